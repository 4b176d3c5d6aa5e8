"""Load run folders from results/, group them into configurations, aggregate over seeds.

Pure helpers shared by ``fedsim-plot`` and ``fedsim-compare``: nothing here draws or prints.
A *run folder* is any folder holding ``metrics.jsonl`` and ``config.yaml`` (written by
``fedsim.results``); a sweep folder holds many of them at any depth.

Runs form one *configuration* when their flattened configs are equal once ``seed``,
``runtime.*`` and ``hydra*`` keys are dropped. Labels name what differs between
configurations (see :func:`label_configurations`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from fedsim.errors import ConfigError

__all__ = [
    "Configuration",
    "ConfigSummary",
    "Curve",
    "Run",
    "TierStats",
    "X_AXES",
    "aggregate_curve",
    "available_metrics",
    "comparable_config",
    "find_run_dirs",
    "flatten_config",
    "group_runs",
    "label_configurations",
    "load_client_rows",
    "load_run",
    "load_runs",
    "markdown_table",
    "mean_std",
    "summarize",
    "tier_stats",
]

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.yaml"
SUMMARY_FILE = "summary.json"
CLIENTS_FILE = "clients.jsonl"
TRAIN_PHASE = "train"
# Keys that never separate configurations: the seed is what we average over; the engine
# settings (runtime.*) and Hydra's own bookkeeping (hydra*) do not change the algorithm.
IGNORED_KEYS = ("seed",)
IGNORED_PREFIXES = ("runtime.", "hydra")
# x axes a curve can be aligned on -> the per-row metrics key it is built from.
X_AXES = {"round": "round", "bytes": "bytes_up+bytes_down", "sim_time": "sim_time_s"}


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
        ``summary.json``, or ``{}`` when it is missing (the run crashed or is still running).

    """

    path: Path
    config: dict[str, Any]
    rows: list[dict[str, Any]]
    summary: dict[str, Any]

    @property
    def complete(self) -> bool:
        """Whether the run wrote its ``summary.json``."""
        return bool(self.summary)

    @property
    def clients_path(self) -> Path | None:
        """``clients.jsonl`` of the run (device simulation only), or None."""
        path = self.path / CLIENTS_FILE
        return path if path.is_file() else None

    def values(self, key: str) -> list[float]:
        """Finite values of a per-round metric, in round order (missing rounds skipped)."""
        return [float(row[key]) for row in self.rows if _is_finite(row.get(key))]

    @property
    def final_accuracy(self) -> float:
        """``summary.final_accuracy``, else the last round's accuracy (nan if none)."""
        if _is_finite(self.summary.get("final_accuracy")):
            return float(self.summary["final_accuracy"])
        values = self.values("accuracy")
        return values[-1] if values else math.nan

    @property
    def best_accuracy(self) -> float:
        """``summary.best_accuracy``, else the best round's accuracy (nan if none)."""
        if _is_finite(self.summary.get("best_accuracy")):
            return float(self.summary["best_accuracy"])
        values = self.values("accuracy")
        return max(values) if values else math.nan

    @property
    def num_rounds(self) -> int:
        """Rounds the run completed (the last train row's round)."""
        return int(self.rows[-1]["round"]) if self.rows else 0


@dataclass(frozen=True, eq=False)
class Configuration:
    """Runs that differ only by seed, with the label that tells them from the others."""

    label: str
    config: dict[str, Any]  # flattened comparable config, shared by all its runs
    runs: tuple[Run, ...]


@dataclass(frozen=True)
class Curve:
    """A metric over seeds, aligned on round. Every array has shape (num_rounds,)."""

    rounds: np.ndarray
    x: np.ndarray  # mean x over the runs that reached the round (rounds, bytes or seconds)
    mean: np.ndarray
    std: np.ndarray  # sample std (ddof=1); 0 where a single run contributes
    low: np.ndarray  # min over runs
    high: np.ndarray  # max over runs
    num_runs: np.ndarray  # runs contributing at each round


@dataclass(frozen=True)
class ConfigSummary:
    """Table row of one configuration; stds are sample stds over seeds (nan for one run)."""

    label: str
    num_runs: int
    num_incomplete: int
    final_accuracy: tuple[float, float]  # (mean, std)
    best_accuracy: tuple[float, float]  # (mean, std)
    rounds: tuple[int, int]  # (min, max) completed rounds over runs
    final_sim_time_s: float | None  # mean over runs that report sim_time_s


def _is_finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def find_run_dirs(dirs: Sequence[str | Path]) -> list[Path]:
    """Every run folder (``metrics.jsonl`` + ``config.yaml``) at or below ``dirs``, sorted.

    Raises
    ------
    ConfigError
        If a folder does not exist or none of them holds a run folder.

    """
    found: set[Path] = set()
    for folder in map(Path, dirs):
        if not folder.is_dir():
            raise ConfigError("DIR", folder, "is not a folder")
        for metrics in folder.rglob(METRICS_FILE):
            if (metrics.parent / CONFIG_FILE).is_file():
                found.add(metrics.parent.resolve())
    if not found:
        names = " ".join(str(d) for d in dirs)
        raise ConfigError(
            "DIR", names, f"no run folder found (a folder with {METRICS_FILE} and {CONFIG_FILE})"
        )
    return sorted(found)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    """JSON lines of a file; a truncated last line (a run killed mid-write) is dropped."""
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    rows: list[dict[str, Any]] = []
    for number, line in enumerate(lines, start=1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            if number == len(lines):
                break
            raise ConfigError(f"{path}:{number}", line[:40], f"is not JSON ({err.msg})") from err
    return rows


def load_run(path: str | Path) -> Run:
    """Read one run folder; a missing ``summary.json`` gives an incomplete run."""
    path = Path(path)
    config = yaml.safe_load((path / CONFIG_FILE).read_text()) or {}
    rows = [
        row
        for row in _read_jsonl(path / METRICS_FILE)
        if row.get("phase", TRAIN_PHASE) == TRAIN_PHASE and "round" in row
    ]
    rows.sort(key=lambda row: int(row["round"]))
    summary_path = path / SUMMARY_FILE
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    return Run(path=path, config=config, rows=rows, summary=summary)


def load_runs(dirs: Sequence[str | Path]) -> list[Run]:
    """Load every run folder at or below ``dirs`` (see :func:`find_run_dirs`)."""
    return [load_run(path) for path in find_run_dirs(dirs)]


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


def comparable_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """Flattened config without the keys that never separate configurations.

    Besides ``seed`` itself, a ``<group>.seed`` equal to the run seed is the run seed resolved
    through ``${seed}`` (data split, partitioner): it separates seeds, not configurations.
    """
    run_seed = config.get("seed")
    return {
        key: value
        for key, value in flatten_config(config).items()
        if key not in IGNORED_KEYS
        and not key.startswith(IGNORED_PREFIXES)
        and not (key.endswith(".seed") and value == run_seed)
    }


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def label_configurations(configs: Sequence[Mapping[str, Any]]) -> list[str]:
    """Short labels naming what differs between flattened configs.

    Rule: keep the keys whose value differs between configs (a missing key counts as a value).
    ``<group>._target_`` shows as ``<group>=<ClassName>``; any other key as ``<name>=<value>``,
    where ``<name>`` is the key's last dotted part (``strategy.proximal_mu`` -> ``proximal_mu``),
    or the whole dotted key if two kept keys share that last part. A config lacking a kept key
    omits it (FedAvg has no ``proximal_mu``) unless its label would be empty, then it shows
    ``<name>=unset``. Parts follow config order, joined by ``", "``. A single config is
    labelled by its strategy class name.
    """
    if len(configs) == 1:
        target = configs[0].get("strategy._target_")
        return [str(target).rsplit(".", 1)[-1] if target else "run"]
    keys: list[str] = []
    for config in configs:
        keys.extend(key for key in config if key not in keys)
    missing = object()
    kept = [key for key in keys if len({repr(c.get(key, missing)) for c in configs}) > 1]
    last_parts = [key.rsplit(".", 1)[-1] for key in kept]
    names = {
        key: key if last_parts.count(last) > 1 else last
        for key, last in zip(kept, last_parts, strict=True)
    }
    labels = []
    for config in configs:
        parts = []
        for key in kept:
            if key not in config:
                continue
            if key.endswith("._target_"):
                parts.append(f"{key.removesuffix('._target_')}={str(config[key]).split('.')[-1]}")
            else:
                parts.append(f"{names[key]}={_format_value(config[key])}")
        labels.append(", ".join(parts) or ", ".join(f"{names[key]}=unset" for key in kept))
    return labels


def group_runs(runs: Iterable[Run]) -> list[Configuration]:
    """Group runs whose comparable configs are equal; sorted by label."""
    groups: dict[tuple[tuple[str, Any], ...], list[Run]] = {}
    flats: dict[tuple[tuple[str, Any], ...], dict[str, Any]] = {}
    for run in runs:
        flat = comparable_config(run.config)
        key = tuple(sorted(flat.items(), key=lambda item: item[0]))
        groups.setdefault(key, []).append(run)
        flats.setdefault(key, flat)
    labels = label_configurations(list(flats.values()))
    configurations = [
        Configuration(label=label, config=flats[key], runs=tuple(groups[key]))
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
        if key != "round" and _is_finite(value)
    }
    return sorted(keys)


def _run_x(run: Run, x: str) -> dict[int, float]:
    """Round -> x value for one run; rounds lacking the x key are left out."""
    if x == "round":
        return {int(row["round"]): float(row["round"]) for row in run.rows}
    if x == "bytes":
        # Rows hold the bytes moved in that round; the axis is cumulative traffic.
        totals = np.cumsum([row.get("bytes_up", 0) + row.get("bytes_down", 0) for row in run.rows])
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
            int(row["round"]): float(row[metric]) for row in run.rows if _is_finite(row.get(metric))
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
        low=np.array(columns["low"]),
        high=np.array(columns["high"]),
        num_runs=np.array(columns["n"], dtype=int),
    )


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample std (ddof=1) of the finite values; std is nan for fewer than two."""
    finite = np.array([v for v in values if math.isfinite(v)], dtype=float)
    if finite.size == 0:
        return math.nan, math.nan
    return float(finite.mean()), float(finite.std(ddof=1)) if finite.size > 1 else math.nan


def summarize(configuration: Configuration) -> ConfigSummary:
    """Summarize final and best accuracy over seeds, completed rounds, final simulated time."""
    runs = configuration.runs
    sim_times = [run.values("sim_time_s")[-1] for run in runs if run.values("sim_time_s")]
    rounds = [run.num_rounds for run in runs]
    return ConfigSummary(
        label=configuration.label,
        num_runs=len(runs),
        num_incomplete=sum(not run.complete for run in runs),
        final_accuracy=mean_std([run.final_accuracy for run in runs]),
        best_accuracy=mean_std([run.best_accuracy for run in runs]),
        rounds=(min(rounds), max(rounds)),
        final_sim_time_s=float(np.mean(sim_times)) if sim_times else None,
    )


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """Render a GitHub markdown table; ``|`` inside cells is escaped."""

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    lines = [line(header), "|" + "|".join("---" for _ in header) + "|"]
    lines.extend(line(row) for row in rows)
    return "\n".join(lines) + "\n"


# --- per-client rows (device simulation) ------------------------------------------------------
OUTCOMES = ("ok", "straggler", "offline", "infeasible")
LATENCY_PARTS = ("download_s", "compute_s", "upload_s")


@dataclass(frozen=True)
class TierStats:
    """Per-client latency of one device tier, pooled over client-rounds of all runs."""

    tier: str
    num_rows: int  # client-rounds, every outcome
    latency_s: np.ndarray  # (k,) finite latencies of the client-rounds that have one
    mean_parts_s: dict[str, float]  # LATENCY_PARTS -> mean seconds over those k rows
    outcomes: dict[str, int]  # outcome -> client-rounds (OUTCOMES first, then any other)


def load_client_rows(runs: Iterable[Run]) -> list[dict[str, Any]]:
    """Rows of every run's ``clients.jsonl``, each with ``run`` set to the run folder.

    Raises
    ------
    ConfigError
        If no run has a ``clients.jsonl`` with a row in it.

    """
    runs = list(runs)
    rows = [
        {**row, "run": str(run.path)}
        for run in runs
        if run.clients_path is not None
        for row in _read_jsonl(run.clients_path)
    ]
    if not rows:
        raise ConfigError(
            CLIENTS_FILE,
            "missing",
            f"none of {len(runs)} runs has client rows; run with a device fleet "
            "(devices=<fleet>) to record per-client latency",
        )
    return rows


def tier_stats(rows: Iterable[Mapping[str, Any]]) -> list[TierStats]:
    """Latency and outcome counts per tier, slowest tier (highest median latency) first."""
    by_tier: dict[str, list[Mapping[str, Any]]] = {}
    for row in rows:
        by_tier.setdefault(str(row.get("tier", "unknown")), []).append(row)
    stats = []
    for tier, tier_rows in by_tier.items():
        timed = [row for row in tier_rows if _is_finite(row.get("latency_s"))]
        outcomes = {name: 0 for name in OUTCOMES}
        for row in tier_rows:
            outcome = str(row.get("outcome", "ok"))
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
        parts = {
            part: float(np.mean([row[part] for row in timed if _is_finite(row.get(part))] or [0.0]))
            for part in LATENCY_PARTS
        }
        latency = np.array([float(row["latency_s"]) for row in timed])
        stats.append(TierStats(tier, len(tier_rows), latency, parts, outcomes))
    median = {s.tier: float(np.median(s.latency_s)) if s.latency_s.size else -1.0 for s in stats}
    return sorted(stats, key=lambda s: (-median[s.tier], s.tier))
