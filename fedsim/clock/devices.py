"""Simulated devices: profiles, fleet assignment, per-round conditions, cost model, clock.

Everything here is a pure function of numbers and seeds; the engine calls it. Units are SI with
decimal prefixes throughout: bytes, FLOPs, seconds, joules, watts, Mbps = 1e6 bit/s,
GFLOPS = 1e9 FLOP/s, GB = 1e9 bytes. A client's round costs (FedScale-style cost model, see
SymbioticLab/FedScale ``fedscale/cloud/internal/client_metadata.py``, but with FLOPs *counted* on
the real model instead of FedScale's "3 x forward" factor)::

    download_s = bytes_down * 8 / (downlink_mbps * 1e6)
    compute_s  = train_flops / (compute_gflops * 1e9)
    upload_s   = bytes_up * 8 / (uplink_mbps * 1e6)
    server_s   = server_flops / (server_gflops * 1e9)
    total_s    = download_s + compute_s + upload_s + server_s
"""

from __future__ import annotations

import contextlib
import functools
import math
import operator
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Protocol, overload, runtime_checkable

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from fedsim.checks import require_number
from fedsim.clock.phones import PhoneModel
from fedsim.config import CONF_DIR
from fedsim.errors import ConfigError
from fedsim.seeding import numpy_rng

__all__ = [
    "DeviceEffect",
    "DeviceProfile",
    "DeviceState",
    "DeviceAssignment",
    "Dynamics",
    "Fleet",
    "MemoryEstimate",
    "ClientWork",
    "Latency",
    "RoundTiming",
    "SimClock",
    "count_train_flops",
    "count_forward_flops",
    "estimate_train_memory_bytes",
    "client_latency",
    "client_energy_j",
    "fits_in_memory",
    "measured_compute_s",
    "synchronous_round",
]

# Shares are probabilities; this only absorbs YAML rounding (e.g. 0.3 + 0.5 + 0.2).
_SHARE_SUM_TOLERANCE = 1e-6
_BITS_PER_BYTE = 8
_MEGA = 1e6
_GIGA = 1e9
# Optimizer states kept per trainable parameter (same dtype as the parameter):
# Adam/AdamW keep exp_avg and exp_avg_sq; SGD keeps a momentum buffer only if momentum > 0.
_ADAM_STATES_PER_PARAM = 2
_MOMENTUM_STATES_PER_PARAM = 1


# --------------------------------------------------------------------------- profiles and fleet
@dataclass(frozen=True)
class DeviceProfile:
    """Nominal capacities of one kind of device (a row of ``conf/devices/<fleet>.yaml``).

    Radio power is split into transmit and receive because uplink costs several times more
    energy per second than downlink on cellular radios (Huang et al., MobiSys 2012).
    """

    name: str
    tier: str  # "low" / "mid" / "high": a label for metrics, never branched on
    train_gflops: float  # sustained fp32 training throughput, GFLOP/s
    memory_gb: float  # memory a training app may use, GB (1e9 bytes)
    uplink_mbps: float  # median uplink throughput, Mbit/s
    downlink_mbps: float  # median downlink throughput, Mbit/s
    availability: float  # probability of being online in a round, (0, 1]
    compute_power_w: float  # SoC power while training, W
    radio_tx_power_w: float  # device power while uploading, W
    radio_rx_power_w: float  # device power while downloading, W
    # Optional: measured seconds of training per example, by sub-model width, as (width,
    # seconds) pairs (YAML: a list of [width, seconds]). When set, the clock charges a job that
    # reports its examples (``DeviceCost.train_examples``) these seconds instead of its FLOPs
    # over ``train_gflops`` (``measured_compute_s``). Empty: the FLOPs rule.
    train_s_per_example: tuple[tuple[float, float], ...] = ()

    def measured_s_per_example(self, width: float) -> float | None:
        """The table's seconds per example at ``width``; None without a table.

        Widths not in the table are refused (ConfigError): a measured table is used as
        measured, never interpolated (our decision; the width sets of HeteroFL and WHALE-FL
        are the table's widths).
        """
        if not self.train_s_per_example:
            return None
        for measured_width, seconds in self.train_s_per_example:
            if math.isclose(measured_width, width, rel_tol=1e-9, abs_tol=0.0):
                return seconds
        raise ConfigError(
            f"devices.profiles[{self.name}].train_s_per_example",
            f"width {width:g}",
            f"has no measurement; measured widths: {[w for w, _ in self.train_s_per_example]}",
        )


@dataclass(frozen=True)
class Dynamics:
    """Round-to-round variation of a device around its profile.

    Compute and bandwidth are multiplied by ``exp(sigma * z)``, ``z ~ N(0, 1)``: a log-normal
    factor with **median 1** (median-preserving; the mean is ``exp(sigma**2 / 2)``). One bandwidth
    factor scales uplink and downlink together (same radio channel). A two-state Gilbert-Elliott
    channel (good/bad) further multiplies bandwidth by ``bad_bandwidth_factor`` in the bad state;
    ``p_good_to_bad = 0`` disables it.
    """

    compute_sigma: float
    bandwidth_sigma: float
    p_good_to_bad: float
    p_bad_to_good: float
    bad_bandwidth_factor: float


@dataclass(frozen=True)
class DeviceState:
    """What one device can do in one round."""

    online: bool
    compute_gflops: float
    uplink_mbps: float
    downlink_mbps: float
    channel_good: bool


#: Profile keys a YAML may leave out (their defaults keep the fleet as it was).
_OPTIONAL_PROFILE_KEYS = ("train_s_per_example",)


def _measured_table(key: str, raw: Any) -> tuple[tuple[float, float], ...]:
    """A list of [width, seconds] pairs: widths in (0, 1] without repeats, seconds > 0."""
    accepted = "must be a list of [width, seconds] pairs, width in (0, 1] (distinct), seconds > 0"
    if isinstance(raw, str | bytes) or not isinstance(raw, Sequence) or not raw:
        raise ConfigError(key, raw, accepted)
    table = []
    for pair in raw:
        if isinstance(pair, str | bytes) or not isinstance(pair, Sequence) or len(pair) != 2:
            raise ConfigError(key, pair, accepted)
        width = require_number(key, pair[0], low=0.0, low_inclusive=False, high=1.0)
        seconds = require_number(key, pair[1], low=0.0, low_inclusive=False)
        table.append((width, seconds))
    if len({w for w, _ in table}) != len(table):
        raise ConfigError(key, [list(p) for p in table], accepted)
    return tuple(sorted(table, reverse=True))


def _profile_from_dict(index: int, raw: Any) -> DeviceProfile:
    key = f"devices.profiles[{index}]"
    names = [f.name for f in fields(DeviceProfile)]
    required = [n for n in names if n not in _OPTIONAL_PROFILE_KEYS]
    if not isinstance(raw, Mapping) or not set(required) <= set(raw) <= set(names):
        got = sorted(raw) if isinstance(raw, Mapping) else raw
        raise ConfigError(
            key,
            got,
            f"must be a mapping with the keys {required} (optional: "
            f"{list(_OPTIONAL_PROFILE_KEYS)})",
        )
    for text_key in ("name", "tier"):
        if not isinstance(raw[text_key], str) or not raw[text_key]:
            raise ConfigError(f"{key}.{text_key}", raw[text_key], "must be a non-empty string")
    positive = ("train_gflops", "memory_gb", "uplink_mbps", "downlink_mbps")
    power = ("compute_power_w", "radio_tx_power_w", "radio_rx_power_w")
    values: dict[str, Any] = {"name": raw["name"], "tier": raw["tier"]}
    for name in positive:
        values[name] = require_number(f"{key}.{name}", raw[name], low=0.0, low_inclusive=False)
    for name in power:
        values[name] = require_number(f"{key}.{name}", raw[name], low=0.0, low_inclusive=True)
    values["availability"] = require_number(
        f"{key}.availability", raw["availability"], low=0.0, low_inclusive=False, high=1.0
    )
    if "train_s_per_example" in raw:
        values["train_s_per_example"] = _measured_table(
            f"{key}.train_s_per_example", raw["train_s_per_example"]
        )
    return DeviceProfile(**values)


def _dynamics_from_dict(raw: Any) -> Dynamics:
    names = [f.name for f in fields(Dynamics)]
    if not isinstance(raw, Mapping) or set(raw) != set(names):
        got = sorted(raw) if isinstance(raw, Mapping) else raw
        raise ConfigError("devices.dynamics", got, f"must be a mapping with exactly {names}")
    key = "devices.dynamics."
    return Dynamics(
        compute_sigma=require_number(
            key + "compute_sigma", raw["compute_sigma"], low=0.0, low_inclusive=True
        ),
        bandwidth_sigma=require_number(
            key + "bandwidth_sigma", raw["bandwidth_sigma"], low=0.0, low_inclusive=True
        ),
        p_good_to_bad=require_number(
            key + "p_good_to_bad", raw["p_good_to_bad"], low=0.0, low_inclusive=True, high=1.0
        ),
        p_bad_to_good=require_number(
            key + "p_bad_to_good", raw["p_bad_to_good"], low=0.0, low_inclusive=True, high=1.0
        ),
        bad_bandwidth_factor=require_number(
            key + "bad_bandwidth_factor",
            raw["bad_bandwidth_factor"],
            low=0.0,
            low_inclusive=False,
            high=1.0,
        ),
    )


@dataclass
class _ChannelTrace:
    """One client's Markov channel, simulated from round 1 and extended on demand."""

    rng: np.random.Generator
    good: bytearray  # good[r - 1] == 1 iff the channel is good in round r


@runtime_checkable
class DeviceEffect(Protocol):
    """Something of a device's life that can keep it from a round: ARCHITECTURE.md's recipe.

    A fleet lists its effects under ``effects:`` in ``conf/devices/<fleet>.yaml``, each with its
    ``_target_`` and arguments. Before a round, every device that is online and passed the
    phones' check-in (``fedsim/clock/phones.py``) asks each effect in turn; the first reason
    given sets the device aside as ``offline`` with that ``offline_reason`` in clients.jsonl,
    as a real server sees a device that does not check in. An effect draws its randomness from
    ``fedsim.seeding.numpy_rng(seed, <its name>, client, round)``, so a run is reproducible
    and one effect's draws never shift another's.
    """

    def check_in(
        self, seed: int, partition_id: int, server_round: int, now_s: float, profile: DeviceProfile
    ) -> str | None:
        """None to let the device take the round, or why it does not (a short word)."""


class Fleet:
    """A population of device profiles with shares and dynamics (Hydra target of conf/devices).

    Parameters
    ----------
    profiles
        One mapping per device kind, with exactly the fields of :class:`DeviceProfile`.
    shares
        Fraction of clients of each kind, same order as ``profiles``; must sum to 1.
    dynamics
        Mapping with exactly the fields of :class:`Dynamics`.
    server_gflops
        Sustained throughput of the server for work a method offloads to it, GFLOP/s.
    availability, battery, interruptions
        Optional: the failures phones have (``fedsim/clock/phones.py``: when devices are
        plugged in and on Wi-Fi, their battery, drop-outs by phase). All absent (the default):
        none of it, and every number is what it was without these keys.
    effects
        Optional: :class:`DeviceEffect` objects (Hydra builds them from their ``_target_``),
        asked in order whether a device checks in. Empty (the default): nothing changes.

    """

    def __init__(
        self,
        *,
        profiles: Sequence[Mapping[str, Any]],
        shares: Sequence[float],
        dynamics: Mapping[str, float],
        server_gflops: float,
        availability: Mapping[str, Any] | None = None,
        battery: Mapping[str, Any] | None = None,
        interruptions: Mapping[str, float] | None = None,
        effects: Sequence[Any] = (),
    ) -> None:
        if isinstance(profiles, str | bytes) or not isinstance(profiles, Sequence) or not profiles:
            raise ConfigError("devices.profiles", profiles, "must be a non-empty list of mappings")
        self.profiles = tuple(_profile_from_dict(i, p) for i, p in enumerate(profiles))
        if (
            isinstance(shares, str | bytes)
            or not isinstance(shares, Sequence)
            or len(shares) != len(self.profiles)
        ):
            raise ConfigError(
                "devices.shares",
                shares,
                f"must be a list of {len(self.profiles)} numbers, one per profile",
            )
        self.shares = tuple(
            require_number(f"devices.shares[{i}]", s, low=0.0, low_inclusive=True)
            for i, s in enumerate(shares)
        )
        if abs(sum(self.shares) - 1.0) > _SHARE_SUM_TOLERANCE:
            raise ConfigError("devices.shares", list(shares), "must sum to 1")
        self.dynamics = _dynamics_from_dict(dynamics)
        self.server_gflops = require_number(
            "devices.server_gflops", server_gflops, low=0.0, low_inclusive=False
        )
        cumulative = np.cumsum(self.shares)
        cumulative[-1] = 1.0  # the last bin catches u in [sum - eps, 1)
        self._cumulative_shares = cumulative
        self._channels: dict[tuple[int, int], _ChannelTrace] = {}
        # None unless the YAML sets one of the three keys: then nothing below changes.
        self.phones = PhoneModel.from_config(availability, battery, interruptions, CONF_DIR)
        if isinstance(effects, str | bytes | Mapping) or not isinstance(effects, Sequence):
            raise ConfigError("devices.effects", effects, "must be a list of effects")
        for i, effect in enumerate(effects):
            if not isinstance(effect, DeviceEffect):
                raise ConfigError(
                    f"devices.effects[{i}]",
                    effect,
                    "must be built from a _target_ whose class has check_in(seed, "
                    "partition_id, server_round, now_s, profile) -> str | None "
                    "(fedsim.clock.devices.DeviceEffect)",
                )
        self.effects: tuple[DeviceEffect, ...] = tuple(effects)

    # -- assignment: client i's device depends only on (seed, i) ------------------------------
    def device_for(self, partition_id: int, seed: int) -> DeviceProfile:
        """Profile of client ``partition_id``: one uniform draw from its own named stream."""
        u = numpy_rng(seed, "device", int(partition_id)).random()
        index = int(np.searchsorted(self._cumulative_shares, u, side="right"))
        return self.profiles[min(index, len(self.profiles) - 1)]

    def assign(self, num_clients: int, seed: int) -> list[DeviceProfile]:
        """Profiles of clients ``0 .. num_clients - 1``; client i's is the same for any count."""
        if num_clients < 0:
            raise ValueError(f"num_clients must be >= 0, got {num_clients}")
        return [self.device_for(i, seed) for i in range(num_clients)]

    def assignment(self, num_clients: int, seed: int) -> DeviceAssignment:
        """:meth:`assign`'s profiles, each drawn when asked for: memory O(clients asked)."""
        return DeviceAssignment(self, num_clients, seed)

    # -- per-round conditions ------------------------------------------------------------------
    def conditions(
        self, profile: DeviceProfile, seed: int, partition_id: int, server_round: int
    ) -> DeviceState:
        """Online flag, compute and bandwidth of one client in one round (rounds start at 1).

        Draws come from the stream named ``(seed, "conditions", partition_id, server_round)`` in
        a fixed order (online, compute, bandwidth), so they do not depend on which other
        clients or rounds were evaluated before. Rounds -1, -2, ... are the visits of a stage
        before round 1 (fedsim/rounds/warm_start.py): their channel state is drawn from the chain's
        stationary law on its own stream, leaving the rounds' chain as it is without the stage.
        """
        if server_round == 0:
            raise ValueError("server_round must be >= 1 (or < 0 for a stage before round 1)")
        rng = numpy_rng(seed, "conditions", int(partition_id), int(server_round))
        u_online = rng.random()
        z_compute, z_bandwidth = rng.standard_normal(2)
        dyn = self.dynamics
        if server_round > 0:
            good = self._channel_good(seed, int(partition_id), int(server_round))
        else:
            p_bad = dyn.p_good_to_bad / max(dyn.p_good_to_bad + dyn.p_bad_to_good, 1e-300)
            u = numpy_rng(seed, "channel", int(partition_id), int(server_round)).random()
            good = dyn.p_good_to_bad == 0.0 or u >= p_bad
        bandwidth_factor = math.exp(dyn.bandwidth_sigma * z_bandwidth)
        if not good:
            bandwidth_factor *= dyn.bad_bandwidth_factor
        return DeviceState(
            online=bool(u_online < profile.availability),
            compute_gflops=profile.train_gflops * math.exp(dyn.compute_sigma * z_compute),
            uplink_mbps=profile.uplink_mbps * bandwidth_factor,
            downlink_mbps=profile.downlink_mbps * bandwidth_factor,
            channel_good=good,
        )

    def _channel_good(self, seed: int, partition_id: int, server_round: int) -> bool:
        """State of the client's Gilbert-Elliott channel in ``server_round`` (cached, O(1) am.).

        Round 1 is drawn from the stationary law, P(bad) = p_good_to_bad / (p_good_to_bad +
        p_bad_to_good), then the chain steps once per round on the client's own stream
        ``(seed, "channel", partition_id)``.
        """
        dyn = self.dynamics
        if dyn.p_good_to_bad == 0.0:
            return True  # chain disabled: always good
        trace = self._channels.get((seed, partition_id))
        if trace is None:
            rng = numpy_rng(seed, "channel", partition_id)
            p_bad = dyn.p_good_to_bad / (dyn.p_good_to_bad + dyn.p_bad_to_good)
            trace = _ChannelTrace(rng=rng, good=bytearray([rng.random() >= p_bad]))
            self._channels[(seed, partition_id)] = trace
        while len(trace.good) < server_round:
            u = trace.rng.random()
            was_good = trace.good[-1]
            trace.good.append(u >= dyn.p_good_to_bad if was_good else u < dyn.p_bad_to_good)
        return bool(trace.good[server_round - 1])


class DeviceAssignment(Sequence[DeviceProfile]):
    """The profile of every client of a population, drawn on demand (``Fleet.device_for``).

    Equal, client by client, to ``fleet.assign(num_clients, seed)``, but a population of
    1,000,000 costs no list of 1,000,000 profiles and no 1,000,000 draws before round 1. The
    last ``cache_size`` answers are kept (a round asks for its clients several times).
    ``assignment[pid] = profile`` pins one client's profile (tests, what-if studies).
    """

    def __init__(self, fleet: Fleet, num_clients: int, seed: int, cache_size: int = 4096) -> None:
        if num_clients < 0:
            raise ValueError(f"num_clients must be >= 0, got {num_clients}")
        self._num_clients = num_clients
        self._pinned: dict[int, DeviceProfile] = {}
        self._draw = functools.lru_cache(maxsize=cache_size)(
            lambda pid: fleet.device_for(pid, seed)
        )

    def __len__(self) -> int:
        return self._num_clients

    def _index(self, pid: int) -> int:
        index = operator.index(pid)
        index += self._num_clients if index < 0 else 0
        if not 0 <= index < self._num_clients:
            raise IndexError(f"client {pid} of {self._num_clients}")
        return index

    @overload
    def __getitem__(self, pid: int) -> DeviceProfile: ...

    @overload
    def __getitem__(self, pid: slice) -> list[DeviceProfile]: ...

    def __getitem__(self, pid: int | slice) -> DeviceProfile | list[DeviceProfile]:
        if isinstance(pid, slice):
            return [self[i] for i in range(*pid.indices(self._num_clients))]
        index = self._index(pid)
        pinned = self._pinned.get(index)
        return pinned if pinned is not None else self._draw(index)

    def __setitem__(self, pid: int, profile: DeviceProfile) -> None:
        self._pinned[self._index(pid)] = profile


# ------------------------------------------------------------------------------- cost model
def _logits(output: Any) -> torch.Tensor:
    """Logits of a plain module (a Tensor) or of a Hugging Face model (``output.logits``)."""
    return output if isinstance(output, torch.Tensor) else output.logits


@contextlib.contextmanager
def _buffers_restored(model: nn.Module) -> Iterator[None]:
    """Undo buffer updates a measuring forward makes (e.g. BatchNorm running statistics)."""
    saved = [(buffer, buffer.detach().clone()) for buffer in model.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)


def _training_loss(
    model: nn.Module, inputs: Mapping[str, torch.Tensor], labels: torch.Tensor
) -> torch.Tensor:
    """Mean cross-entropy of one batch; (N, C) or (N, T, C) logits, ignore_index = -100."""
    logits = _logits(model(**inputs))
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))


_FLOPS_MEMO: dict[tuple, int] = {}
_PLAIN = (bool, int, float, str, type(None))


def _shape_key(
    model: nn.Module, inputs: Mapping[str, torch.Tensor], labels: torch.Tensor | None
) -> tuple:
    """What a FLOP count depends on: the module tree, its settings, and the tensor shapes.

    ``repr`` gives the tree and each layer's hyper-parameters; plain attributes (flags such as
    a pivot-token switch that steer ``forward``) and every parameter's shape and trainability
    are added because ``repr`` need not show them.
    """
    settings = tuple(
        (
            name,
            type(module).__qualname__,
            tuple(
                sorted(
                    (k, v)
                    for k, v in vars(module).items()
                    if isinstance(v, _PLAIN) and not k.startswith("_")
                )
            ),
        )
        for name, module in model.named_modules()
    )
    params = tuple(
        (n, tuple(p.shape), p.dtype, p.requires_grad) for n, p in model.named_parameters()
    )
    tensors = tuple((k, tuple(v.shape), v.dtype) for k, v in sorted(inputs.items()))
    return (
        repr(model),
        settings,
        params,
        tensors,
        None if labels is None else (tuple(labels.shape), labels.dtype),
    )


def count_train_flops(
    model: nn.Module, inputs: Mapping[str, torch.Tensor], labels: torch.Tensor
) -> int:
    """FLOPs of one training step (forward + backward of cross-entropy) on this batch.

    Counted by ``torch.utils.flop_counter.FlopCounterMode``: matmul/conv/attention ops at
    2 FLOPs per multiply-accumulate; element-wise ops (activations, softmax, loss) count 0.
    The backward computes gradients of trainable parameters only (as training would), so a
    frozen prefix costs forward FLOPs but no backward FLOPs, and the first layer computes no
    input gradient. Gradients are returned by ``torch.autograd.grad``, never stored in ``.grad``.
    Counts are memoized per process by module tree, settings and shapes (a count depends on
    nothing else), so the clients of a run and the runs of a sweep share them.
    """
    key = ("train", *_shape_key(model, inputs, labels))
    if key not in _FLOPS_MEMO:  # counting runs the step (and costs seconds on first use)
        trainable = [p for p in model.parameters() if p.requires_grad]
        with _buffers_restored(model), FlopCounterMode(display=False) as counter:
            loss = _training_loss(model, inputs, labels)
            if trainable:
                torch.autograd.grad(loss, trainable, allow_unused=True)
        _FLOPS_MEMO[key] = int(counter.get_total_flops())
    return _FLOPS_MEMO[key]


def warm_up_flop_counter() -> None:
    """Pay ``FlopCounterMode``'s first use now (it imports ``torch._dynamo``: 1.3 s on 2 cores).

    A run's first FLOP count happens in round 1, on the server, while every worker waits for
    it; :func:`fedsim.engine.simulation.simulate` calls this in a thread while Ray starts
    instead (Ray's start mostly waits on its processes). It counts a tiny step on zeros: no
    random draw, no model of the run's, nothing memoized.
    """
    weight = torch.zeros(2, 2, requires_grad=True)  # not nn.Linear: its init draws from torch's RNG
    with FlopCounterMode(display=False):
        torch.autograd.grad(nn.functional.linear(torch.zeros(1, 2), weight).sum(), weight)


def count_forward_flops(model: nn.Module, inputs: Mapping[str, torch.Tensor]) -> int:
    """FLOPs of one forward pass without autograd (e.g. a forward-only side-tuning device).

    Like :func:`count_train_flops`, memoized per process by module tree and shapes.
    """
    key = ("forward", *_shape_key(model, inputs, None))
    if key not in _FLOPS_MEMO:
        with _buffers_restored(model), torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(**inputs)
        _FLOPS_MEMO[key] = int(counter.get_total_flops())
    return _FLOPS_MEMO[key]


def _identity(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one training step holds: weights, gradients, optimizer state, saved activations."""

    params: int  # all parameters, trainable and frozen
    grads: int  # trainable parameters only
    optimizer_state: int  # trainable parameters only
    activations: int  # tensors saved for backward, deduplicated by storage
    total: int


def estimate_train_memory_bytes(
    model: nn.Module,
    inputs: Mapping[str, torch.Tensor],
    labels: torch.Tensor,
    optimizer: str = "sgd",
    momentum: bool = False,
) -> MemoryEstimate:
    """Training memory of ``model`` on this batch, activations measured, not guessed.

    Activations are the tensors autograd saves for backward during one forward + loss, seen by
    ``torch.autograd.graph.saved_tensors_hooks`` and deduplicated by storage (views and tensors
    saved twice count once); parameters saved by autograd are excluded (already in ``params``).
    The input batch and labels count when autograd saves them. Allocator overhead, temporary
    buffers of the backward pass and framework runtime are not included.

    Parameters
    ----------
    model
        The model as it will train: ``requires_grad`` marks trainable parameters.
    inputs
        Keyword inputs of one batch, ``model(**inputs)``.
    labels
        Class labels of the batch, (N,) or (N, T).
    optimizer
        ``"sgd"`` (one momentum buffer if ``momentum``) or ``"adam"`` (two states; AdamW alike).
    momentum
        Whether SGD keeps a momentum buffer; ignored for Adam.

    """
    if optimizer not in ("sgd", "adam"):
        raise ValueError(f"optimizer must be 'sgd' or 'adam', got {optimizer!r}")
    all_params = list(model.parameters())
    trainable_bytes = sum(p.numel() * p.element_size() for p in all_params if p.requires_grad)
    params_bytes = sum(p.numel() * p.element_size() for p in all_params)
    if optimizer == "adam":
        states = _ADAM_STATES_PER_PARAM
    else:
        states = _MOMENTUM_STATES_PER_PARAM if momentum else 0
    param_storages = {p.untyped_storage().data_ptr() for p in all_params}
    # data_ptr -> storage; holding the storage keeps its address from being reused in the pass
    saved: dict[int, torch.UntypedStorage] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in param_storages:
            saved[storage.data_ptr()] = storage
        return tensor

    with _buffers_restored(model), torch.autograd.graph.saved_tensors_hooks(pack, _identity):
        _training_loss(model, inputs, labels)  # the graph is dropped on return
    activations = sum(storage.nbytes() for storage in saved.values())
    optimizer_bytes = states * trainable_bytes
    return MemoryEstimate(
        params=params_bytes,
        grads=trainable_bytes,
        optimizer_state=optimizer_bytes,
        activations=activations,
        total=params_bytes + trainable_bytes + optimizer_bytes + activations,
    )


@dataclass(frozen=True)
class ClientWork:
    """What one client does in one round, in FLOPs and bytes."""

    train_flops: int  # on the device
    bytes_down: int
    bytes_up: int
    peak_memory_bytes: int
    server_flops: int = 0  # work a method offloads to the server (e.g. side-tuning)
    # Seconds of device compute from a measured table (``measured_compute_s``), used instead
    # of train_flops / compute rate; None: the FLOPs rule.
    compute_s: float | None = None


@dataclass(frozen=True)
class Latency:
    """Seconds one client's round takes, by phase; ``total_s`` is their sum."""

    download_s: float
    compute_s: float
    upload_s: float
    server_s: float
    total_s: float


def client_latency(state: DeviceState, work: ClientWork, server_gflops: float) -> Latency:
    """Sequential download -> local compute -> upload -> server-side compute, in seconds.

    The ``online`` flag is not consulted: the engine drops offline clients before this.
    """
    download_s = work.bytes_down * _BITS_PER_BYTE / (state.downlink_mbps * _MEGA)
    if work.compute_s is not None:  # a measured table's seconds (measured_compute_s)
        compute_s = work.compute_s
    else:
        compute_s = work.train_flops / (state.compute_gflops * _GIGA)
    upload_s = work.bytes_up * _BITS_PER_BYTE / (state.uplink_mbps * _MEGA)
    server_s = work.server_flops / (server_gflops * _GIGA)
    return Latency(
        download_s=download_s,
        compute_s=compute_s,
        upload_s=upload_s,
        server_s=server_s,
        total_s=download_s + compute_s + upload_s + server_s,
    )


def measured_compute_s(
    profile: DeviceProfile, width: float, train_examples: int, compute_gflops: float
) -> float | None:
    """Compute seconds of a job from the profile's measured table; None: use the FLOPs rule.

    ``seconds per example at width x train_examples``, scaled by the round's compute draw
    (``profile.train_gflops / compute_gflops``: 1 exactly at the nominal rate, so a device at
    its nominal rate is charged exactly the table's time). None when the profile has no table
    or the job reports no examples (``DeviceCost.train_examples == 0``: e.g. a forward-only
    side-tuning device, which the table, measured on backpropagation, does not describe).
    The table is tied to the model and batch it was measured with (conf/devices/
    whale_testbed.yaml); the clock uses it as measured, whatever model trains here.
    """
    per_example = profile.measured_s_per_example(width) if train_examples > 0 else None
    if per_example is None:
        return None
    seconds = per_example * train_examples
    if compute_gflops == profile.train_gflops:
        return seconds
    return seconds * (profile.train_gflops / compute_gflops)


def client_energy_j(profile: DeviceProfile, latency: Latency) -> float:
    """Device energy of one round, J: compute power x compute time + radio rx/tx x link time.

    Server time costs the device nothing (we assume it idles, e.g. waiting with the radio in a
    low-power state; idle and LTE tail energy are not modelled).
    """
    return (
        profile.compute_power_w * latency.compute_s
        + profile.radio_rx_power_w * latency.download_s
        + profile.radio_tx_power_w * latency.upload_s
    )


def fits_in_memory(profile: DeviceProfile, work: ClientWork) -> bool:
    """Whether the round's peak memory fits what the app may use (GB = 1e9 bytes)."""
    return work.peak_memory_bytes <= profile.memory_gb * _GIGA


# --------------------------------------------------------------------------- simulated clock
@dataclass(frozen=True)
class RoundTiming:
    """Outcome of one synchronous round on the simulated clock."""

    round_time_s: float
    kept: tuple[int, ...]  # partition ids whose update is aggregated, ascending
    stragglers: tuple[int, ...]  # partition ids whose update is dropped, ascending


def synchronous_round(
    latencies: Mapping[int, float],
    *,
    deadline_s: float | None = None,
    target_count: int | None = None,
    server_time_s: float = 0.0,
) -> RoundTiming:
    """Who makes it into a synchronous round, and how long the round lasts.

    - Neither ``deadline_s`` nor ``target_count``: wait for all; time = max latency.
    - ``deadline_s``: clients with latency > deadline are stragglers; the server waits until the
      deadline or until every client is done, time = min(deadline, max latency). If all miss,
      the round still lasts the full deadline and aggregates nothing (``kept`` is empty).
    - ``target_count = k`` (FedScale over-selection, ``aggregator.py`` ``tictak_client_tasks``):
      the first k finishers (ties by partition id) are kept and the round ends at the k-th
      finish; if fewer than k finish (in time), the rule above applies.

    ``server_time_s`` (aggregation etc.) is added to the round time in every case.
    """
    if deadline_s is not None and not deadline_s > 0:
        raise ValueError(f"deadline_s must be > 0 or None, got {deadline_s}")
    if target_count is not None and target_count < 1:
        raise ValueError(f"target_count must be >= 1 or None, got {target_count}")
    if server_time_s < 0 or any(not latency >= 0 for latency in latencies.values()):
        raise ValueError("latencies and server_time_s must be >= 0 (and not NaN)")
    finish = sorted(latencies.items(), key=lambda item: (item[1], item[0]))
    limit = math.inf if deadline_s is None else deadline_s
    on_time = [pid for pid, latency in finish if latency <= limit]
    if target_count is not None and len(on_time) >= target_count:
        kept = on_time[:target_count]
        wait_s = latencies[kept[-1]]
    else:
        kept = on_time
        wait_s = min(limit, max(latencies.values(), default=0.0))
    kept_set = set(kept)
    return RoundTiming(
        round_time_s=wait_s + server_time_s,
        kept=tuple(sorted(kept_set)),
        stragglers=tuple(sorted(pid for pid in latencies if pid not in kept_set)),
    )


@dataclass
class SimClock:
    """Cumulative simulated seconds since the run began (FedScale's ``global_virtual_clock``)."""

    now_s: float = field(default=0.0)

    def advance(self, seconds: float) -> float:
        """Move the clock forward by ``seconds`` (>= 0) and return the new time."""
        if not seconds >= 0:
            raise ValueError(f"seconds must be >= 0, got {seconds}")
        self.now_s += seconds
        return self.now_s

    def to_dict(self) -> dict[str, float]:
        """State for a checkpoint."""
        return asdict(self)

    @classmethod
    def from_dict(cls, state: Mapping[str, float]) -> SimClock:
        """Rebuild a clock saved by :meth:`to_dict`."""
        return cls(now_s=float(state["now_s"]))
