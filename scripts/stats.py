"""Statistics over seeds for ``fedsim-plot`` and ``fedsim-compare``: pure functions of numbers.

- :func:`mean_ci`: mean and the half-width of its 95% confidence interval, Student t with
  n - 1 degrees of freedom (seeds are few; the t quantile widens the interval accordingly).
- :func:`accuracy_time_auc`: area under accuracy against simulated time up to a horizon,
  divided by the horizon: the time-averaged accuracy of the latest global model.
- :func:`paired_test`: two configurations' runs paired by seed; paired t-test
  (``scipy.stats.ttest_rel``) and, from :data:`MIN_WILCOXON_PAIRS` pairs, the Wilcoxon
  signed-rank test (``scipy.stats.wilcoxon``) as a check that does not assume normal differences.
- :func:`tied_ranks`: ranks where a difference the paired t-test does not find significant at
  :data:`ALPHA` is a tie (``1``, ``2=``, ``2=``).

scipy is imported inside the functions that use it: loading it costs seconds on a busy machine
and ``fedsim-plot --latency`` never needs it.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "ALPHA",
    "CONFIDENCE",
    "MIN_SEEDS",
    "MIN_WILCOXON_PAIRS",
    "PairedTest",
    "Rank",
    "accuracy_time_auc",
    "ci_half_widths",
    "mean_ci",
    "paired_test",
    "tied_ranks",
]

CONFIDENCE = 0.95  # two-sided confidence of every interval in the tables
ALPHA = 0.05  # significance level of the paired tests that decide tied ranks
# Fewer seeds than this -> a warning line: with 4 seeds t(0.975, 3) = 3.18, the interval is
# 1.6x wider than with many seeds (1.96), and a paired test rarely separates anything.
MIN_SEEDS = 5
# The exact two-sided Wilcoxon signed-rank p is at least 2 / 2**n (every difference one sign):
# 0.0625 for n = 5, 0.03125 for n = 6. Below 6 pairs it can never reach ALPHA: not reported.
MIN_WILCOXON_PAIRS = 6


def _t_quantile(n: np.ndarray | int) -> np.ndarray | float:
    """t(1 - (1 - CONFIDENCE) / 2, n - 1): 2.776 for n = 5, 4.303 for n = 3."""
    from scipy import stats

    return stats.t.ppf(1 - (1 - CONFIDENCE) / 2, np.asarray(n) - 1)


def mean_ci(values: Sequence[float]) -> tuple[float, float]:
    """Mean of the finite values and the half-width of its 95% CI (Student t, n - 1 dof).

    The half-width is t(0.975, n - 1) x sample std (ddof=1) / sqrt(n); nan for fewer than two
    values, and the mean is nan for none.
    """
    finite = np.array([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    if finite.size == 0:
        return math.nan, math.nan
    if finite.size == 1:
        return float(finite[0]), math.nan
    std = float(finite.std(ddof=1))
    return float(finite.mean()), float(_t_quantile(finite.size)) * std / math.sqrt(finite.size)


def ci_half_widths(std: np.ndarray, num_runs: np.ndarray) -> np.ndarray:
    """Per-point 95% CI half-width from sample stds and run counts; 0 where one run contributes."""
    num_runs = np.asarray(num_runs)
    widths = np.zeros(np.shape(std), dtype=float)
    many = num_runs > 1
    if many.any():
        widths[many] = _t_quantile(num_runs[many]) * np.asarray(std)[many] / np.sqrt(num_runs[many])
    return widths


def accuracy_time_auc(
    times_s: Sequence[float], accuracies: Sequence[float], horizon_s: float
) -> float:
    """Area under accuracy against simulated time over [0, ``horizon_s``], divided by the horizon.

    ``times_s[i]`` is when round i ended and ``accuracies[i]`` the accuracy of the model it
    produced (increasing times). Between rounds the curve holds the latest model's accuracy (a
    step: no accuracy is invented between evaluations), and it is 0 before the first round ends
    (fedsim records no round-0 score). So the result is the time-averaged accuracy a user of the
    latest model would have seen over the horizon, in [0, 1]; a round ending after the horizon
    does not count. Our choice, not a published metric.
    """
    if not horizon_s > 0:
        return math.nan
    starts = np.asarray(times_s, dtype=float)
    ends = np.append(starts[1:], np.inf)
    held_s = np.clip(np.minimum(ends, horizon_s) - starts, 0.0, None)  # time each model was latest
    return float(np.dot(held_s, np.asarray(accuracies, dtype=float)) / horizon_s)


@dataclass(frozen=True)
class PairedTest:
    """``a`` against ``b`` over the seeds both have; p-values are two-sided, nan when untestable."""

    num_pairs: int
    mean_difference: float  # mean over paired seeds of a - b; nan without pairs
    t_p: float  # paired t-test; nan for fewer than 2 pairs
    wilcoxon_p: float  # Wilcoxon signed-rank; nan for fewer than MIN_WILCOXON_PAIRS pairs

    @property
    def a_better(self) -> bool:
        """Whether ``a`` is significantly better than ``b`` (paired t-test, p < ALPHA)."""
        return self.t_p < ALPHA and self.mean_difference > 0


def paired_test(a: Mapping[Hashable, float], b: Mapping[Hashable, float]) -> PairedTest:
    """Pair ``a`` and ``b`` (seed -> value) on the seeds both have with finite values; test a - b.

    Differences that are all zero give p = 1; equal non-zero differences (zero spread) give
    p = 0 for the t-test (scipy's limit, said here so it is not a surprise).
    """
    from scipy import stats

    seeds = [s for s in a if s in b and math.isfinite(a[s]) and math.isfinite(b[s])]
    a_paired = np.array([a[s] for s in seeds], dtype=float)  # (num_pairs,)
    b_paired = np.array([b[s] for s in seeds], dtype=float)
    diffs = a_paired - b_paired
    if diffs.size == 0:
        return PairedTest(0, math.nan, math.nan, math.nan)
    mean = float(diffs.mean())
    if diffs.size < 2:
        return PairedTest(1, mean, math.nan, math.nan)
    if not diffs.any():
        return PairedTest(
            int(diffs.size), 0.0, 1.0, 1.0 if diffs.size >= MIN_WILCOXON_PAIRS else math.nan
        )
    # equal non-zero differences: t = inf; scipy's p would be 0 too, with a warning
    spread = np.ptp(diffs) > 0
    t_p = float(stats.ttest_rel(a_paired, b_paired).pvalue) if spread else 0.0
    wilcoxon_p = math.nan
    if diffs.size >= MIN_WILCOXON_PAIRS:
        wilcoxon_p = float(stats.wilcoxon(a_paired, b_paired).pvalue)
    return PairedTest(int(diffs.size), mean, t_p, wilcoxon_p)


@dataclass(frozen=True)
class Rank:
    """A rank that may be shared: ``position`` 1 is best; None when there is no value to rank."""

    position: int | None
    tied: bool = False

    def __str__(self) -> str:
        if self.position is None:
            return "–"
        return f"{self.position}=" if self.tied else str(self.position)


def tied_ranks(by_seed: Sequence[Mapping[Hashable, float]]) -> list[Rank]:
    """Rank configurations (seed -> value, higher is better) with ties where tests cannot tell.

    Sort by mean value. The best unranked configuration leads a group with every unranked one
    the paired t-test does not find significantly worse than it (p >= ALPHA, or fewer than 2
    shared seeds); the group shares the next free position (marked ``=`` when it has more than
    one member), and the next best unranked configuration leads the next group. A configuration
    without a finite value gets no rank.
    """
    means = [mean_ci(list(values.values()))[0] for values in by_seed]
    order = sorted((i for i, m in enumerate(means) if math.isfinite(m)), key=lambda i: -means[i])
    ranks = [Rank(None)] * len(by_seed)
    position = 1
    while order:
        leader = order[0]
        group = [leader] + [
            i for i in order[1:] if not paired_test(by_seed[leader], by_seed[i]).a_better
        ]
        for i in group:
            ranks[i] = Rank(position, tied=len(group) > 1)
        order = [i for i in order if i not in group]
        position += len(group)
    return ranks
