"""``fedsim`` / ``python -m fedsim``: compose the config, simulate, save. No logic lives here."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from fedsim.config import CONF_DIR
from fedsim.errors import EXIT_BAD_INPUT, ConfigError


def _fail(error: ConfigError) -> None:
    print(f"fedsim: error: {error.one_line()}", file=sys.stderr)
    sys.exit(EXIT_BAD_INPUT)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def _run(cfg: DictConfig) -> float:
    """One run; returns its final test accuracy, the objective of a sweeper (Optuna's)."""
    from fedsim.simulation import simulate

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        summary = simulate(cfg, run_dir)
    except ConfigError as error:
        if run_dir.is_dir() and not any(run_dir.iterdir()):
            run_dir.rmdir()  # Hydra made it; a refused run leaves no folder behind
        _fail(error)
    _report(summary, run_dir)
    if summary["status"] == "failed":
        sys.exit(EXIT_RUN_FAILED)
    final = summary["final_accuracy"]
    return math.nan if final is None else float(final)  # nan: no round finished


EXIT_RUN_FAILED = 1  # the engine lost every client for runtime.max_failed_rounds rounds


def _report(summary: dict, run_dir: Path) -> None:
    status = "done" if summary["status"] == "completed" else summary["status"]
    if summary["final_accuracy"] is None:
        print(f"[fedsim] {status}: no round finished\n[fedsim] results: {run_dir}", file=sys.stderr)
        return
    print(
        f"[fedsim] {status}: final accuracy {summary['final_accuracy']:.4f}, "
        f"best {summary['best_accuracy']:.4f} (round {summary['best_round']}), "
        f"{summary['wall_time_s']:.1f} s\n[fedsim] results: {run_dir}",
        file=sys.stderr,
    )


def _resume(argument: str, others: list[str]) -> None:
    """``fedsim resume=RUN_DIR [runtime.*=...]``: continue a run from its checkpoint.

    The run folder's saved config is the config (only ``runtime.*``, how it runs, may change);
    Hydra is not involved, so no new folder is made.
    """
    from omegaconf import OmegaConf

    from fedsim.checkpoint import read_checkpoint
    from fedsim.results import CONFIG_FILE
    from fedsim.simulation import simulate

    run_dir = Path(argument.split("=", 1)[1]).expanduser()
    if not (run_dir / CONFIG_FILE).is_file():
        raise ConfigError("resume", run_dir, f"must be a run folder (holding {CONFIG_FILE})")
    for override in others:
        if not override.startswith("runtime."):
            raise ConfigError(
                "resume", override, "only runtime.* settings can change when resuming a run"
            )
    read_checkpoint(run_dir)  # missing or corrupt: say so before loading anything
    cfg = OmegaConf.load(run_dir / CONFIG_FILE)
    cfg.merge_with_dotlist(others)
    summary = simulate(cfg, run_dir, resume=True)
    _report(summary, run_dir)
    if summary["status"] == "failed":
        sys.exit(EXIT_RUN_FAILED)


def _quiet_libraries() -> None:
    """Keep stderr to fedsim's lines: library warnings and progress bars are not for users."""
    import warnings

    warnings.simplefilter("ignore", FutureWarning)
    warnings.simplefilter("ignore", DeprecationWarning)
    warnings.simplefilter("ignore", UserWarning)
    import datasets
    import transformers

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def main() -> None:
    """Console entry point: reject bad overrides in one line, then hand over to Hydra."""
    from fedsim.config import precheck_overrides

    _quiet_libraries()
    argv = sys.argv[1:]
    resume = [a for a in argv if a.startswith("resume=")]
    try:
        if resume:
            _resume(resume[0], [a for a in argv if a not in resume])
            return
        precheck_overrides(argv)
    except ConfigError as error:
        _fail(error)
    _run()


if __name__ == "__main__":
    main()
