"""Failures phones have: availability tied to charging and Wi-Fi, a battery, interruptions by phase.

An optional part of a device fleet (``conf/devices/<fleet>.yaml``: ``availability``, ``battery``,
``interruptions``); a fleet without them behaves exactly as before. Times are seconds on the
simulated clock (``SimClock.now_s``), energy joules, power watts, battery levels fractions of
``capacity_j``.

* **Availability** (``kind``): when a device is *plugged in* and on an *unmetered* network.
  ``always``: always plugged in; ``diurnal``: plugged in once a day for ``charging_h`` hours from
  ``plug_in_h`` (each device shifted by a uniform draw in ``+-spread_h``; clock 0 is ``start_h``
  o'clock), a synthetic pattern, not a measurement; ``trace``: a CSV of per-client on-intervals
  (:func:`read_trace`) in which the device is both plugged in and on Wi-Fi, as the traces of
  FLASH (Yang et al., WWW 2021) and FedScale count a device available. Outside a trace, and for
  ``always``/``diurnal``, a device is on an unmetered network in a round with probability
  ``unmetered_p``, drawn per (seed, client, round). A device checks in for a round only if it is
  plugged in (when ``require_charging``), unmetered (when ``require_unmetered``) and its battery
  is at least ``min_level`` (Bonawitz et al., "Towards Federated Learning at Scale", MLSys 2019:
  devices train when idle, charging and on an unmetered network).
* **Battery**: a level in joules that charges at ``charge_w`` while plugged in, drains at
  ``idle_w`` otherwise (background use), and drains by exactly the energy the cost model charges
  a round (``client_energy_j``); it starts at a uniform draw in ``[initial_min, 1]`` per client.
* **Interruptions** (FLASH's failures by phase): a device that checked in can still drop out in
  its download, training or upload phase. Three causes, the earliest wins: its plugged-in
  window ends while charging is required (or its trace interval ends), its battery runs empty
  (charging during the round is not counted for this test: a conservative decision), or a
  random interruption with probability ``download_p`` / ``train_p`` / ``upload_p`` per phase at a
  uniform point of that phase (user interaction, network change; our decision, FLASH draws them
  from its trace). Every draw comes from a stream named by (seed, client, round).

What a real server sees: the check-in (a device that is not eligible does not check in: outcome
``offline`` with its reason) and a failure after the fact (outcome ``interrupted``). The clock
charges an interrupted device the seconds until its interruption and the energy it spent until
then; the strategy gets nothing from it.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedsim.checks import is_number
from fedsim.errors import ConfigError
from fedsim.seeding import numpy_rng

__all__ = [
    "Availability",
    "Battery",
    "CheckIn",
    "Interruption",
    "Interruptions",
    "PhoneModel",
    "battery_after",
    "read_trace",
]

KINDS = ("always", "diurnal", "trace")
PHASES = ("download", "train", "upload")
_DAY_S = 86_400.0
_HOUR_S = 3_600.0
_TRACE_COLUMNS = ("client", "start_s", "end_s")


def _num(key: str, raw: Mapping[str, Any], name: str, default: Any, lo: float, hi: float) -> float:
    value = raw.get(name, default)
    if not is_number(value) or not math.isfinite(value) or not lo <= value <= hi:
        raise ConfigError(f"{key}.{name}", value, f"must be a number in [{lo:g}, {hi:g}]")
    return float(value)


def _flag(key: str, raw: Mapping[str, Any], name: str, default: bool) -> bool:
    value = raw.get(name, default)
    if not isinstance(value, bool):
        raise ConfigError(f"{key}.{name}", value, "must be true or false")
    return value


def _mapping(key: str, raw: Any, names: Sequence[str]) -> Mapping[str, Any]:
    if not isinstance(raw, Mapping) or not set(raw) <= set(names):
        got = sorted(raw) if isinstance(raw, Mapping) else raw
        raise ConfigError(key, got, f"must be a mapping with keys among {list(names)}")
    return raw


# --------------------------------------------------------------------------------- the trace
def read_trace(path: Path) -> dict[int, list[tuple[float, float]]]:
    """Per-client on-intervals ``[start_s, end_s)`` of an availability trace CSV, sorted.

    The file has a header line ``client,start_s,end_s`` and one interval per line: ``client`` an
    integer id >= 0, ``start_s < end_s`` seconds on the simulated clock (>= 0). A client's
    intervals must not overlap. Anything else is refused in one line naming the column, the
    file and the line.
    """
    key = "devices.availability.path"
    try:
        handle = path.open(newline="")
    except OSError as exc:
        raise ConfigError(key, str(path), f"must be a readable CSV file ({exc.strerror})") from None
    intervals: dict[int, list[tuple[float, float]]] = {}
    with handle:
        reader = csv.reader(handle)
        header = [h.strip() for h in next(reader, [])]
        if tuple(header) != _TRACE_COLUMNS:
            raise ConfigError(
                key, f"{path} line 1", f"must start with the header {','.join(_TRACE_COLUMNS)}"
            )
        for line, fields in enumerate(reader, start=2):
            where = f"{path} line {line}"
            if not fields or all(not f.strip() for f in fields):
                continue  # a blank line (e.g. at the end) carries nothing
            if len(fields) != len(_TRACE_COLUMNS):
                raise ConfigError(key, where, f"must have the {len(_TRACE_COLUMNS)} columns")
            try:
                client = int(fields[0])
            except ValueError:
                raise ConfigError(key, where, "client must be an integer >= 0") from None
            try:
                start, end = float(fields[1]), float(fields[2])
            except ValueError:
                raise ConfigError(key, where, "start_s and end_s must be numbers") from None
            if client < 0:
                raise ConfigError(key, where, "client must be an integer >= 0")
            if not (math.isfinite(start) and math.isfinite(end) and 0 <= start < end):
                raise ConfigError(key, where, "must have 0 <= start_s < end_s (finite)")
            intervals.setdefault(client, []).append((start, end))
    if not intervals:
        raise ConfigError(key, str(path), "must hold at least one interval")
    for client, spans in intervals.items():
        spans.sort()
        for (_, end), (start, _) in zip(spans, spans[1:], strict=False):
            if start < end:
                raise ConfigError(key, str(path), f"client {client}'s intervals overlap")
    return intervals


# ------------------------------------------------------------------------------ the settings
@dataclass(frozen=True)
class Availability:
    """When devices are plugged in and on an unmetered network (module docstring)."""

    kind: str = "always"
    require_charging: bool = True
    require_unmetered: bool = True
    unmetered_p: float = 1.0
    start_h: float = 0.0  # o'clock at simulated time 0 (diurnal)
    plug_in_h: float = 22.0  # diurnal: median hour of plugging in
    spread_h: float = 0.0  # diurnal: each device's plug-in hour is shifted by U(-spread, spread)
    charging_h: float = 8.0  # diurnal: hours plugged in per day
    path: str | None = None  # trace: CSV file (relative: to conf/)
    period_s: float | None = None  # trace: it repeats with this period (null: it does not)

    @classmethod
    def from_config(cls, raw: Any) -> Availability:
        """Check a YAML ``availability`` mapping; ConfigError names the bad key."""
        key = "devices.availability"
        raw = _mapping(key, raw, [f for f in cls.__dataclass_fields__])
        kind = raw.get("kind", "always")
        if kind not in KINDS:
            raise ConfigError(f"{key}.kind", kind, f"must be one of {', '.join(KINDS)}")
        path, period = raw.get("path"), raw.get("period_s")
        if (kind == "trace") != (path is not None):
            raise ConfigError(f"{key}.path", path, "must be set for kind trace, and only then")
        if path is not None and not isinstance(path, str):
            raise ConfigError(f"{key}.path", path, "must be a file path")
        if period is not None:
            period = _num(key, raw, "period_s", None, 1e-9, math.inf)
        return cls(
            kind=kind,
            require_charging=_flag(key, raw, "require_charging", True),
            require_unmetered=_flag(key, raw, "require_unmetered", True),
            unmetered_p=_num(key, raw, "unmetered_p", 1.0, 0.0, 1.0),
            start_h=_num(key, raw, "start_h", 0.0, 0.0, 24.0),
            plug_in_h=_num(key, raw, "plug_in_h", 22.0, 0.0, 24.0),
            spread_h=_num(key, raw, "spread_h", 0.0, 0.0, 12.0),
            charging_h=_num(key, raw, "charging_h", 8.0, 0.0, 24.0),
            path=path,
            period_s=period,
        )


@dataclass(frozen=True)
class Battery:
    """A phone battery (module docstring); levels are fractions of ``capacity_j``."""

    capacity_j: float
    min_level: float = 0.2
    initial_min: float = 0.2
    charge_w: float = 0.0
    idle_w: float = 0.0

    @classmethod
    def from_config(cls, raw: Any) -> Battery:
        """Check a YAML ``battery`` mapping; ConfigError names the bad key."""
        key = "devices.battery"
        raw = _mapping(key, raw, [f for f in cls.__dataclass_fields__])
        if "capacity_j" not in raw:
            raise ConfigError(f"{key}.capacity_j", None, "must be a number > 0")
        return cls(
            capacity_j=_num(key, raw, "capacity_j", None, 1e-9, math.inf),
            min_level=_num(key, raw, "min_level", 0.2, 0.0, 1.0),
            initial_min=_num(key, raw, "initial_min", 0.2, 0.0, 1.0),
            charge_w=_num(key, raw, "charge_w", 0.0, 0.0, math.inf),
            idle_w=_num(key, raw, "idle_w", 0.0, 0.0, math.inf),
        )


@dataclass(frozen=True)
class Interruptions:
    """Probability that a device drops out in each phase of a round (module docstring)."""

    download_p: float = 0.0
    train_p: float = 0.0
    upload_p: float = 0.0

    @classmethod
    def from_config(cls, raw: Any) -> Interruptions:
        """Check a YAML ``interruptions`` mapping; ConfigError names the bad key."""
        key = "devices.interruptions"
        raw = _mapping(key, raw, [f for f in cls.__dataclass_fields__])
        return cls(*(_num(key, raw, name, 0.0, 0.0, 1.0) for name in cls.__dataclass_fields__))


@dataclass(frozen=True)
class CheckIn:
    """What a device is when a round begins, and whether it checks in."""

    plugged: bool
    unmetered: bool
    battery_level: float | None  # fraction of capacity; None without a battery
    window_end_s: float  # when it stops being available (inf: not before the round ends)
    reason: str | None  # None: it checks in; else "unplugged", "metered" or "battery_low"


@dataclass(frozen=True)
class Interruption:
    """Where a device's round broke off: the phase, the seconds into its round, why."""

    phase: str
    at_s: float
    cause: str  # "random", "unavailable" (its window ended) or "battery"


def battery_after(
    level_j: float, segments: Sequence[tuple[float, float, bool]], battery: Battery
) -> float:
    """The level after ``segments`` (start s, end s, plugged in), clamped to [0, capacity]."""
    for start, end, plugged in segments:
        rate_w = battery.charge_w if plugged else -battery.idle_w
        if rate_w:
            level_j = min(battery.capacity_j, max(0.0, level_j + rate_w * (end - start)))
    return level_j


# -------------------------------------------------------------------------------- the model
class PhoneModel:
    """Availability, battery and interruptions of a fleet's phones; pure functions of draws.

    ``state`` (what a battery carries between rounds) is the caller's (``RoundScheduler``).
    """

    def __init__(
        self,
        availability: Availability,
        battery: Battery | None,
        interruptions: Interruptions,
        conf_dir: Path | None = None,
    ) -> None:
        self.availability = availability
        self.battery = battery
        self.interruptions = interruptions
        self.trace: dict[int, list[tuple[float, float]]] = {}
        self._trace_ids: list[int] = []
        if availability.kind == "trace":
            assert availability.path is not None  # Availability.from_config checks it
            path = Path(availability.path)
            if not path.is_absolute() and conf_dir is not None:
                path = conf_dir / path
            self.trace = read_trace(path)
            self._trace_ids = sorted(self.trace)

    @classmethod
    def from_config(
        cls, availability: Any, battery: Any, interruptions: Any, conf_dir: Path | None
    ) -> PhoneModel | None:
        """None when none of the three is set (the fleet behaves as before)."""
        if availability is None and battery is None and interruptions is None:
            return None
        return cls(
            Availability.from_config(availability if availability is not None else {}),
            None if battery is None else Battery.from_config(battery),
            Interruptions.from_config(interruptions if interruptions is not None else {}),
            conf_dir,
        )

    # -- plugged-in intervals on the simulated clock -----------------------------------------
    def _pattern(self, seed: int, pid: int) -> tuple[list[tuple[float, float]], float | None]:
        """One period's on-intervals of ``pid`` and the period (None: no repetition)."""
        av = self.availability
        if av.kind == "always":
            return [(0.0, math.inf)], None
        if av.kind == "trace":  # clients take the trace's ids in turn (FedScale maps alike)
            return self.trace[self._trace_ids[pid % len(self._trace_ids)]], av.period_s
        shift_h = av.spread_h * (2.0 * numpy_rng(seed, "plug-in", pid).random() - 1.0)
        start = ((av.plug_in_h + shift_h - av.start_h) * _HOUR_S) % _DAY_S
        return [(start, start + av.charging_h * _HOUR_S)], _DAY_S

    def segments(
        self, seed: int, pid: int, t0: float, t1: float
    ) -> list[tuple[float, float, bool]]:
        """``[t0, t1]`` cut into (start, end, plugged in) pieces, in order."""
        spans, period = self._pattern(seed, pid)
        ons: list[tuple[float, float]] = []
        if period is None:
            ons = [(max(a, t0), min(b, t1)) for a, b in spans if b > t0 and a < t1]
        else:
            longest = max(b - a for a, b in spans)
            for k in range(math.floor((t0 - longest) / period), math.floor(t1 / period) + 1):
                for a, b in spans:
                    a, b = a + k * period, b + k * period
                    if b > t0 and a < t1:
                        ons.append((max(a, t0), min(b, t1)))
        out, at = [], t0
        for a, b in sorted(ons):
            if a > at:
                out.append((at, a, False))
            if b > max(a, at):
                out.append((max(a, at), b, True))
            at = max(at, b)
        if at < t1 or not out:
            out.append((at, t1, False))
        return out

    def window_end_s(self, seed: int, pid: int, now_s: float) -> float | None:
        """End of the on-interval holding ``now_s`` (None: not plugged in at ``now_s``).

        Intervals that touch (a night split at a trace's period boundary) count as one.
        """
        spans, period = self._pattern(seed, pid)

        def holding(t: float) -> float | None:
            base = 0.0 if period is None else math.floor(t / period) * period
            for shift in [0.0] if period is None else [base - period, base, base + period]:
                for a, b in spans:
                    if shift + a <= t < shift + b:
                        return shift + b
            return None

        end = holding(now_s)
        if end is None:
            return None
        for _ in range(len(spans) + 2):  # a period holds at most len(spans) touching pieces
            later = holding(end) if math.isfinite(end) else None
            if later is None:
                break
            end = later
            if period is not None and end - now_s > period:
                return math.inf  # on for a whole period: on for ever
        return end

    # -- the battery ---------------------------------------------------------------------------
    def initial_level_j(self, seed: int, pid: int) -> float:
        """Level at simulated time 0: U(initial_min, 1) of the capacity, per (seed, client)."""
        assert self.battery is not None
        u = numpy_rng(seed, "battery", pid).random()
        b = self.battery
        return b.capacity_j * (b.initial_min + (1.0 - b.initial_min) * u)

    def level_at(self, seed: int, pid: int, anchor: Sequence[float] | None, now_s: float) -> float:
        """Level at ``now_s`` from the last known ``[level_j, at_s]`` (None: time 0's draw)."""
        assert self.battery is not None
        level, at = (self.initial_level_j(seed, pid), 0.0) if anchor is None else anchor
        if now_s <= at:
            return float(level)
        return battery_after(float(level), self.segments(seed, pid, at, now_s), self.battery)

    # -- a round ---------------------------------------------------------------------------
    def check_in(
        self, seed: int, pid: int, server_round: int, now_s: float, level_j: float | None
    ) -> CheckIn:
        """Whether ``pid`` checks in for ``server_round`` at ``now_s`` (module docstring)."""
        av = self.availability
        end = self.window_end_s(seed, pid, now_s)
        plugged = end is not None
        if av.kind == "trace":
            unmetered = plugged  # a trace interval is plugged in and on Wi-Fi
        else:
            u = numpy_rng(seed, "unmetered", pid, server_round).random()
            unmetered = bool(u < av.unmetered_p)
        level = None
        if self.battery is not None and level_j is not None:
            level = level_j / self.battery.capacity_j
        reason = None
        if av.require_charging and not plugged:
            reason = "unplugged"
        elif av.require_unmetered and not unmetered:
            reason = "metered"
        elif self.battery is not None and level is not None and level < self.battery.min_level:
            reason = "battery_low"
        bound = av.require_charging or (av.kind == "trace" and av.require_unmetered)
        window_end = end if (bound and end is not None) else math.inf
        return CheckIn(plugged, unmetered, level, window_end, reason)

    def interruption(
        self,
        seed: int,
        pid: int,
        server_round: int,
        phases_s: Sequence[float],
        powers_w: Sequence[float],
        now_s: float,
        check_in: CheckIn,
        level_j: float | None,
    ) -> Interruption | None:
        """The earliest of the three causes inside the device's phases, or None.

        ``phases_s`` and ``powers_w``: seconds and device power of download, train, upload.
        The random draws (u, v per phase, in phase order) come from the stream
        ``(seed, "interrupt", pid, server_round)`` whatever the outcome, so they do not depend
        on anything else.
        """
        rng = numpy_rng(seed, "interrupt", pid, server_round)
        draws = rng.random((len(PHASES), 2))
        starts = [sum(phases_s[:i]) for i in range(len(PHASES))]
        total = sum(phases_s)
        events: list[tuple[float, str, int | None]] = []  # (seconds in, cause, phase or None)
        ps = (
            self.interruptions.download_p,
            self.interruptions.train_p,
            self.interruptions.upload_p,
        )
        for i, p in enumerate(ps):
            if draws[i, 0] < p:
                events.append((starts[i] + draws[i, 1] * phases_s[i], "random", i))
                break  # the first random drop ends the round; later draws stay unused
        if check_in.window_end_s - now_s < total:
            events.append((max(0.0, check_in.window_end_s - now_s), "unavailable", None))
        if level_j is not None:
            spent = 0.0
            for i, (seconds, power) in enumerate(zip(phases_s, powers_w, strict=True)):
                need = seconds * power
                if spent + need > level_j:  # power > 0 here
                    events.append((starts[i] + (level_j - spent) / power, "battery", i))
                    break
                spent += need
        if not events:
            return None
        at, cause, index = min(events, key=lambda e: e[0])
        if index is None:  # the phase with time in it that holds ``at``
            index = max(i for i in range(len(PHASES)) if starts[i] <= at and phases_s[i] > 0)
        return Interruption(PHASES[index], at, cause)
