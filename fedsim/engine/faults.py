"""Failure injection for reliability tests: a client raises, hangs, or kills its Ray worker.

Each fault is drawn per client-round from ``derive_seed(seed, "fault", round, client)``, so the
same config fails the same clients in the same rounds, whatever the lanes, the number of workers
or the wall clock. A fault strikes for real only in the first attempt at a lane: fedsim sends
the clients of a lane that crashed or timed out again (fedsim/rounds/virtual_grid.py), and there a
fault that already struck is reported, not repeated. What each fault does:

* an exception: the client fails; the other clients of its lane still answer;
* a hang of ``hang_s >= runtime.round_timeout_s``: the worker sleeps until the lane's timeout
  (never longer: the lane message carries it) and gives the lane up; the server stops waiting
  for it at its timeout and sends its clients again: the hung client fails, the others train.
  A shorter hang only delays its client, which trains;
* a killed worker process (``os._exit``): Ray restarts the worker (fedsim asks for
  ``max_restarts=-1``); the server waits until the workers answer again and sends the lane's
  clients again: the client that killed it fails, the others train.

Failures are counted in ``metrics.jsonl`` (``num_failed``) and ``clients.jsonl`` (``failed``).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from fedsim.errors import ConfigError
from fedsim.seeding import numpy_rng

__all__ = ["FaultInjector", "InjectedFault", "LaneGivenUp", "Faults"]

KILLED_WORKER_EXIT_CODE = 13


class InjectedFault(RuntimeError):
    """The exception an injected client failure raises."""


class LaneGivenUp(RuntimeError):
    """A hang outlasted the lane's timeout: the server has given the lane up; stop it."""


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

    def strike(
        self,
        seed: int,
        server_round: int,
        partition_id: int,
        *,
        first_attempt: bool = True,
        timeout_s: float | None = None,
        time_left_s: float | None = None,
    ) -> None:
        """Make this client-round's faults happen (called in the worker before training).

        ``timeout_s`` is the lane's timeout (None: none) and ``time_left_s`` what is left of it.
        Only a ``first_attempt`` kills the worker or sleeps; a later attempt at the same
        client-round (its lane crashed or timed out) reports a kill or a hang past the timeout
        as the client's failure at once, and skips a shorter hang, which already happened.

        Raises
        ------
        LaneGivenUp
            First attempt, after a hang past the timeout: the lane is no longer waited for.
        InjectedFault
            The client fails (an exception; a later attempt: a kill or a hang past the timeout).
        """
        if not (self.kill_worker_prob or self.hang_prob or self.exception_prob):
            return  # fault-free runs skip the draw (a generator per client-round)
        faults = self.draw(seed, server_round, partition_id)
        where = f"round {server_round}, client {partition_id}"
        if faults.kill_worker:
            if first_attempt:
                os._exit(KILLED_WORKER_EXIT_CODE)  # no cleanup, like an OOM kill
            raise InjectedFault(f"injected worker kill ({where})")
        hang_outlasts = timeout_s is not None and self.hang_s >= timeout_s
        if faults.hang and first_attempt:
            # Never past the lane's timeout: the worker is free again when the server stops
            # waiting for it, so that a hang never reaches into a later round.
            left_s = self.hang_s if time_left_s is None else max(0.0, time_left_s)
            time.sleep(min(self.hang_s, left_s))
            if hang_outlasts:
                raise LaneGivenUp(f"injected hang of {self.hang_s:g} s ({where})")
        if faults.hang and hang_outlasts:
            raise InjectedFault(
                f"injected hang of {self.hang_s:g} s, past the lane timeout of {timeout_s:g} s "
                f"({where})"
            )
        if faults.exception:
            raise InjectedFault(f"injected failure ({where})")
