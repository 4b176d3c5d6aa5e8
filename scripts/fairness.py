"""Per-client accuracy of the final global model (``client_eval.jsonl``), and method ranks.

Pure helpers for ``fedsim-compare``: nothing here draws or prints. ``client_eval.jsonl`` holds
one row per scored client (written by ``fedsim.rounds.synchronous`` after the last round, for
``eval.num_clients_final`` clients): its ``partition_id``, ``num_examples`` and the final
model's ``accuracy`` and ``loss`` on its local data. Run folders are loaded by
:mod:`fedsim.scripts.runs`.

Fairness numbers are per run first (each client counts once, whatever its size), then averaged
over the seeds of a configuration (mean and 95% CI), as in q-FFL (Li et al., ICLR 2020) and
Ditto (Li et al., ICML 2021), which report the worst 10% of devices and the spread over devices.

Methods are ranked within a setting by :func:`standings`: tied ranks from paired tests across
seeds (:mod:`fedsim.scripts.stats`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedsim.errors import ConfigError
from fedsim.records.results import CLIENT_EVAL_FILE
from fedsim.scripts.runs import (
    Configuration,
    Run,
    is_finite,
    label_configurations,
    read_jsonl,
)
from fedsim.scripts.stats import PairedTest, Rank, mean_ci, paired_test, tied_ranks

__all__ = [
    "CLIENT_EVAL_FILE",
    "WORST_SHARE",
    "FairnessSummary",
    "MethodSplit",
    "Standing",
    "client_accuracies",
    "rank_within",
    "split_methods",
    "standings",
    "summarize_fairness",
    "target_default",
    "worst_share_mean",
]

WORST_SHARE = 0.1  # "worst 10%": the mean accuracy of the ceil(10% of n) least accurate clients


@dataclass(frozen=True)
class FairnessSummary:
    """Per-client accuracy of one configuration: per run, then (mean, 95% CI) over seeds."""

    num_clients: tuple[int, int]  # (min, max) clients scored per run
    mean: tuple[float, float]  # mean over clients
    std: tuple[float, float]  # population std over clients (ddof=0: the clients scored)
    worst: tuple[float, float]  # mean of the worst WORST_SHARE of clients
    pooled: np.ndarray  # (clients x seeds,) every run's client accuracies, for the box plot


@dataclass(frozen=True)
class MethodSplit:
    """Which part of a configuration is the method and which the setting it is compared in."""

    method: str  # label among the configurations, from the method keys
    setting: str  # label from the other differing keys; "" when there is one setting


def client_accuracies(run: Run) -> np.ndarray:
    """Finite per-client accuracies of a run's ``client_eval.jsonl`` (clients with data).

    Raises
    ------
    ConfigError
        If the run has no ``client_eval.jsonl`` or no client with an accuracy in it.

    """
    path = run.path / CLIENT_EVAL_FILE
    expected = (
        "expected the per-client accuracy of the final model, which fedsim writes at the end of "
        "a run with eval.num_clients_final > 0"
    )
    if not path.is_file():
        raise ConfigError(
            "SWEEP_DIR", run.path, f"run folder has no {CLIENT_EVAL_FILE}; {expected}"
        )
    values = [float(row["accuracy"]) for row in read_jsonl(path) if is_finite(row.get("accuracy"))]
    if not values:
        raise ConfigError("SWEEP_DIR", path, f"holds no client accuracy; {expected}")
    return np.array(values)


def worst_share_mean(accuracies: Sequence[float], share: float = WORST_SHARE) -> float:
    """Mean of the ``ceil(share * n)`` lowest values (at least one)."""
    values = np.sort(np.asarray(accuracies, dtype=float))
    k = max(1, math.ceil(share * values.size - 1e-9))  # 1e-9: 0.1 * 30 is 3.0000000000000004
    return float(values[:k].mean())


def summarize_fairness(configuration: Configuration) -> FairnessSummary:
    """Mean, spread and worst share of client accuracy per run, then over the seeds."""
    per_run = [client_accuracies(run) for run in configuration.runs]
    sizes = [values.size for values in per_run]
    return FairnessSummary(
        num_clients=(min(sizes), max(sizes)),
        mean=mean_ci([float(values.mean()) for values in per_run]),
        std=mean_ci([float(values.std(ddof=0)) for values in per_run]),
        worst=mean_ci([worst_share_mean(values) for values in per_run]),
        pooled=np.concatenate(per_run),
    )


def method_knobs(
    configurations: Sequence[Configuration],
    splits: Sequence[MethodSplit],
    method_prefixes: Sequence[str],
) -> list[tuple[str, str]]:
    """(method label, every knob under ``method_prefixes`` it ran with), once per method.

    Labels name only what separates methods (a class name, or a knob within one class); this
    is the rest, for the report's legend. ``_target_`` keys are the label itself.
    """
    legend: dict[str, str] = {}
    for configuration, split in zip(configurations, splits, strict=True):
        if split.method in legend:
            continue
        knobs = [
            f"{key.rsplit('.', 1)[-1]}={value}"
            for key, value in configuration.config.items()
            if _matches(key, method_prefixes) and not key.endswith("._target_")
        ]
        legend[split.method] = ", ".join(knobs) or "(none)"
    return list(legend.items())


def _matches(key: str, prefixes: Sequence[str]) -> bool:
    return any(key == p or key.startswith(f"{p}.") for p in prefixes)


def split_methods(
    configurations: Sequence[Configuration], method_prefixes: Sequence[str]
) -> list[MethodSplit]:
    """Label each configuration's method (keys under ``method_prefixes``) and setting (the rest).

    Only keys whose values differ between configurations count. When none of them is a method
    key (a sweep over, e.g., ``partition.alpha`` alone), every configuration is a method of one
    setting.
    """
    configs = [c.config for c in configurations]
    if len(configs) == 1:
        return [MethodSplit(method=configurations[0].label, setting="")]
    keys = list(dict.fromkeys(key for config in configs for key in config))
    differing = [k for k in keys if len({repr(c.get(k)) for c in configs}) > 1]  # null = unset
    method_keys = [k for k in differing if _matches(k, method_prefixes)] or differing
    setting_keys = [k for k in differing if k not in method_keys]

    def labels(kept: Sequence[str]) -> list[str]:
        parts = [{k: c[k] for k in kept if c.get(k) is not None} for c in configs]
        distinct = list({repr(sorted(p.items())): p for p in parts}.values())
        if len(distinct) == 1:
            return [""] * len(configs)
        names = [repr(sorted(p.items())) for p in distinct]
        by_part = dict(zip(names, label_configurations(distinct), strict=True))
        return [by_part[repr(sorted(p.items()))] for p in parts]

    methods = labels(method_keys)
    settings = labels(setting_keys) if setting_keys else [""] * len(configs)
    return [MethodSplit(m, s) for m, s in zip(methods, settings, strict=True)]


def rank_within(values: Sequence[float], groups: Sequence[Any]) -> list[int]:
    """Rank (1 = highest value) among the entries of the same group; ties share the best rank.

    A nan value ranks below every number of its group.
    """
    ranks = []
    for value, group in zip(values, groups, strict=True):
        peers = [v for v, g in zip(values, groups, strict=True) if g == group]
        key = -math.inf if math.isnan(value) else value
        ranks.append(1 + sum((-math.inf if math.isnan(v) else v) > key for v in peers))
    return ranks


@dataclass(frozen=True)
class Standing:
    """A configuration's rank among the methods of its setting, and its test against the best."""

    rank: Rank
    against_best: PairedTest | None  # best - this over shared seeds; None for the best itself


def by_seed(runs: Sequence[Run], value: Any) -> dict[Any, float]:
    """Map seed -> ``value(run)``; a run without a seed is keyed by its path (pairs with none)."""
    return {str(run.path) if run.seed is None else run.seed: value(run) for run in runs}


def standings(
    configurations: Sequence[Configuration], settings: Sequence[Any], value: Any = None
) -> list[Standing]:
    """Rank configurations within each setting, and test each against its setting's best.

    Ranks are :func:`~fedsim.scripts.stats.tied_ranks` of ``value(run)`` (default the final
    accuracy) paired by seed; the best is the configuration with the highest mean.
    """
    value = value or (lambda run: run.final_accuracy)
    values = [by_seed(c.runs, value) for c in configurations]
    result: list[Standing | None] = [None] * len(configurations)
    for setting in dict.fromkeys(settings):
        members = [i for i, s in enumerate(settings) if s == setting]
        ranks = tied_ranks([values[i] for i in members])
        means = [mean_ci(list(values[i].values()))[0] for i in members]
        finite = [k for k, m in enumerate(means) if math.isfinite(m)]
        best = members[max(finite, key=lambda k: means[k])] if finite else None
        for i, rank in zip(members, ranks, strict=True):
            test = None if i == best or best is None else paired_test(values[best], values[i])
            result[i] = Standing(rank, test)
    return [s for s in result if s is not None]


def target_default(final_means: Sequence[float], share: float) -> float:
    """``share`` of the best mean final accuracy, rounded down to 0.01 (at least 0.01)."""
    best = max((v for v in final_means if math.isfinite(v)), default=0.0)
    return max(0.01, math.floor(share * best * 100 + 1e-9) / 100)
