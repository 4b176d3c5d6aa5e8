"""Failure injection for reliability tests: a client raises, hangs, or kills its Ray worker.

Each fault is drawn per client-round from ``derive_seed(seed, "fault", round, client)``, so the
same config fails the same clients in the same rounds. What fedsim does about each:

* an exception: the client is reported failed; the other clients of its lane still answer;
* a hang longer than ``runtime.round_timeout_s``: the server stops waiting for that lane, whose
  clients are reported failed; the round goes on with the others;
* a killed worker process (``os._exit``): Ray restarts the worker (fedsim asks for
  ``max_restarts=-1``); the lane's clients are reported failed for that round.

Failures are counted in ``metrics.jsonl`` (``num_failed``) and ``clients.jsonl`` (``failed``).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from fedsim.errors import ConfigError
from fedsim.seeding import numpy_rng

__all__ = ["FaultInjector", "InjectedFault", "Faults"]

KILLED_WORKER_EXIT_CODE = 13


class InjectedFault(RuntimeError):
    """The exception an injected client failure raises."""


@dataclass(frozen=True)
class Faults:
    """Which faults strike one client-round."""

    kill_worker: bool
    hang: bool
    exception: bool


class FaultInjector:
    """Per client-round fault draws (all probabilities 0 by default: no faults).

    Parameters
    ----------
    exception_prob
        Probability that a client raises during training.
    hang_prob
        Probability that a client sleeps ``hang_s`` seconds before training.
    hang_s
        How long a hung client sleeps.
    kill_worker_prob
        Probability that a client kills the Ray worker process training it.
    """

    def __init__(
        self,
        *,
        exception_prob: float = 0.0,
        hang_prob: float = 0.0,
        hang_s: float = 0.0,
        kill_worker_prob: float = 0.0,
    ) -> None:
        for key, value in (
            ("exception_prob", exception_prob),
            ("hang_prob", hang_prob),
            ("kill_worker_prob", kill_worker_prob),
        ):
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
                raise ConfigError(f"faults.{key}", value, "must be a probability in [0, 1]")
        if isinstance(hang_s, bool) or not isinstance(hang_s, int | float) or hang_s < 0:
            raise ConfigError("faults.hang_s", hang_s, "must be a number of seconds >= 0")
        self.exception_prob = float(exception_prob)
        self.hang_prob = float(hang_prob)
        self.hang_s = float(hang_s)
        self.kill_worker_prob = float(kill_worker_prob)

    def draw(self, seed: int, server_round: int, partition_id: int) -> Faults:
        """The faults of one client-round (pure: the same arguments, the same answer)."""
        u = numpy_rng(seed, "fault", server_round, partition_id).random(3)
        return Faults(
            kill_worker=bool(u[0] < self.kill_worker_prob),
            hang=bool(u[1] < self.hang_prob),
            exception=bool(u[2] < self.exception_prob),
        )

    def strike(self, seed: int, server_round: int, partition_id: int) -> None:
        """Make this client-round's faults happen (called in the worker before training)."""
        if not (self.kill_worker_prob or self.hang_prob or self.exception_prob):
            return  # fault-free runs skip the draw (a generator per client-round)
        faults = self.draw(seed, server_round, partition_id)
        if faults.kill_worker:
            os._exit(KILLED_WORKER_EXIT_CODE)  # no cleanup, like an OOM kill
        if faults.hang:
            time.sleep(self.hang_s)
        if faults.exception:
            raise InjectedFault(f"injected failure (round {server_round}, client {partition_id})")
