"""``fedsim`` / ``python -m fedsim``: compose the config, simulate, save. No logic lives here."""

from __future__ import annotations

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
def _run(cfg: DictConfig) -> None:
    from fedsim.simulation import simulate

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        summary = simulate(cfg, run_dir)
    except ConfigError as error:
        if run_dir.is_dir() and not any(run_dir.iterdir()):
            run_dir.rmdir()  # Hydra made it; a refused run leaves no folder behind
        _fail(error)
    print(
        f"[fedsim] done: final accuracy {summary['final_accuracy']:.4f}, "
        f"best {summary['best_accuracy']:.4f} (round {summary['best_round']}), "
        f"{summary['wall_time_s']:.1f} s\n[fedsim] results: {run_dir}",
        file=sys.stderr,
    )


def main() -> None:
    """Console entry point: reject bad overrides in one line, then hand over to Hydra."""
    from fedsim.config import precheck_overrides

    try:
        precheck_overrides(sys.argv[1:])
    except ConfigError as error:
        _fail(error)
    _run()


if __name__ == "__main__":
    main()
