"""What a strategy may read about the federation: only what a real server knows when it decides.

Strategies that adapt to the fleet (HeteroFL's capacity-based widths, WHALE-FL's per-round
widths) get a :class:`FederationView` injected at build time through an optional ``bind(view)``
method (``Federation.build`` calls it). The view is read-only and holds **no draw of the round
being decided**, by construction (issue 14): when the server decides round ``r`` it knows

* ``profiles[pid]``: each device's nominal capacities (what it declared when it enrolled);
* ``online(pid, r)``: whether the device checked in for round ``r`` (a device that checks in is
  online; availability is announced, not measured);
* ``observed(pid, r)``: what the scheduler *measured* of the device in its latest round before
  ``r`` (:class:`Observation`: compute and link rates, channel state, bytes sent besides its
  tensors, running means), or the profile's nominal values if it never took part;
* ``extra_upload_bytes_per_flop(r)``: over every device measured before ``r``, the bytes sent
  besides the tensors (side-tuning's activations) per device FLOP, to estimate them for a device
  never measured;
* ``cost(pid, width)``, ``payload_bytes(width)``, ``slim_layout()``: the cost model (FLOPs and
  peak memory of a client's job on the width-``width`` sub-model, the bytes of its tensors, the
  model's width axes; raises ConfigError for a model that cannot be sliced). These are fixed by
  the config, not drawn.

Round ``r``'s compute, bandwidth and channel draw (``Fleet.conditions``) is what the clock charges;
the view never reads it. The scheduler records a round's measurements when the round settles
(:meth:`ObservationLog.record`, an observer of ``RoundScheduler.settle``), and an answer for round
``r`` reads only rounds ``< r``: re-drawing round ``r`` leaves every answer for ``r`` unchanged,
and round ``r + 1`` sees what round ``r`` measured (tests/test_whale_fl.py). A device that
trained (kept or dropped as a straggler: its reply, with its measured times, still arrives) is
measured; an offline, infeasible or failed one is not. A phone that dropped out mid-round
(outcome ``interrupted``, fedsim/clock/phones.py) is seen as a real server sees it, after the
fact: ``failures(pid, r)`` counts its drop-outs in rounds before ``r``; its battery, charging
state and the interruption draws of round ``r`` are never in the view. The log's state travels
in the bound strategy's checkpoint (``ObservationLog.state``), so a resumed run knows what it
knew.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from fedsim import keys
from fedsim.clock.devices import DeviceProfile, DeviceState
from fedsim.clock.scheduler import DeviceCost
from fedsim.errors import ConfigError
from fedsim.learning.slicing import SlimLayout

__all__ = ["FederationView", "Observation", "ObservationLog", "slim_layout_of"]


def slim_layout_of(model: nn.Module) -> SlimLayout:
    """The width axes of a model (``model.slim_layout()``); ConfigError if it has none."""
    layout = getattr(model, "slim_layout", None)
    if layout is None:
        raise ConfigError(
            "strategy",
            "width-sliced",
            "needs model=cnn or client=side_tuning (a model with width axes, "
            "fedsim/learning/slicing.py)",
        )
    result: SlimLayout = layout()
    return result


@dataclass(frozen=True)
class Observation:
    """What the server knows of one device's speed before a round.

    ``round`` is the round it was measured in (0: never, every number is the profile's nominal
    value and ``extra_upload_bytes`` is None). Rates are what the round's measured times give:
    FLOPs / compute seconds, bytes / link seconds (in simulation: that round's draw).
    """

    round: int
    compute_gflops: float
    uplink_mbps: float
    downlink_mbps: float
    channel_good: bool
    extra_upload_bytes: float | None  # bytes sent besides its tensors (activations)
    latency_s: float | None  # its whole round: download + compute + upload (+ server)
    num_rounds: int  # rounds it was measured in, up to ``round``
    mean_compute_gflops: float  # running means over those rounds (nominal if none)
    mean_uplink_mbps: float
    mean_downlink_mbps: float

    def state(self, *, mean: bool = False) -> DeviceState:
        """The cost model's input: the last (or mean) measured rates, online."""
        if mean:
            rates = (self.mean_compute_gflops, self.mean_uplink_mbps, self.mean_downlink_mbps)
        else:
            rates = (self.compute_gflops, self.uplink_mbps, self.downlink_mbps)
        return DeviceState(True, *rates, self.channel_good)


def nominal_observation(profile: DeviceProfile) -> Observation:
    """A device never measured: its profile's capacities, a good channel."""
    c, u, d = profile.train_gflops, profile.uplink_mbps, profile.downlink_mbps
    return Observation(0, c, u, d, True, None, None, 0, c, u, d)


#: Outcomes whose reply came back with measured times (a dropped straggler's too).
MEASURED = (keys.Outcome.OK, keys.Outcome.STRAGGLER)
#: A phone's drop-out mid-round (fedsim/clock/phones.py): seen after the fact.
DROPPED = keys.Outcome.INTERRUPTED
#: The fields of a stored entry, in order (plain lists: checkpointable,
# fedsim/records/checkpoint.py).
_ENTRY = (
    "round",
    "compute_gflops",
    "uplink_mbps",
    "downlink_mbps",
    "channel_good",
    "extra_upload_bytes",
    "latency_s",
    "num_rounds",
    "mean_compute_gflops",
    "mean_uplink_mbps",
    "mean_downlink_mbps",
)


class ObservationLog:
    """The scheduler's measurements, by client and round; an answer for round r reads rounds < r.

    Per client the last ``keep`` measurements are kept (memory O(clients measured)); a question
    about a round older than those raises ValueError rather than answer from a later round.
    """

    def __init__(self, keep: int = 2) -> None:
        self.keep = keep
        self.clients: dict[int, list[list[Any]]] = {}  # pid -> entries (_ENTRY), oldest first
        self.fleet: list[list[float]] = []  # [round, cumulative extra bytes, cumulative FLOPs]
        self.dropped: dict[int, list[int]] = {}  # pid -> rounds it dropped out in, ascending

    def record(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """Add a settled round's clients.jsonl rows (``RoundScheduler.settle`` calls this)."""
        extra, flops, rnd = 0.0, 0.0, None
        for row in rows:
            if row.get("outcome") == DROPPED:
                self.dropped.setdefault(int(row["partition_id"]), []).append(int(row[keys.ROUND]))
            if row.get("outcome") not in MEASURED:
                continue
            pid, rnd = int(row["partition_id"]), int(row[keys.ROUND])
            entries = self.clients.setdefault(pid, [])
            n = entries[-1][7] + 1 if entries else 1
            rates = [float(row[k]) for k in ("compute_gflops", "uplink_mbps", "downlink_mbps")]
            means = (
                rates
                if not entries
                else [m + (r - m) / n for m, r in zip(entries[-1][8:], rates, strict=True)]
            )
            sent = float(row.get("extra_upload_bytes", 0))
            entries.append(
                [rnd, *rates, bool(row["channel_good"]), sent, float(row["latency_s"]), n, *means]
            )
            del entries[: -self.keep]
            extra, flops = extra + sent, flops + float(row["train_flops"])
        if rnd is not None:
            total = self.fleet[-1][1:] if self.fleet else [0.0, 0.0]
            self.fleet.append([float(rnd), total[0] + extra, total[1] + flops])

    def observed(self, pid: int, server_round: int, profile: DeviceProfile) -> Observation:
        """The latest measurement of ``pid`` in a round before ``server_round``."""
        entries = self.clients.get(int(pid), [])
        before = [e for e in entries if e[0] < server_round]
        if before:
            return Observation(**dict(zip(_ENTRY, before[-1], strict=True)))
        if entries and entries[0][7] > 1:  # measured before, but that entry was dropped
            raise ValueError(f"client {pid}: no measurement kept from before round {server_round}")
        return nominal_observation(profile)

    def failures(self, pid: int, server_round: int) -> int:
        """How many times ``pid`` dropped out mid-round in rounds before ``server_round``."""
        return sum(r < server_round for r in self.dropped.get(int(pid), []))

    def extra_upload_bytes_per_flop(self, server_round: int) -> float:
        """Bytes sent besides tensors per device FLOP, over every measurement before the round."""
        before = [f for f in self.fleet if f[0] < server_round]
        return before[-1][1] / before[-1][2] if before and before[-1][2] > 0 else 0.0

    def state(self) -> dict[str, Any]:
        """The containers themselves (a strategy keeps them as an attribute: checkpointed)."""
        return {"clients": self.clients, "fleet": self.fleet, "dropped": self.dropped}

    def restore(self, state: Mapping[str, Any]) -> None:
        """Take back a :meth:`state` (a resumed run's); an empty one changes nothing."""
        for pid, entries in state.get("clients", {}).items():
            self.clients[int(pid)] = [list(e) for e in entries]
        self.fleet[:] = [list(f) for f in state.get("fleet", [])]
        for pid, rounds in state.get("dropped", {}).items():
            self.dropped[int(pid)] = [int(r) for r in rounds]


@dataclass(frozen=True)
class FederationView:
    """Read-only access to what the server knows of the fleet, and to the cost model.

    See the module docstring: ``online(pid, round)`` is the check-in, ``observed(pid, round)``
    the latest measurement before ``round`` (nominal if none), ``cost(pid, width)`` the cost
    model's FLOPs and peak memory of the client's job on the width-``width`` sub-model,
    ``payload_bytes(width)`` the bytes of that sub-model's trainable tensors on the wire,
    ``slim_layout()`` the global model's width axes.
    """

    seed: int
    profiles: Sequence[DeviceProfile]
    server_gflops: float
    deadline_s: float | None
    online: Callable[[int, int], bool]
    observations: ObservationLog
    cost: Callable[[int, float], DeviceCost]
    payload_bytes: Callable[[float], int]
    slim_layout: Callable[[], SlimLayout]

    def observed(self, pid: int, server_round: int) -> Observation:
        """What the server measured of ``pid`` before ``server_round`` (module docstring)."""
        return self.observations.observed(pid, server_round, self.profiles[pid])

    def extra_upload_bytes_per_flop(self, server_round: int) -> float:
        """Fleet-wide bytes sent besides tensors per device FLOP, measured before the round."""
        return self.observations.extra_upload_bytes_per_flop(server_round)

    def failures(self, pid: int, server_round: int) -> int:
        """Drop-outs of ``pid`` (a phone interrupted mid-round) seen in rounds before this one."""
        return self.observations.failures(pid, server_round)
