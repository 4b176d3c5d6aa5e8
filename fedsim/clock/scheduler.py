"""A synchronous round as a fleet of devices would live it: who is online, who fits, who is late.

Before sending, offline devices (per-round availability draw) and devices whose memory cannot hold
the client's training job are set aside. After the replies come back, each trained client's
latency = download + compute + upload (+ server time a method offloads) is computed from the
*actual* payload bytes and the FLOPs the cost model counted, under that round's conditions; a
deadline and over-selection decide whose update the strategy aggregates, and the simulated clock
advances by the round's length. The numbers come from fedsim/clock/devices.py (pure functions).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from flwr.app import Message, RecordDict

from fedsim import keys
from fedsim.clock.devices import (
    ClientWork,
    DeviceAssignment,
    Fleet,
    SimClock,
    client_energy_j,
    client_latency,
    fits_in_memory,
    synchronous_round,
)
from fedsim.errors import ConfigError
from fedsim.keys import partition_id_of
from fedsim.learning.params import content_nbytes

__all__ = [
    "RoundScheduler",
    "DeviceCost",
    "RoundPlan",
    "RoundSettlement",
    "CostModel",
    "device_link_bytes",
]

OK, STRAGGLER, OFFLINE, INFEASIBLE, FAILED = "ok", "straggler", "offline", "infeasible", "failed"


@dataclass(frozen=True)
class DeviceCost:
    """A client-round's work as the cost model counts it (before bytes are known)."""

    train_flops: int  # FLOPs the device executes this round
    peak_memory_bytes: int  # peak training memory of the device-side job
    server_flops: int = 0  # FLOPs a method offloads to the server (side-tuning)
    # The trained model lives on the server (MobiLLM's side network): the worker that trains it
    # plays the server, so the tensors of its messages never cross the device's radio. The
    # device's link then carries only what the client reports (``extra_upload_bytes``).
    model_on_server: bool = False
    # Bytes each device downloads once after the last round (the tuned model, for on-device
    # inference); 0 = none. Charged at the end of the run, never per round.
    final_download_bytes: int = 0


class CostModel(Protocol):
    """What a client behaviour tells the scheduler about its device-side work."""

    def device_cost(
        self, model: torch.nn.Module, batch: dict[str, torch.Tensor], num_examples: int
    ) -> DeviceCost:
        """Cost of one client-round on ``num_examples`` examples; ``batch`` is a full batch."""
        ...


@dataclass
class RoundPlan:
    """Which sampled clients are sent work, and the records of those set aside."""

    to_send: list[Message]
    records: dict[int, dict[str, Any]]  # partition id -> clients.jsonl row so far


@dataclass
class RoundSettlement:
    """The round after the replies: updates to aggregate, timing and per-client rows."""

    kept: list[Message]
    round_time_s: float
    records: list[dict[str, Any]]
    counts: dict[str, int] = field(default_factory=dict)
    energy_j: float = 0.0


def device_link_bytes(content: RecordDict, cost: DeviceCost) -> int:
    """Bytes of a message's tensors on the device's link (0: the model stays on the server)."""
    return 0 if cost.model_on_server else content_nbytes(content)


def _extra_upload_bytes(reply: Message) -> int:
    """Bytes the device uploaded besides its tensors (e.g. activations), as it reported them."""
    metrics = reply.content.get(keys.METRICS)
    if metrics is None:
        return 0
    return int(keys.number(metrics, keys.EXTRA_UPLOAD_BYTES, 0))


class RoundScheduler:
    """Applies a device fleet and a synchronous clock to the rounds of one run.

    Parameters
    ----------
    fleet
        The device fleet (``conf/devices``).
    seed
        Run seed: device assignment and per-round conditions derive from it.
    num_clients
        Number of simulated devices.
    deadline_s
        Round deadline in simulated seconds; later updates are dropped (null = wait for all).
    over_selection
        FedScale-style over-selection factor: of the n clients sent work, the first
        ``ceil(n / over_selection)`` to finish are kept (1.0 = keep all).

    """

    def __init__(
        self,
        fleet: Fleet,
        seed: int,
        num_clients: int,
        deadline_s: float | None = None,
        over_selection: float = 1.0,
    ) -> None:
        if deadline_s is not None and not (isinstance(deadline_s, int | float) and deadline_s > 0):
            raise ConfigError("clock.deadline_s", deadline_s, "must be null or a number > 0")
        if not (isinstance(over_selection, int | float) and over_selection >= 1.0):
            raise ConfigError("clock.over_selection", over_selection, "must be a number >= 1")
        self.fleet = fleet
        self.seed = seed
        # Drawn per client when asked for: a population of millions costs no list of them.
        self.profiles: DeviceAssignment = fleet.assignment(num_clients, seed)
        self.deadline_s = deadline_s
        self.over_selection = float(over_selection)
        self.clock = SimClock()
        # Called with a settled round's rows (fedsim/clock/server_view.py ObservationLog.record:
        # what the server measured, for the strategies' view of later rounds).
        self.observers: list[Callable[[Sequence[dict[str, Any]]], None]] = []

    def plan(
        self, server_round: int, messages: Sequence[Message], costs: dict[int, DeviceCost]
    ) -> RoundPlan:
        """Set aside offline and infeasible devices; the rest are sent their messages."""
        to_send, records = [], {}
        for msg in messages:
            pid = partition_id_of(msg.metadata.dst_node_id)
            profile = self.profiles[pid]
            state = self.fleet.conditions(profile, self.seed, pid, server_round)
            cost = costs[pid]
            row: dict[str, Any] = {
                keys.ROUND: server_round,
                "partition_id": pid,
                "device": profile.name,
                "tier": profile.tier,
                "channel_good": state.channel_good,
                "compute_gflops": state.compute_gflops,
                "uplink_mbps": state.uplink_mbps,
                "downlink_mbps": state.downlink_mbps,
                "train_flops": cost.train_flops,
                "peak_memory_bytes": cost.peak_memory_bytes,
                "bytes_down": device_link_bytes(msg.content, cost),
            }
            config = msg.content.get(keys.CONFIG)
            for name, value in config.items() if config is not None else ():
                if name.startswith(keys.LOG_PREFIX):  # a strategy's per-client log fields
                    row.setdefault(name[len(keys.LOG_PREFIX) :], value)
            work = ClientWork(cost.train_flops, row["bytes_down"], 0, cost.peak_memory_bytes)
            if not state.online:
                row["outcome"] = OFFLINE
            elif not fits_in_memory(profile, work):
                row["outcome"] = INFEASIBLE
            else:
                to_send.append(msg)
            records[pid] = row | {"_state": state}
        return RoundPlan(to_send, records)

    def measure(self, row: dict[str, Any], reply: Message, cost: DeviceCost) -> float | None:
        """Fill ``row`` (a :meth:`plan` record) from the client's reply; its latency in seconds.

        Latency = download + compute + upload (+ offloaded server time) from the real payload
        bytes and the counted FLOPs under the conditions drawn in :meth:`plan`. A failed reply
        gets outcome ``failed`` and its reason, and no latency (None).
        """
        if reply.has_error():
            row["outcome"] = FAILED
            assert reply.error.reason is not None  # VirtualGrid's errors all give one
            row["error"] = " ".join(reply.error.reason.split())[:300]
            return None
        pid = row["partition_id"]
        work = ClientWork(
            train_flops=cost.train_flops,
            bytes_down=row["bytes_down"],
            bytes_up=device_link_bytes(reply.content, cost) + _extra_upload_bytes(reply),
            peak_memory_bytes=cost.peak_memory_bytes,
            server_flops=cost.server_flops,
        )
        latency = client_latency(row["_state"], work, self.fleet.server_gflops)
        row.update(
            bytes_up=work.bytes_up,
            extra_upload_bytes=_extra_upload_bytes(reply),
            latency_s=latency.total_s,
            download_s=latency.download_s,
            compute_s=latency.compute_s,
            upload_s=latency.upload_s,
            server_s=latency.server_s,
            energy_j=client_energy_j(self.profiles[pid], latency),
        )
        metrics = reply.content.get(keys.METRICS)
        for name, value in metrics.items() if metrics is not None else ():
            if name.startswith(keys.LOG_PREFIX):  # a client's own log fields (e.g. DFL's beta)
                row.setdefault(name[len(keys.LOG_PREFIX) :], value)
        return latency.total_s

    def settle(
        self,
        plan: RoundPlan,
        replies: Sequence[Message],
        costs: dict[int, DeviceCost],
        server_time_s: float = 0.0,
    ) -> RoundSettlement:
        """Latency per trained client, the round's deadline / over-selection, the clock."""
        latencies, by_pid = {}, {}
        for reply in replies:
            pid = partition_id_of(reply.metadata.src_node_id)
            latency = self.measure(plan.records[pid], reply, costs[pid])
            if latency is not None:
                latencies[pid], by_pid[pid] = latency, reply
        target = math.ceil(len(latencies) / self.over_selection) if latencies else None
        timing = synchronous_round(
            latencies,
            deadline_s=self.deadline_s,
            target_count=target if self.over_selection > 1.0 else None,
            server_time_s=server_time_s,
        )
        kept = set(timing.kept)
        for pid in latencies:
            plan.records[pid]["outcome"] = OK if pid in kept else STRAGGLER
        self.clock.advance(timing.round_time_s)
        rows = [{k: v for k, v in row.items() if k != "_state"} for row in plan.records.values()]
        outcomes = (OK, STRAGGLER, OFFLINE, INFEASIBLE, FAILED)
        counts = {o: sum(r["outcome"] == o for r in rows) for o in outcomes}
        for observe in self.observers:
            observe(rows)
        return RoundSettlement(
            kept=[by_pid[pid] for pid in sorted(kept)],
            round_time_s=timing.round_time_s,
            records=sorted(rows, key=lambda r: r["partition_id"]),
            counts=counts,
            energy_j=sum(r.get("energy_j", 0.0) for r in rows),
        )
