"""What a run says on stderr: its start-up phases, then one line per round.

Start-up (``StartupLog``): one line per phase with its time, from the config to the first
round (data and model, Ray, the engine and its workers), and :func:`notice` lines for long
one-off work inside a phase (the first computation of frozen hidden states, with its cache
folder and size). Rounds (``RoundProgress``): round, accuracy, loss, elapsed and ETA. All of it
follows ``runtime.progress``. Every such line also goes to the run folder's ``run.log``
(:func:`transcript`, :func:`keep_transcript`), shown or not: the console output of a run with
progress on, kept with its results.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

__all__ = [
    "RUN_LOG",
    "RoundProgress",
    "StartupLog",
    "format_duration",
    "format_sim_time",
    "notice",
    "notices",
]

_NOTICES = {"enabled": False}  # set for the length of a run by :func:`notices`
RUN_LOG = "run.log"
# The run's transcript: lines before its folder exists are buffered, then appended to run.log.
_TRANSCRIPT: dict[str, Any] = {"lines": None, "path": None}


def say(line: str, show: bool = True, stream: TextIO | None = None) -> None:
    """Print ``line`` on stderr (or ``stream``) if ``show``; record it in the run's transcript."""
    if show:
        print(line, file=stream or sys.stderr, flush=True)
    if _TRANSCRIPT["path"] is not None:
        with open(_TRANSCRIPT["path"], "a") as log:
            log.write(line + "\n")
    elif _TRANSCRIPT["lines"] is not None:
        _TRANSCRIPT["lines"].append(line)


@contextmanager
def transcript() -> Iterator[None]:
    """Record every :func:`say` line of the block: one run (a sweep has one per run)."""
    _TRANSCRIPT.update(lines=[], path=None)
    try:
        yield
    finally:
        _TRANSCRIPT.update(lines=None, path=None)


def keep_transcript(run_dir: Path | str) -> None:
    """Append the lines so far to ``run_dir/run.log`` and every later one as it comes."""
    if _TRANSCRIPT["lines"] is None:
        return
    path = Path(run_dir) / RUN_LOG
    with open(path, "a") as log:  # a resume appends: nothing written is lost
        log.writelines(line + "\n" for line in _TRANSCRIPT["lines"])
    _TRANSCRIPT.update(lines=[], path=path)


def log_line(run_dir: Path | str, line: str, show: bool = True) -> None:
    """:func:`say` after the run: shown, and appended to ``run_dir/run.log`` if it has one."""
    if show:
        print(line, file=sys.stderr, flush=True)
    path = Path(run_dir) / RUN_LOG
    if path.is_file():
        with open(path, "a") as log:
            log.write(line + "\n")


@contextmanager
def notices(enabled: bool) -> Iterator[None]:
    """Let :func:`notice` print (``runtime.progress``) for the length of the block."""
    before = _NOTICES["enabled"]
    _NOTICES["enabled"] = enabled
    try:
        yield
    finally:
        _NOTICES["enabled"] = before


def notice(message: str) -> None:
    """One ``[fedsim]`` line on stderr, from code that has no run config at hand."""
    say(f"[fedsim] {message}", show=_NOTICES["enabled"])


def progress_bars() -> bool:
    """Whether long one-off work may draw a progress bar: notices on and stderr a terminal."""
    return _NOTICES["enabled"] and sys.stderr.isatty()


class StartupLog:
    """Times a run's start-up, one line per phase: ``[fedsim] start-up: Ray 3.1 s``."""

    def __init__(
        self, enabled: bool = True, stream: TextIO | None = None, hold: bool = False
    ) -> None:
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.started = time.perf_counter()
        self._mark = self.started
        # hold: lines wait for release(), so that a run refused before it claims its folder
        # says only its one-line error
        self._held: list[str] | None = [] if hold else None

    def _line(self, text: str) -> None:
        line = f"[fedsim] start-up: {text}"
        if self._held is not None:
            self._held.append(line)
        else:
            say(line, show=self.enabled, stream=self.stream)

    def release(self) -> None:
        """Say the held lines (the run passed its checks and claimed its folder); stop holding."""
        held, self._held = self._held or [], None
        for line in held:
            say(line, show=self.enabled, stream=self.stream)

    def lap(self, what: str) -> float:
        """Report ``what`` as the phase since the last lap; return its seconds."""
        now = time.perf_counter()
        seconds, self._mark = now - self._mark, now
        self._line(f"{what} {seconds:.1f} s")
        return seconds

    def done(self, what: str) -> float:
        """The last phase (``what``), then the whole start-up; return the whole's seconds."""
        self.lap(what)
        total = self._mark - self.started
        self._line(f"{total:.1f} s in all, first round next")
        return total


def format_duration(seconds: float) -> str:
    """``75.2`` -> ``'1:15'``; ``3725`` -> ``'1:02:05'``."""
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def format_sim_time(seconds: float) -> str:
    """Simulated time, readable at every scale: ``0.13`` -> ``'0.13s'``, ``75`` -> ``'1:15'``."""
    return f"{seconds:.2f}s" if seconds < 60 else format_duration(seconds)


class RoundProgress:
    """Prints a progress line per round; the ETA assumes the remaining rounds cost the mean."""

    def __init__(self, num_rounds: int, enabled: bool = True, stream: TextIO | None = None) -> None:
        self.num_rounds = num_rounds
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.started = time.perf_counter()
        self.first_round: int | None = None

    def update(self, server_round: int, accuracy: float, loss: float, extra: str = "") -> None:
        """Report that ``server_round`` finished with these metrics."""
        if self.first_round is None:
            self.first_round = server_round
        elapsed = time.perf_counter() - self.started
        done = server_round - self.first_round + 1
        eta = elapsed / done * (self.num_rounds - server_round)
        width = len(str(self.num_rounds))
        line = (
            f"[fedsim] round {server_round:>{width}}/{self.num_rounds}"
            f"  acc {accuracy:.4f}  loss {loss:.4f}"
            f"  elapsed {format_duration(elapsed)}  eta {format_duration(eta)}"
        )
        say(line + (f"  {extra}" if extra else ""), show=self.enabled, stream=self.stream)
