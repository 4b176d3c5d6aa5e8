"""FedCompass (Li et al., ICLR 2024): semi-asynchronous FL with a computing-power-aware scheduler.

The server estimates each client's speed (simulated seconds per local step, an exponential
moving average ``s_i <- (1 - m) s_i + m * elapsed / Q_i``) and gives it a number of local steps
Q_i in [q_min, q_max] chosen so that a *group* of clients arrives at about the same time; a group
is merged when all of it has arrived, or when its timer fires at its latest arrival time
(expected + ``latest_time_factor`` x its span). Arrivals after that are late: they wait in a
general buffer, merged with the next group, and their client is reassigned at once. A client's
first update (no speed known yet; everyone starts with q_max) is merged on its own. Each merged
update moves the model by

    w <- w - alpha * s(tau_i) / N * Delta_i          Delta_i = w_sent - w_trained

with N the participating clients and tau_i the global updates since the client downloaded.

This follows methods.md 6.4, read from the official code (APPFL, compass_scheduler.py and
fedcompass_aggregator.py): joining picks the existing group with the largest feasible Q
(``floor((expected - now) / s_i)`` within [q_min, q_max]); otherwise a new group is created whose
Q lets the client arrive after the fastest member of an open group could finish another q_max
steps, clamped to [q_min, q_max]. Our decisions, each a knob:

* ``q_min`` / ``q_max`` default to null: q_max = the median over participants of the steps of
  one round of the client's own epochs, q_min = max(1, round(q_max / 5)) (the paper's 20 / 100
  ratio). The paper's 20 and 100 are steps of batch 64 on CIFAR-10; on a digits partition of
  ~36 examples they would be 10 to 50 epochs. Numbers set them as in the paper.
* ``staleness_a`` defaults to -0.5: the official example uses (tau + 1)^(+0.5), which *grows*
  with staleness (methods.md flags it as a pitfall); FedAsync's decay is (tau + 1)^(-a).
* The timers are events on fedsim's simulated clock, and speeds are measured on it (download +
  compute + upload of the dispatch, from the device model): no wall-clock timer anywhere.
* ``num_participants``: FedCompass is cross-silo (every client always busy). null = all
  ``num_clients``; a number = that many, drawn once by the seed.
* A device that is offline when it would be reassigned is retried at the next event; a failed
  client is retried the same way. Floors get a 1e-9 slack so that equal speeds give Q = q_max,
  not q_max - 1, through rounding.
* Parameters are merged by the rule above; buffers (no model of ours has any) likewise.
"""

from __future__ import annotations

import math
import random
from typing import Any

import numpy as np

from fedsim.checks import is_int
from fedsim.errors import ConfigError
from fedsim.keys import Outcome
from fedsim.rounds.asynchronous import (
    Arrival,
    AsyncLoop,
    AsyncStrategy,
    apply_step,
    check_staleness_fn,
    staleness_weight,
)
from fedsim.seeding import derive_seed
from fedsim.strategies.common import check_number, to_record

__all__ = ["FedCompass", "compass_step"]

_SLACK = 1e-9


def compass_step(
    global_arrays: dict, updates: list[tuple[dict, float]], alpha: float, num_clients: int
) -> dict:
    """``w - sum_i alpha * s_i / N * Delta_i`` from (Delta_i, s(tau_i)) pairs."""
    step = {k: sum(alpha * s / num_clients * d[k] for d, s in updates) for k in global_arrays}
    return apply_step(global_arrays, step)


class FedCompass(AsyncStrategy):
    """``strategy=fedcompass``; YAML keys = these arguments (conf/strategy/fedcompass.yaml).

    Parameters
    ----------
    q_min, q_max
        Bounds of the local steps a client is given (the paper: 20 and 100; null: from the
        clients' own rounds, see the module docstring).
    speed_momentum
        m of the speed estimate (0.9: the newest measurement counts 90%).
    latest_time_factor
        A group's latest arrival = start + factor x (expected - start) (1.5).
    alpha
        Server mixing rate (0.9).
    staleness_fn, staleness_a, staleness_b
        s(tau): ``constant``, ``polynomial`` (tau + 1)^a, or ``hinge``
        (fedsim/rounds/asynchronous.py).
    num_participants
        Clients taking part (null = all; else drawn once by the seed).

    """

    def __init__(
        self,
        q_min: int | None = None,
        q_max: int | None = None,
        speed_momentum: float = 0.9,
        latest_time_factor: float = 1.5,
        alpha: float = 0.9,
        staleness_fn: str = "polynomial",
        staleness_a: float = -0.5,
        staleness_b: float = 0.0,
        num_participants: int | None = None,
    ) -> None:
        if q_min is not None and not is_int(q_min, 1):
            raise ConfigError("strategy.q_min", q_min, "null or an integer >= 1")
        if q_max is not None and not is_int(q_max, q_min or 1):
            raise ConfigError("strategy.q_max", q_max, f"null or an integer >= q_min ({q_min})")
        m = check_number("speed_momentum", speed_momentum, 0.0, inclusive=False)
        if m > 1:
            raise ConfigError("strategy.speed_momentum", speed_momentum, "a number in (0, 1]")
        check_number("latest_time_factor", latest_time_factor, 1.0)
        check_number("alpha", alpha, 0.0, inclusive=False)
        check_staleness_fn("strategy", staleness_fn, staleness_a, staleness_b)
        if num_participants is not None and not is_int(num_participants, 1):
            raise ConfigError("strategy.num_participants", num_participants, "null or >= 1")
        self.q_min, self.q_max = q_min, q_max
        self.speed_momentum, self.latest_time_factor = float(m), float(latest_time_factor)
        self.alpha = float(alpha)
        self.staleness_fn, self.staleness_a = staleness_fn, float(staleness_a)
        self.staleness_b, self.num_participants = float(staleness_b), num_participants
        # Scheduler state: plain data, saved by checkpoints.
        self.participants: list[int] = []
        self.speed: dict[int, float] = {}  # seconds per local step
        self.group_of: dict[int, int] = {}  # client -> arrival group (-1: none, first contact)
        self.groups: dict[int, dict[str, Any]] = {}  # clients, arrived, start, expected, latest
        self.group_buffer: dict[int, list[dict[str, Any]]] = {}
        self.general_buffer: list[dict[str, Any]] = []
        self.waiting: list[int] = []  # could not be dispatched (offline, failed): retried
        self.group_counter = 0

    # --- events -------------------------------------------------------------------------------
    def begin(self, loop: AsyncLoop) -> None:
        """Every participant starts at once with q_max steps and no group."""
        everyone = range(loop.num_clients)  # sampled as a range: the same draw, no list of all
        if self.num_participants is not None and self.num_participants < len(everyone):
            rng = random.Random(derive_seed(loop.seed, "fedcompass-participants"))
            pids = sorted(rng.sample(everyone, self.num_participants))
        else:
            pids = list(everyone)
        self.participants = pids
        if self.q_max is None:
            self.q_max = int(np.median([loop.round_steps(pid) for pid in pids]))
        if self.q_min is None:
            self.q_min = min(self.q_max, max(1, round(self.q_max / 5)))
        for pid in pids:
            self._send(loop, pid, self.q_max, -1)

    def on_arrival(self, loop: AsyncLoop, job: Arrival) -> None:
        """Update the client's speed; merge alone, buffer in its group, or buffer as late."""
        pid = job.pid
        if job.steps is None:  # every dispatch of FedCompass names its Q_i
            raise RuntimeError(f"client {pid} arrived without the step count it was sent")
        measured = (job.arrival_s - job.sent_s) / job.steps
        old = self.speed.get(pid)
        m = self.speed_momentum
        self.speed[pid] = measured if old is None else (1 - m) * old + m * measured
        entry = {k: getattr(job, k) for k in ("pid", "base", "delta", "train_loss")}
        gid = self.group_of.get(pid, -1)
        group = self.groups.get(gid)
        if gid == -1:  # first contact: merged on its own, then grouped
            self._merge(loop, [entry])
            self._assign(loop, pid)
        elif group is None or loop.now > group["latest"]:
            job.outcome = Outcome.LATE
            if group is not None:
                group["clients"].remove(pid)
                if not group["clients"]:
                    self._close_group(gid)
            self.general_buffer.append(entry)
            self._assign(loop, pid)
        else:
            group["clients"].remove(pid)
            group["arrived"].append(pid)
            self.group_buffer.setdefault(gid, []).append(entry)
            if not group["clients"]:
                self._aggregate(loop, gid)
        self._retry(loop)

    def on_timer(self, loop: AsyncLoop, tag: int) -> None:
        """A group's latest arrival time: merge what arrived (if the group is still waiting)."""
        if tag in self.groups and self.group_buffer.get(tag):
            self._aggregate(loop, tag)
        self._retry(loop)

    def on_idle(self, loop: AsyncLoop) -> None:
        """Nothing in flight: retry the clients that could not be dispatched."""
        self._retry(loop)

    # --- scheduling ---------------------------------------------------------------------------
    def _aggregate(self, loop: AsyncLoop, gid: int) -> None:
        """Merge the group's buffer and the general buffer; reassign the arrived, fastest first."""
        entries = self.general_buffer + self.group_buffer.pop(gid, [])
        self.general_buffer = []
        self._merge(loop, entries)
        group = self.groups[gid]
        arrived, group["arrived"] = group["arrived"], []
        group["expected"] = group["latest"] = -math.inf  # closed: later members arrive late
        if not group["clients"]:
            self._close_group(gid)
        for pid in sorted(arrived, key=lambda p: (self.speed[p], p)):
            self._assign(loop, pid)

    def _merge(self, loop: AsyncLoop, entries: list[dict[str, Any]]) -> None:
        n = len(self.participants)
        updates = [
            (
                e["delta"],
                staleness_weight(
                    loop.version - e["base"], self.staleness_fn, self.staleness_a, self.staleness_b
                ),
            )
            for e in entries
        ]
        new = compass_step(loop.global_tensors(), updates, self.alpha, n)
        loop.update(to_record(new), entries)

    def _assign(self, loop: AsyncLoop, pid: int) -> None:
        """Give ``pid`` a group and its steps (join the best group, else open one); send it."""
        assert self.q_min is not None and self.q_max is not None  # set by begin()
        speed, now = self.speed[pid], loop.now
        best_gid, best_q = -1, -1
        for gid, group in self.groups.items():
            if not math.isfinite(group["expected"]):  # merged already: only late members left
                continue
            q = math.floor((group["expected"] - now) / speed + _SLACK)
            if self.q_min <= q <= self.q_max and q >= best_q:
                best_gid, best_q = gid, q
        if best_gid >= 0:
            self.groups[best_gid]["clients"].append(pid)
            self._send(loop, pid, best_q, best_gid)
            return
        q_new = -1
        for group in self.groups.values():
            if now < group["latest"]:
                members = group["clients"] + group["arrived"]
                fastest = min(self.speed.get(p, math.inf) for p in members)
                if math.isfinite(fastest):
                    q = math.floor((group["latest"] + fastest * self.q_max - now) / speed + _SLACK)
                    if q <= self.q_max:
                        q_new = max(q_new, q)
        if 0 <= q_new < self.q_min:
            q_new = self.q_min
        elif q_new < 0:
            q_new = self.q_max
        gid = self.group_counter
        self.group_counter += 1
        span = q_new * speed
        self.groups[gid] = {
            "clients": [pid],
            "arrived": [],
            "expected": now + span,
            "latest": now + span * self.latest_time_factor,
        }
        loop.set_timer(self.groups[gid]["latest"], gid)
        self._send(loop, pid, q_new, gid)

    def _send(self, loop: AsyncLoop, pid: int, steps: int, gid: int) -> None:
        self.group_of[pid] = gid
        if loop.dispatch(pid, steps=steps):
            return
        if gid >= 0:  # offline or infeasible: not coming; leave the group
            self.groups[gid]["clients"].remove(pid)
            if not self.groups[gid]["clients"] and not self.groups[gid]["arrived"]:
                self._close_group(gid)
        if pid not in loop.infeasible:
            self.waiting.append(pid)

    def _retry(self, loop: AsyncLoop) -> None:
        waiting, self.waiting = self.waiting, []
        assert self.q_max is not None  # set by begin()
        busy = loop.busy()
        for pid in waiting:
            if pid in busy:
                continue
            if pid in self.speed:
                self._assign(loop, pid)
            else:
                self._send(loop, pid, self.q_max, -1)

    def _close_group(self, gid: int) -> None:
        self.groups.pop(gid, None)
        self.group_buffer.pop(gid, None)

    def on_failure(self, loop: AsyncLoop, pid: int) -> None:
        """A client's training failed: it leaves its group and is retried at the next event."""
        gid = self.group_of.get(pid, -1)
        group = self.groups.get(gid)
        if group is not None and pid in group["clients"]:
            group["clients"].remove(pid)
            if not group["clients"] and not group["arrived"]:
                self._close_group(gid)
        self.waiting.append(pid)
