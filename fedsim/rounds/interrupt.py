"""SIGINT or SIGTERM ends a run: the last complete round kept, how to resume said, nothing left.

:func:`stop_on_signals` (installed by ``fedsim/engine/simulation.py`` for one run) handles both
signals:

* The first asks the round loop (``fedsim/rounds/synchronous.py``) to stop before its next round:
  the round in progress finishes and is checkpointed, ``summary.json`` says ``interrupted``, the
  run's Ray processes are stopped and the command exits with 128 + the signal's number (130 for
  SIGINT, 143 for SIGTERM, the shells' convention) after printing how to resume.
* If the run has not ended :data:`GRACE_S` after the first signal (a long or hung round, a slow
  start), or on a second signal, the round in progress is abandoned (:class:`RunInterrupted`
  out of the grid, :class:`AbandonableGrid`): the loop writes the summary of the last complete
  round, every process this one started (Ray's head, workers, dashboard and runtime-env agents)
  is killed, and the process exits at once with the same code.

Flower runs the ServerApp in a thread and waits for its worker threads, which wait on Ray: a
Python-level stop cannot interrupt them, hence the kill of the process tree.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, NoReturn

import psutil

__all__ = [
    "GRACE_S",
    "AbandonableGrid",
    "RunInterrupted",
    "abandoned",
    "announce",
    "before_claim",
    "exit_code",
    "exit_now",
    "round_loop",
    "stop_on_signals",
    "stop_requested",
]

#: Seconds the round in progress may take to finish after the first signal. With ABANDON_S
#: more for the loop's summary (or the shutdown under way) and the kill, a run has ended
#: within 10 s of its first signal.
GRACE_S = 4.0
#: Seconds an abandoned round loop gets to write the summary of its last complete round.
ABANDON_S = 3.0
#: Seconds Ray's processes get to exit after ``ray.shutdown`` before they are killed (its
#: workers, dashboard and runtime-env agents otherwise linger for up to 1-2 minutes).
REAP_S = 0.5

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class RunInterrupted(Exception):
    """The run was stopped by a signal before it finished (raised where it must unwind)."""


class _Stop:
    """What the signals of the current run have asked for (one run at a time per process)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.stop = threading.Event()  # first signal: no new round
        self.abandon = threading.Event()  # grace over or second signal: drop the round
        self.wake = threading.Event()  # wakes the watchdog: second signal, or the run ended
        self.hurry = threading.Event()  # a second signal: no more waiting
        self.ended = threading.Event()  # simulate() returned or raised
        self.loop_running = threading.Event()  # the round loop runs in the ServerApp thread
        self.loop_done = threading.Event()  # ...and has returned (its summary is written)
        self.run_dir: Path | None = None
        self.processes: Callable[[], list[psutil.Process]] = list  # the run's Ray processes
        self.seen: dict[int, psutil.Process] = {}  # every one listed since the first signal
        self.previous: dict[int, Any] = {}
        self.announced = False
        self.lock = threading.Lock()


_state = _Stop()


def stop_requested() -> bool:
    """True once a signal asked the current run to stop (the round loop checks between rounds)."""
    return _state.stop.is_set()


def abandoned() -> bool:
    """True once the round in progress is to be dropped (never in a Ray worker: no signals)."""
    return _state.abandon.is_set()


def exit_code() -> int:
    """128 + the number of the signal that stopped the run (130 SIGINT, 143 SIGTERM)."""
    return 128 + int(_state.signum or signal.SIGINT)


def _signal_name() -> str:
    return signal.Signals(_state.signum or signal.SIGINT).name


def announce(run_dir: Path | str) -> None:
    """Print, once, the one line that says how the run stopped and how to resume it."""
    from fedsim.records.checkpoint import CHECKPOINT_FILE

    with _state.lock:
        if _state.announced:
            return
        _state.announced = True
    run_dir = Path(run_dir).resolve()
    if (run_dir / CHECKPOINT_FILE).is_file():
        tail = f"resume with: fedsim resume={shlex.quote(str(run_dir))}"
    else:
        tail = f"no round was checkpointed, nothing to resume in {run_dir}"
    print(f"fedsim: interrupted by {_signal_name()}; {tail}", file=sys.stderr, flush=True)


def _handle(signum: int, _frame: object) -> None:
    state = _state
    if state.signum is None:
        state.signum = signum
        state.stop.set()
        threading.Thread(target=_watchdog, name="fedsim-interrupt", daemon=True).start()
    else:  # a second signal: end now
        state.hurry.set()
        state.abandon.set()
        state.wake.set()


def _install() -> None:
    for signum in SIGNALS:
        previous = signal.signal(signum, _handle)
        _state.previous.setdefault(signum, previous)


def before_claim() -> None:
    """Call after Ray started, before the run folder is claimed.

    ``ray.init`` installs its own SIGTERM handler (``sys.exit``), so ours are installed again;
    a signal that came during start-up ends the run here, before anything is written.
    """
    if _state.previous:  # stop_on_signals is active in this (the main) thread
        _install()
    if stop_requested():
        raise RunInterrupted(f"interrupted by {_signal_name()} before the run started")


@contextlib.contextmanager
def round_loop() -> Iterator[None]:
    """Around the round loop: an abandoned run waits (up to ABANDON_S) for its summary."""
    _state.loop_running.set()
    try:
        yield
    finally:
        _state.loop_done.set()


class AbandonableGrid:
    """A Flower Grid whose message calls raise :class:`RunInterrupted` once a run is abandoned.

    fedsim's VirtualGrid polls ``pull_messages`` every few ms while a round is out, so an
    abandoned round stops waiting at once; everything else is the wrapped Grid's.
    """

    def __init__(self, grid: Any) -> None:
        self._grid = grid

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def push_messages(self, messages: Iterable[Any]) -> Iterable[str]:  # noqa: D102
        self._check()
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Any]:  # noqa: D102
        self._check()
        return self._grid.pull_messages(message_ids)

    @staticmethod
    def _check() -> None:
        if _state.abandon.is_set():
            raise RunInterrupted(f"round abandoned after {_signal_name()}")


def _list_processes() -> list[psutil.Process]:
    """The run's Ray processes now, and every one listed before.

    A raylet's children (workers, agents) re-parent when it exits: listed early, they are
    still known when the time comes to kill them.
    """
    for process in _state.processes():
        _state.seen.setdefault(process.pid, process)
    return list(_state.seen.values())


def _kill(processes: list[psutil.Process], wait_s: float) -> None:
    """Wait up to ``wait_s`` for ``processes`` to exit, then SIGKILL what is left."""
    _gone, alive = psutil.wait_procs(processes, timeout=wait_s)
    for process in alive:
        with contextlib.suppress(psutil.Error):
            process.kill()
    psutil.wait_procs(alive, timeout=1.0)


def _watchdog() -> None:
    """After GRACE_S (or a second signal): abandon the round, let the loop write, kill, exit.

    Without a second signal, a shutdown already under way (the loop ended, Ray being released)
    may still finish by itself until GRACE_S + ABANDON_S after the first signal.
    """
    state = _state
    give_up_at = time.monotonic() + GRACE_S + ABANDON_S
    _list_processes()
    state.wake.wait(GRACE_S)
    if state.ended.is_set():
        return  # the run ended by itself; the caller reports it
    state.abandon.set()
    if state.loop_running.is_set():
        state.loop_done.wait(ABANDON_S)
    while not (state.hurry.is_set() or state.ended.is_set()) and time.monotonic() < give_up_at:
        time.sleep(0.05)
    if state.ended.is_set():
        return
    if state.run_dir is not None and state.run_dir.is_dir():
        if any(state.run_dir.iterdir()):
            announce(state.run_dir)
        else:
            state.run_dir.rmdir()  # made for this run, nothing written yet
    _kill(_list_processes(), 0.0)
    exit_now()


def exit_now() -> NoReturn:
    """Exit with :func:`exit_code` at once, without Python's teardown.

    Tearing down torch and Ray's core worker takes seconds (over 10 on a loaded 2-core
    machine) after the last line of a run; an interrupted run has closed its files by now.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code())


@contextlib.contextmanager
def stop_on_signals(
    run_dir: Path | str | None,
    release: Callable[[], None],
    processes: Callable[[], list[psutil.Process]],
) -> Iterator[None]:
    """Handle SIGINT and SIGTERM as the module doc says while the block (one run) executes.

    ``release`` shuts the engine (Ray) down after an interrupted run; what is left of
    ``processes()`` (the local Ray instance's processes and their children, listed before the
    release) is killed REAP_S later, or at once on a hard stop. Outside the main thread (where
    Python allows no signal handlers) this does nothing.
    """
    global _state
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _state = _Stop()
    _state.run_dir = None if run_dir is None else Path(run_dir)
    _state.processes = processes
    _install()
    try:
        yield
    finally:
        if _state.signum is not None:
            left = _list_processes()  # listed before the raylet goes
            release()
            _kill(left, REAP_S)
        for signum, previous in _state.previous.items():
            signal.signal(signum, previous)
        _state.ended.set()
        _state.wake.set()
