"""flwr-datasets' partitioners, imported without flwr-datasets' plotting.

``flwr_datasets/__init__.py`` imports ``flwr_datasets.visualization``, which imports seaborn,
matplotlib and scipy.stats: most of what importing a partitioner costs, paid by the driver and by
every Ray worker although none of them plots. Before the package is first imported, this module
puts a stand-in for ``flwr_datasets.visualization`` in ``sys.modules`` (the package's
``__init__`` binds it as it would the real one); the first attribute read on the stand-in
(PEP 562 ``__getattr__``) loads the real module and hands over, so
``flwr_datasets.visualization.plot_label_distribution(...)`` still works for a user who calls it.
(:class:`importlib.util.LazyLoader` cannot do this: the import system reads ``__spec__`` of the
module it finds, which makes a lazy module load at once.) fedsim imports flwr-datasets through
here only.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
import types
from typing import Any

__all__ = [
    "DirichletPartitioner",
    "NaturalIdPartitioner",
    "Partitioner",
    "PathologicalPartitioner",
    "ShardPartitioner",
]

_PLOTTING = "flwr_datasets.visualization"


def _defer_plotting() -> None:
    """Stand in for flwr-datasets' visualization module until it is used (once, before import)."""
    if "flwr_datasets" in sys.modules or _PLOTTING in sys.modules:
        return  # already imported (e.g. by a user's script): nothing left to save
    package = importlib.util.find_spec("flwr_datasets")  # a top-level find runs no code
    if package is None or package.submodule_search_locations is None:
        return
    spec = importlib.machinery.PathFinder.find_spec(_PLOTTING, package.submodule_search_locations)
    if spec is None or spec.loader is None:
        return
    stand_in = types.ModuleType(_PLOTTING, "flwr-datasets' plotting, loaded on first use")
    stand_in.__spec__ = spec
    stand_in.__file__ = spec.origin  # inspect.getmodule reads every module's __file__
    stand_in.__path__ = list(spec.submodule_search_locations or [])

    def load(name: str) -> Any:
        if name.startswith("__") and name.endswith("__"):
            # probes of module dunders (copy, pickle, inspect, torch's registries) load nothing
            raise AttributeError(f"module {_PLOTTING!r} has no attribute {name!r}")
        real = sys.modules.get(_PLOTTING)
        if real is None or real is stand_in:
            real = importlib.util.module_from_spec(spec)
            sys.modules[_PLOTTING] = real
            spec.loader.exec_module(real)  # type: ignore[union-attr]
            parent = sys.modules.get("flwr_datasets")
            if parent is not None:
                parent.visualization = real  # type: ignore[attr-defined]
        return getattr(real, name)

    stand_in.__getattr__ = load  # type: ignore[method-assign]
    sys.modules[_PLOTTING] = stand_in


_defer_plotting()

from flwr_datasets.partitioner import (  # noqa: E402 (after the deferral, on purpose)
    DirichletPartitioner,
    NaturalIdPartitioner,
    Partitioner,
    PathologicalPartitioner,
    ShardPartitioner,
)
