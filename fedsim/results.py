"""The sole writer of run folders: ``config.yaml``, ``metrics.jsonl``, ``summary.json``.

A run folder is never reused: starting a run in a folder that already holds ``metrics.jsonl``
is refused. Rows are appended and flushed as they come, so a crashed run keeps what it did.
``summary.json`` is written atomically (temporary file, then rename).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from fedsim.errors import ConfigError

__all__ = [
    "RunWriter",
    "CONFIG_FILE",
    "METRICS_FILE",
    "SUMMARY_FILE",
    "CLIENTS_FILE",
    "CLIENT_EVAL_FILE",
    "read_metrics",
    "atomic_write_text",
]

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
CLIENTS_FILE = "clients.jsonl"  # one row per client-round: device, outcome, latency, bytes
CLIENT_EVAL_FILE = "client_eval.jsonl"  # one row per client: the final model on its local data


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN/inf; a diverged value is recorded as null
    return value


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file in the same folder and a rename."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class RunWriter:
    """Writes one run folder.

    Parameters
    ----------
    run_dir
        The run's folder (created if missing). It must not already hold a run.

    """

    def __init__(self, run_dir: Path | str) -> None:
        self.run_dir = Path(run_dir)

    def start(self, cfg: DictConfig) -> None:
        """Claim the folder and save the resolved config."""
        if (self.run_dir / METRICS_FILE).exists():
            raise ConfigError(
                "hydra.run.dir",
                self.run_dir,
                "must be a new folder: it already holds a run, which is never overwritten",
            )
        self.run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.run_dir / CONFIG_FILE, OmegaConf.to_yaml(cfg, resolve=True))
        (self.run_dir / METRICS_FILE).touch()

    def reopen(self, server_round: int) -> None:
        """Continue a run from its checkpoint after ``server_round``.

        Rows of later rounds (written after the checkpoint, before the run died) are dropped:
        the resumed run computes them again, identically. Each file is rewritten atomically.
        """
        for name in (METRICS_FILE, CLIENTS_FILE):
            path = self.run_dir / name
            if path.exists():
                kept = [
                    line
                    for line in path.read_text().splitlines()
                    if line.strip() and _row_round(line) <= server_round
                ]
                atomic_write_text(path, "".join(f"{line}\n" for line in kept))
        (self.run_dir / SUMMARY_FILE).unlink(missing_ok=True)
        (self.run_dir / CLIENT_EVAL_FILE).unlink(missing_ok=True)  # written again at the end

    def write_rows(self, rows: Iterable[Mapping[str, Any]], file: str) -> None:
        """Write ``file`` as JSON lines, one per row, atomically (replacing any earlier one)."""
        lines = [json.dumps({k: _jsonable(v) for k, v in row.items()}) + "\n" for row in rows]
        atomic_write_text(self.run_dir / file, "".join(lines))

    def log_row(self, row: Mapping[str, Any], file: str = METRICS_FILE) -> None:
        """Append one JSON row to ``file`` and flush it to disk."""
        line = json.dumps({k: _jsonable(v) for k, v in row.items()})
        with open(self.run_dir / file, "a") as handle:
            handle.write(line + "\n")

    def finish(self, summary: Mapping[str, Any]) -> None:
        """Write ``summary.json`` atomically."""
        text = json.dumps({k: _jsonable(v) for k, v in summary.items()}, indent=2)
        atomic_write_text(self.run_dir / SUMMARY_FILE, text + "\n")


def _row_round(line: str) -> float:
    """The round of a JSON row; a torn last line (the run died mid-write) counts as later."""
    try:
        return float(json.loads(line).get("round", 0))
    except json.JSONDecodeError:
        return math.inf


def read_metrics(run_dir: Path | str, file: str = METRICS_FILE) -> list[dict[str, Any]]:
    """The rows of a run's JSON-lines file."""
    path = Path(run_dir) / file
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
