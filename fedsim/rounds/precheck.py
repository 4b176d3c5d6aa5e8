"""What a run checks before it starts, where that needs the run's own parts (layer 5).

``fedsim.config`` checks what a config says (syntax, options, scalars) without importing the
layers above it. The checks here build what the run builds: the strategy, devices, faults, the
client behaviour and the warm start (:func:`check_cheap_groups`), so that a bad value in any job
of a ``--multirun`` is one line before job 0 starts (:func:`precheck_overrides`,
:func:`check_sweep_jobs`), and the keys whose meaning depends on the strategy's kind
(:func:`validate_run`). Heavier modules are imported inside the functions: the command line's
own start stays light.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Sequence
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fedsim.config import (
    GROUPS,
    build,
    check_run_dir,
    compose_config,
    compose_error,
    group_options,
    validate,
)
from fedsim.errors import ConfigError

__all__ = [
    "MAX_JOBS_CHECKED",
    "check_cheap_groups",
    "check_sweep_jobs",
    "precheck_overrides",
    "validate_run",
]


def precheck_overrides(argv: Sequence[str]) -> None:
    """Reject bad command-line overrides with one line, before Hydra prints its own report."""
    overrides = [a for a in argv if not a.startswith("-") and "=" in a]
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as exc:
        first = str(exc).strip().splitlines()[0]
        raise ConfigError(
            "override", " ".join(overrides), f"not valid Hydra syntax ({first})"
        ) from None
    single: list[str] = []
    sweeps: list[tuple[str, list[str]]] = []  # (override key as typed, every value)
    for override, text in zip(parsed, overrides, strict=True):
        if override.is_hydra_override():
            if override.key_or_group in ("hydra.run.dir", "hydra.sweep.dir"):
                check_run_dir(override.key_or_group, override.get_value_element_as_str())
            continue
        key = override.key_or_group
        values = (
            [str(v) for v in override.sweep_string_iterator()]
            if override.is_sweep_override()
            else [override.get_value_element_as_str()]
            if not override.is_delete()
            else []
        )
        if key in GROUPS:
            options = group_options(key)
            for value in values:
                if value not in options:  # (Hydra cannot set a group to null either)
                    raise ConfigError(key, value, f"unknown option; accepted: {', '.join(options)}")
        single.append(f"{text.split('=', 1)[0]}={values[0]}" if values else text)
        if override.is_sweep_override() and len(values) > 1:
            sweeps.append((text.split("=", 1)[0], values))
    try:
        cfg = compose_config(single)
    except (HydraException, OmegaConfBaseException) as exc:
        raise compose_error(exc, single) from None
    if sweeps:
        check_sweep_jobs(single, sweeps)
    else:  # the config's own scalars and options, before the run imports torch, Flower and Ray
        validate(cfg)


#: A sweep up to this many jobs is checked job by job; a larger one value by value.
MAX_JOBS_CHECKED = 256


def check_sweep_jobs(base: Sequence[str], sweeps: Sequence[tuple[str, Sequence[str]]]) -> None:
    """Check every job of a ``--multirun`` before job 0 starts: compose, validate, build.

    Without this, ``num_rounds=2,0`` would run job 0 to the end and only then refuse job 1.
    Each job is composed and its run scalars and cheap groups (strategy, devices, faults,
    client, distillation, warm start) are built, about 0.1 s a job; data and models are not
    loaded. A sweep of more than :data:`MAX_JOBS_CHECKED` jobs checks each value once instead.
    """
    import flwr.common.logger  # noqa: F401 - it sets Flower's level on import: import it first

    logging.getLogger("flwr").setLevel(logging.CRITICAL)  # FedAvg's notes are not for here
    keys = [key for key, _ in sweeps]
    if math.prod(len(values) for _, values in sweeps) <= MAX_JOBS_CHECKED:
        jobs = [
            dict(zip(keys, combo, strict=True))
            for combo in itertools.product(*(values for _, values in sweeps))
        ]
    else:
        jobs = [{key: value} for key, values in sweeps for value in values]
    plain = {o.split("=", 1)[0]: o for o in base}
    for job in jobs:
        overrides = {**plain, **{key: f"{key}={value}" for key, value in job.items()}}
        try:
            cfg = compose_config(list(overrides.values()))
        except (HydraException, OmegaConfBaseException) as exc:
            raise compose_error(exc, list(overrides.values())) from None
        validate_run(cfg)
        check_cheap_groups(cfg)


def check_cheap_groups(cfg: DictConfig) -> Any:
    """Build, as the run does, the groups it checks before loading data; return the strategy.

    Strategy, devices, faults, the client wrapped by its distillation, the warm start (which
    needs ``num_clients``): one path for the run and for a sweep's precheck.
    """
    from fedsim.rounds.warm_start import warm_start_of  # noqa: PLC0415 - the CLI stays light
    from fedsim.training.contract import behaviour_of  # noqa: PLC0415

    strategy = build(cfg, "strategy")
    build(cfg, "devices")  # the fleet checks its profiles and shares
    build(cfg, "faults")
    # The workers build the client too; check its arguments and DFL's fit with it here, once.
    behaviour_of(cfg)
    warm_start_of(cfg)
    return strategy


def validate_run(cfg: DictConfig) -> None:
    """``fedsim.config.validate``, and the keys that depend on the strategy's kind.

    An asynchronous strategy never waits for a round: round-only clock knobs are refused. The
    strategy's class is looked up, not built (``build`` reports an unimportable one).
    """
    validate(cfg)
    deadline = OmegaConf.select(cfg, "clock.deadline_s")
    over = OmegaConf.select(cfg, "clock.over_selection")
    target = OmegaConf.select(cfg, "strategy._target_")
    try:
        cls = get_class(str(target))
    except Exception:  # noqa: BLE001 - build() reports an unimportable target in one line
        return
    from fedsim.rounds.asynchronous import AsyncStrategy  # noqa: PLC0415 - the CLI stays light

    if not (isinstance(cls, type) and issubclass(cls, AsyncStrategy)):
        return
    if deadline is not None:
        raise ConfigError(
            "clock.deadline_s", deadline, "must be null with an asynchronous strategy"
        )
    if over != 1:
        raise ConfigError("clock.over_selection", over, "must be 1 with an asynchronous strategy")
