"""What a run returns to a sweeper (its ``objective``), and Optuna studies that outlive a sweep.

``fedsim`` returns one float per run: Hydra's Optuna sweeper optimises it. Which float is the
config key ``objective`` (:data:`fedsim.config.OBJECTIVES`), computed from the run's summary and
its ``metrics.jsonl`` rows by :func:`objective_value`.

An Optuna experiment keeps its study in ``<sweep dir>/optuna.db`` (``hydra.sweeper.storage``,
conf/experiment/hpo_fedprox.yaml); launching the sweep again loads that study (the sweeper's
``load_if_exists``) and asks it for more trials. :class:`OptunaStudyCallback` makes that work
with fedsim's run folders: it creates the sweep folder before the study opens its database there
(Hydra creates it only when the first job starts), and numbers the jobs of a relaunch after the
trials already stored, so that job folder ``<n>`` is Optuna's trial ``n`` and a relaunch never
meets an earlier trial's folder (``${fedsim_trial:${hydra.job.num}}`` as ``hydra.sweep.subdir``).
"""

from __future__ import annotations

import gc
import math
import sqlite3
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import OmegaConf, open_dict, read_write

from fedsim.config import OBJECTIVES
from fedsim.errors import ConfigError

__all__ = ["objective_value", "OptunaStudyCallback", "stored_trials", "prepare_sqlite_storage"]

_first_job = {"number": 0}  # Optuna trials stored before this launch: the first job's number


def _trial_number(job_num: Any) -> int:
    """``${fedsim_trial:${hydra.job.num}}``: this launch's job ``job_num`` as Optuna's trial."""
    return _first_job["number"] + int(job_num)


OmegaConf.register_new_resolver("fedsim_trial", _trial_number, replace=True)


def objective_value(
    name: str, summary: Mapping[str, Any], rows: Sequence[Mapping[str, Any]],
    target_accuracy: float | None = None,
) -> float:  # fmt: skip
    """The run's ``objective`` (``nan`` when no round finished: Optuna records a failed trial).

    ``final_accuracy`` / ``best_accuracy``: the summary's. ``auc_time``: the area under test
    accuracy over simulated time (trapezoids between the rounds' ends) divided by the time those
    rounds span, i.e. the mean accuracy over simulated time (a method that learns early scores
    higher; one round: its accuracy). ``time_to_target``: simulated seconds until the test
    accuracy first reaches ``target_accuracy`` (``inf`` if it never does; minimise it).
    """
    train = [
        r for r in rows if r.get("phase", "train") == "train" and r.get("accuracy") is not None
    ]
    if name in ("final_accuracy", "best_accuracy"):
        value = summary.get(name)
        return math.nan if value is None else float(value)
    if not train:
        return math.nan
    if name == "auc_time":
        times = [float(r["sim_time_s"]) for r in train]
        accs = [float(r["accuracy"]) for r in train]
        span = times[-1] - times[0]
        if span <= 0:
            return accs[-1]
        area = sum((t1 - t0) * (a0 + a1) / 2 for t0, t1, a0, a1 in
                   zip(times, times[1:], accs, accs[1:], strict=False))  # fmt: skip
        return area / span
    if name == "time_to_target":
        if target_accuracy is None:
            raise ConfigError("objective_target", None, "must be set with objective=time_to_target")
        reached = [float(r["sim_time_s"]) for r in train if r["accuracy"] >= target_accuracy]
        return reached[0] if reached else math.inf
    raise ConfigError("objective", name, f"accepted: {', '.join(OBJECTIVES)}")


def stored_trials(storage: str | None, study_name: str | None) -> int:
    """How many trials a SQLite Optuna storage holds for ``study_name`` (0 if none yet)."""
    if not storage or not str(storage).startswith("sqlite:///") or study_name is None:
        return 0
    path = Path(str(storage).removeprefix("sqlite:///"))
    if not path.is_file():
        return 0
    with sqlite3.connect(path) as db:  # Optuna's schema: studies(study_id, study_name), trials
        row = db.execute(
            "SELECT COUNT(*) FROM trials JOIN studies USING (study_id) WHERE study_name = ?",
            (study_name,),
        ).fetchone()
    return int(row[0])


class OptunaStudyCallback(Callback):
    """Hydra callback of the Optuna experiments: the sweep folder first, trials numbered on."""

    def on_multirun_start(self, config: Any, **_: Any) -> None:
        """Create the sweep folder and the study's database; count the trials a relaunch finds."""
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)  # Hydra's lines say it all once
        Path(str(config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        sweeper = config.hydra.sweeper
        storage = sweeper.get("storage")
        if storage and str(storage).startswith("sqlite:///"):
            prepare_sqlite_storage(str(storage))
        stored = _first_job["number"] = stored_trials(storage, sweeper.get("study_name"))
        seed = OmegaConf.select(sweeper, "sampler.seed")
        if stored and isinstance(seed, int):
            # The sampler is built after this callback, from this config. With its seed, a
            # relaunch would draw the first launch's random start-up trials again; seed + trials
            # stored draws new ones, and the same sequence of launches stays reproducible.
            with read_write(sweeper), open_dict(sweeper):
                sweeper.sampler.seed = seed + stored


def prepare_sqlite_storage(url: str) -> None:
    """Create Optuna's tables in the SQLite file ``url`` and stamp their schema version.

    hydra-optuna-sweeper 1.3 needs optuna < 3, and optuna 2.10 stamps the schema version
    (alembic's ``alembic_version`` row) on a connection it never commits: SQLAlchemy 2, which
    Flower requires, rolls that back, and every later open of the storage fails on an assert.
    The stamp is made here on a committed connection, once, before the sweeper opens the study;
    optuna's own sessions commit, so the rest of the storage works as documented.
    """
    import optuna
    import sqlalchemy
    from alembic.migration import MigrationContext
    from alembic.script import ScriptDirectory

    engine = sqlalchemy.create_engine(url)
    try:
        with engine.begin() as connection:
            if MigrationContext.configure(connection).get_current_revision() is not None:
                return  # stamped: a study's database from an earlier launch
        try:
            optuna.storages.RDBStorage(url)  # creates the tables, then fails on the lost stamp
        except AssertionError:
            pass
        gc.collect()  # closes the connection optuna left holding its uncommitted stamp (a lock)
        scripts = ScriptDirectory(str(Path(optuna.storages.__file__).parent / "_rdb" / "alembic"))
        with engine.begin() as connection:
            head = scripts.get_current_head()
            assert head is not None  # optuna ships its migrations: they have a head
            MigrationContext.configure(connection).stamp(scripts, head)
    finally:
        engine.dispose()
