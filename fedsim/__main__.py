"""``fedsim`` / ``python -m fedsim``: compose the config, simulate, save. No logic lives here."""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

if TYPE_CHECKING:
    from hydra.conf import HydraConf

from fedsim.config import CONF_DIR
from fedsim.errors import EXIT_BAD_INPUT, ConfigError
from fedsim.rounds.interrupt import RunInterrupted, announce, exit_now


def _fail(error: ConfigError) -> None:
    print(f"fedsim: error: {error.one_line()}", file=sys.stderr)
    sys.exit(EXIT_BAD_INPUT)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def _run(cfg: DictConfig) -> float:
    """One run; returns its ``objective`` (default: final test accuracy) to a sweeper (Optuna)."""
    from omegaconf import OmegaConf

    from fedsim.config import provenance
    from fedsim.engine.simulation import simulate
    from fedsim.rounds.virtual_grid import WorkerSetupError

    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    choices = OmegaConf.to_container(hydra_cfg.runtime.choices)
    assert isinstance(choices, dict)  # a DictConfig's container is a dict
    made_by = provenance(choices, list(hydra_cfg.overrides.task))
    try:
        again = _sweep_job_again(cfg, run_dir) if _in_multirun(hydra_cfg) else None
        if again == "finished":
            summary = _saved_summary(run_dir)
            print(f"[fedsim] {run_dir}: already finished ({summary['status']}), skipped",
                  file=sys.stderr)  # fmt: skip
            return _objective(cfg, summary, run_dir)
        summary = simulate(cfg, run_dir, resume=again == "resume", made_by=made_by)
    except (ConfigError, RunInterrupted) as error:
        if run_dir.is_dir() and not any(run_dir.iterdir()):
            run_dir.rmdir()  # Hydra made it; a refused or interrupted start leaves no folder
        if isinstance(error, RunInterrupted):
            _stopped(error)
        else:
            _fail(error)
    except WorkerSetupError as error:  # not the input's fault: the workers' machines lack something
        print(f"fedsim: error: {error} (folder {run_dir})", file=sys.stderr)
        sys.exit(1)
    _finish(summary, run_dir, in_sweep=_in_multirun(hydra_cfg))
    return _objective(cfg, summary, run_dir)  # nan: no round finished


def _objective(cfg: DictConfig, summary: dict, run_dir: Path) -> float:
    """The float a sweeper optimises: ``cfg.objective`` of the run (fedsim/records/sweeps.py)."""
    from omegaconf import OmegaConf

    from fedsim.records.results import read_metrics
    from fedsim.records.sweeps import objective_value

    name = OmegaConf.select(cfg, "objective", default="final_accuracy")
    target = OmegaConf.select(cfg, "objective_target", default=None)
    return objective_value(name, summary, read_metrics(run_dir), target)


def _in_multirun(hydra_cfg: HydraConf) -> bool:
    from hydra.types import RunMode

    return hydra_cfg.mode == RunMode.MULTIRUN


def _sweep_job_again(cfg: DictConfig, run_dir: Path) -> str | None:
    """A ``--multirun`` launched again: what to do with a job whose folder already holds a run.

    ``"finished"`` (skip it), ``"resume"`` (continue from its checkpoint), or None (a new
    folder: run it). The folder must hold a run of this very job's config (the checkpoint's
    config hash); a run that stopped before its first checkpoint cannot be continued and is
    refused rather than overwritten.
    """
    from fedsim.config import config_hash
    from fedsim.records.checkpoint import CHECKPOINT_FILE, verify_checkpoint
    from fedsim.records.results import METRICS_FILE, check_folder_free

    if not (run_dir / METRICS_FILE).exists():
        return None
    check_folder_free(run_dir, resume=True, key="hydra.sweep.dir")  # the same sweep, running
    if not (run_dir / CHECKPOINT_FILE).exists():
        raise ConfigError(
            "hydra.sweep.dir", run_dir,
            "holds a run of this job that stopped before its first checkpoint; remove that "
            "folder to run the job again",
        )  # fmt: skip
    try:
        verify_checkpoint(run_dir, config_hash(cfg))
    except ConfigError as error:
        raise ConfigError(
            "hydra.sweep.dir", run_dir,
            f"holds another run than this job's ({error.accepted}); use a new hydra.sweep.dir",
        ) from None  # fmt: skip
    return "finished" if _finished_status(run_dir) is not None else "resume"


def _saved_summary(run_dir: Path) -> dict:
    import json

    from fedsim.records.results import SUMMARY_FILE

    return json.loads((run_dir / SUMMARY_FILE).read_text())


EXIT_RUN_FAILED = 1  # the engine lost every client for runtime.max_failed_rounds rounds
# SIGINT / SIGTERM: 130 / 143 (128 + the signal's number), see fedsim/rounds/interrupt.py


def _stopped(stop: RunInterrupted) -> None:
    """A signal before the run claimed its folder: one line, nothing written."""
    print(f"fedsim: {stop}; nothing was written", file=sys.stderr)
    exit_now()


#: Jobs of this ``--multirun`` whose run ended ``failed``: the sweep runs the rest, then exits 1.
_FAILED_JOBS: list[Path] = []


def _finish(summary: dict, run_dir: Path, in_sweep: bool = False) -> None:
    """Report the run; exit 1 if it failed, 130 / 143 with the resume command if a signal hit.

    A failed job of a sweep does not end the sweep (a fault study's harshest setting may fail
    by design): the other jobs run, and the sweep exits 1 at its end (:func:`main`).
    """
    _report(summary, run_dir)
    if summary["status"] == "interrupted":
        announce(run_dir)
        exit_now()
    if summary["status"] == "failed":
        if in_sweep:
            _FAILED_JOBS.append(run_dir)
            return
        sys.exit(EXIT_RUN_FAILED)


def _report(summary: dict, run_dir: Path) -> None:
    from fedsim.records.progress import log_line

    status = "done" if summary["status"] == "completed" else summary["status"]
    if summary["final_accuracy"] is None:
        log_line(run_dir, f"[fedsim] {status}: no round finished")
        log_line(run_dir, f"[fedsim] results: {run_dir}")
        return
    rounds_s, startup_s = summary["wall_time_s"], summary.get("startup_s")
    took = f"{rounds_s:.1f} s of rounds"
    if startup_s is not None:  # a resume counts its own start-up
        took = f"{startup_s + rounds_s:.1f} s ({startup_s:.1f} s start-up, {took})"
    log_line(
        run_dir,
        f"[fedsim] {status}: final accuracy {summary['final_accuracy']:.4f}, "
        f"best {summary['best_accuracy']:.4f} (round {summary['best_round']}), {took}",
    )
    log_line(run_dir, f"[fedsim] results: {run_dir}")


def _resume(argument: str, others: list[str]) -> None:
    """``fedsim resume=RUN_DIR [runtime.*=...]``: continue a run from its checkpoint.

    The run folder's saved config is the config (only ``runtime.*``, how it runs, may change);
    Hydra is not involved, so no new folder is made. The folder may come from someone else, so
    it is checked before anything is built: the config names only classes fedsim's config tree
    names (:mod:`fedsim.records.saved_config`), the checkpoint is intact and of that config. A
    finished run is left as it is.
    """
    from fedsim.config import config_hash
    from fedsim.engine.simulation import simulate
    from fedsim.records.checkpoint import verify_checkpoint
    from fedsim.records.results import CONFIG_FILE, check_folder_free
    from fedsim.records.saved_config import load_saved_config

    run_dir = Path(argument.split("=", 1)[1]).expanduser()
    if not (run_dir / CONFIG_FILE).is_file():
        raise ConfigError("resume", run_dir, f"must be a run folder (holding {CONFIG_FILE})")
    for override in others:
        if not override.startswith("runtime."):
            raise ConfigError(
                "resume", override, "only runtime.* settings can change when resuming a run"
            )
    cfg = load_saved_config(run_dir)  # refuses a tampered config before anything is built
    # A run still writing the folder replaces its checkpoint as it goes: refuse it before reading.
    check_folder_free(run_dir, resume=True, key="resume")
    meta = verify_checkpoint(run_dir, config_hash(cfg))  # missing, corrupt, another config
    finished = _finished_status(run_dir)
    if finished is not None:
        print(
            f"[fedsim] {run_dir} already finished ({finished}, round {meta['server_round']}); "
            "nothing to resume",
            file=sys.stderr,
        )
        return
    try:
        cfg.merge_with_dotlist(others)
    except Exception as exc:  # noqa: BLE001 - OmegaConf's errors are several lines
        raise ConfigError("resume", " ".join(others), " ".join(str(exc).split())[:160]) from None
    summary = simulate(cfg, run_dir, resume=True)
    _finish(summary, run_dir)


def _finished_status(run_dir: Path) -> str | None:
    """The final status of a run that ended for good (completed, diverged), else None.

    Failed, interrupted and crashed runs resume; a folder without a status (killed) too: its
    checkpoint decides.
    """
    from fedsim.records.results import FINAL_STATUSES, run_status

    status = run_status(run_dir)
    return status if status in FINAL_STATUSES else None


#: (message regex, category, module regex) of warnings that say nothing a fedsim user can act on,
#: each found in a run and named here with its cause. Noise known to one part is filtered where it
#: arises, by message and module: peft's in clients/peft_tuning.py, MLflow's in
#: fedsim/records/tracking.py. Python's own defaults already hide DeprecationWarnings outside
#: ``__main__``.
KNOWN_NOISE: list[tuple[str, type[Warning], str]] = [
    # datasets' Dataset.sort (flwr-datasets' ShardPartitioner sorts by label) passes pyarrow 25's
    # deprecated SortOptions(null_placement=...): the library's call, not the user's.
    ("Specifying null_placement in SortOptions is deprecated", FutureWarning, "pyarrow"),
]


def _quiet_libraries() -> None:
    """Keep stderr to fedsim's lines: known library noise and progress bars are not for users.

    Only warnings known to be noise are filtered (:data:`KNOWN_NOISE`); any other warning, from a
    library or a user's own code, is shown.
    """
    import warnings

    for message, category, module in KNOWN_NOISE:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    # By the libraries' own environment variables, read when each is first imported: a digits
    # run never imports transformers (importing it only to quiet it cost a second of start-up),
    # and Ray's workers inherit them. A value the user set is kept.
    for name, value in QUIET_ENV.items():
        os.environ.setdefault(name, value)
    if "datasets" in sys.modules:  # imported already (by a caller of main): too late for its env
        import datasets

        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()
    if "transformers" in sys.modules:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()


#: Environment variables that keep Hugging Face's libraries quiet: logging at error level, no
#: progress bars (transformers follows huggingface_hub's switch).
QUIET_ENV = {
    "DATASETS_VERBOSITY": "error",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
}


def version_line() -> str:
    """``fedsim 0.1.0 (flwr 1.41.0, ray 2.52.1, torch 2.13.0, Python 3.11.7)``."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    from fedsim import __version__

    def installed(name: str) -> str:
        try:
            return f"{name} {version(name)}"
        except PackageNotFoundError:
            return f"{name} not installed"

    stack = ", ".join(installed(name) for name in ("flwr", "ray", "torch"))
    return f"fedsim {__version__} ({stack}, Python {platform.python_version()})"


def main() -> None:
    """Console entry point: reject bad overrides in one line, then hand over to Hydra."""
    from fedsim.rounds.precheck import precheck_overrides

    argv = sys.argv[1:]
    if argv in (["--version"], ["-V"]):  # Hydra's own --version would print Hydra's
        print(version_line())
        return
    _quiet_libraries()
    resume = [a for a in argv if a.startswith("resume=")]
    try:
        if resume:
            _resume(resume[0], [a for a in argv if a not in resume])
            _end_process()
        precheck_overrides(argv)
    except ConfigError as error:
        _fail(error)
    except RunInterrupted as stop:  # a resume stopped before it reopened its folder
        _stopped(stop)
    _run()
    if _FAILED_JOBS:
        print(
            f"[fedsim] {len(_FAILED_JOBS)} job(s) of the sweep failed (every client lost for "
            f"runtime.max_failed_rounds rounds): {', '.join(map(str, _FAILED_JOBS))}",
            file=sys.stderr,
        )
        _end_process(EXIT_RUN_FAILED)
    _end_process()


def _end_process(code: int = 0) -> NoReturn:
    """Exit with ``code`` (0: done) without the interpreter's teardown, once all is written.

    With torch, Ray and Flower loaded, Python's teardown (modules, Ray's core worker) took
    2.4-3.4 s after the last line on 2 cores: every command paid it. The exit handlers still
    run first, as at a normal exit (logging's, the trackers' libraries'), after the engine is
    released (Ray shut down), then the standard streams are flushed; a run's files were closed
    by the run itself.
    """
    engine = sys.modules.get("fedsim.engine.simulation")  # loaded: a run happened here
    if engine is not None:
        engine.release_engine()  # Ray's exit hook would first sleep 0.5 s for its log lines
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # a closed pipe: nothing left to flush into
            stream.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
