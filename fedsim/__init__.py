"""fedsim: federated-learning simulation of heterogeneous mobile devices on Flower and Ray.

The Python API (``import fedsim`` stays light: each name loads its module on first use)::

    import fedsim
    summary = fedsim.run(["strategy=fedprox", "num_rounds=5"], run_dir="results/runs/nb")
    df = fedsim.load_runs("results/runs/nb")      # pandas, one row per round

- :func:`run`: compose ``conf/`` with Hydra overrides, simulate, return the run summary;
- :func:`compose_config` and :func:`simulate`: the two steps of ``run``, for a config edited
  in between;
- :func:`load_runs` and :func:`load_clients`: run folders (one, or a sweep) as DataFrames.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import Any

try:
    __version__ = version("fedsim")  # pyproject.toml's, as installed (editable or wheel)
except PackageNotFoundError:  # a bare checkout on sys.path, never installed
    __version__ = "0+unknown"

__all__ = ["__version__", "compose_config", "load_clients", "load_runs", "run", "simulate"]

_LAZY = {
    "compose_config": "fedsim.config",
    "simulate": "fedsim.engine.simulation",
    "run": "fedsim.api",
    "load_runs": "fedsim.records.tables",
    "load_clients": "fedsim.records.tables",
}


def __getattr__(name: str) -> Any:
    """Import the module behind a public name on first use (Ray and torch load only then)."""
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fedsim' has no attribute {name!r}")
