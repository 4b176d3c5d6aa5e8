"""Read a run folder's ``config.yaml`` without trusting it: resuming never runs code it names.

A run folder can come from someone else (a colleague's results, an archive, a download). Its
``config.yaml`` is instantiated when the run resumes, and Hydra's ``instantiate`` calls whatever
``_target_`` names: ``builtins.open`` with ``_args_`` empties a file, ``numpy.load`` with
``allow_pickle`` runs a pickle. So before anything is built, the saved config must pass
:func:`check_saved_config`:

* every ``_target_`` is one that fedsim's own config tree (``conf/``) names: the classes a
  user can pick with ``group=option``. A plug-in becomes resumable the way it becomes usable,
  by adding its YAML option under ``conf/``. A folder written before a module moved names the
  old path: it is read as the new one (``fedsim.config.MOVED_MODULES``), then checked;
* no other instantiation key (``_args_``, ``_partial_``, ``_recursive_``, ``_convert_``): fedsim's
  options use none of them, and each changes what is called or how;
* no interpolation (``${...}``): the config was saved resolved, and a resolver is code too.

Anything else is refused with one line naming the key and the value; nothing is built, read or
written. The values of allowed classes' arguments are checked by the classes, as on any run.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

from fedsim.config import CONF_DIR, current_target, with_targets
from fedsim.errors import ConfigError

__all__ = ["shipped_targets", "check_saved_config", "load_saved_config"]

#: Hydra's instantiation keys other than ``_target_``: they change what is called and how.
_INSTANTIATE_KEYS = frozenset({"_args_", "_partial_", "_recursive_", "_convert_"})


def _nodes(value: Any, path: str = "") -> Iterator[tuple[str, Any, Any]]:
    """Every (dotted path, key, value) of a plain YAML tree, depth first."""
    items = value.items() if isinstance(value, dict) else enumerate(value)
    for key, item in items:
        child = f"{path}.{key}" if path else str(key)
        yield child, key, item
        if isinstance(item, dict | list):
            yield from _nodes(item, child)


@functools.cache
def shipped_targets(conf_dir: Path = CONF_DIR) -> frozenset[str]:
    """The ``_target_`` values named anywhere in fedsim's config tree (every group's options)."""
    targets: set[str] = set()
    for path in conf_dir.rglob("*.yaml"):
        tree = yaml.safe_load(path.read_text())
        if isinstance(tree, dict | list):
            targets.update(str(item) for _, key, item in _nodes(tree) if key == "_target_")
    return frozenset(targets)


def check_saved_config(tree: Any, source: Path | str = "config.yaml") -> None:
    """Refuse a saved config that would make ``instantiate`` call anything fedsim does not ship.

    Parameters
    ----------
    tree
        The config as plain YAML data (``yaml.safe_load`` of the file).
    source
        The file, named in the error.

    Raises
    ------
    ConfigError
        On the first disallowed ``_target_``, instantiation key or interpolation.

    """
    if not isinstance(tree, dict):
        raise ConfigError("resume", source, "must hold a fedsim config (a mapping of keys)")
    allowed = shipped_targets()
    nodes = list(_nodes(tree))
    for path, key, value in nodes:  # what would be called comes first in the message
        if key == "_target_" and str(value) not in allowed:
            raise ConfigError(
                path,
                value,
                f"in {source} is not a class fedsim's config tree names; resuming builds only "
                "those (add a YAML option under conf/ for a class of your own)",
            )
    for path, key, value in nodes:
        if key in _INSTANTIATE_KEYS:
            raise ConfigError(path, value, f"in {source}: fedsim's configs never set {key}")
        if isinstance(value, str) and "${" in value:
            raise ConfigError(path, value, f"in {source}: a saved config holds no interpolations")


def load_saved_config(run_dir: Path | str, name: str = "config.yaml") -> DictConfig:
    """The checked config of a run folder, or a one-line ConfigError (broken YAML included)."""
    path = Path(run_dir) / name
    try:
        tree = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError("resume", path, f"cannot be read ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise ConfigError("resume", path, "is not UTF-8 text") from None
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" at line {where.line + 1}" if where is not None else ""
        raise ConfigError("resume", path, f"is not valid YAML{line}") from None
    tree = with_targets(tree, current_target)  # written before a module moved: read as now
    check_saved_config(tree, path)
    return OmegaConf.create(tree)
