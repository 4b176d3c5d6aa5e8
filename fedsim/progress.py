"""One line per round on stderr: round, accuracy, loss, elapsed and ETA."""

from __future__ import annotations

import sys
import time
from typing import TextIO

__all__ = ["RoundProgress", "format_duration", "format_sim_time"]


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

    def __init__(
        self, num_rounds: int, enabled: bool = True, stream: TextIO | None = None
    ) -> None:
        self.num_rounds = num_rounds
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.started = time.perf_counter()
        self.first_round: int | None = None

    def update(self, server_round: int, accuracy: float, loss: float, extra: str = "") -> None:
        """Report that ``server_round`` finished with these metrics."""
        if not self.enabled:
            return
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
        print(line + (f"  {extra}" if extra else ""), file=self.stream, flush=True)
