"""HeteroFL (Diao, Ding, Tarokh, ICLR 2021): each client trains a width-sliced sub-model.

Official code dem123456789/HeteroFL @ea528c3 (methods.md 6.5). A client of width ``p`` gets the
first ``ceil(p K)`` channels of every hidden layer of the global model
(``fedsim/learning/slicing.py``),
trains that sub-model with ordinary local SGD, and the server averages every coordinate over
the clients whose sub-model holds it (example-weighted; untouched coordinates keep their value).

Width assignment, our decision for a device fleet (HeteroFL assigns rates by fixed proportions,
``model_split_mode: fix``): a client keeps one width for the whole run, the **largest** of
``widths`` whose job fits its device's memory and, if ``latency_budget_s`` is set, whose latency
under the device's *nominal* capacities (profile compute and bandwidth, no dynamics) fits the
budget; if none fits, the smallest. This is the "assign as large a subnetwork as the full
capacity allows" baseline WHALE-FL argues against (methods.md 3.2). The budget is the
strategy's own estimate; the clock's deadline (``clock.deadline_s``, the scheduler drops updates
later than it) is separate, so the WHALE-FL tables show both "HeteroFL" (budget only: the round
waits for every phone) and "HeteroFL with the same deadline" (``strategy.latency_budget_s=D
clock.deadline_s=D``, the deadline WHALE-FL runs with).

Not implemented (our model has no BatchNorm and every client sees every class): HeteroFL's
static BN, its ``Scaler`` (``x / p`` in training) and the label-split masked loss. With every
width 1 one round equals FedAvg.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedsim import keys
from fedsim.clock.devices import (
    ClientWork,
    DeviceState,
    client_latency,
    fits_in_memory,
    measured_compute_s,
)
from fedsim.clock.server_view import FederationView, slim_layout_of
from fedsim.errors import ConfigError
from fedsim.keys import partition_id_of
from fedsim.learning.params import array_record
from fedsim.learning.slicing import (
    Indices,
    SlimLayout,
    aggregate_sliced,
    layout_indices,
    slice_state,
)
from fedsim.strategies.common import Tensors, to_numpy, to_record

__all__ = ["HeteroFL", "check_widths", "expected_latency_s", "largest_fitting_width"]

#: HeteroFL's model_split_rate {a: 1, b: 1/2, c: 1/4, d: 1/8, e: 1/16} (methods.md 6.5).
DEFAULT_WIDTHS = (1.0, 0.5, 0.25, 0.125, 0.0625)


def check_widths(widths: Any) -> tuple[float, ...]:
    """The width set, largest first; each a number in (0, 1], no repeats."""
    accepted = "must be a non-empty list of distinct numbers in (0, 1]"
    if isinstance(widths, str | bytes) or not isinstance(widths, Sequence) or not widths:
        raise ConfigError("strategy.widths", widths, accepted)
    for w in widths:
        if isinstance(w, bool) or not isinstance(w, int | float) or not 0 < w <= 1:
            raise ConfigError("strategy.widths", list(widths), accepted)
    if len(set(widths)) != len(widths):
        raise ConfigError("strategy.widths", list(widths), accepted)
    return tuple(sorted((float(w) for w in widths), reverse=True))


def expected_latency_s(
    state: DeviceState,
    train_flops: int,
    payload_bytes: int,
    server_flops: int,
    server_gflops: float,
    extra_upload_bytes: float = 0.0,
    compute_s: float | None = None,
) -> float:
    """Download + compute + upload + server seconds of a job, before it runs.

    The model travels both ways (``payload_bytes`` each); the device also uploads
    ``extra_upload_bytes`` (side-tuning's activations: an estimate, they are measured only after
    the round, ``FederationView.observed``). ``compute_s``: the device's measured table's
    seconds (``devices.measured_compute_s``), used instead of the FLOPs if given.
    """
    upload = payload_bytes + round(extra_upload_bytes)
    work = ClientWork(train_flops, payload_bytes, upload, 0, server_flops, compute_s)
    return client_latency(state, work, server_gflops).total_s


def largest_fitting_width(
    widths: Sequence[float],
    fits_memory: Sequence[bool],
    latencies_s: Sequence[float],
    latency_budget_s: float | None,
) -> float:
    """The largest width whose memory (and latency, if budgeted) fits; else the smallest."""
    fitting = [
        w
        for w, fits, lat in zip(widths, fits_memory, latencies_s, strict=True)
        if fits and (latency_budget_s is None or lat <= latency_budget_s)
    ]
    return max(fitting) if fitting else min(widths)


class HeteroFL(FedAvg):
    """FedAvg over width-sliced sub-models, one fixed width per client.

    Parameters
    ----------
    widths
        The sub-model widths a client may get (HeteroFL's rates).
    latency_budget_s
        A client's width must finish a round within this many simulated seconds at its
        device's nominal capacities (null: memory is the only limit).
    **fedavg_kwargs
        Flower FedAvg's arguments (sampling fractions, minimum nodes, ...).

    """

    #: What ``bind(view)`` sets, built again on resume (the checkpoint keeps the rest).
    REBUILT_ON_RESUME = ("view", "layout")

    def __init__(
        self,
        *,
        widths: Sequence[float] = DEFAULT_WIDTHS,
        latency_budget_s: float | None = None,
        **fedavg_kwargs: Any,
    ) -> None:
        super().__init__(**fedavg_kwargs)
        self.widths = check_widths(widths)
        if latency_budget_s is not None and (
            isinstance(latency_budget_s, bool)
            or not isinstance(latency_budget_s, int | float)
            or not latency_budget_s > 0
        ):
            raise ConfigError("strategy.latency_budget_s", latency_budget_s, "must be null or > 0")
        self.latency_budget_s = latency_budget_s
        self.view: FederationView | None = None
        self.layout: SlimLayout | None = None
        self.current: Tensors | None = None  # the global tensors sliced this round
        self.assigned: dict[int, Indices] = {}  # partition id -> indices it trains this round
        # The view's ObservationLog state (what the server measured): kept here so that it is
        # checkpointed with the strategy; bind() takes a resumed run's back.
        self.observed: dict[str, Any] = {}
        self._fixed: dict[int, tuple[float, float]] = {}  # pid -> (width, nominal latency s)

    # ------------------------------------------------------------------ hooks for subclasses
    def bind(self, view: FederationView) -> None:
        """Injected by ``Federation.build``: what the server knows of the fleet, the cost model."""
        self.view = view
        self.layout = view.slim_layout()
        view.observations.restore(self.observed)  # a resumed run: what it had measured
        self.observed = view.observations.state()  # the log's own containers, checkpointed

    def check_model(self, model: torch.nn.Module) -> None:
        """Before the run folder is claimed: the model must have width axes (ConfigError)."""
        slim_layout_of(model)

    def assign_widths(
        self, partition_ids: Sequence[int], server_round: int
    ) -> dict[int, tuple[float, dict[str, float]]]:
        """Per sampled client: its width and the fields its clients.jsonl row logs."""
        out = {}
        for pid in partition_ids:
            if pid not in self._fixed:
                self._fixed[pid] = self._nominal_width(pid)
            width, latency_s = self._fixed[pid]
            out[pid] = (width, {"width": width, "latency_est_s": latency_s})
        return out

    def indices_for(self, width: float, server_round: int) -> Indices:
        """Which channels a width trains: HeteroFL's prefix of every axis."""
        return layout_indices(self._layout(), width)

    def on_aggregate(
        self, updates: Sequence[tuple[Mapping[str, np.ndarray], Indices, float]]
    ) -> None:
        """Called with the round's updates before they are merged (WHALE-FL's training status)."""

    # ------------------------------------------------------------------ Flower hooks
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """FedAvg's sampling; each client gets a fresh content: its slice and its width."""
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self.current = to_numpy(arrays)
        pids = [partition_id_of(m.metadata.dst_node_id) for m in messages]
        widths = self.assign_widths(pids, server_round)
        self.assigned = {}
        sliced: dict[float, tuple[Indices, ArrayRecord]] = {}  # same width, same record
        for message, pid in zip(messages, pids, strict=True):
            width, fields = widths[pid]
            if width not in sliced:
                indices = self.indices_for(width, server_round)
                sliced[width] = (
                    indices,
                    to_record(slice_state(self.current, self._layout(), indices)),
                )
            indices, record = sliced[width]
            self.assigned[pid] = indices
            shared = message.content
            shared_config = shared[self.configrecord_key]
            assert isinstance(shared_config, ConfigRecord)  # FedAvg's train config
            own = ConfigRecord(dict(shared_config))
            own[keys.WIDTH] = width
            for name, value in fields.items():
                own[f"{keys.LOG_PREFIX}{name}"] = float(value)
            content = RecordDict({self.arrayrecord_key: record, self.configrecord_key: own})
            for name, other in shared.items():  # anything else the shared content carried
                if name not in (self.arrayrecord_key, self.configrecord_key):
                    content[name] = other
            message.content = content
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Coordinate-wise example-weighted mean over the clients that trained each coordinate."""
        valid = [r for r in replies if not r.has_error()]
        if not valid or self.current is None:
            return None, None
        updates = []
        for reply in valid:
            pid = partition_id_of(reply.metadata.src_node_id)
            metrics = reply.content[keys.METRICS]
            assert isinstance(metrics, MetricRecord)  # the reply's metrics
            num_examples = float(keys.number(metrics, self.weighted_by_key))
            sub = to_numpy(array_record(reply.content, self.arrayrecord_key))
            updates.append((sub, self.assigned[pid], num_examples))
        self.on_aggregate(updates)
        merged = aggregate_sliced(self.current, updates, self._layout())
        metrics = self.train_metrics_aggr_fn([r.content for r in valid], self.weighted_by_key)
        return to_record(merged), metrics

    # ------------------------------------------------------------------ helpers
    def _view(self) -> FederationView:
        if self.view is None:
            raise RuntimeError(f"{type(self).__name__} needs bind(view) before the first round")
        return self.view

    def _layout(self) -> SlimLayout:
        self._view()
        assert self.layout is not None
        return self.layout

    def expected_latency(
        self, pid: int, width: float, state: DeviceState, extra_upload_bytes: float = 0.0
    ) -> float:
        """Seconds the client's job at ``width`` would take under ``state``."""
        view = self._view()
        cost = view.cost(pid, width)
        return expected_latency_s(
            state,
            cost.train_flops,
            view.payload_bytes(width),
            cost.server_flops,
            view.server_gflops,
            extra_upload_bytes,
            measured_compute_s(
                view.profiles[pid], width, cost.train_examples, state.compute_gflops
            ),
        )

    def compute_s(self, pid: int, width: float, state: DeviceState) -> float:
        """Compute seconds of the job at ``width`` under ``state``, as the clock charges them.

        The device's measured seconds-per-example table when its profile has one (the
        WHALE-FL testbed, conf/devices/whale_testbed.yaml), else FLOPs over the compute rate.
        """
        view = self._view()
        cost = view.cost(pid, width)
        measured = measured_compute_s(
            view.profiles[pid], width, cost.train_examples, state.compute_gflops
        )
        work = ClientWork(cost.train_flops, 0, 0, 0, compute_s=measured)
        return client_latency(state, work, view.server_gflops).compute_s

    def extra_upload_estimate(self, pid: int, server_round: int, width: float) -> float:
        """Bytes the device will send besides its tensors in ``server_round`` (activations).

        Its own last measurement; never measured: the fleet's bytes per device FLOP measured so
        far times its job's FLOPs (0 before any measurement).
        """
        view = self._view()
        sent = view.observed(pid, server_round).extra_upload_bytes
        if sent is not None:
            return sent
        return view.extra_upload_bytes_per_flop(server_round) * view.cost(pid, width).train_flops

    def fits_memory(self, pid: int, width: float) -> bool:
        """Whether the job at ``width`` fits the device's memory (the scheduler's own test)."""
        view = self._view()
        work = ClientWork(0, 0, 0, view.cost(pid, width).peak_memory_bytes)
        return fits_in_memory(view.profiles[pid], work)

    def _nominal_width(self, pid: int) -> tuple[float, float]:
        view = self._view()
        profile = view.profiles[pid]
        nominal = DeviceState(
            True, profile.train_gflops, profile.uplink_mbps, profile.downlink_mbps, True
        )
        latencies = [self.expected_latency(pid, w, nominal) for w in self.widths]
        fits = [self.fits_memory(pid, w) for w in self.widths]
        width = largest_fitting_width(self.widths, fits, latencies, self.latency_budget_s)
        return width, latencies[self.widths.index(width)]
