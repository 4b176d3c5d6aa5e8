"""Virtual clients on a few physical lanes: the strategy sees one node per partition id.

Flower's simulation engine runs one ClientApp call per message, and each call pays Ray transport
of the message *and* the node's Context plus a 0.1 s polling quantum (landscape.md, A.1.4 and D).
With thousands of simulated devices that orchestration, not training, would dominate. So:

* ``VirtualGrid`` is what strategies talk to. ``get_node_ids()`` returns one *virtual* node id
  per partition id (``partition_id + 1``; Flower reserves node id 0 for the SuperLink), in sorted
  order, so Flower's ``random.sample`` over it is reproducible once ``random`` is seeded.
* ``send_and_receive`` packs the strategy's per-client messages into one message per *lane* (a
  real SuperNode, i.e. a Ray actor's worth of work), deduplicating content the strategy shared
  between clients (FedAvg sends one RecordDict to all), and unpacks each lane's reply into one
  reply Message per virtual client. Strategies' ``aggregate_train`` runs unchanged on those.
* A lane whose worker crashed or that did not answer in time costs only its own clients, and
  only if they fail again: the grid waits until the workers answer again (``recover``), then
  sends the lane's clients once more. A client's training is a pure function of what its
  message carries, so a second attempt computes what the first would have.

The pack/unpack functions are pure and tested without Ray.
"""

from __future__ import annotations

import hashlib
import logging
import re
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.app.error import Error
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from omegaconf import DictConfig, OmegaConf

from fedsim import keys
from fedsim.keys import node_id_of, partition_id_of

if TYPE_CHECKING:
    from flwr.supercore.run import Run

__all__ = [
    "PlainMessages",
    "VirtualGrid",
    "listed_population_limit",
    "node_id_of",
    "partition_id_of",
    "pack_lane",
    "unpack_lane",
    "pack_replies",
    "unpack_replies",
    "assign_lanes",
    "LaneSettings",
    "lane_settings",
    "CLIENT_ERROR_CODE",
]

#: Set whenever lane messages are pushed: wakes the simulation engine's message pump, which
#: would otherwise find them at its next 0.1 s poll (see fedsim/engine/simulation.py).
MESSAGES_PUSHED = threading.Event()

#: Error code of a virtual client whose training raised (Flower's ClientApp exception code).
CLIENT_ERROR_CODE = 1
#: Error code of a virtual client whose lane did not answer before the round timeout.
LANE_TIMEOUT_CODE = 2

log = logging.getLogger("fedsim")


@dataclass(frozen=True)
class LaneSettings:
    """How the server sends a lane message: what the worker needs to know about the wait."""

    attempt: int = 1  # 1 = the clients' first send this round; 2 = sent again after a failure
    timeout_s: float | None = None  # how long the server waits for the lane (None: no limit)
    hold_s: float = 0.0  # an empty lane (a probe, see VirtualGrid.recover) holds its worker


def job_record(cfg: DictConfig) -> ConfigRecord:
    """The job description every lane message carries (resolved YAML + its hash)."""
    text = OmegaConf.to_yaml(cfg, resolve=True)
    digest = hashlib.sha256(text.encode()).hexdigest()
    return ConfigRecord({keys.JOB_YAML: text, keys.JOB_HASH: digest})


def assign_lanes(
    partition_ids: Sequence[int], cost: Callable[[int], float], num_lanes: int
) -> list[list[int]]:
    """Split clients over lanes, longest job first onto the least-loaded lane (LPT rule).

    Deterministic: ties break on lane index and partition id. Empty lanes are dropped.
    """
    lanes: list[list[int]] = [[] for _ in range(max(1, num_lanes))]
    loads = [0.0] * len(lanes)
    for pid in sorted(partition_ids, key=lambda p: (-cost(p), p)):
        lane = min(range(len(lanes)), key=lambda i: (loads[i], i))
        lanes[lane].append(pid)
        loads[lane] += cost(pid)
    return [sorted(lane) for lane in lanes if lane]


def pack_lane(
    messages: Sequence[Message],
    job: ConfigRecord,
    states: Mapping[int, RecordDict] | None = None,
    lane: LaneSettings | None = None,
) -> RecordDict:
    """One lane message's content carrying ``messages`` (all to distinct virtual nodes).

    Content objects shared by several messages are stored once (``c<k>/<name>``); each client's
    persistent state, if any, rides along as ``s<partition id>/<name>``; ``lane`` (default: a
    first attempt without a timeout) is read back by :func:`lane_settings`.
    """
    content_index: dict[int, int] = {}
    packed = RecordDict({keys.JOB: job})
    partition_ids: list[int] = []
    indices: list[int] = []
    for msg in messages:
        k = content_index.get(id(msg.content))
        if k is None:
            k = content_index[id(msg.content)] = len(content_index)
            for name, record in msg.content.items():
                packed[f"{keys.CONTENT_PREFIX}{k}/{name}"] = record
        pid = partition_id_of(msg.metadata.dst_node_id)
        partition_ids.append(pid)
        indices.append(k)
        for name, record in (states or {}).get(pid, RecordDict()).items():
            packed[f"{keys.STATE_PREFIX}{pid}/{name}"] = record
    lane = lane or LaneSettings()
    record = ConfigRecord(
        {
            keys.LANE_PARTITION_IDS: partition_ids,
            keys.LANE_CONTENT_INDEX: indices,
            keys.LANE_ATTEMPT: lane.attempt,
            keys.LANE_HOLD_S: float(lane.hold_s),
        }
    )
    if lane.timeout_s is not None:
        record[keys.LANE_TIMEOUT_S] = float(lane.timeout_s)
    packed[keys.LANE] = record
    return packed


def lane_settings(content: RecordDict) -> LaneSettings:
    """The :class:`LaneSettings` a lane message was packed with."""
    lane = content[keys.LANE]
    assert isinstance(lane, ConfigRecord)  # pack_lane's record
    timeout_s = keys.number(lane, keys.LANE_TIMEOUT_S) if keys.LANE_TIMEOUT_S in lane else None
    return LaneSettings(
        attempt=int(keys.number(lane, keys.LANE_ATTEMPT, 1)),
        timeout_s=None if timeout_s is None else float(timeout_s),
        hold_s=float(keys.number(lane, keys.LANE_HOLD_S, 0.0)),
    )


def _split_prefixed(content: RecordDict, prefix: str) -> dict[int, RecordDict]:
    """Records named ``<prefix><int>/<name>`` grouped by the int."""
    out: dict[int, RecordDict] = {}
    for name, record in content.items():
        head, sep, record_name = name.partition("/")
        if sep and head.startswith(prefix) and head[len(prefix) :].isdigit():
            out.setdefault(int(head[len(prefix) :]), RecordDict())[record_name] = record
    return out


def unpack_lane(
    content: RecordDict,
) -> tuple[ConfigRecord, list[tuple[int, RecordDict, RecordDict]]]:
    """Inverse of :func:`pack_lane`: the job record and (partition id, content, state) per client.

    A client without state gets an empty RecordDict.
    """
    lane = content[keys.LANE]
    assert isinstance(lane, ConfigRecord)  # pack_lane's record
    by_index = _split_prefixed(content, keys.CONTENT_PREFIX)
    states = _split_prefixed(content, keys.STATE_PREFIX)
    partition_ids, content_index = lane[keys.LANE_PARTITION_IDS], lane[keys.LANE_CONTENT_INDEX]
    assert isinstance(partition_ids, list) and isinstance(content_index, list)  # of ints
    pids = [int(p) for p in partition_ids]
    idx = [int(k) for k in content_index]
    job = content[keys.JOB]
    assert isinstance(job, ConfigRecord)  # pack_lane's job record
    return job, [
        (pid, by_index[k], states.get(pid, RecordDict())) for pid, k in zip(pids, idx, strict=True)
    ]


def pack_replies(
    replies: Sequence[tuple[int, RecordDict | str]],
    states: Mapping[int, RecordDict] | None = None,
) -> RecordDict:
    """One lane reply: per client its reply content or an error text, plus its new state.

    A client of the lane message that ``replies`` leaves out was not trained (its worker gave the
    lane up): the server sends it again.
    """
    packed = RecordDict()
    pids: list[int] = []
    errors: list[str] = []
    for pid, reply in replies:
        pids.append(pid)
        if isinstance(reply, str):
            errors.append(reply or "client failed")
            continue
        errors.append("")
        for name, record in reply.items():
            packed[f"{keys.CLIENT_PREFIX}{pid}/{name}"] = record
        for name, record in (states or {}).get(pid, RecordDict()).items():
            packed[f"{keys.STATE_PREFIX}{pid}/{name}"] = record
    packed[keys.LANE] = ConfigRecord({keys.LANE_PARTITION_IDS: pids, keys.LANE_ERRORS: errors})
    return packed


def unpack_replies(
    content: RecordDict,
) -> tuple[dict[int, RecordDict | str], dict[int, RecordDict]]:
    """Inverse of :func:`pack_replies`: per partition id the reply (or error), and new states."""
    lane = content[keys.LANE]
    assert isinstance(lane, ConfigRecord)  # pack_replies' record
    bodies = _split_prefixed(content, keys.CLIENT_PREFIX)
    out: dict[int, RecordDict | str] = {}
    partition_ids, errors = lane[keys.LANE_PARTITION_IDS], lane[keys.LANE_ERRORS]
    assert isinstance(partition_ids, list) and isinstance(errors, list)  # of ints, of strs
    for pid, err in zip(partition_ids, errors, strict=True):
        assert isinstance(pid, int)  # (zip of a union of lists: mypy sees an object)
        out[int(pid)] = str(err) if err else bodies.get(int(pid), RecordDict())
    return out, _split_prefixed(content, keys.STATE_PREFIX)


@dataclass
class LaneStats:
    """What the last ``send_and_receive`` cost on the wire and in wall time."""

    num_lane_messages: int = 0
    wall_time_s: float = 0.0


def listed_population_limit(available_bytes: int, num_clients: int) -> int:
    """The largest population whose node ids Flower's strategies can list in ``available_bytes``.

    Flower's ``FedAvg.configure_train`` (and every strategy built on it) lists every node id,
    each round, to count and sample them (``list(grid.get_node_ids())``, Flower 1.41). fedsim's
    VirtualGrid keeps the ids (a tuple: one pointer and one int object per client) so that each
    round copies pointers instead of building a million ints; the round's list adds one more
    pointer per client while it samples. Everything else fedsim keeps about clients is drawn per
    client on demand: these ids are the one cost that grows with the population. Bytes per id
    are computed here (CPython's sizes, rounded up to the 16-byte blocks its allocator hands
    out), not assumed.
    """
    pointer = sys.getsizeof([0]) - sys.getsizeof([])
    int_object = -(-sys.getsizeof(num_clients + 1) // _ALLOCATION_BLOCK) * _ALLOCATION_BLOCK
    return max(0, int(available_bytes)) // (2 * pointer + int_object)


_ALLOCATION_BLOCK = 16  # CPython's small-object allocator: sizes round up to 16 bytes (64-bit)


class WorkerSetupError(RuntimeError):
    """A worker cannot set up the run (its workload, model or client behaviour raised)."""


def _raise_if_cannot_start(replies: Iterable[Message]) -> None:
    """An empty lane message (a warm-up or a probe) that raised: no send will ever succeed.

    Such a message trains nobody; the worker only builds the run's state (workload, model,
    behaviour), so the ClientApp raising means that build fails, and would fail again on every
    send. Raise at once with the worker's reason rather than retry until a timeout. A worker
    that died or is restarting answers with another code and is waited for.
    """
    for reply in replies:
        if reply.has_error() and reply.error.code == ErrorCode.CLIENT_APP_RAISED_EXCEPTION:
            raise WorkerSetupError(
                f"the workers could not set up this run: {_worker_error(reply.error.reason)}"
            )


def _worker_error(reason: str | None) -> str:
    """The worker's own error out of Flower's and Ray's wrapping (a traceback, colour codes)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(reason))
    if "Message:" in text:  # Flower: "Exception ClientAppException occurred. Message: <error>"
        text = text.rsplit("Message:", 1)[1]
    return " ".join(text.strip().removesuffix("'>").split())[:400]


class PlainMessages:
    """``Grid.create_message`` as Flower's own grids make it: the ``Message`` constructor.

    Flower deprecates ``create_message`` (build ``Message`` directly) but keeps it abstract;
    fedsim's grids (this module's :class:`VirtualGrid`, the inline engine's) share this one.
    """

    def create_message(  # noqa: D102
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)


class VirtualGrid(PlainMessages, Grid):
    """A Grid of ``num_clients`` virtual nodes multiplexed over the real grid's nodes (lanes).

    Parameters
    ----------
    grid
        The real Grid (Flower's InMemoryGrid in simulation).
    num_clients
        Number of virtual clients (partition ids ``0..num_clients-1``).
    job
        ConfigRecord with the resolved job config, sent with every lane message so that a
        ClientApp needs no configuration of its own.
    cost
        Relative cost of a client's job (e.g. its number of examples), used to balance lanes.
    timeout_s
        Longest wait for a lane's reply (``runtime.round_timeout_s``), per attempt.
    poll_interval_s
        Sleep between polls for replies (Flower's own Grid sleeps 0.1 s).
    max_attempts
        Sends of a client per call: the clients of a lane that crashed, or did not answer within
        ``timeout_s``, are sent again until then; after the last they come back as errors.
    recovery_timeout_s
        Longest wait in :meth:`recover` for the workers to answer again (a restart included).
    probe_hold_s
        How long each probe of :meth:`recover` keeps its worker busy (see there).

    """

    def __init__(
        self,
        grid: Grid,
        num_clients: int,
        job: ConfigRecord,
        cost: Callable[[int], float] = lambda _pid: 1.0,
        timeout_s: float | None = None,
        poll_interval_s: float = 0.005,
        max_attempts: int = 2,
        recovery_timeout_s: float = 300.0,
        probe_hold_s: float = 0.2,
    ) -> None:
        self._grid = grid
        self._num_clients = num_clients
        self._node_ids: tuple[int, ...] | None = None  # get_node_ids, built on first use
        self._job = job
        self._cost = cost
        self._timeout_s = timeout_s
        self._poll_interval_s = poll_interval_s
        self._max_attempts = max(1, int(max_attempts))
        self._recovery_timeout_s = recovery_timeout_s
        self._probe_hold_s = probe_hold_s
        self.stats = LaneStats()

    # --- Grid interface -------------------------------------------------------------------------
    def set_run(self, run: Run) -> None:  # noqa: D102
        self._grid.set_run(run)

    @property
    def run(self) -> Run:  # noqa: D102
        return self._grid.run

    def get_node_ids(self) -> tuple[int, ...]:
        """Virtual node ids, sorted (so seeded sampling over them is reproducible).

        Built once and kept (40 bytes a client): Flower's FedAvg lists them twice a round
        (``list(grid.get_node_ids())``), which copies a tuple's pointers (about 5 ms per million
        clients) but would build every int anew from a ``range`` (about 25 ms per million).
        """
        if self._node_ids is None:
            self._node_ids = tuple(range(node_id_of(0), node_id_of(self._num_clients)))
        return self._node_ids

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:  # noqa: D102
        raise NotImplementedError("VirtualGrid only supports send_and_receive")

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:  # noqa: D102
        raise NotImplementedError("VirtualGrid only supports send_and_receive")

    def lanes(self) -> list[int]:
        """Node ids of the real SuperNodes, sorted."""
        return sorted(self._grid.get_node_ids())

    def warm_up(self) -> None:
        """Start every lane's worker and load its workload before round 1, without a timeout.

        Worker start-up (Ray actor, imports, data, model) can take tens of seconds; it must not
        count against ``runtime.round_timeout_s``, which is about rounds.
        """
        pings = [
            Message(pack_lane([], self._job), node_id, MessageType.TRAIN, group_id="warm-up")
            for node_id in self.lanes()
        ]
        replies, _ = self._exchange(pings, timeout_s=None)
        _raise_if_cannot_start(replies)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        """Send each virtual message via its lane; one reply per message, in message order."""
        return self.exchange(messages, timeout=timeout)[0]

    def exchange(
        self,
        messages: Iterable[Message],
        states: Mapping[int, RecordDict] | None = None,
        *,
        timeout: float | None = None,
    ) -> tuple[list[Message], dict[int, RecordDict]]:
        """Like ``send_and_receive``, carrying each client's state there and its new state back.

        Returns the replies (in message order) and the new state of each client that returned
        one. States never reach the strategy: its replies hold only what the client sent it.
        Clients whose lane crashed or did not answer within the timeout are sent again once the
        workers answer again (:meth:`recover`), up to ``max_attempts`` sends in all. No messages:
        no replies.
        """
        started = time.perf_counter()
        virtual = list(messages)
        by_pid = {partition_id_of(m.metadata.dst_node_id): m for m in virtual}
        if len(by_pid) != len(virtual):
            raise ValueError("VirtualGrid: two messages for the same virtual node in one call")
        timeout_s = timeout if timeout is not None else self._timeout_s
        results: dict[int, RecordDict | str] = {}
        new_states: dict[int, RecordDict] = {}
        unsettled = dict.fromkeys(by_pid, "not sent")  # pid -> why it has no answer yet
        num_lane_messages = 0
        for attempt in range(1, self._max_attempts + 1):
            if not unsettled:
                break
            sent = self._send_lanes(
                [by_pid[pid] for pid in sorted(unsettled)],
                states,
                LaneSettings(attempt=attempt, timeout_s=timeout_s),
            )
            num_lane_messages += sent.num_lane_messages
            results.update(sent.results)
            new_states.update(sent.states)
            unsettled = sent.unsettled
            if sent.troubled:  # a crashed or late lane must not cost the next send or round
                self.recover(sent.stale)
        out = []
        for msg in virtual:
            pid = partition_id_of(msg.metadata.dst_node_id)
            result = results.get(pid)
            if isinstance(result, RecordDict):
                out.append(Message(result, reply_to=msg))
            elif isinstance(result, str):
                out.append(Message(Error(code=CLIENT_ERROR_CODE, reason=result), reply_to=msg))
            else:
                reason = unsettled.get(pid, "lane failed or timed out")
                out.append(Message(Error(code=LANE_TIMEOUT_CODE, reason=reason), reply_to=msg))
        self.stats = LaneStats(num_lane_messages, time.perf_counter() - started)
        return out, new_states

    def _send_lanes(
        self,
        virtual: list[Message],
        states: Mapping[int, RecordDict] | None,
        lane: LaneSettings,
    ) -> _LaneAttempt:
        """One attempt: pack ``virtual`` onto the lanes, send, and sort out the replies."""
        by_pid = {partition_id_of(m.metadata.dst_node_id): m for m in virtual}
        groups = assign_lanes(list(by_pid), self._cost, len(self.lanes()))
        lane_msgs = []
        for node_id, pids in zip(self.lanes(), groups, strict=False):
            first = by_pid[pids[0]]
            lane_msgs.append(
                Message(
                    pack_lane([by_pid[p] for p in pids], self._job, states, lane),
                    node_id,
                    first.metadata.message_type,
                    group_id=first.metadata.group_id,
                )
            )
        replies, stale = self._exchange(lane_msgs, lane.timeout_s)
        late = "lane did not answer" + (
            f" within {lane.timeout_s:g} s" if lane.timeout_s is not None else ""
        )
        attempt = _LaneAttempt(len(lane_msgs), stale=stale, troubled=bool(stale))
        attempt.unsettled = {pid: late for pid in by_pid}
        # push_messages gave each lane message its id, which its reply names
        lane_of = {m.metadata.message_id: pids for m, pids in zip(lane_msgs, groups, strict=False)}
        for reply in replies:
            pids = lane_of[reply.metadata.reply_to_message_id]
            if reply.has_error():  # the worker crashed, or refused the lane while restarting
                attempt.troubled = True
                assert reply.error.reason is not None  # Flower's errors all give one
                reason = " ".join(reply.error.reason.split())[:300]
                attempt.unsettled.update(dict.fromkeys(pids, f"lane failed: {reason}"))
                continue
            bodies, lane_states = unpack_replies(reply.content)
            for pid in pids:  # a client the reply leaves out was not trained: sent again
                if pid in bodies:
                    attempt.results[pid] = bodies[pid]
                    del attempt.unsettled[pid]
                else:
                    attempt.unsettled[pid] = "its lane was given up after a hang"
            attempt.states.update(lane_states)
        return attempt

    def recover(self, stale: Iterable[str] = ()) -> None:
        """Wait until the workers answer again after a lane crashed or timed out.

        Without ``timeout_s``, like :meth:`warm_up`: a restarting worker (Ray starts a new
        process, which imports and loads its workload again) or a hung one must cost no later
        send. First the late replies of ``stale`` lane messages (an injected hang sleeps no
        longer than its lane's timeout), then probes: one empty lane message per lane, until
        every probe is answered. Flower's Ray backend hands a message to the worker that became
        idle last, and refuses it at once while that worker restarts (which puts it back on
        top); each probe keeps its worker ``probe_hold_s``, so that together they reach as many
        workers as there are lanes, the same ones the next lane messages go to. Gives up, with a
        warning, after ``recovery_timeout_s``.
        """
        deadline = time.monotonic() + self._recovery_timeout_s
        self._collect(set(stale), deadline)
        hold = LaneSettings(hold_s=self._probe_hold_s)
        while time.monotonic() < deadline:
            probes = [
                Message(
                    pack_lane([], self._job, lane=hold),
                    node_id,
                    MessageType.TRAIN,
                    group_id="recover",
                )
                for node_id in self.lanes()
            ]
            replies, stale = self._exchange(probes, max(0.0, deadline - time.monotonic()))
            _raise_if_cannot_start(replies)
            if not stale and not any(reply.has_error() for reply in replies):
                return
            time.sleep(self._probe_hold_s)
        log.warning(
            "the workers did not all answer within %g s after a lane failed; going on",
            self._recovery_timeout_s,
        )

    def _exchange(
        self, lane_msgs: list[Message], timeout_s: float | None
    ) -> tuple[list[Message], set[str]]:
        """Push ``lane_msgs``; their replies within ``timeout_s`` and the ids left unanswered."""
        pending = set(self._grid.push_messages(lane_msgs))
        # the engine's message pump may start them now (fedsim/engine/simulation.py)
        MESSAGES_PUSHED.set()
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        replies = self._collect(pending, deadline)
        return replies, pending

    def _collect(self, pending: set[str], deadline: float | None) -> list[Message]:
        """Replies to ``pending`` message ids until ``deadline``; removes the answered ids."""
        replies: list[Message] = []
        while pending and (deadline is None or time.monotonic() < deadline):
            got = list(self._grid.pull_messages(pending))
            replies.extend(got)
            pending.difference_update(m.metadata.reply_to_message_id for m in got)
            if pending:
                time.sleep(self._poll_interval_s)
        return replies


@dataclass
class _LaneAttempt:
    """What one send of lane messages gave: answers, and the clients still without one."""

    num_lane_messages: int
    results: dict[int, RecordDict | str] = field(default_factory=dict)  # pid -> reply or error
    states: dict[int, RecordDict] = field(default_factory=dict)
    unsettled: dict[int, str] = field(default_factory=dict)  # pid -> why it has no answer
    stale: set[str] = field(default_factory=set)  # ids of lane messages given up at the timeout
    troubled: bool = False  # a lane crashed or timed out: recover before the next send
