"""Load run folders from results/, group them into configurations, aggregate over seeds.

Pure helpers shared by ``fedsim-plot`` and ``fedsim-compare``: nothing here draws or prints.
A *run folder* is any folder holding ``metrics.jsonl`` and ``config.yaml`` (written by
``fedsim.records.results``); a sweep folder holds many of them at any depth.

Runs form one *configuration* when their flattened configs are equal once ``seed``,
``runtime.*`` and ``hydra*`` keys are dropped; a configuration holds one run per seed (see
:func:`group_runs` for repeated seeds). Labels name what differs between configurations (see
:func:`label_configurations`).

:func:`summarize` and :func:`summarize_target` reduce a configuration's runs to a table row:
means with the half-width of their 95% confidence interval over seeds
(:mod:`fedsim.scripts.stats`).
Per-client rows (``clients.jsonl``) are read by :mod:`fedsim.scripts.clients_stats`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from fedsim.errors import ConfigError
from fedsim.records.results import (
    CLIENTS_FILE,
    CONFIG_FILE,
    CRASH_FILE,
    FINAL_STATUSES,
    METRICS_FILE,
    SUMMARY_FILE,
    read_jsonl,
    run_status,
)
from fedsim.records.tables import find_run_dirs
from fedsim.scripts.stats import accuracy_time_auc, ci_half_widths, mean_ci

__all__ = [
    "CLIENTS_FILE",
    "Configuration",
    "ConfigSummary",
    "Curve",
    "Reach",
    "Run",
    "TOTAL_KEYS",
    "TargetSummary",
    "X_AXES",
    "aggregate_curve",
    "auc_horizon_s",
    "available_metrics",
    "comparable_config",
    "find_run_dirs",
    "first_reach",
    "flatten_config",
    "group_runs",
    "is_finite",
    "label_configurations",
    "load_run",
    "load_runs",
    "markdown_table",
    "read_jsonl",
    "run_auc",
    "seeds_of",
    "summarize",
    "summarize_target",
]

TRAIN_PHASE = "train"
# Keys that never separate configurations: the seed is what we average over; the engine
# settings (runtime.*) and Hydra's own bookkeeping (hydra*) do not change the algorithm.
IGNORED_KEYS = ("seed",)
IGNORED_PREFIXES = ("runtime.", "hydra")
# x axes a curve can be aligned on -> the per-row metrics key it is built from.
X_AXES = {"round": "round", "bytes": "bytes_up+bytes_down", "sim_time": "sim_time_s"}
# Per-round counters of the device simulation (fedsim.rounds.synchronous writes them to
# metrics.jsonl): a run's total is their sum over its rounds; the table shows the mean of those
# totals over seeds.
TOTAL_KEYS = ("num_stragglers", "num_offline", "num_infeasible", "num_failed", "energy_j")


@dataclass(frozen=True, eq=False)
class Run:
    """One run folder, as read from disk.

    Parameters
    ----------
    path
        The run folder.
    config
        The resolved Hydra config saved with the run (nested mapping).
    rows
        Train-phase rows of ``metrics.jsonl`` (``phase`` absent or ``"train"``), by round.
    summary
        ``summary.json``, or ``{}`` when it is missing (the run was killed or is still running).
    status
        :func:`fedsim.records.results.run_status`: completed, diverged, failed, interrupted,
        crashed, or None (killed or still running).
    stage
        What the rows before round 1 (a warm start's ``phase: warm_start`` rows) moved and
        spent, summed: ``bytes`` (up + down) and each :data:`TOTAL_KEYS` they report. Bytes to
        a target, the bytes axis and the run totals start from it, as the simulated time (the
        rows' ``sim_time_s`` is the run's clock) already does.

    """

    path: Path
    config: dict[str, Any]
    rows: list[dict[str, Any]]
    summary: dict[str, Any]
    stage: dict[str, float] = field(default_factory=dict)
    status: str | None = None

    @property
    def complete(self) -> bool:
        """Whether the run ended for good (:data:`FINAL_STATUSES`: completed or diverged).

        Failed, interrupted and crashed runs stopped early and resume: no table counts them.
        """
        return self.status in FINAL_STATUSES

    @property
    def ending(self) -> str:
        """How the run ended, in a few words: ``interrupted after round 3``.

        A crashed run adds its error from ``crash.json`` (100 characters at most):
        ``crashed after round 2: KeyError: 'x'``.
        """
        if self.status is None:
            return f"no summary: killed or still going, after round {self.num_rounds}"
        text = f"{self.status} after round {self.num_rounds}"
        if self.status == "crashed":
            try:
                text += ": " + str(json.loads((self.path / CRASH_FILE).read_text())["error"])[:100]
            except (OSError, ValueError, KeyError, TypeError):
                pass  # a damaged record: the status alone
        return text

    def _summary(self, key: str) -> Any:
        """A ``summary.json`` value, only where the summary is the run's last word (complete)."""
        return self.summary.get(key) if self.complete else None

    @property
    def clients_path(self) -> Path | None:
        """``clients.jsonl`` of the run (device simulation only), or None."""
        path = self.path / CLIENTS_FILE
        return path if path.is_file() else None

    def values(self, key: str) -> list[float]:
        """Finite values of a per-round metric, in round order (missing rounds skipped)."""
        return [float(row[key]) for row in self.rows if is_finite(row.get(key))]

    def accuracy_at(self, round_number: int) -> float:
        """Test accuracy after round ``round_number`` (nan if the run has no such row)."""
        for row in self.rows:
            if int(row["round"]) == round_number and is_finite(row.get("accuracy")):
                return float(row["accuracy"])
        return math.nan

    def final_value(self, metric: str) -> float:
        """``summary.final_<metric>``, else the last round's ``metric`` (nan if none).

        ``final_value("accuracy")`` is :attr:`final_accuracy`.
        """
        if is_finite(self._summary(f"final_{metric}")):
            return float(self.summary[f"final_{metric}"])
        values = self.values(metric)
        return values[-1] if values else math.nan

    @property
    def final_accuracy(self) -> float:
        """``summary.final_accuracy``, else the last round's accuracy (nan if none)."""
        return self.final_value("accuracy")

    @property
    def best_accuracy(self) -> float:
        """``summary.best_accuracy``, else the best round's accuracy (nan if none)."""
        if is_finite(self._summary("best_accuracy")):
            return float(self.summary["best_accuracy"])
        values = self.values("accuracy")
        return max(values) if values else math.nan

    @property
    def num_rounds(self) -> int:
        """Rounds the run completed (the last train row's round)."""
        return int(self.rows[-1]["round"]) if self.rows else 0

    @property
    def seed(self) -> Any:
        """The run's ``seed`` (None when its config has none)."""
        return self.config.get("seed")


@dataclass(frozen=True, eq=False)
class Configuration:
    """Runs that differ only by seed, with the label that tells them from the others.

    ``runs`` holds one run per seed; ``ignored`` the runs of a seed already present (see
    :func:`group_runs`).
    """

    label: str
    config: dict[str, Any]  # flattened comparable config, shared by all its runs
    runs: tuple[Run, ...]
    ignored: tuple[Run, ...] = ()


@dataclass(frozen=True)
class Curve:
    """A metric over seeds, aligned on round. Every array has shape (num_rounds,)."""

    rounds: np.ndarray
    x: np.ndarray  # mean x over the runs that reached the round (rounds, bytes or seconds)
    mean: np.ndarray
    std: np.ndarray  # sample std (ddof=1); 0 where a single run contributes
    ci95: np.ndarray  # half-width of the mean's 95% CI (Student t); 0 where a single run does
    low: np.ndarray  # min over runs
    high: np.ndarray  # max over runs
    num_runs: np.ndarray  # runs contributing at each round


@dataclass(frozen=True)
class ConfigSummary:
    """Table row of one configuration: (mean, 95% CI half-width) over seeds (nan for one run)."""

    label: str
    num_runs: int
    num_incomplete: int
    final_accuracy: tuple[float, float]  # (mean, CI half-width)
    best_accuracy: tuple[float, float]  # (mean, CI half-width)
    rounds: tuple[int, int]  # (min, max) completed rounds over runs
    final_sim_time_s: float | None  # mean over runs that report sim_time_s
    # TOTAL_KEYS some run reports -> mean over those runs of the run's total (sum over rounds)
    totals: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Reach:
    """Where one run first reaches a target accuracy: all values are through that round."""

    round: int
    sim_time_s: float | None  # cumulative simulated seconds; None without a device fleet
    bytes: int  # cumulative bytes up + down


@dataclass(frozen=True)
class TargetSummary:
    """Cost to a target accuracy; (mean, 95% CI half-width) over the seeds that reached it.

    Means are nan when no seed reached the target (``sim_time_s`` also without a device fleet);
    half-widths are nan for fewer than two seeds.
    """

    target: float
    num_reached: int
    num_runs: int
    sim_time_s: tuple[float, float]
    rounds: tuple[float, float]
    bytes: tuple[float, float]


def is_finite(value: Any) -> bool:
    """Whether ``value`` is a finite int or float (a JSON null, bool or text is not)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _stage_totals(rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Bytes up + down and the :data:`TOTAL_KEYS` summed over rows before round 1."""
    totals = {}
    if any("bytes_up" in r or "bytes_down" in r for r in rows):
        totals["bytes"] = float(sum(r.get("bytes_up", 0) + r.get("bytes_down", 0) for r in rows))
    for key in TOTAL_KEYS:
        values = [float(r[key]) for r in rows if is_finite(r.get(key))]
        if values:
            totals[key] = sum(values)
    return totals


def load_run(path: str | Path) -> Run:
    """Read one run folder; a run that did not end for good (:attr:`Run.complete`) is incomplete."""
    path = Path(path)
    config = yaml.safe_load((path / CONFIG_FILE).read_text()) or {}
    rows, stage = [], []
    for row in read_jsonl(path / METRICS_FILE):
        if "round" not in row:
            continue
        (rows if row.get("phase", TRAIN_PHASE) == TRAIN_PHASE else stage).append(row)
    rows.sort(key=lambda row: int(row["round"]))
    summary_path = path / SUMMARY_FILE
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    return Run(
        path=path,
        config=config,
        rows=rows,
        summary=summary,
        stage=_stage_totals(stage),
        status=run_status(path),
    )


def load_runs(dirs: Sequence[str | Path]) -> list[Run]:
    """Load every run folder at or below ``dirs`` (``fedsim.records.tables.find_run_dirs``)."""
    return [load_run(path) for path in find_run_dirs(dirs, key="DIR")]


def _hashable(value: Any) -> Any:
    if isinstance(value, list | tuple | dict):
        return json.dumps(value, sort_keys=True)
    return value


def flatten_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mapping -> ``{"strategy.proximal_mu": 0.1, ...}``; lists become JSON strings."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_config(value, prefix=f"{dotted}."))
        else:
            flat[dotted] = _hashable(value)
    return flat


def comparable_config(
    config: Mapping[str, Any], seed_keys: Iterable[str] | None = None
) -> dict[str, Any]:
    """Flattened config without the keys that never separate configurations.

    Besides ``seed`` itself: the run seed resolved into a group through ``${seed}`` (data split,
    partitioner, ``model.init_seed``) separates seeds, not configurations. Of the keys in
    ``seed_keys`` (:func:`seed_keys_of` the runs compared; default: every ``<group>.seed``),
    those equal to the run seed are dropped.
    """
    run_seed = config.get("seed")
    flat = flatten_config(config)
    if seed_keys is None:
        seed_keys = [key for key in flat if key.endswith(".seed")]
    dropped = {key for key in seed_keys if key in flat and flat[key] == run_seed}
    return {
        key: value
        for key, value in flat.items()
        if key not in IGNORED_KEYS and not key.startswith(IGNORED_PREFIXES) and key not in dropped
    }


def seed_keys_of(configs: Iterable[Mapping[str, Any]]) -> set[str]:
    """Keys named ``<...>.seed`` or ``<...>_seed`` whose value varies between the runs.

    A run drops such a key where it equals its seed (``${seed}`` resolved into a group). A key
    with one value in every run is kept as it is: a fixed knob like ``client.label_key_seed: 0``
    equals the run seed only by chance (seed 0), and dropping it there would split seed 0 off.
    """
    values: dict[str, set[str]] = {}
    for config in configs:
        for key, value in flatten_config(config).items():
            name = key.rsplit(".", 1)[-1]
            if "." in key and (name == "seed" or name.endswith("_seed")):
                values.setdefault(key, set()).add(repr(value))
    return {key for key, seen in values.items() if len(seen) > 1}


def _as_list(value: Any) -> list[Any] | None:
    """The list behind a flattened value (:func:`flatten_config` stores lists as JSON), or None."""
    if isinstance(value, list | tuple):
        return list(value)
    if not (isinstance(value, str) and value.startswith("[")):
        return None
    try:
        decoded = json.loads(value)
    except json.JSONDecodeError:
        return None
    return decoded if isinstance(decoded, list) else None


def _compact(value: Any) -> str:
    """One list item of a label: a number as ``%g``, a mapping by its ``name`` where it has one."""
    if isinstance(value, Mapping):
        if isinstance(value.get("name"), str):
            return value["name"]
        return json.dumps(value, sort_keys=True, separators=(",", ":"))
    if isinstance(value, list | tuple):
        return "[" + "/".join(_compact(item) for item in value) + "]"
    return _format_value(value)


def _format_value(value: Any) -> str:
    if value is None:
        return "null"  # as YAML and Hydra overrides spell it (clock.deadline_s=null)
    if isinstance(value, float):
        return f"{value:g}"
    items = _as_list(value)
    if items is not None:  # [0.25, 0.5, 1.0] -> 0.25/0.5/1
        return "/".join(_compact(item) for item in items) if items else "[]"
    return str(value)


def _without_unneeded_lists(kept: Sequence[str], configs: Sequence[Mapping[str, Any]]) -> list[str]:
    """``kept`` less the list-valued keys the other kept keys do not need to tell configs apart.

    A list (``strategy.widths``, a fleet's ``profiles``) makes a long label part: it is left out
    when the other keys already give every config its own label. Otherwise list keys are added
    back in config order, each only if it separates configs that the keys before it did not.
    """
    lists = [key for key in kept if any(_as_list(c.get(key)) is not None for c in configs)]

    def distinct(keys: Sequence[str]) -> int:
        return len({tuple(repr(c.get(key)) for key in keys) for c in configs})

    chosen = [key for key in kept if key not in lists]
    for key in lists:
        if distinct(chosen) == len(configs):
            break
        if distinct([*chosen, key]) > distinct(chosen):
            chosen.append(key)
    return [key for key in kept if key in chosen]


def _value_texts(key: str, configs: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """``repr(value)`` -> the value as a label shows it, for ``key``'s values in ``configs``.

    A list shows compactly (:func:`_format_value`) unless two different lists would then read
    the same (two fleets of one profile name): then all of ``key``'s values show as stored.
    """
    values = {repr(c[key]): c[key] for c in configs if c.get(key) is not None}
    texts = {text: _format_value(value) for text, value in values.items()}
    is_list = any(_as_list(value) is not None for value in values.values())
    if is_list and len(set(texts.values())) < len(texts):
        return {text: str(value) for text, value in values.items()}
    return texts


def _separates_a_class(key: str, configs: Sequence[Mapping[str, Any]]) -> bool:
    """Whether ``key`` differs between two configs of the same ``<group>._target_`` class.

    True for keys of groups without a class, and for the classes themselves.
    """
    group, _, name = key.rpartition(".")
    target = f"{group}._target_"
    if name == "_target_" or not group or not any(target in c for c in configs):
        return True
    values: dict[str, set[str]] = {}
    for config in configs:
        values.setdefault(repr(config.get(target)), set()).add(repr(config.get(key)))
    return any(len(seen) > 1 for seen in values.values())


def label_configurations(configs: Sequence[Mapping[str, Any]]) -> list[str]:
    """Short labels naming what differs between flattened configs.

    Rule: keep the keys whose value differs between configs (a missing key counts as a value,
    the same as null: a knob added later with default null does not separate old runs).
    A knob of a group that names its class (``strategy.proximal_mu`` beside
    ``strategy._target_``) is kept only when it separates two configs of the same class: the
    class name already tells FedAvg from FedProx, and sixteen strategies' knobs would bury it.
    ``<group>._target_`` shows as ``<group>=<ClassName>``; any other key as ``<name>=<value>``,
    where ``<name>`` is the key's last dotted part (``strategy.proximal_mu`` -> ``proximal_mu``),
    or the whole dotted key if two kept keys share that last part. A config lacking a kept key
    omits it (FedAvg has no ``proximal_mu``) unless its label would be empty, then it shows
    ``<name>=unset``. A list-valued key (``strategy.widths``, stored as JSON by
    :func:`flatten_config`) is left out when the other kept keys already tell every config
    apart; where it is needed it shows compactly, ``widths=1/0.5/0.25`` (a list of mappings by
    their ``name``: ``profiles=low_end_phone/high_end_phone``). Parts follow config order, joined
    by ``", "``. A single config is labelled by its strategy class name.
    """
    if len(configs) == 1:
        target = configs[0].get("strategy._target_")
        return [str(target).rsplit(".", 1)[-1] if target else "run"]
    keys: list[str] = []
    for config in configs:
        keys.extend(key for key in config if key not in keys)
    kept = [key for key in keys if len({repr(c.get(key)) for c in configs}) > 1]  # null = unset
    kept = [key for key in kept if _separates_a_class(key, configs)]
    kept = _without_unneeded_lists(kept, configs)
    texts = {key: _value_texts(key, configs) for key in kept}
    last_parts = [key.rsplit(".", 1)[-1] for key in kept]
    names = {
        key: key if last_parts.count(last) > 1 else last
        for key, last in zip(kept, last_parts, strict=True)
    }
    labels = []
    for config in configs:
        parts = []
        for key in kept:
            if config.get(key) is None:
                continue
            if key.endswith("._target_"):
                parts.append(f"{key.removesuffix('._target_')}={str(config[key]).split('.')[-1]}")
            else:
                parts.append(f"{names[key]}={texts[key][repr(config[key])]}")
        unset = [f"{names[key]}={'null' if key in config else 'unset'}" for key in kept]
        labels.append(", ".join(parts) or ", ".join(unset))
    return labels


def _one_run_per_seed(runs: Sequence[Run]) -> tuple[tuple[Run, ...], tuple[Run, ...]]:
    """(kept, ignored): per seed, the finished run written last; runs without a seed all kept.

    Two runs of one seed in one configuration are one sample, not two (fedsim is deterministic:
    a repeated seed is a re-run or a copy). We keep the finished one (:attr:`Run.complete`), and
    among those the one whose ``metrics.jsonl`` was modified last (path order breaks ties): a
    re-run replaces the run it repeats. The others are returned so that tools can name them.
    """
    by_seed: dict[Any, list[Run]] = {}
    kept: list[Run] = []
    for run in runs:
        if run.seed is None:
            kept.append(run)
        else:
            by_seed.setdefault(_hashable(run.seed), []).append(run)
    ignored: list[Run] = []
    for same_seed in by_seed.values():
        order = sorted(
            same_seed,
            key=lambda r: (r.complete, (r.path / METRICS_FILE).stat().st_mtime_ns, str(r.path)),
        )
        kept.append(order[-1])
        ignored.extend(order[:-1])
    key = lambda r: str(r.path)  # noqa: E731 - the order runs were found in
    return tuple(sorted(kept, key=key)), tuple(sorted(ignored, key=key))


def seeds_of(runs: Iterable[Run]) -> list[Any]:
    """The seeds of ``runs``, sorted (numbers before text; a run without a seed is None)."""
    seeds = {run.seed for run in runs}
    numbers = sorted(s for s in seeds if isinstance(s, int | float))
    return numbers + sorted((s for s in seeds if not isinstance(s, int | float)), key=str)


def group_runs(runs: Iterable[Run]) -> list[Configuration]:
    """Group runs whose comparable configs are equal, one run per seed; sorted by label.

    A key set to null counts as absent: a run made before a knob existed (``clock.max_sim_time_s``
    added with default null) belongs with the runs made after it. Two runs of one seed in one
    configuration count once: the finished one written last is kept, the others go to
    :attr:`Configuration.ignored` (see :func:`_one_run_per_seed`).
    """
    groups: dict[tuple[tuple[str, Any], ...], list[Run]] = {}
    flats: dict[tuple[tuple[str, Any], ...], dict[str, Any]] = {}
    runs = list(runs)
    seed_keys = seed_keys_of(run.config for run in runs)
    for run in runs:
        flat = comparable_config(run.config, seed_keys)
        set_keys = [item for item in flat.items() if item[1] is not None]
        key = tuple(sorted(set_keys, key=lambda item: item[0]))
        groups.setdefault(key, []).append(run)
        flats.setdefault(key, flat)
    labels = label_configurations(list(flats.values()))
    configurations = [
        Configuration(label, flats[key], *_one_run_per_seed(groups[key]))
        for key, label in zip(flats, labels, strict=True)
    ]
    return sorted(configurations, key=lambda c: c.label)


def available_metrics(runs: Iterable[Run]) -> list[str]:
    """Numeric per-round keys present in any run (``round`` excluded), sorted."""
    keys = {
        key
        for run in runs
        for row in run.rows
        for key, value in row.items()
        if key != "round" and is_finite(value)
    }
    return sorted(keys)


def _cumulative_bytes(rows: Sequence[Mapping[str, Any]], start: float = 0) -> list[int]:
    """Bytes up + down through each row (its own round's), from ``start``: a warm start's."""
    moved = [row.get("bytes_up", 0) + row.get("bytes_down", 0) for row in rows]
    return (int(start) + np.cumsum(moved, dtype=np.int64)).tolist()


def _run_x(run: Run, x: str) -> dict[int, float]:
    """Round -> x value for one run; rounds lacking the x key are left out."""
    if x == "round":
        return {int(row["round"]): float(row["round"]) for row in run.rows}
    if x == "bytes":
        totals = _cumulative_bytes(run.rows, run.stage.get("bytes", 0))
        return {int(row["round"]): float(t) for row, t in zip(run.rows, totals, strict=True)}
    if x == "sim_time":
        return {int(r["round"]): float(r["sim_time_s"]) for r in run.rows if "sim_time_s" in r}
    raise ConfigError("--x", x, f"must be one of: {', '.join(X_AXES)}")


def aggregate_curve(runs: Sequence[Run], metric: str, x: str = "round") -> Curve:
    """Mean, std, min and max of ``metric`` over runs, per round; x is each round's mean x."""
    per_run = []
    for run in runs:
        xs = _run_x(run, x)
        ys = {
            int(row["round"]): float(row[metric]) for row in run.rows if is_finite(row.get(metric))
        }
        per_run.append({r: (xs[r], ys[r]) for r in ys if r in xs})
    rounds = sorted({r for points in per_run for r in points})
    columns: dict[str, list[float]] = {k: [] for k in ("x", "mean", "std", "low", "high", "n")}
    for r in rounds:
        points = np.array([points[r] for points in per_run if r in points])  # (n, 2): x, y
        ys = points[:, 1]
        columns["x"].append(float(points[:, 0].mean()))
        columns["mean"].append(float(ys.mean()))
        columns["std"].append(float(ys.std(ddof=1)) if len(ys) > 1 else 0.0)
        columns["low"].append(float(ys.min()))
        columns["high"].append(float(ys.max()))
        columns["n"].append(len(ys))
    return Curve(
        rounds=np.array(rounds, dtype=int),
        x=np.array(columns["x"]),
        mean=np.array(columns["mean"]),
        std=np.array(columns["std"]),
        ci95=ci_half_widths(np.array(columns["std"]), np.array(columns["n"], dtype=int)),
        low=np.array(columns["low"]),
        high=np.array(columns["high"]),
        num_runs=np.array(columns["n"], dtype=int),
    )


def summarize(configuration: Configuration) -> ConfigSummary:
    """Accuracy over seeds (mean, 95% CI), completed rounds, final simulated time, run totals."""
    runs = configuration.runs
    sim_times = [run.values("sim_time_s")[-1] for run in runs if run.values("sim_time_s")]
    rounds = [run.num_rounds for run in runs]
    totals = {}
    for key in TOTAL_KEYS:
        per_run = [  # runs reporting the key; a warm start's share counts
            sum(run.values(key)) + run.stage.get(key, 0.0) for run in runs if run.values(key)
        ]
        if per_run:
            totals[key] = float(np.mean(per_run))
    return ConfigSummary(
        label=configuration.label,
        num_runs=len(runs),
        num_incomplete=sum(not run.complete for run in runs),
        final_accuracy=mean_ci([run.final_accuracy for run in runs]),
        best_accuracy=mean_ci([run.best_accuracy for run in runs]),
        rounds=(min(rounds), max(rounds)),
        final_sim_time_s=float(np.mean(sim_times)) if sim_times else None,
        totals=totals,
    )


def first_reach(
    rows: Sequence[Mapping[str, Any]],
    target: float,
    metric: str = "accuracy",
    start_bytes: float = 0,
) -> Reach | None:
    """First round (rows in round order) whose ``metric`` is >= ``target``; None if none is.

    Bytes and simulated time count everything up to the end of that round, stragglers' uploads
    and a warm start's ``start_bytes`` included (they were sent); a later dip below the target
    does not undo the reach.
    """
    for row, total_bytes in zip(rows, _cumulative_bytes(rows, start_bytes), strict=True):
        value = row.get(metric)
        if is_finite(value) and value >= target:
            sim_time = row.get("sim_time_s")
            sim_time_s = float(sim_time) if is_finite(sim_time) else None
            return Reach(int(row["round"]), sim_time_s, int(total_bytes))
    return None


def summarize_target(runs: Sequence[Run], target: float, metric: str = "accuracy") -> TargetSummary:
    """Simulated time, rounds and bytes to first reach ``target``, over the seeds that did.

    A seed that never reached it (or stopped early) counts in ``num_runs`` only: the means and
    their 95% CIs are over the reaching seeds, so read them together with ``num_reached``.
    """
    reaches = [
        reach
        for run in runs
        if (reach := first_reach(run.rows, target, metric, run.stage.get("bytes", 0)))
    ]
    return TargetSummary(
        target=target,
        num_reached=len(reaches),
        num_runs=len(runs),
        sim_time_s=mean_ci([r.sim_time_s for r in reaches if r.sim_time_s is not None]),
        rounds=mean_ci([float(r.round) for r in reaches]),
        bytes=mean_ci([float(r.bytes) for r in reaches]),
    )


def auc_horizon_s(runs: Iterable[Run]) -> float:
    """The common time horizon of an AUC comparison: the shortest run's end (simulated s).

    nan when a run has no ``sim_time_s`` (no device fleet): no AUC then.
    """
    ends = [run.values("sim_time_s")[-1] if run.values("sim_time_s") else math.nan for run in runs]
    return min(ends) if ends and all(math.isfinite(end) for end in ends) else math.nan


def run_auc(run: Run, horizon_s: float, metric: str = "accuracy") -> float:
    """Area under ``metric`` against simulated time to ``horizon_s``, over the horizon.

    See :func:`fedsim.scripts.stats.accuracy_time_auc`; rows lacking either value are skipped.
    """
    points = [
        (float(row["sim_time_s"]), float(row[metric]))
        for row in run.rows
        if is_finite(row.get("sim_time_s")) and is_finite(row.get(metric))
    ]
    if not points or not math.isfinite(horizon_s):
        return math.nan
    times_s, values = zip(*points, strict=True)
    return accuracy_time_auc(times_s, values, horizon_s)


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """Render a GitHub markdown table; ``|`` inside cells is escaped."""

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    lines = [line(header), "|" + "|".join("---" for _ in header) + "|"]
    lines.extend(line(row) for row in rows)
    return "\n".join(lines) + "\n"
