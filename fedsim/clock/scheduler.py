"""A synchronous round as a fleet of devices would live it: who is online, who fits, who is late.

Before sending, offline devices (per-round availability draw) and devices whose memory cannot hold
the client's training job are set aside. After the replies come back, each trained client's
latency = download + compute + upload (+ server time a method offloads) is computed from the
*actual* payload bytes and the FLOPs the cost model counted, under that round's conditions; a
deadline and over-selection decide whose update the strategy aggregates, and the simulated clock
advances by the round's length. The numbers come from fedsim/clock/devices.py (pure functions).

Two optional parts of a fleet change this only where a YAML sets them: a profile's measured
seconds-per-example table replaces FLOPs / rate for a job that reports its examples
(``DeviceCost.train_examples``, ``devices.measured_compute_s``), and a fleet's phone failures
(fedsim/clock/phones.py) add a check-in at the round's start (plugged in, unmetered, battery:
``offline`` with an ``offline_reason``), drop-outs by phase (``interrupted``, charged until the
drop-out, never aggregated) and a battery per device that the round's energy drains.
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
    DeviceProfile,
    DeviceState,
    Fleet,
    Latency,
    SimClock,
    client_energy_j,
    client_latency,
    fits_in_memory,
    measured_compute_s,
    synchronous_round,
)
from fedsim.clock.phones import CheckIn
from fedsim.errors import ConfigError
from fedsim.keys import Outcome, partition_id_of
from fedsim.learning.params import arrays_nbytes, content_nbytes

__all__ = [
    "RoundScheduler",
    "DeviceCost",
    "RoundPlan",
    "RoundSettlement",
    "CostModel",
    "charged_bytes",
    "device_link_bytes",
]


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
    # Examples the device trains on this round (local epochs x its examples, capped by the
    # step limit): what a measured seconds-per-example table multiplies
    # (devices.measured_compute_s). 0 = not reported: the FLOPs rule.
    train_examples: int = 0
    # Bytes the clock charges on the device's link per byte measured on the real payload: 1.0
    # unless a cost backbone (``model.cost_backbone``, fedsim/learning/cost_backbone.py) stands in
    # for the model that trains. Decision: the bytes stay *measured* on the real messages and
    # reports (so a strategy's extra records, SCAFFOLD's control variates say, and side-tuning's
    # cache hits and real token counts keep their effect) and are scaled in the one place the
    # clock reads them (:func:`charged_bytes`: the messages' tensors and the reported extra
    # upload) by the ratio the method computes: the cost backbone's trainable bytes / the trained
    # model's (LoRA, IA3, full fine-tuning, local SGD), or activation bytes per sample
    # (side-tuning). clients.jsonl, metrics.jsonl and the summary report the scaled bytes.
    payload_scale: float = 1.0
    # Whether ``payload_scale`` applies to the reported extra upload too: the method's payload
    # when the model stays on the server (side-tuning's activations). Otherwise an extra upload
    # is a side record that does not grow with the backbone (DFL's per-class targets, C x C).
    scale_extra_upload: bool = False


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
    # partition id -> the conditions drawn for it (compute, bandwidth, channel): the clock's own
    # draw, which the strategies never see (fedsim/clock/server_view.py)
    conditions: dict[int, DeviceState] = field(default_factory=dict)


@dataclass
class _InFlight:
    """What the scheduler keeps of a client sent work until :meth:`RoundScheduler.measure`."""

    start_s: float  # the clock when it was sent
    width: float  # the sub-model width it trains (1: the whole model)
    check_in: CheckIn | None  # its phone's check-in (None without phones)
    conditions: DeviceState  # drawn in plan()


@dataclass
class RoundSettlement:
    """The round after the replies: updates to aggregate, timing and per-client rows."""

    kept: list[Message]
    round_time_s: float
    records: list[dict[str, Any]]
    counts: dict[str, int] = field(default_factory=dict)
    energy_j: float = 0.0


#: Array records whose size does not depend on the model (DFL's per-class targets, C x C): a
#: cost backbone's ``payload_scale`` leaves them as measured.
UNSCALED_RECORDS = frozenset({keys.DFL_CLASS_TARGETS})


def device_link_bytes(content: RecordDict, cost: DeviceCost) -> int:
    """Bytes of a message's tensors on the device's link (0: the model stays on the server)."""
    if cost.model_on_server:
        return 0
    measured = content_nbytes(content)
    if cost.payload_scale == 1.0:
        return measured
    fixed = sum(
        arrays_nbytes(record)
        for name, record in content.array_records.items()
        if name in UNSCALED_RECORDS
    )
    return charged_bytes(measured - fixed, cost) + fixed


def charged_bytes(measured: int, cost: DeviceCost) -> int:
    """Bytes the clock charges for ``measured`` real bytes (:attr:`DeviceCost.payload_scale`)."""
    return measured if cost.payload_scale == 1.0 else round(measured * cost.payload_scale)


def _extra_upload_bytes(reply: Message) -> int:
    """Bytes the device uploaded besides its tensors (e.g. activations), as it reported them."""
    metrics = reply.content.get(keys.METRICS)
    if metrics is None:
        return 0
    return int(keys.number(metrics, keys.EXTRA_UPLOAD_BYTES, 0))


def _part(total_bytes: int, done_s: float, full_s: float) -> int:
    """Bytes a link carried in ``done_s`` of the ``full_s`` seconds the whole transfer takes."""
    return total_bytes if done_s >= full_s else round(total_bytes * done_s / full_s)


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
        # Phones (fleet.phones): each battery's last [level J, at s] (plain lists: checkpointed
        # through keep_state), and each client sent work until its reply is measured.
        self.batteries: dict[int, list[float]] = {}
        self._jobs: dict[int, _InFlight] = {}

    def keep_state(self, extra: dict[str, Any]) -> None:
        """Keep the batteries in a checkpointed dict (``RunState.extra``); take back a resumed one.

        Nothing without phones, so such a run's checkpoint is what it was.
        """
        if self.fleet.phones is None or self.fleet.phones.battery is None:
            return
        for pid, anchor in extra.get("batteries", {}).items():
            self.batteries[int(pid)] = [float(v) for v in anchor]
        extra["batteries"] = self.batteries

    def _check_in(self, pid: int, server_round: int, row: dict[str, Any]) -> CheckIn | None:
        """The phone's state at the round's start, logged in ``row``; None without phones."""
        phones = self.fleet.phones
        if phones is None:
            return None
        now = self.clock.now_s
        level = None
        if phones.battery is not None:
            level = phones.level_at(self.seed, pid, self.batteries.get(pid), now)
        check_in = phones.check_in(self.seed, pid, server_round, now, level)
        row.update(
            plugged=check_in.plugged,
            unmetered=check_in.unmetered,
            battery_level=check_in.battery_level,
            failed_phase=None,
        )
        return check_in

    def plan(
        self, server_round: int, messages: Sequence[Message], costs: dict[int, DeviceCost]
    ) -> RoundPlan:
        """Set aside offline and infeasible devices; the rest are sent their messages."""
        to_send, records, conditions = [], {}, {}
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
            check_in = self._check_in(pid, server_round, row) if state.online else None
            if not state.online:
                row["outcome"] = Outcome.OFFLINE
            elif check_in is not None and check_in.reason is not None:
                row["outcome"], row["offline_reason"] = Outcome.OFFLINE, check_in.reason
            elif (reason := self._effect_reason(pid, server_round, profile)) is not None:
                row["outcome"], row["offline_reason"] = Outcome.OFFLINE, reason
            elif not fits_in_memory(profile, work):
                row["outcome"] = Outcome.INFEASIBLE
            else:
                to_send.append(msg)
                width = float(keys.number(config, keys.WIDTH, 1.0)) if config is not None else 1.0
                self._jobs[pid] = _InFlight(self.clock.now_s, width, check_in, state)
            records[pid], conditions[pid] = row, state
        return RoundPlan(to_send, records, conditions)

    def _effect_reason(self, pid: int, server_round: int, profile: DeviceProfile) -> str | None:
        """The first reason a fleet's effect gives for keeping the device out (None: none)."""
        for effect in self.fleet.effects:
            reason = effect.check_in(self.seed, pid, server_round, self.clock.now_s, profile)
            if reason is not None:
                return str(reason)
        return None

    def count_fitting(self, cost: DeviceCost) -> int:
        """How many of the run's devices can hold ``cost``'s peak memory (:meth:`plan`'s check).

        One assignment draw per device: meant for the start-up report, not for every round.
        """
        work = ClientWork(cost.train_flops, 0, 0, cost.peak_memory_bytes)
        return sum(fits_in_memory(self.profiles[pid], work) for pid in range(len(self.profiles)))

    def measure(self, row: dict[str, Any], reply: Message, cost: DeviceCost) -> float | None:
        """Fill ``row`` (a :meth:`plan` record) from the client's reply; its latency in seconds.

        Latency = download + compute + upload (+ offloaded server time) from the real payload
        bytes and the counted FLOPs under the conditions drawn in :meth:`plan`. A failed reply
        gets outcome ``failed`` and its reason, and no latency (None).
        """
        pid = row["partition_id"]
        sent = self._jobs.pop(pid)
        start_s, width, check_in, state = sent.start_s, sent.width, sent.check_in, sent.conditions
        if reply.has_error():
            row["outcome"] = Outcome.FAILED
            assert reply.error.reason is not None  # VirtualGrid's errors all give one
            row["error"] = " ".join(reply.error.reason.split())[:300]
            return None
        profile = self.profiles[pid]
        extra_up = _extra_upload_bytes(reply)
        extra_up = charged_bytes(extra_up, cost) if cost.scale_extra_upload else extra_up
        work = ClientWork(
            train_flops=cost.train_flops,
            bytes_down=row["bytes_down"],
            bytes_up=device_link_bytes(reply.content, cost) + extra_up,
            peak_memory_bytes=cost.peak_memory_bytes,
            server_flops=cost.server_flops,
            compute_s=measured_compute_s(profile, width, cost.train_examples, state.compute_gflops),
        )
        if work.compute_s is not None:  # the clock charged the measured table, not FLOPs
            row["measured_compute"] = True
        latency = client_latency(state, work, self.fleet.server_gflops)
        bytes_up = work.bytes_up
        if self.fleet.phones is not None:
            full = latency
            latency = self._phone_round(row, latency, start_s, check_in)
            if latency is not full:  # interrupted: the link carried the part it finished
                row["bytes_down"] = _part(work.bytes_down, latency.download_s, full.download_s)
                bytes_up = _part(work.bytes_up, latency.upload_s, full.upload_s)
        row.update(
            bytes_up=bytes_up,
            extra_upload_bytes=extra_up,
            latency_s=latency.total_s,
            download_s=latency.download_s,
            compute_s=latency.compute_s,
            upload_s=latency.upload_s,
            server_s=latency.server_s,
            energy_j=client_energy_j(profile, latency),
        )
        metrics = reply.content.get(keys.METRICS)
        for name, value in metrics.items() if metrics is not None else ():
            if name.startswith(keys.LOG_PREFIX):  # a client's own log fields (e.g. DFL's beta)
                row.setdefault(name[len(keys.LOG_PREFIX) :], value)
        if self.fleet.phones is not None and self.fleet.phones.battery is not None:
            self._drain(row, start_s)
        return None if row.get("outcome") == Outcome.INTERRUPTED else latency.total_s

    def _phone_round(
        self, row: dict[str, Any], latency: Latency, start_s: float, check_in: CheckIn | None
    ) -> Latency:
        """An interruption (fedsim/clock/phones.py) cuts the round short: the time until it."""
        phones = self.fleet.phones
        assert phones is not None
        pid, profile = row["partition_id"], self.profiles[row["partition_id"]]
        if check_in is None:  # sent without a check-in (a caller outside plan): check in now
            check_in = self._check_in(pid, int(row[keys.ROUND]), row)
            assert check_in is not None
        level = None
        if phones.battery is not None:
            level = phones.level_at(self.seed, pid, self.batteries.get(pid), start_s)
        phases = (latency.download_s, latency.compute_s, latency.upload_s)
        powers = (profile.radio_rx_power_w, profile.compute_power_w, profile.radio_tx_power_w)
        cut = phones.interruption(
            self.seed, pid, int(row[keys.ROUND]), phases, powers, start_s, check_in, level
        )
        if cut is None:
            return latency
        row.update(outcome=Outcome.INTERRUPTED, failed_phase=cut.phase, failure_cause=cut.cause)
        # Each phase runs until the interruption point, none after it; no server time.
        starts = (0.0, latency.download_s, latency.download_s + latency.compute_s)
        done = [min(max(cut.at_s - a, 0.0), d) for a, d in zip(starts, phases, strict=True)]
        return Latency(done[0], done[1], done[2], 0.0, cut.at_s)

    def _drain(self, row: dict[str, Any], start_s: float) -> None:
        """The battery after the client's round: charged/idle over it, less its energy."""
        phones = self.fleet.phones
        assert phones is not None and phones.battery is not None
        pid = row["partition_id"]
        end_s = start_s + row["latency_s"]
        level = phones.level_at(self.seed, pid, self.batteries.get(pid), end_s)
        level = max(0.0, level - row["energy_j"])
        self.batteries[pid] = [level, end_s]
        row["battery_level_end"] = level / phones.battery.capacity_j

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
            plan.records[pid]["outcome"] = Outcome.OK if pid in kept else Outcome.STRAGGLER
        round_time_s = timing.round_time_s
        if not kept:  # only drop-outs (or nothing): the round lasted until the last was seen
            cut = [
                r["latency_s"] for r in plan.records.values() if r["outcome"] == Outcome.INTERRUPTED
            ]
            limit = math.inf if self.deadline_s is None else self.deadline_s
            round_time_s = max(round_time_s, min(max(cut, default=0.0), limit) + server_time_s)
        self.clock.advance(round_time_s)
        rows = [dict(row) for row in plan.records.values()]
        outcomes: tuple[str, ...] = (
            Outcome.OK,
            Outcome.STRAGGLER,
            Outcome.OFFLINE,
            Outcome.INFEASIBLE,
            Outcome.FAILED,
        )
        if self.fleet.phones is not None:  # drop-outs are counted only where they can happen
            outcomes += (Outcome.INTERRUPTED,)
        counts = {o: sum(r["outcome"] == o for r in rows) for o in outcomes}
        for observe in self.observers:
            observe(rows)
        return RoundSettlement(
            kept=[by_pid[pid] for pid in sorted(kept)],
            round_time_s=round_time_s,
            records=sorted(rows, key=lambda r: r["partition_id"]),
            counts=counts,
            energy_j=sum(r.get("energy_j", 0.0) for r in rows),
        )
