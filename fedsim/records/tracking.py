"""Experiment tracking: the ``logger`` group (``none``, ``tensorboard``, ``mlflow``, ``wandb``).

A tracker mirrors what a run writes into its folder to a tracking tool: the resolved config as
parameters (flattened to dotted keys: ``strategy._target_``, ``client.lr``), every
``metrics.jsonl`` row as it is written (each finite numeric column, at the row's round), the
summary, and the run's files at the end. The run folder stays the record; a tracker only copies.

Each library is imported when its logger is built, never on ``import fedsim``: a run without a
tracker does not pay for MLflow's 5-10 s import. A library that is missing is a one-line
:class:`ConfigError` naming ``logger`` and what to install, raised before the run folder is
claimed.

Resuming (``fedsim resume=DIR``) continues the same tracked run. Rows the killed process wrote
after its last checkpoint are computed again and logged again at the same round: TensorBoard
hides the old points (``purge_step``), MLflow keeps both points of such a round (equal values;
only ``wall_time_s`` differs), and W&B writes a second offline folder with the same run id.
The ids live in the run folder's ``tracking.json``.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

from fedsim.errors import ConfigError

__all__ = [
    "Tracker",
    "NoTracker",
    "TensorBoardTracker",
    "MlflowTracker",
    "WandbTracker",
    "TRACKING_FILE",
    "flatten",
    "row_metrics",
    "run_files",
]

log = logging.getLogger(__name__)

#: The tracked run's ids (MLflow run id, W&B run id), so that a resume continues that run.
TRACKING_FILE = "tracking.json"
#: Rows are logged at their round; a stage before round 1 (a warm start, round 0) at its cycle,
#: under its phase's name (``warm_start/accuracy``) so that it never overwrites round 0's points.
TRAIN_PHASE = "train"
#: Run-folder files not copied as artifacts: rows a tracker already holds as metrics, per-client
#: rows that can be large, and the checkpoint.
NOT_ARTIFACTS = frozenset({"metrics.jsonl", "clients.jsonl", TRACKING_FILE})
NOT_ARTIFACT_SUFFIXES = frozenset({".safetensors", ".tmp"})


class Tracker(Protocol):
    """What the run calls: ``start`` once the folder is claimed, then rows, then the end."""

    def start(self, config: Mapping[str, Any], run_dir: Path, resumed_after: int | None) -> None:
        """Open (or, after a resume from round ``resumed_after``, reopen) the tracked run."""

    def log_row(self, row: Mapping[str, Any]) -> None:
        """Record one ``metrics.jsonl`` row."""

    def finish(self, summary: Mapping[str, Any], run_dir: Path) -> None:
        """Record the summary and the run folder's files; close the tracked run.

        A run ended by an exception finishes with ``{"status": "crashed", "error": ...}``
        instead; the files hold the rest (``crash.json``: rounds kept, time, traceback). A
        resume reopens the tracked run, and its own end replaces the status.
        """

    def close(self) -> None:
        """End the tracked run if :meth:`finish` was not reached (its record failed)."""


def _require(module: str, package: str, option: str) -> Any:
    """Import ``module`` now, or refuse the logger in one line."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(
            "logger",
            option,
            f"needs {package}: pip install {package} (or pip install 'fedsim[tracking]')",
        ) from None


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """A config as dotted keys: ``{"client": {"lr": 0.2}}`` -> ``{"client.lr": 0.2}``.

    List items are keyed by their index (``devices.profiles.0.name``): one short parameter each,
    where the whole list as one string would pass MLflow's length limit on a parameter.
    """
    if isinstance(tree, Mapping):
        items: Iterator[tuple[Any, Any]] = iter(tree.items())
    elif isinstance(tree, list | tuple):
        items = iter(enumerate(tree))
    else:
        return {prefix: tree}
    flat: dict[str, Any] = {}
    for key, value in items:
        flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def row_metrics(row: Mapping[str, Any]) -> tuple[int, dict[str, float]]:
    """The step and the finite numeric columns of a ``metrics.jsonl`` row (the round excluded).

    A training row's step is its round; a warm-start row's is its cycle and its names carry the
    phase. ``None`` and non-finite values are left out, as ``metrics.jsonl`` holds them as null.
    """
    phase = row.get("phase", TRAIN_PHASE)
    step = int(row.get("round", 0) if phase == TRAIN_PHASE else row.get("cycle", 0))
    prefix = "" if phase == TRAIN_PHASE else f"{phase}/"
    values = {
        f"{prefix}{key}": float(value)
        for key, value in row.items()
        if key not in ("round", "cycle")
        and isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
    }
    return step, values


def summary_values(summary: Mapping[str, Any]) -> tuple[dict[str, float], dict[str, str]]:
    """A summary's finite numbers and its texts (``status``), each key prefixed ``summary.``."""
    numbers: dict[str, float] = {}
    texts: dict[str, str] = {}
    for key, value in summary.items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            if math.isfinite(value):
                numbers[f"summary.{key}"] = float(value)
        elif value is not None:
            texts[f"summary.{key}"] = str(value)
    return numbers, texts


def run_files(run_dir: Path) -> list[Path]:
    """The run folder's files a tracker keeps: config, choices, summary, log, figures."""
    return sorted(
        path
        for path in run_dir.iterdir()
        if path.is_file()
        and not path.name.startswith(".")
        and path.name not in NOT_ARTIFACTS
        and path.suffix not in NOT_ARTIFACT_SUFFIXES
    )


def _saved_ids(run_dir: Path) -> dict[str, str]:
    try:
        ids = json.loads((run_dir / TRACKING_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return ids if isinstance(ids, dict) else {}


def _save_id(run_dir: Path, name: str, run_id: str) -> None:
    from fedsim.records.results import atomic_write_text

    ids = _saved_ids(run_dir) | {name: run_id}
    atomic_write_text(run_dir / TRACKING_FILE, json.dumps(ids, indent=2) + "\n")


class NoTracker:
    """``logger=none`` (the default): the run folder is the only record."""

    def start(self, config: Mapping[str, Any], run_dir: Path, resumed_after: int | None) -> None:
        """Nothing to open."""

    def log_row(self, row: Mapping[str, Any]) -> None:
        """Nothing to record."""

    def finish(self, summary: Mapping[str, Any], run_dir: Path) -> None:
        """Nothing to close."""

    def close(self) -> None:
        """Nothing to end."""


class TensorBoardTracker:
    """``logger=tensorboard``: event files in ``<run dir>/<subdir>`` (``tensorboard --logdir``).

    Each metric is a scalar at its round; the config is TensorBoard's hparams (HPARAMS tab) and
    a text; the summary is scalars ``summary.<key>`` at the last round and a text. The run's files
    stay beside the event files, in the run folder: TensorBoard has no artifact store.
    """

    def __init__(self, subdir: str = "tensorboard", flush_secs: int = 10) -> None:
        _require("tensorboard", "tensorboard", "tensorboard")
        self.subdir, self.flush_secs = subdir, int(flush_secs)
        self._writer: Any = None
        self._last_step = 0

    def start(self, config: Mapping[str, Any], run_dir: Path, resumed_after: int | None) -> None:
        """Open the writer; a resume hides points past its checkpoint (TensorBoard's purge)."""
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        purge = None if resumed_after is None else resumed_after + 1
        self._writer = SummaryWriter(
            str(run_dir / self.subdir), purge_step=purge, flush_secs=self.flush_secs
        )
        if resumed_after is not None:
            return  # the first process logged the config
        flat = {k: v if isinstance(v, bool | int | float | str) else str(v)
                for k, v in flatten(config).items()}  # fmt: skip
        for summary in hparams(flat, {"accuracy": 0.0}):  # the metric the HPARAMS tab shows
            self._writer.file_writer.add_summary(summary)
        self._writer.add_text("config", f"```\n{json.dumps(config, indent=2)}\n```", 0)

    def log_row(self, row: Mapping[str, Any]) -> None:
        """One scalar per column at the row's step."""
        step, values = row_metrics(row)
        for name, value in values.items():
            self._writer.add_scalar(name, value, step)
        self._last_step = max(self._last_step, step)

    def finish(self, summary: Mapping[str, Any], run_dir: Path) -> None:
        """The summary's numbers as scalars at the last round, all of it as a text."""
        numbers, _ = summary_values(summary)
        for name, value in numbers.items():
            self._writer.add_scalar(name, value, self._last_step)
        self._writer.add_text("summary", f"```\n{json.dumps(dict(summary), indent=2)}\n```", 0)
        self.close()

    def close(self) -> None:
        """Flush and close the event file."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class MlflowTracker:
    """``logger=mlflow``: a run in an MLflow tracking store (``mlflow ui`` reads it).

    Parameters
    ----------
    tracking_uri
        The store. ``null``: ``sqlite:///<run dir>/../mlflow.db``, a local store beside the run
        folders (``results/runs/mlflow.db``; one per sweep folder), its artifacts in
        ``mlartifacts/`` beside it. MLflow 3 refuses a new ``file:`` store (maintenance mode).
    experiment_name
        The MLflow experiment, created (with its artifacts beside a SQLite store) if missing.

    """

    def __init__(self, tracking_uri: str | None = None, experiment_name: str = "fedsim") -> None:
        import os
        import warnings

        # MLflow 3 reports usage over the network by default: this simulator stays offline.
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        _require("mlflow.tracking", "mlflow-skinny", "mlflow")
        # Creating a SQLite store logs its schema migrations at INFO: not news for a user.
        logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
        # MLflow's SQL store asks SQLAlchemy 2.1 for a loader it deprecates: MLflow's to fix.
        warnings.filterwarnings(
            "ignore", message=r"The ``noload`` loader strategy is deprecated",
            module=r"mlflow\.store\.tracking\.sqlalchemy_store",
        )  # fmt: skip
        self.tracking_uri, self.experiment_name = tracking_uri, experiment_name
        self._client: Any = None
        self._run_id: str | None = None

    def _store(self, run_dir: Path) -> tuple[str, str | None]:
        """The tracking URI and, for a local SQLite store, the artifact folder beside it."""
        uri = self.tracking_uri or f"sqlite:///{run_dir.resolve().parent / 'mlflow.db'}"
        if uri.startswith("sqlite:///"):
            db = Path(uri.removeprefix("sqlite:///"))
            return uri, (db.parent / "mlartifacts").resolve().as_uri()
        return uri, None

    def start(self, config: Mapping[str, Any], run_dir: Path, resumed_after: int | None) -> None:
        """Create the run (or reopen the one ``tracking.json`` names) and log the config."""
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        uri, artifacts = self._store(run_dir)
        self._client = MlflowClient(tracking_uri=uri)
        saved = _saved_ids(run_dir).get("mlflow_run_id")
        if resumed_after is not None and saved is not None:
            self._run_id = saved
            self._client.update_run(saved, status="RUNNING")
            tags = self._client.get_run(saved).data.tags
            for name in ("summary.status", "summary.error"):  # a crash's: the run goes on
                if name in tags:
                    self._client.delete_tag(saved, name)
            return
        experiment = self._client.get_experiment_by_name(self.experiment_name)
        experiment_id = (
            experiment.experiment_id
            if experiment is not None
            else self._client.create_experiment(self.experiment_name, artifact_location=artifacts)
        )
        run = self._client.create_run(experiment_id, run_name=run_dir.name,
                                      tags={"fedsim.run_dir": str(run_dir.resolve())})  # fmt: skip
        self._run_id = run.info.run_id
        _save_id(run_dir, "mlflow_run_id", self._run_id)
        params = [Param(k, str(v)) for k, v in flatten(config).items()]
        for first in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self._client.log_batch(self._run_id, params=params[first : first + 100])

    def log_row(self, row: Mapping[str, Any]) -> None:
        """One batch: each column at the row's step."""
        import time

        from mlflow.entities import Metric

        step, values = row_metrics(row)
        now_ms = int(time.time() * 1000)
        metrics = [Metric(name, value, now_ms, step) for name, value in values.items()]
        self._client.log_batch(self._run_id, metrics=metrics)

    def finish(self, summary: Mapping[str, Any], run_dir: Path) -> None:
        """Summary metrics and tags, the run's files as artifacts, status from the summary."""
        numbers, texts = summary_values(summary)
        for name, value in numbers.items():
            self._client.log_metric(self._run_id, name, value)
        for name, text in texts.items():
            self._client.set_tag(self._run_id, name, text)
        for path in run_files(run_dir):
            self._client.log_artifact(self._run_id, str(path))
        ended = {"interrupted": "KILLED", "failed": "FAILED", "crashed": "FAILED"}
        status = ended.get(str(summary.get("status")), "FINISHED")
        self._client.set_terminated(self._run_id, status=status)
        self._run_id = None

    def close(self) -> None:
        """A run that ended unrecorded is marked FAILED (a resume sets it RUNNING again)."""
        if self._run_id is not None:
            self._client.set_terminated(self._run_id, status="FAILED")
            self._run_id = None


class WandbTracker:
    """``logger=wandb``: a W&B run in offline mode, in ``<run dir>/wandb/`` (never networking).

    ``wandb sync <run dir>/wandb/offline-run-*`` uploads it later from a machine that may.
    History rows are logged at their round (``step``); the summary goes to the run's summary and
    the run folder's files are saved with the run.
    """

    def __init__(self, project: str = "fedsim") -> None:
        import os

        # W&B's terminal lines (offline notice, one "Symlinked 1 file" warning per saved file)
        # follow its process-wide setup, not a run's settings: quiet unless the user says so.
        os.environ.setdefault("WANDB_SILENT", "true")
        _require("wandb", "wandb", "wandb")
        self.project = project
        self._run: Any = None

    def start(self, config: Mapping[str, Any], run_dir: Path, resumed_after: int | None) -> None:
        """``wandb.init`` offline, with the config; a resume reuses the saved run id."""
        import wandb

        run_id = _saved_ids(run_dir).get("wandb_run_id")  # None: W&B makes one
        settings = wandb.Settings(
            mode="offline", console="off", save_code=False, disable_git=True, silent=True,
            x_disable_stats=True, x_disable_meta=True, x_disable_machine_info=True,
            disable_job_creation=True, x_save_requirements=False,
        )  # fmt: skip
        self._run = wandb.init(
            project=self.project, dir=str(run_dir), id=run_id, name=run_dir.name,
            config=dict(config), resume="allow", settings=settings, reinit="create_new",
        )  # fmt: skip
        _save_id(run_dir, "wandb_run_id", self._run.id)

    def log_row(self, row: Mapping[str, Any]) -> None:
        """One history row at the row's step."""
        step, values = row_metrics(row)
        self._run.log(values, step=step)

    def finish(self, summary: Mapping[str, Any], run_dir: Path) -> None:
        """Summary and files into the offline run, then close it."""
        # A crash's error stays in crash.json (saved below): W&B keeps a summary key across a
        # resume's offline folders, and a run that then completes would still show the error.
        kept = {k: v for k, v in summary.items() if v is not None and k != "error"}
        self._run.summary.update(kept)
        for path in run_files(run_dir):  # under files/<run name>/: W&B has a config.yaml of its own
            self._run.save(str(path), base_path=str(run_dir.parent), policy="now")
        self._run.finish(exit_code=1 if summary.get("status") in ("failed", "crashed") else 0)
        self._run = None

    def close(self) -> None:
        """A run that ended unrecorded ends with exit code 1."""
        if self._run is not None:
            self._run.finish(exit_code=1)
            self._run = None


def tracker_of(cfg: Any) -> Tracker:
    """The run's tracker (``none`` for configs saved before the ``logger`` group existed)."""
    from omegaconf import OmegaConf

    from fedsim.config import build

    if OmegaConf.select(cfg, "logger") is None:
        return NoTracker()
    tracker: Tracker = build(cfg, "logger")
    return tracker
