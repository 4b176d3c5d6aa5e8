"""Asynchronous and semi-asynchronous training on the simulated clock (FedBuff, FedCompass).

A synchronous round sends work and waits for it. Here every device runs on its own: the server
hands the current global model to a device, the device trains and uploads when its latency says
(download + compute + upload under the conditions drawn for that dispatch), and the strategy
reacts to each arrival: buffer it, aggregate, reassign. Time is the simulated clock alone: a
min-heap of arrival and timer events (methods.md 6.4: "replace wall-clock timers with a
virtual-time event queue"); nothing waits on a wall-clock timer.

When a client's update is computed does not matter: it depends only on the model it was sent,
its data, its state and its seed. So training is deferred and batched: dispatched clients are
trained together (one exchange on the lanes) once one of them could arrive before the next
queued event (dispatch time + download + compute is a lower bound; the upload's size is known
only after training), or before a global update is recorded. Each is then queued to arrive at
dispatch time + its latency. Its new state is kept when it arrives (not when a strategy drops it
as too stale). A client is never dispatched while it is in flight, so its state is never read
before its previous update has landed.

Vocabulary of the run folder:

* ``round`` in metrics.jsonl is one update of the global model (its version); ``num_rounds``
  counts updates. ``num_clients`` of a row is how many client updates that update merged,
  ``num_sampled`` how many devices were sent work since the previous row; ``round_time_s`` the
  simulated time between the two updates; ``staleness_mean`` / ``staleness_max`` the merged
  updates' staleness (global updates between a client's download and the merge).
* Every dispatch has its own sequence number. It is the ``server-round`` the client sees, so its
  random draws (batch order, device conditions, faults) are named by (seed, dispatch, client).
* clients.jsonl gets one row per arrival (``outcome`` ok, late or stale, with ``staleness``,
  ``dispatch``, ``sent_s`` and ``arrival_s``) and one per device that could not take work
  (offline, infeasible) or failed; ``round`` is the version the row's step leads to.

Strategies subclass :class:`AsyncStrategy`; the loop is :meth:`AsyncLoop.steps`, which
``fedsim.rounds.synchronous.run_rounds`` drives like its synchronous rounds (same rows, progress
line, checkpoints: the event queue is in the checkpoint, so a resumed run continues bit for bit).
"""

from __future__ import annotations

import bisect
import heapq
import math
import operator
import random
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any, NamedTuple, overload

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict

from fedsim import keys
from fedsim.clock.devices import ClientWork, client_latency
from fedsim.clock.scheduler import DeviceCost, RoundSettlement
from fedsim.errors import ConfigError
from fedsim.keys import Outcome, node_id_of, partition_id_of
from fedsim.learning.params import array_record
from fedsim.seeding import derive_seed

if TYPE_CHECKING:  # the loop only reads the Federation; synchronous.py imports this module
    from fedsim.records.checkpoint import RunState
    from fedsim.rounds.synchronous import Federation

__all__ = [
    "Arrival",
    "ClientIdsExcept",
    "AsyncLoop",
    "Event",
    "AsyncStalled",
    "AsyncStrategy",
    "is_asynchronous",
    "staleness_weight",
]

# what a job of the loop can end as (Outcome.STRAGGLER and INTERRUPTED are synchronous only)
OUTCOMES = (
    Outcome.OK,
    Outcome.LATE,
    Outcome.STALE,
    Outcome.OFFLINE,
    Outcome.INFEASIBLE,
    Outcome.FAILED,
)
STALENESS_FNS = ("constant", "polynomial", "hinge")
MAX_IDLE_RETRIES = 1000  # retries with nothing in flight before a run is declared stalled
Tensors = dict[str, np.ndarray]


class Event(NamedTuple):
    """One entry of the loop's queue, ordered by simulated time, then by when it was queued.

    ``kind`` is ``arrival`` (``payload``: an :class:`Arrival`'s saved form, a plain dict),
    ``dropout`` (a phone interrupted mid-round: ``{"pid", "row"}``), ``timer`` (the strategy's
    tag) or ``idle`` (0). A checkpoint saves the queue as lists; the
    loop turns them back into events when it resumes.
    """

    at_s: float
    order: int
    kind: str
    payload: Any


@dataclass
class Arrival:
    """A client's update on its way back to the server, then landed (``on_arrival``'s argument).

    A strategy reads it and may set ``outcome`` (``Outcome.LATE``: merged from a later buffer;
    ``Outcome.STALE``: dropped, and the client's new state is not kept).
    """

    pid: int  # the client (partition id)
    base: int  # the global version it was sent and trained from
    steps: int | None  # local steps it was asked for (None: its own epochs)
    sent_s: float  # simulated time of the dispatch
    arrival_s: float  # sent_s + its latency (download, compute, upload, offloaded server time)
    train_loss: float | None  # its mean training loss, if it reported one
    delta: Tensors  # w_sent - w_trained, per tensor
    seq: int = 0  # the dispatch number (the server-round the client saw)
    num_examples: int = 0  # examples it trained on
    state: RecordDict | None = None  # its new client state (kept when it lands, unless stale)
    row: dict[str, Any] = field(default_factory=dict)  # its clients.jsonl row, completed on landing
    staleness: int = 0  # global updates between its dispatch and its landing (set on landing)
    outcome: str = Outcome.OK  # a strategy may set Outcome.LATE or Outcome.STALE

    def saved(self) -> dict[str, Any]:
        """The plain dict the event queue (and so a checkpoint) holds while it is in flight."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in _LANDING}

    @classmethod
    def from_saved(cls, saved: dict[str, Any]) -> Arrival:
        """Back from :meth:`saved` (a resumed run's queue holds the same keys)."""
        return cls(**saved)


_LANDING = ("staleness", "outcome")  # set when an update lands: not part of the queue
_IN_FLIGHT = ("arrival", "dropout")  # events whose client is still busy until they fire


class AsyncStalled(RuntimeError):
    """Every dispatch failed ``runtime.max_failed_rounds`` times in a row: the run stops."""


def is_asynchronous(strategy: object) -> bool:
    """Whether ``strategy`` runs on :class:`AsyncLoop` rather than synchronous rounds."""
    return isinstance(strategy, AsyncStrategy)


def staleness_weight(staleness: int, fn: str, a: float, b: float = 0.0) -> float:
    """s(tau): how much an update ``staleness`` global updates old counts.

    ``constant`` 1; ``polynomial`` (tau + 1)^a (a < 0 decays: FedBuff's 1/sqrt(1 + tau) is
    a = -0.5); ``hinge`` 1 while tau <= b, then 1 / (a (tau - b) + 1) (FedAsync, FedCompass).
    """
    if fn == "constant":
        return 1.0
    if fn == "polynomial":
        return float((staleness + 1) ** a)
    if fn == "hinge":
        return 1.0 if staleness <= b else 1.0 / (a * (staleness - b) + 1.0)
    raise ValueError(f"unknown staleness function {fn!r}")


def check_staleness_fn(prefix: str, fn: Any, a: Any, b: Any) -> None:
    """One-line ConfigErrors for a strategy's staleness knobs."""
    if fn not in STALENESS_FNS:
        raise ConfigError(f"{prefix}.staleness_fn", fn, f"one of {list(STALENESS_FNS)}")
    for name, value in (("staleness_a", a), ("staleness_b", b)):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{prefix}.{name}", value, "a number")
    if fn == "hinge" and (a < 0 or b < 0):
        raise ConfigError(f"{prefix}.staleness_a", a, "hinge needs a >= 0 and b >= 0")


class AsyncStrategy:
    """A strategy that reacts to events on the simulated clock instead of playing rounds.

    The loop calls :meth:`begin` once, then one handler per event; a handler may dispatch
    clients (:meth:`AsyncLoop.dispatch`), set timers, and make at most one global update
    (:meth:`AsyncLoop.update`). Whatever a strategy keeps between events must be plain data
    (numbers, strings, lists, dicts, NumPy arrays): that is what a checkpoint saves of it.
    """

    def begin(self, loop: AsyncLoop) -> None:
        """Start the first clients."""
        raise NotImplementedError

    def on_arrival(self, loop: AsyncLoop, job: Arrival) -> None:
        """A client's update arrived (see :class:`Arrival`)."""
        raise NotImplementedError

    def on_timer(self, loop: AsyncLoop, tag: int) -> None:
        """A timer set with :meth:`AsyncLoop.set_timer` fired."""

    def on_idle(self, loop: AsyncLoop) -> None:
        """Nothing is in flight and no timer is set (devices were offline or failed): retry."""

    def on_failure(self, loop: AsyncLoop, pid: int) -> None:
        """Client ``pid``'s training failed (it is idle again): note it, do not dispatch.

        This runs while the event's dispatches are being sent; the next event's handler may
        dispatch the client again.
        """

    def train_config(self) -> dict[str, Any]:
        """Extra train-config entries every dispatched client receives (client-term knobs)."""
        return {}


def to_tensors(arrays: ArrayRecord) -> Tensors:
    """An ArrayRecord as name -> NumPy array (read-only views are copied)."""
    return {name: np.array(array.numpy()) for name, array in arrays.items()}


def apply_step(global_arrays: Tensors, step: Tensors) -> Tensors:
    """``w - step`` per tensor, in each tensor's own dtype."""
    return {k: (w - step[k]).astype(w.dtype, copy=False) for k, w in global_arrays.items()}


class ClientIdsExcept(Sequence[int]):
    """The client ids ``0 .. num_clients - 1`` without ``excluded``, ascending, never listed.

    ``random.Random.sample`` draws the same clients from it as from the equivalent list (it only
    takes its length and indexes it, or lists it when small), but a population of 1,000,000
    costs no list of idle ids per dispatch: an index is found by binary search over the sorted
    excluded ids, O(log(len(excluded))^2).
    """

    def __init__(self, num_clients: int, excluded: Iterable[int]) -> None:
        self._num_clients = num_clients
        self._excluded = sorted(pid for pid in set(excluded) if 0 <= pid < num_clients)

    def __len__(self) -> int:
        return self._num_clients - len(self._excluded)

    @overload
    def __getitem__(self, index: int) -> int: ...

    @overload
    def __getitem__(self, index: slice) -> list[int]: ...

    def __getitem__(self, index: int | slice) -> int | list[int]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        position = operator.index(index)
        position += len(self) if position < 0 else 0
        if not 0 <= position < len(self):
            raise IndexError(f"index {index} of {len(self)} idle clients")
        # The smallest id with position + 1 non-excluded ids at or below it (binary search).
        low, high = position, position + len(self._excluded)
        while low < high:
            middle = (low + high) // 2
            if middle + 1 - bisect.bisect_right(self._excluded, middle) > position:
                high = middle
            else:
                low = middle + 1
        return low

    def __iter__(self) -> Iterator[int]:
        skip = set(self._excluded)
        return (pid for pid in range(self._num_clients) if pid not in skip)


class AsyncLoop:
    """The event loop of one asynchronous run (module docstring).

    Parameters
    ----------
    fed
        The run's ``fedsim.rounds.synchronous.Federation`` (grid, scheduler, cost model, model,
        test data).
    state
        The loop state; ``state.extra`` holds the event queue and counters (checkpointed).
    close
        ``close(state, arrays, version, (bytes up, bytes down, energy)) -> row``: evaluates a
        new global model, updates the run's totals and starts its metrics row
        (``fedsim.rounds.synchronous.close_round``).

    """

    def __init__(
        self,
        fed: Federation,
        state: RunState,
        close: Callable[[RunState, ArrayRecord, int, tuple[int, int, float]], dict[str, Any]],
    ) -> None:
        if not isinstance(fed.strategy, AsyncStrategy):
            raise TypeError(f"{type(fed.strategy).__name__} plays rounds: it has no event loop")
        self.fed, self.state, self._close = fed, state, close
        self.strategy: AsyncStrategy = fed.strategy
        self.seed = int(fed.cfg.seed)
        self.num_clients = int(fed.cfg.num_clients)
        self.max_failed = int(fed.cfg.runtime.max_failed_rounds)
        # What the loop keeps across a checkpoint (``state.extra``, plain data): the event queue,
        # counters, the clients that never fit their device. Its keys are those of run folders
        # already written, so they do not change.
        saved = state.extra
        # the queue, a heap of Events (a checkpoint gives them back as lists)
        saved["events"] = [Event(*event) for event in saved.get("events", [])]
        for name in ("order", "seq", "failed_streak", "idle_streak", "latency_n", "last_update_s"):
            saved.setdefault(name, 0)
        saved.setdefault("latency_sum", 0.0)
        saved.setdefault("infeasible", [])
        saved.setdefault("began", False)
        self.saved = saved
        # dispatched, not trained yet: (message, row, cost, steps, earliest possible arrival)
        self._sends: list[tuple[Message, dict[str, Any], DeviceCost, int | None, float]] = []
        self._update: tuple[ArrayRecord, Sequence[Mapping[str, Any]]] | None = None
        self._new_step()
        self._base: tuple[int, Tensors] | None = None  # the global model as NumPy, by version
        self._default_steps: dict[int, int] = {}

    # --- what a strategy reads ------------------------------------------------------------------
    @property
    def now(self) -> float:
        """Simulated seconds since the run began."""
        return self.fed.scheduler.clock.now_s

    @property
    def version(self) -> int:
        """How many global updates have been made (this event's included)."""
        return self.state.server_round + (self._update is not None)

    @property
    def arrays(self) -> ArrayRecord:
        """The current global model (this event's update included)."""
        return self._update[0] if self._update is not None else self.state.arrays

    def global_tensors(self) -> Tensors:
        """The current global model as NumPy arrays (converted once per version; do not modify)."""
        if self._base is None or self._base[0] != self.version:
            self._base = (self.version, to_tensors(self.arrays))
        return self._base[1]

    def busy(self) -> set[int]:
        """Partition ids of the clients in flight (their update has not arrived yet)."""
        in_flight = {e.payload["pid"] for e in self.saved["events"] if e.kind in _IN_FLIGHT}
        return in_flight | {partition_id_of(m.metadata.dst_node_id) for m, *_ in self._sends}

    @property
    def infeasible(self) -> frozenset[int]:
        """Clients whose training does not fit their device's memory: never offered work again."""
        return frozenset(self.saved["infeasible"])

    def idle(self) -> ClientIdsExcept:
        """Clients that may be sent work now (not in flight, not too big for their device)."""
        return ClientIdsExcept(self.num_clients, self.busy() | self.infeasible)

    def sample_idle(self, count: int) -> list[int]:
        """Up to ``count`` idle clients, drawn by (seed, the event's order)."""
        pool = self.idle()
        rng = random.Random(
            derive_seed(self.seed, "async-sample", self.saved["order"], self.version)
        )
        return rng.sample(pool, min(count, len(pool)))

    def mean_latency_s(self) -> float | None:
        """Mean latency of the updates that arrived so far (None before the first)."""
        n = self.saved["latency_n"]
        return self.saved["latency_sum"] / n if n else None

    # --- what a strategy does -------------------------------------------------------------------
    def dispatch(self, pid: int, steps: int | None = None) -> bool:
        """Send the current global model to client ``pid``; False if its device cannot take it.

        ``steps``: exactly that many local steps instead of the client's epochs. A device cannot
        take work when it is offline (a draw per dispatch) or when its training does not fit its
        memory (it never will: it is not offered work again).
        """
        if pid in self.busy():
            raise ValueError(f"client {pid} is already in flight")
        self.saved["seq"] += 1
        seq = self.saved["seq"]
        config: dict[str, Any] = {keys.SERVER_ROUND: seq, **self.strategy.train_config()}
        if steps is not None:
            config[keys.LOCAL_STEPS] = int(steps)
        content = RecordDict({keys.ARRAYS: self.arrays, keys.CONFIG: ConfigRecord(config)})
        message = Message(content, node_id_of(pid), MessageType.TRAIN, group_id=f"dispatch-{seq}")
        self.fed.distillation.attach([message], self.state.client_states)  # as of the dispatch
        cost = self._cost(pid, steps)
        plan = self.fed.scheduler.plan(seq, [message], {pid: cost})
        row = plan.records[pid]
        row.update(dispatch=seq, base_version=self.version, sent_s=self.now, local_steps=steps)
        self.step["num_sampled"] += 1
        if not plan.to_send:
            if row["outcome"] == Outcome.INFEASIBLE:
                self.saved["infeasible"].append(pid)
            self._log(row)
            return False
        # Download + compute (+ offloaded server time) are known now; the upload is not (it is the
        # reply's size), so this is a lower bound on the arrival time.
        work = ClientWork(
            cost.train_flops, row["bytes_down"], 0, cost.peak_memory_bytes, cost.server_flops
        )
        bound = client_latency(plan.conditions[pid], work, self.fed.scheduler.fleet.server_gflops)
        self._sends.append((message, row, cost, steps, self.now + bound.total_s))
        self.saved["idle_streak"] = 0
        return True

    def set_timer(self, at_s: float, tag: int) -> None:
        """Call the strategy's ``on_timer(loop, tag)`` at simulated time ``at_s`` (>= now)."""
        self._push(max(at_s, self.now), "timer", int(tag))

    def update(self, arrays: ArrayRecord, jobs: Sequence[Mapping[str, Any]]) -> None:
        """Make ``arrays`` the new global model, merged from ``jobs`` (one update per event).

        ``jobs``: what the strategy kept of each merged arrival (plain dicts, since it keeps them
        in its checkpointed state), with at least ``base`` and ``train_loss``.
        """
        if self._update is not None:
            raise RuntimeError("a strategy may make one global update per event")
        self._update = (arrays, jobs)

    # --- the loop ---------------------------------------------------------------------------------
    def steps(self, num_rounds: int) -> Iterator[tuple[dict[str, Any], RoundSettlement]]:
        """Run events until ``num_rounds`` global updates; yield each update's row and records."""
        if not self.saved["began"]:
            self.saved["began"] = True
            self.saved["last_update_s"] = self.now
            self.strategy.begin(self)
        while self.version < num_rounds:
            events = self.saved["events"]
            # Training is deferred until a dispatched client could arrive before the next event:
            # the clients dispatched in between are trained together (one exchange), and a
            # client's update depends only on what it was sent, not on when it is computed.
            if self._sends and (not events or min(s[4] for s in self._sends) <= events[0].at_s):
                self._flush()
            if not events:  # nobody in flight, no timer: look again after a typical latency
                self._check_progress()
                self._push(self.now + (self.mean_latency_s() or 1.0), "idle", 0)
            at_s, _, kind, payload = heapq.heappop(events)
            self.fed.scheduler.clock.now_s = max(self.now, float(at_s))
            if kind == "arrival":
                self._arrive(Arrival.from_saved(payload))
            elif kind == "dropout":
                self._drop_out(payload["pid"], payload["row"])
            elif kind == "timer":
                self.strategy.on_timer(self, payload)
            else:
                self.strategy.on_idle(self)
            if self._update is not None:
                self._flush()  # a checkpoint may follow: nothing dispatched stays untrained
                yield self._close_step()

    def _check_progress(self) -> None:
        """Stop a run that can no longer make an update (nothing in flight, nothing can go)."""
        if not self.idle():
            raise AsyncStalled(
                "no client can take work: every device is too small for its training job "
                "(infeasible in clients.jsonl)"
            )
        self.saved["idle_streak"] += 1
        if self.saved["idle_streak"] > MAX_IDLE_RETRIES:
            raise AsyncStalled(f"no device took work in {MAX_IDLE_RETRIES} tries (all offline)")

    def _push(self, at_s: float, kind: str, payload: Any) -> None:
        self.saved["order"] += 1
        heapq.heappush(self.saved["events"], Event(float(at_s), self.saved["order"], kind, payload))

    def _cost(self, pid: int, steps: int | None) -> DeviceCost:
        """The device cost of a client-round, scaled to ``steps`` local steps if given.

        The cost model counts a round of the client's own epochs; Q steps cost Q / (steps of
        such a round) of it (device and server FLOPs; memory is per step and unchanged).
        """
        cost = self.fed.cost_fn(pid, 1.0)
        if steps is None:
            return cost
        default = self.round_steps(pid)
        scale = steps / default
        return replace(
            cost,
            train_flops=round(cost.train_flops * scale),
            server_flops=round(cost.server_flops * scale),
        )

    def round_steps(self, pid: int) -> int:
        """Mini-batch steps of one round of the client's own epochs (and ``max_steps``)."""
        if pid not in self._default_steps:
            behaviour = self.fed.behaviour
            while not hasattr(behaviour, "local_epochs") and hasattr(behaviour, "inner"):
                behaviour = behaviour.inner  # DFL's wrapper
            epochs = getattr(behaviour, "local_epochs", None)
            batch = getattr(behaviour, "batch_size", None)
            if epochs is None or batch is None:
                raise ConfigError(
                    "client", type(behaviour).__name__, "needs local_epochs and batch_size"
                )
            n = self.fed.num_examples(pid)
            steps = int(epochs) * max(1, math.ceil(n / int(batch)))
            cap = getattr(behaviour, "max_steps", None)
            self._default_steps[pid] = max(1, min(steps, cap) if cap is not None else steps)
        return self._default_steps[pid]

    def _flush(self) -> None:
        """Train every client dispatched and not trained yet (one exchange); queue arrivals."""
        if not self._sends:
            return
        sends, self._sends = self._sends, []
        messages = [message for message, *_ in sends]
        replies, new_states = self.fed.grid.exchange(messages, self.state.client_states)
        bases: dict[int, Tensors] = {}  # the model each message carried, as NumPy, once
        failed = 0
        for (message, row, cost, steps, _), reply in zip(sends, replies, strict=True):
            pid = row["partition_id"]
            sent = array_record(message.content, keys.ARRAYS)
            if id(sent) not in bases:
                bases[id(sent)] = self.global_tensors() if sent is self.arrays else to_tensors(sent)
            base = bases[id(sent)]
            latency = self.fed.scheduler.measure(row, reply, cost)
            # as the scheduler charged the link (a phone that dropped out: the part it carried)
            self.step["bytes_down"] += row["bytes_down"]
            if latency is None:
                # A phone that drops out mid-round is busy, and spending, until it drops; as in a
                # synchronous round, a drop-out is not an engine failure (no stall streak).
                if row["outcome"] == Outcome.INTERRUPTED:
                    self._push(
                        row["sent_s"] + row["latency_s"], "dropout", {"pid": pid, "row": row}
                    )
                    continue
                failed += 1
                self._log(row)
                self.strategy.on_failure(self, pid)
                continue
            trained = to_tensors(array_record(reply.content, keys.ARRAYS))
            metrics = reply.content.get(keys.METRICS)
            job = Arrival(
                pid=pid,
                base=row["base_version"],
                seq=row["dispatch"],
                steps=steps,
                sent_s=row["sent_s"],
                arrival_s=row["sent_s"] + latency,
                num_examples=int(keys.number(metrics, keys.NUM_EXAMPLES)) if metrics else 0,
                train_loss=float(keys.number(metrics, keys.TRAIN_LOSS))
                if metrics and keys.TRAIN_LOSS in metrics
                else None,
                delta={k: base[k] - trained[k] for k in base},  # w_sent - w_trained
                state=new_states.get(pid),
                row=row,
            )
            self._push(job.arrival_s, "arrival", job.saved())
        streak = self.saved["failed_streak"] + 1 if failed == len(sends) else 0
        self.saved["failed_streak"] = streak
        if self.max_failed and streak >= self.max_failed:
            raise AsyncStalled(
                f"every client sent work failed {streak} times in a row "
                f"(last: {sends[-1][1].get('error', '?')})"
            )

    def _arrive(self, job: Arrival) -> None:
        """A client's update lands: its state is kept, the strategy decides what to do with it."""
        pid, row = job.pid, job.row
        job.staleness = self.version - job.base
        self.saved["latency_sum"] += job.arrival_s - job.sent_s
        self.saved["latency_n"] += 1
        new_state, job.state = job.state, None  # the client's to keep, not the strategy's
        self.strategy.on_arrival(self, job)
        if job.outcome != Outcome.STALE and new_state is not None:
            self.state.client_states[pid] = new_state
        row.update(outcome=job.outcome, staleness=job.staleness, arrival_s=job.arrival_s)
        self.step["bytes_up"] += int(row.get("bytes_up", 0))
        self.step["energy_j"] += float(row.get("energy_j", 0.0))
        self._log(row)

    def _drop_out(self, pid: int, row: dict[str, Any]) -> None:
        """A phone drops out mid-round (fedsim/clock/phones.py), at the time its row says.

        Until then it was busy: it is not offered work before, and what it spent (energy, the
        bytes it carried up) is counted in the step in which it drops, as an arrival's is.
        """
        self.step["bytes_up"] += int(row.get("bytes_up", 0))
        self.step["energy_j"] += float(row.get("energy_j", 0.0))
        self._log(row)
        self.strategy.on_failure(self, pid)

    def _log(self, row: dict[str, Any]) -> None:
        clean = dict(row)
        clean[keys.ROUND] = self.state.server_round + 1  # the update this step leads to
        self.step["rows"].append(clean)

    def _new_step(self) -> None:
        self.step: dict[str, Any] = {
            "rows": [],
            "num_sampled": 0,
            "bytes_up": 0,
            "bytes_down": 0,
            "energy_j": 0.0,
        }

    def _close_step(self) -> tuple[dict[str, Any], RoundSettlement]:
        """Install the update, evaluate it, and return its metrics row and client records."""
        assert self._update is not None
        arrays, jobs = self._update
        self._update = None
        version = self.state.server_round + 1
        staleness = [version - 1 - job["base"] for job in jobs]
        losses = [job["train_loss"] for job in jobs if job.get("train_loss") is not None]
        step, rows = self.step, self.step["rows"]
        counts = {o: sum(r.get("outcome") == o for r in rows) for o in OUTCOMES}
        round_time_s = self.now - self.saved["last_update_s"]
        self.saved["last_update_s"] = self.now
        traffic = (step["bytes_up"], step["bytes_down"], step["energy_j"])
        row = self._close(self.state, arrays, version, traffic)
        row.update(
            {
                keys.NUM_CLIENTS: len(jobs),
                keys.NUM_SAMPLED: step["num_sampled"],
                keys.NUM_FAILED: counts[Outcome.FAILED],
                keys.TRAIN_LOSS: float(np.mean(losses)) if losses else None,
                keys.SIM_TIME_S: self.state.sim_time_s,
                keys.ROUND_TIME_S: round_time_s,
                keys.NUM_STRAGGLERS: counts[Outcome.LATE] + counts[Outcome.STALE],
                keys.NUM_OFFLINE: counts[Outcome.OFFLINE],
                keys.NUM_INFEASIBLE: counts[Outcome.INFEASIBLE],
                keys.STALENESS_MEAN: float(np.mean(staleness)) if staleness else None,
                keys.STALENESS_MAX: max(staleness) if staleness else None,
            }
        )
        settled = RoundSettlement(
            kept=[],
            round_time_s=round_time_s,
            records=sorted(rows, key=lambda r: (r.get("arrival_s", r["sent_s"]), r["dispatch"])),
            counts={
                Outcome.STRAGGLER: counts[Outcome.LATE] + counts[Outcome.STALE],
                **{o: counts[o] for o in (Outcome.OFFLINE, Outcome.INFEASIBLE, Outcome.FAILED)},
            },
            energy_j=step["energy_j"],
        )
        self._new_step()
        return row, settled
