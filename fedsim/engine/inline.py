"""The inline engine (``runtime.engine=inline``): the ServerApp and the ClientApp in this process.

Ray's engine starts a Ray instance (its GCS, raylet and five helper processes) and worker
processes that each import torch and Flower and build the run's workload: on two cores that is
about 15 s before round 1, whatever the run. A short run, a debugging session (a breakpoint in a
client's training works here) or a test needs none of it. This engine runs the same apps:

* :class:`InlineGrid` is a Flower ``Grid`` with one node, the lane. A pushed message is kept;
  pulling it calls fedsim's ClientApp (``fedsim.engine.apps.client_app``) on a copy, in this
  process, and returns the copy of its reply, as a Ray worker would (messages cross a process
  boundary there: pickled both ways, so neither side ever holds the other's objects).
* Around a lane, what is process-wide and would have been the worker's own is the client's:
  torch's thread count (``runtime.client_num_cpus``), and the global random generators (Python's,
  numpy's, torch's), which are saved before and restored after, so that the server's draws
  (Flower's sampling seeds Python's ``random``) are what they are under Ray.
* The ServerApp runs in this thread: SIGINT and SIGTERM reach fedsim's handlers
  (``fedsim.rounds.interrupt``) between two bytecodes; an abandoned round stops before the next
  client (``fedsim.engine.worker.handle_lane``).

A client's training is a pure function of its message (seeds named by round and client), so the
metrics are those of the Ray engine, bit for bit (``tests/test_inline_engine.py`` runs both).
What needs separate processes is refused before anything starts (:func:`check_inline`).
"""

from __future__ import annotations

import pickle
import random
import secrets
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from uuid import uuid4

import numpy as np
import torch
from flwr.app import Context, Message, RecordDict
from flwr.app.error import Error
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity
from omegaconf import DictConfig, OmegaConf

from fedsim.engine.apps import client_app, quiet_flower
from fedsim.errors import ConfigError
from fedsim.rounds.virtual_grid import PlainMessages

__all__ = ["LANE_NODE_ID", "InlineGrid", "check_inline", "engine_of", "run_inline"]

#: The inline grid's one node (a lane): Flower's node ids start above the SuperLink's.
LANE_NODE_ID = SUPERLINK_NODE_ID + 1


def engine_of(cfg: DictConfig) -> str:
    """``runtime.engine`` (checked by ``fedsim.config.validate``; older folders ran on Ray)."""
    return str(OmegaConf.select(cfg, "runtime.engine", default="ray"))


def check_inline(cfg: DictConfig) -> None:
    """Refuse what the inline engine cannot do, naming the key (before anything starts)."""
    if cfg.runtime.ray_address:
        raise ConfigError(
            "runtime.ray_address",
            cfg.runtime.ray_address,
            "must be null with runtime.engine=inline (a cluster needs runtime.engine=ray)",
        )
    kill = float(OmegaConf.select(cfg, "faults.kill_worker_prob", default=0.0) or 0.0)
    if kill > 0:
        raise ConfigError(
            "faults.kill_worker_prob",
            kill,
            "must be 0 with runtime.engine=inline (the killed worker would be this process); "
            "use runtime.engine=ray",
        )
    gpus = float(cfg.runtime.client_num_gpus)
    if gpus > 0 and torch.cuda.device_count() < 1:
        raise ConfigError(
            "runtime.client_num_gpus", cfg.runtime.client_num_gpus, "needs a GPU (0 here)"
        )


class InlineGrid(PlainMessages, Grid):
    """A Flower Grid of one node whose ClientApp runs in this process when its replies are pulled.

    ``client_num_cpus``: torch's threads while a client trains (a Ray worker's own setting);
    the server's are restored after each lane.
    """

    def __init__(self, run: Run, client_num_cpus: int = 1) -> None:
        self._run = run
        self._threads = max(1, int(client_num_cpus))
        self._pending: dict[str, Message] = {}
        # The node's context, kept across its messages as Flower keeps a SuperNode's.
        self._context = Context(run.run_id, LANE_NODE_ID, {}, RecordDict(), {})

    def set_run(self, run: Run) -> None:  # noqa: D102
        self._run = run

    @property
    def run(self) -> Run:  # noqa: D102
        return self._run

    def get_node_ids(self) -> tuple[int, ...]:  # noqa: D102
        return (LANE_NODE_ID,)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        """Keep ``messages`` for the next pull; their ids, as Flower's grids give them."""
        ids = []
        for msg in messages:
            if msg.metadata.dst_node_id != LANE_NODE_ID:
                raise ValueError(f"InlineGrid: no node {msg.metadata.dst_node_id}")
            msg.metadata.__dict__["_message_id"] = str(uuid4())  # as Flower's InMemoryGrid
            ids.append(msg.metadata.message_id)
            self._pending[msg.metadata.message_id] = msg
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        """Run the ClientApp on each pending message of ``message_ids``, in push order."""
        wanted = set(message_ids)
        replies = []
        for message_id in [m for m in self._pending if m in wanted]:
            replies.append(self._deliver(self._pending.pop(message_id)))
        return replies

    def send_and_receive(  # noqa: D102
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        return self.pull_messages(self.push_messages(messages))

    def _deliver(self, msg: Message) -> Message:
        """The ClientApp's reply to ``msg``; both cross as copies, as between two processes."""
        received = _copy(msg)
        with self._as_a_worker():
            try:
                reply = client_app(received, self._context)
            except Exception as exc:  # noqa: BLE001 - reported as Flower reports a ClientApp's
                error = Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, f"{type(exc).__name__}: {exc}")
                return Message(error, reply_to=msg)
        return _copy(reply)

    @contextmanager
    def _as_a_worker(self) -> Iterator[None]:
        """The client's thread count and random generators for the block; the server's after."""
        threads = torch.get_num_threads()
        states = random.getstate(), np.random.get_state(), torch.get_rng_state()
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
        if threads != self._threads:
            torch.set_num_threads(self._threads)
        try:
            yield
        finally:
            if torch.get_num_threads() != threads:
                torch.set_num_threads(threads)
            random.setstate(states[0])
            np.random.set_state(states[1])
            torch.set_rng_state(states[2])
            if cuda is not None:
                torch.cuda.set_rng_state_all(cuda)


def _copy(msg: Message) -> Message:
    """``msg`` as the other side of a process boundary receives it (Ray pickles it)."""
    copied: Message = pickle.loads(pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL))
    return copied


def run_inline(server_app: ServerApp, cfg: DictConfig) -> None:
    """Run ``server_app`` on :class:`InlineGrid` in this thread (``run_flower``'s work on Ray)."""
    quiet_flower()
    run = Run.create_empty(run_id=secrets.randbits(63))
    # What Flower's run_simulation sets for its ServerApp: Messages are made in this process.
    TaskIdentity.task_id, TaskIdentity.run_id = 1, run.run_id
    TaskIdentity.node_id = SUPERLINK_NODE_ID
    grid = InlineGrid(run, int(cfg.runtime.client_num_cpus))
    context = Context(run.run_id, SUPERLINK_NODE_ID, {}, RecordDict(), {})
    server_app(grid, context)
