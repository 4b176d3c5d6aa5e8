"""Per-client rows of device simulations (``clients.jsonl``), pooled by device tier.

Pure helpers for ``fedsim-plot --latency``: nothing here draws or prints. ``clients.jsonl`` holds
one row per client-round (written by ``fedsim.rounds.synchronous``): the device and its tier, the
outcome (:data:`OUTCOMES`), and for clients that trained, the latency and its parts in simulated
seconds.
Run folders are loaded by :mod:`fedsim.scripts.runs`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedsim.errors import ConfigError
from fedsim.keys import Outcome
from fedsim.scripts.runs import CLIENTS_FILE, Run, is_finite, read_jsonl

__all__ = [
    "LATENCY_PARTS",
    "OUTCOMES",
    "TierStats",
    "deadlines_of",
    "load_client_rows",
    "tier_stats",
]

# The synchronous scheduler's outcomes (fedsim.keys.Outcome), in the order plots and tables show
# them: aggregated, dropped (deadline / over-selection), not sent (offline, too little memory),
# sent but the client raised. Others (a phone's interruption, the asynchronous loop's) follow.
OUTCOMES = (Outcome.OK, Outcome.STRAGGLER, Outcome.OFFLINE, Outcome.INFEASIBLE, Outcome.FAILED)
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
        for row in read_jsonl(run.clients_path)
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
        timed = [row for row in tier_rows if is_finite(row.get("latency_s"))]
        outcomes = {name: 0 for name in OUTCOMES}
        for row in tier_rows:
            outcome = str(row.get("outcome", "ok"))
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
        parts = {
            part: float(np.mean([row[part] for row in timed if is_finite(row.get(part))] or [0.0]))
            for part in LATENCY_PARTS
        }
        latency = np.array([float(row["latency_s"]) for row in timed])
        stats.append(TierStats(tier, len(tier_rows), latency, parts, outcomes))
    median = {s.tier: float(np.median(s.latency_s)) if s.latency_s.size else -1.0 for s in stats}
    return sorted(stats, key=lambda s: (-median[s.tier], s.tier))


def deadlines_of(runs: Iterable[Run]) -> dict[float | None, int]:
    """Runs per round deadline (``clock.deadline_s``; None: null or not set), deadlines sorted.

    A client-round whose latency exceeds its run's deadline is a straggler
    (:func:`fedsim.clock.devices.synchronous_round` drops its update).
    """
    counts: dict[float | None, int] = {}
    for run in runs:
        clock = run.config.get("clock")
        deadline = clock.get("deadline_s") if isinstance(clock, Mapping) else None
        key = float(deadline) if is_finite(deadline) else None
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items(), key=lambda item: (item[0] is None, item[0] or 0.0)))
