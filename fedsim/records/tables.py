"""Run folders as pandas tables: ``fedsim.load_runs`` and ``fedsim.load_clients``.

One row per round (``load_runs``, from ``metrics.jsonl``) or per client-round (``load_clients``,
from ``clients.jsonl``), each with the columns that say which run it comes from:

- ``run``: the run folder, relative to the folder given (``.`` for a run folder itself);
- ``seed`` and ``status`` (:func:`fedsim.records.results.run_status`: completed, diverged,
  failed, interrupted, crashed; None while a run is going or after it was killed);
- one column per config group with the option chosen (``strategy``: ``fedprox``, ``devices``:
  ``phones_mixed``, ...) and ``overrides``, the command's overrides in one string, both from the
  run's ``choices.yaml`` (None for runs written before fedsim saved it);

then every key of the rows themselves (``round``, ``phase``, ``accuracy``, ``sim_time_s``,
``bytes_up``, ``energy_j``, ...). At the end of a ``--multirun`` the sweep folder gets
``runs.parquet``, ``load_runs`` of the whole sweep (:class:`RunsTableCallback`).

Example::

    import fedsim
    df = fedsim.load_runs("results/sweeps/my_sweep")
    last = df[df.phase == "train"].groupby(["run"]).tail(1)
    print(last.groupby("strategy").accuracy.agg(["mean", "std", "count"]))
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode

from fedsim.config import GROUPS
from fedsim.errors import ConfigError
from fedsim.records.results import (
    CHOICES_FILE,
    CLIENTS_FILE,
    CONFIG_FILE,
    METRICS_FILE,
    read_jsonl,
    run_status,
)

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "RUNS_TABLE_FILE",
    "RunsTableCallback",
    "find_run_dirs",
    "load_clients",
    "load_runs",
    "write_runs_table",
]

RUNS_TABLE_FILE = "runs.parquet"
#: One column per config group (experiment included).
CHOICE_COLUMNS = GROUPS


def find_run_dirs(paths: str | Path | Sequence[str | Path], key: str = "path") -> list[Path]:
    """Every run folder (``metrics.jsonl`` + ``config.yaml``) at or below ``paths``, sorted.

    The one finder of run folders (``fedsim.load_runs``, ``fedsim-plot``, ``fedsim-compare``);
    ``key`` names the argument in the one-line error for a missing folder or no run at all.
    """
    folders = [Path(paths)] if isinstance(paths, str | Path) else [Path(p) for p in paths]
    found: set[Path] = set()
    for folder in folders:
        if not folder.is_dir():
            raise ConfigError(
                key, folder, "is not a folder; expected a run folder or a sweep folder"
            )
        found |= {
            m.parent.resolve()
            for m in folder.rglob(METRICS_FILE)
            if (m.parent / CONFIG_FILE).is_file()
        }
    if not found:
        raise ConfigError(
            key,
            " ".join(str(folder) for folder in folders),
            f"holds no run folder (a folder with {METRICS_FILE} and {CONFIG_FILE})",
        )
    return sorted(found)


def _rows(file: Path) -> list[dict[str, Any]]:
    return read_jsonl(file) if file.is_file() else []


def _run_columns(root: Path, run_dir: Path) -> dict[str, Any]:
    """``run``, ``seed``, ``status``, the group choices and ``overrides`` of one run folder."""
    config = yaml.safe_load((run_dir / CONFIG_FILE).read_text()) or {}
    made_by_file = run_dir / CHOICES_FILE
    made_by = yaml.safe_load(made_by_file.read_text()) if made_by_file.is_file() else {}
    choices = made_by.get("choices", {})
    columns: dict[str, Any] = {
        "run": str(run_dir.relative_to(root)),
        "seed": config.get("seed"),
        "status": run_status(run_dir),
    }
    columns |= {group: choices.get(group) for group in CHOICE_COLUMNS}
    overrides = made_by.get("overrides")
    columns["overrides"] = None if overrides is None else " ".join(overrides)
    return columns


def _table(path: str | Path, file: str) -> pd.DataFrame:
    import pandas as pd

    root = Path(path).expanduser().resolve()
    records = []
    for run_dir in find_run_dirs(root):
        columns = _run_columns(root, run_dir)
        records += [columns | row for row in _rows(run_dir / file)]
    return pd.DataFrame.from_records(records)


def load_runs(path: str | Path) -> pd.DataFrame:
    """Every round of every run folder at or below ``path``: one row per ``metrics.jsonl`` row.

    Raises :class:`fedsim.errors.ConfigError` if ``path`` holds no run folder.
    """
    return _table(path, METRICS_FILE)


def load_clients(path: str | Path) -> pd.DataFrame:
    """Every client-round of the runs at or below ``path``, with :func:`load_runs`' run columns.

    Rows come from ``clients.jsonl``, which runs with a device fleet write.
    """
    return _table(path, CLIENTS_FILE)


def write_runs_table(sweep_dir: str | Path) -> Path:
    """Write ``sweep_dir/runs.parquet`` (:func:`load_runs` of the sweep); return its path."""
    out = Path(sweep_dir) / RUNS_TABLE_FILE
    table = load_runs(sweep_dir)
    tmp = out.with_suffix(".parquet.tmp")
    table.to_parquet(tmp, index=False)
    tmp.replace(out)  # a reader never sees half a file
    return out


class RunsTableCallback(Callback):
    """Hydra callback (``hydra.callbacks`` in conf/config.yaml): a sweep's ``runs.parquet``.

    Called at the end of a ``--multirun``. Hydra runs every job of a sweep even when one raises,
    then raises that job's error instead of ending the sweep: the table is therefore also
    written after the job that raised and after each job that follows, so that the sweep's
    table holds every job, the crashed ones with status ``crashed``. A sweep whose table cannot
    be written still ends as it would have: the reason is one line on stderr.
    """

    def __init__(self) -> None:
        self._job_raised = False  # a job of this sweep raised: Hydra will skip on_multirun_end

    def on_job_end(self, config: Any, job_return: JobReturn, **_: Any) -> None:
        """From a job that raised on, keep the table current after every job."""
        if config.hydra.mode != RunMode.MULTIRUN:
            return
        sweep_dir = Path(str(config.hydra.sweep.dir))
        if job_return.status == JobStatus.FAILED and not self._job_raised:
            self._job_raised = True
            print(f"[fedsim] a job raised; the sweep table is kept current after each job: "
                  f"{sweep_dir / RUNS_TABLE_FILE}", file=sys.stderr)  # fmt: skip
        if self._job_raised:
            self._write(sweep_dir, quiet=True)

    def on_multirun_end(self, config: Any, **_: Any) -> None:
        """Write the sweep's table into ``hydra.sweep.dir``."""
        self._write(Path(str(config.hydra.sweep.dir)))

    @staticmethod
    def _write(sweep_dir: Path, quiet: bool = False) -> None:
        try:
            out = write_runs_table(sweep_dir)
        except (ConfigError, OSError, ValueError) as error:
            print(f"[fedsim] no {RUNS_TABLE_FILE} for {sweep_dir}: {error}", file=sys.stderr)
            return
        if not quiet:
            print(f"[fedsim] sweep table: {out}", file=sys.stderr)
