"""``fedsim.run``: one simulation from Python, as ``fedsim OVERRIDES`` runs it from a shell."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedsim.config import compose_with_provenance
from fedsim.engine.simulation import simulate

__all__ = ["run"]

DEFAULT_RUNS_DIR = Path("results/runs")


def run(overrides: Sequence[str] = (), run_dir: str | Path | None = None) -> dict[str, Any]:
    """Compose ``conf/config.yaml`` with Hydra ``overrides``, simulate, and return the summary.

    Parameters
    ----------
    overrides
        What follows ``fedsim`` on a command line, one item each: ``["strategy=fedprox",
        "devices=phones_mixed", "num_rounds=5"]``.
    run_dir
        A new folder for the run (default ``results/runs/<time>``, as the command line).

    Returns
    -------
    dict
        ``summary.json``'s content (``status``, ``final_accuracy``, ``sim_time_s``, ...) plus
        ``run_dir``. The folder is the command line's, ``choices.yaml`` included; read its rounds
        with :func:`fedsim.load_runs`. Bad input raises :class:`fedsim.errors.ConfigError`.

    """
    cfg, made_by = compose_with_provenance(overrides)
    if run_dir is None:
        run_dir = DEFAULT_RUNS_DIR / dt.datetime.now().strftime("%Y-%m-%d_%H-%M-%S_%f")
    summary = simulate(cfg, Path(run_dir), made_by=made_by)
    return summary | {"run_dir": str(run_dir)}
