"""Config checks that turn bad input into one-line ``ConfigError``s before anything runs.

Three layers, cheapest first:

1. ``fedsim.rounds.precheck.precheck_overrides`` reads the command line before Hydra does: an
   unknown option in a group (``strategy=fedavgg``), an unknown key or a syntax error become one
   line naming the override and what is accepted (Hydra's own messages span several lines and
   exit with 1). It lives a layer up, since checking a sweep's jobs builds what the run builds.
2. :func:`validate` checks the composed config's top-level scalars (and
   ``fedsim.rounds.precheck.validate_run`` those that depend on the strategy's kind).
3. :func:`build` instantiates a group's object; the classes validate their own arguments and
   raise ``ConfigError`` (Hydra wraps it; we unwrap), and an unknown argument is named.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.errors import InstantiationException
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from fedsim.errors import ConfigError

__all__ = [
    "CONF_DIR",
    "GROUPS",
    "validate",
    "compose_error",
    "check_run_dir",
    "group_options",
    "build",
    "compose_config",
    "compose_with_provenance",
    "config_hash",
    "provenance",
    "MOVED_MODULES",
    "current_target",
    "first_target",
    "with_targets",
]

#: Modules that moved (issue 18's layer folders), old dotted name -> new. A run folder names its
#: classes (``_target_``) by the path they had when it was written: resuming reads them through
#: this table (:func:`current_target`), and :func:`config_hash` names every class by its first
#: path (:func:`first_target`), so moving a module never orphans a checkpoint. Append, never edit.
MOVED_MODULES = {
    "fedsim.data": "fedsim.learning.data",
    "fedsim.partitioners": "fedsim.learning.partitioners",
    "fedsim.models": "fedsim.learning.models",
    "fedsim.devices": "fedsim.clock.devices",
    "fedsim.faults": "fedsim.engine.faults",
    "fedsim.warm_start": "fedsim.rounds.warm_start",
}
_FIRST_MODULES = {new: old for old, new in MOVED_MODULES.items()}


def _moved(target: str, table: Mapping[str, str]) -> str:
    module, _, name = str(target).rpartition(".")
    return f"{table[module]}.{name}" if module in table else str(target)


def current_target(target: str) -> str:
    """Where a saved config's ``_target_`` lives now (itself unless its module moved)."""
    return _moved(target, MOVED_MODULES)


def first_target(target: str) -> str:
    """The path a class was first saved under: what :func:`config_hash` names it by."""
    return _moved(target, _FIRST_MODULES)


def with_targets(tree: Any, rename: Callable[[str], str]) -> Any:
    """A plain config tree with every ``_target_`` value passed through ``rename``."""
    if isinstance(tree, dict):
        return {
            k: rename(v) if k == "_target_" and isinstance(v, str) else with_targets(v, rename)
            for k, v in tree.items()
        }
    if isinstance(tree, list):
        return [with_targets(v, rename) for v in tree]
    return tree


def _conf_dir() -> Path:
    """The config tree: fedsim/conf/ in an installed wheel, else the checkout's conf/."""
    package = Path(__file__).resolve().parent
    installed = package / "conf"
    return installed if (installed / "config.yaml").is_file() else package.parent / "conf"


CONF_DIR = _conf_dir()
#: Config groups a user picks options from.
GROUPS = (
    "data",
    "partition",
    "model",
    "strategy",
    "client",
    "devices",
    "warm_start",
    "distillation",
    "logger",
    "experiment",
)


def group_options(group: str) -> list[str]:
    """The option names of a config group (YAML files, subfolders included: ``a/b``)."""
    root = CONF_DIR / group
    return sorted(str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.yaml"))


def check_run_dir(key: str, value: str) -> None:
    """A run folder must be a folder (or not exist yet) inside a folder the user can write to."""
    path = Path(value).expanduser()
    if "${" in value:
        return  # Hydra resolves it (the default's timestamp); the run checks it then
    if path.exists() and not path.is_dir():
        raise ConfigError(key, value, "must be a folder, not a file")
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:  # a real write, not os.access: root passes that on read-only or special folders
        os.rmdir(tempfile.mkdtemp(dir=existing, prefix=".fedsim-probe-"))
    except OSError as exc:
        raise ConfigError(
            key, value, f"must be inside a folder you can write to ({existing}: {exc.strerror})"
        ) from None


def compose_error(exc: Exception, overrides: Sequence[str]) -> ConfigError:
    """Hydra's or OmegaConf's error on composing ``overrides``, as one line naming the key."""
    text = " ".join(str(exc).split())
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        if f"'{key}'" in text or f"Key '{key.split('.')[-1]}'" in text:
            value = override.split("=", 1)[1] if "=" in override else ""
            return ConfigError(
                key, value, "not a config key of the chosen options (see `fedsim --cfg job`)"
            )
    return ConfigError("override", " ".join(overrides), text)


def provenance(choices: Mapping[Any, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """What made a run: each config group's chosen option and the command-line overrides.

    ``choices`` is Hydra's ``hydra.runtime.choices`` (Hydra's own ``hydra/*`` groups left out);
    written to the run folder's ``choices.yaml``, read back by :func:`fedsim.load_runs`.
    """
    kept = {str(k): v for k, v in choices.items() if not str(k).startswith("hydra/")}
    return {"choices": dict(sorted(kept.items())), "overrides": [str(o) for o in overrides]}


def compose_with_provenance(overrides: Sequence[str] = ()) -> tuple[DictConfig, dict[str, Any]]:
    """:func:`compose_config` plus the run's :func:`provenance` (the same config, tested)."""
    from hydra.core.global_hydra import GlobalHydra

    def composed() -> tuple[DictConfig, dict[str, Any]]:
        cfg = compose(config_name="config", overrides=list(overrides), return_hydra_config=True)
        choices = OmegaConf.to_container(cfg.hydra.runtime.choices)
        assert isinstance(choices, dict)  # a DictConfig's container is a dict
        made = provenance(choices, list(cfg.hydra.overrides.task))
        with open_dict(cfg):
            del cfg["hydra"]
        return cfg, made

    if GlobalHydra.instance().is_initialized():
        return composed()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return composed()


def compose_config(overrides: Sequence[str] = ()) -> DictConfig:
    """Compose ``conf/config.yaml`` with overrides, outside of ``@hydra.main``."""
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        return compose(config_name="config", overrides=list(overrides))
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def _int(cfg: DictConfig, key: str, minimum: int) -> int:
    value = OmegaConf.select(cfg, key)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(key, value, f"must be an integer >= {minimum}")
    return value


def _positive(cfg: DictConfig, key: str) -> float:
    value = OmegaConf.select(cfg, key)
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ConfigError(key, value, "must be a number > 0")
    return float(value)


def validate(cfg: DictConfig) -> None:
    """Check the run scalars (the groups' objects check their own arguments in ``build``)."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(missing[0], "???", "is required: set it on the command line")
    _int(cfg, "seed", 0)
    _int(cfg, "num_clients", 1)
    _int(cfg, "num_rounds", 1)
    _int(cfg, "checkpoint_every", 0)
    _positive(cfg, "runtime.client_num_cpus")
    _positive(cfg, "runtime.round_timeout_s")
    _int(cfg, "runtime.max_failed_rounds", 0)
    _int(cfg, "runtime.server_num_threads", 1)
    deadline = OmegaConf.select(cfg, "clock.deadline_s")
    if deadline is not None:
        _positive(cfg, "clock.deadline_s")
    if OmegaConf.select(cfg, "clock.max_sim_time_s") is not None:
        _positive(cfg, "clock.max_sim_time_s")
    over = OmegaConf.select(cfg, "clock.over_selection")
    if isinstance(over, bool) or not isinstance(over, int | float) or over < 1:
        raise ConfigError("clock.over_selection", over, "must be a number >= 1")
    engine = OmegaConf.select(cfg, "runtime.engine", default="ray")  # older folders: Ray
    if engine not in ENGINES:
        raise ConfigError("runtime.engine", engine, f"must be one of: {', '.join(ENGINES)}")
    lanes = OmegaConf.select(cfg, "runtime.num_lanes")
    if lanes is not None:
        _int(cfg, "runtime.num_lanes", 1)
    _check_devices(cfg)
    _check_objective(cfg)
    final = OmegaConf.select(cfg, "eval.num_clients_final")
    if final != "all" and (isinstance(final, bool) or not isinstance(final, int) or final < 0):
        raise ConfigError(
            "eval.num_clients_final", final, "must be all or an integer >= 0 (0 = none)"
        )


#: ``runtime.engine``: ``ray`` (worker processes on a local Ray, or a cluster) or ``inline``
#: (the ServerApp and the ClientApp in the driver's process: fedsim/engine/inline.py).
ENGINES = ("ray", "inline")

#: ``runtime.server_device`` values besides ``cuda:N`` (fedsim/learning/placement.py).
SERVER_DEVICES = ("cpu", "auto", "cuda")


def _check_devices(cfg: DictConfig) -> None:
    """GPU keys: a GPU share Ray can place, a server device that exists, a boolean switch.

    Ray places a fraction of one GPU (0.25: four workers on one) or whole GPUs; 1.5 would stay
    pending for ever. Whether a Ray node has the GPUs is checked once Ray is up
    (``fedsim.engine.simulation``); the server's own device is checked here, before anything
    starts. Keys absent from a run folder saved before they existed mean CPU.
    """
    gpus = OmegaConf.select(cfg, "runtime.client_num_gpus", default=0.0)
    number = isinstance(gpus, int | float) and not isinstance(gpus, bool)
    if not number or not (0 <= gpus <= 1 or float(gpus).is_integer()):
        raise ConfigError(
            "runtime.client_num_gpus",
            gpus,
            "must be 0 (CPU), a share of one GPU up to 1 (0.25: four workers per GPU) "
            "or a whole number of GPUs",
        )
    deterministic = OmegaConf.select(cfg, "runtime.deterministic_gpu", default=True)
    if not isinstance(deterministic, bool):
        raise ConfigError("runtime.deterministic_gpu", deterministic, "must be true or false")
    check_server_device(OmegaConf.select(cfg, "runtime.server_device", default="cpu"))


def check_server_device(spec: Any) -> None:
    """``runtime.server_device``: cpu, auto, or a CUDA device this process can see."""
    key = "runtime.server_device"
    text = str(spec)
    index = text.removeprefix("cuda:")
    if not (text in SERVER_DEVICES or (text.startswith("cuda:") and index.isdigit())):
        raise ConfigError(
            key, spec, "must be cpu, auto (a GPU if one is free, else cpu), cuda or cuda:N"
        )
    if not text.startswith("cuda"):
        return
    import torch  # noqa: PLC0415 - config.py stays light: torch only for a CUDA request

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise ConfigError(
            key,
            spec,
            f"no CUDA device here (torch {torch.__version__}, 0 GPUs visible); use cpu or auto",
        )
    if text != "cuda" and int(index) >= count:
        raise ConfigError(key, spec, f"must name a visible GPU: cuda:0 to cuda:{count - 1} here")


#: Top-level keys that change what a run reports, never what it computes: out of its hash.
NOT_COMPUTED = ("logger", "objective", "objective_target")
#: Knobs added after runs were recorded whose null means what the run did before they existed:
#: left out of the hash while null, so an older folder's job keeps its hash (a relaunched sweep
#: finds it finished) and a new knob never makes every earlier run look different.
NULL_AS_BEFORE = (
    ("model", "cost_backbone"),
    ("model", "cost_seq_len"),
    ("client", "cost_backbone"),
    ("client", "cost_seq_len"),
)
#: What ``fedsim`` returns to a sweeper (``objective``): fedsim/records/sweeps.py computes them.
OBJECTIVES = ("final_accuracy", "best_accuracy", "auc_time", "time_to_target")


def _check_objective(cfg: DictConfig) -> None:
    """``objective`` names one of :data:`OBJECTIVES`; ``time_to_target`` needs its target."""
    name = OmegaConf.select(cfg, "objective", default="final_accuracy")
    if name not in OBJECTIVES:
        raise ConfigError("objective", name, f"accepted: {', '.join(OBJECTIVES)}")
    target = OmegaConf.select(cfg, "objective_target", default=None)
    if name == "time_to_target" and (
        isinstance(target, bool) or not isinstance(target, int | float) or not 0 < target <= 1
    ):
        raise ConfigError(
            "objective_target",
            target,
            "must be a test accuracy in (0, 1] with objective=time_to_target",
        )


def config_hash(cfg: DictConfig) -> str:
    """Hash of what a run computes: the resolved config less ``runtime`` and :data:`NOT_COMPUTED`.

    Classes count by their first path (:data:`MOVED_MODULES`): where the code lives is not what
    the run computes. How it runs (``runtime``), where it is tracked (``logger``) and what it
    reports to a sweeper (``objective``) are not either, so a folder written before those keys
    existed keeps its hash; nor is a later knob at its neutral null (:data:`NULL_AS_BEFORE`).
    """
    plain = with_targets(OmegaConf.to_container(cfg, resolve=True), first_target)
    plain.pop("runtime", None)
    for key in NOT_COMPUTED:
        plain.pop(key, None)
    for group, key in NULL_AS_BEFORE:
        node = plain.get(group)
        if isinstance(node, dict) and key in node and node[key] is None:
            del node[key]
    return hashlib.sha256(json.dumps(plain, sort_keys=True, default=str).encode()).hexdigest()


def build(cfg: DictConfig, group: str, **kwargs: Any) -> Any:
    """Instantiate ``cfg.<group>``; constructor errors come out as one-line ConfigErrors."""
    node = cfg[group]
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as exc:
        cause = exc.__cause__
        while cause is not None and not isinstance(cause, ConfigError):
            cause = cause.__cause__
        if isinstance(cause, ConfigError):
            raise cause from None
        raise _unknown_argument(node, group, exc) from None


def _unknown_argument(node: DictConfig, group: str, exc: Exception) -> ConfigError:
    target = str(node.get("_target_", "?"))
    try:
        params = inspect.signature(get_class(target)).parameters
    except Exception:  # noqa: BLE001 - the target itself cannot be imported
        return ConfigError(f"{group}._target_", target, "must name an importable class")
    accepted = [p for p in params if p not in ("self", "args", "kwargs")]
    for key in node:
        if key != "_target_" and key not in params and "kwargs" not in params:
            # !s prints a YAML key (str, int, float, bool) as {} does; mypy: a key may be bytes
            return ConfigError(f"{group}.{key!s}", node[key], f"not accepted; accepted: {accepted}")
    message = " ".join(str(exc.__cause__ or exc).split())
    return ConfigError(group, target.rsplit(".", 1)[-1], f"could not be built: {message}")
