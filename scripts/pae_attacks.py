"""PAE MobiLLM's label privacy over seeds: every attack of the threat model, one row per seed.

``python -m fedsim.scripts.pae_attacks --seeds 0 1 2 3 4 [--out FILE.json]``

For each seed (another data split, partition and set of label keys) one real client-round of the
showcase's phones is observed as the server sees it (:func:`observe_one_round`), and each attack
of :data:`ATTACKS` is scored against the true labels. The last rows are the mean and the 95%
confidence interval over seeds (Student t), and, for each attack, the mean of its rate minus
chance. The threat model is in ``fedsim/clients/side_tuning/label_attack.py``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scipy import stats

from fedsim.clients.side_tuning.label_attack import ATTACKS, attack_rates

__all__ = ["main"]

COLUMNS = ("chance", "zero-shot content alone", *ATTACKS)


def mean_ci(values: Sequence[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% confidence interval (Student t; 0 for one value)."""
    arr = np.asarray(values, dtype=float)
    if len(arr) < 2:
        return float(arr.mean()), 0.0
    half = stats.t.ppf(0.975, len(arr) - 1) * arr.std(ddof=1) / np.sqrt(len(arr))
    return float(arr.mean()), float(half)


def table(rows: dict[int, dict[str, float]]) -> str:
    """A Markdown table: one row per seed, then mean ± 95% CI and the mean above chance."""
    lines = [
        "| seed | " + " | ".join(COLUMNS) + " |",
        "|---" * (len(COLUMNS) + 1) + "|",
    ]
    for seed, rates in rows.items():
        lines.append(f"| {seed} | " + " | ".join(f"{rates[c]:.3f}" for c in COLUMNS) + " |")
    summary = [mean_ci([rates[c] for rates in rows.values()]) for c in COLUMNS]
    lines.append("| mean ± 95% CI | " + " | ".join(f"{m:.3f} ± {h:.3f}" for m, h in summary) + " |")
    above = [mean_ci([rates[c] - rates["chance"] for rates in rows.values()]) for c in COLUMNS]
    lines.append("| minus chance | " + " | ".join(f"{m:+.3f} ± {h:.3f}" for m, h in above) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Score every attack on each seed; print the table; write the rates to ``--out``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--out", type=Path, default=None, help="JSON file for the rates")
    args = parser.parse_args(argv)
    rows: dict[int, dict[str, float]] = {}
    for seed in args.seeds:
        start = time.perf_counter()
        rows[seed] = attack_rates(seed)
        print(f"seed {seed}: {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    print(table(rows))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({str(k): v for k, v in rows.items()}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
