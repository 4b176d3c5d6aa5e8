"""``fedsim-compare``: a markdown report comparing the methods of one sweep, with figures.

From a Hydra multirun folder (``results/sweeps/<time>/<job>/``, each job a run folder holding
``config.yaml``, ``metrics.jsonl``, ``summary.json`` and ``client_eval.jsonl``) it writes
``REPORT_DIR/report.md`` and, beside it:

- ``accuracy_curves.png``: test accuracy against round, simulated time and bytes (mean over
  seeds, min-max band), drawn by :func:`fedsim.scripts.plot.plot_curves`;
- ``client_accuracy.png``: per-client accuracy of the final model, one box per configuration.

Runs whose configs differ only in the seed form one configuration. A configuration's *method*
is its value of the keys under ``--method`` (default ``strategy``) and its *setting* the other
keys that differ (e.g. ``partition.alpha``): methods are ranked within each setting.

Example::

    fedsim --multirun strategy=fedavg,fedprox seed=0,1,2 partition=dirichlet partition.alpha=0.1,1
    fedsim-compare results/sweeps/<time> --out results/reports/alpha --target 0.8

"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fedsim.errors import EXIT_BAD_INPUT, ConfigError
from fedsim.scripts.fairness import (
    WORST_SHARE,
    FairnessSummary,
    MethodSplit,
    method_knobs,
    rank_within,
    split_methods,
    summarize_fairness,
    target_default,
)
from fedsim.scripts.plot import (
    BAND_CAPTION,
    _new_figure,
    _OneLineParser,
    _pick_unit,
    _save,
    _three_digits,
    plot_curves,
)
from fedsim.scripts.runs import (
    SUMMARY_FILE,
    Configuration,
    Run,
    TargetSummary,
    group_runs,
    load_runs,
    markdown_table,
    mean_std,
    summarize_target,
)

__all__ = ["build_parser", "main", "plot_client_accuracy", "write_report"]

PROG = "fedsim-compare"
REPORT_FILE = "report.md"
CURVES_FILE = "accuracy_curves.png"
CLIENTS_FIGURE_FILE = "client_accuracy.png"
DEFAULT_METHOD_KEYS = ("strategy",)
# Default --target: this share of the best configuration's mean final accuracy (our choice: high
# enough to separate methods, low enough that the better ones reach it).
DEFAULT_TARGET_SHARE = 0.9
POINT_ALPHA = 0.35
JITTER = 0.08  # half-width of the horizontal scatter of client points in a box, in box units
NOT_REACHED = "not reached"


def build_parser() -> argparse.ArgumentParser:
    """Return the command-line parser of ``fedsim-compare``."""
    parser = _OneLineParser(
        prog=PROG,
        description="Compare the methods of a sweep: writes REPORT_DIR/report.md (final "
        "accuracy with mean, std and rank per method; per-client accuracy of the final model; "
        "time and bytes to a target accuracy) and its figures.",
        epilog="Runs that differ only by seed form a configuration; std is the sample std "
        "(ddof=1) over seeds. Every run folder needs summary.json and client_eval.jsonl.",
    )
    parser.add_argument("sweep_dir", type=Path, metavar="SWEEP_DIR", help="a multirun folder")
    parser.add_argument(
        "--out", required=True, type=Path, metavar="REPORT_DIR", help="folder for the report"
    )
    parser.add_argument(
        "--target",
        type=float,
        default=None,
        metavar="ACC",
        help="target accuracy in (0, 1] for the time and bytes to reach it (default: "
        f"{DEFAULT_TARGET_SHARE:g} x the best configuration's mean final accuracy, rounded "
        "down to 0.01)",
    )
    parser.add_argument(
        "--method",
        nargs="+",
        default=list(DEFAULT_METHOD_KEYS),
        metavar="KEY",
        help="config keys (or key prefixes) that make a method; the other keys that differ "
        "make the setting methods are ranked in (default: strategy)",
    )
    parser.add_argument(
        "--force", action="store_true", help="write into REPORT_DIR even if it is not empty"
    )
    return parser


def _check_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError("--out", out, "is a file; expected a folder for the report")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ConfigError(
            "--out", out, "is not empty; expected a new or empty folder (--force writes into it)"
        )


def _load(sweep_dir: Path) -> list[Run]:
    """Finished runs under ``sweep_dir``; anything missing is a one-line ConfigError."""
    if not sweep_dir.is_dir():
        raise ConfigError(
            "SWEEP_DIR",
            sweep_dir,
            "folder does not exist; expected a multirun folder (results/sweeps/<time>/)",
        )
    try:
        runs = load_runs([sweep_dir])
    except ConfigError as err:
        if err.key != "DIR":
            raise
        raise ConfigError(
            "SWEEP_DIR",
            sweep_dir,
            "holds no run folder; expected <job>/ folders with config.yaml and metrics.jsonl "
            "(`fedsim --multirun ... hydra.sweep.dir=SWEEP_DIR`)",
        ) from None
    for run in runs:
        if not run.complete:
            raise ConfigError(
                "SWEEP_DIR",
                run.path,
                f"run folder has no {SUMMARY_FILE}; expected finished runs (the run crashed or "
                "is still going: finish or remove it)",
            )
    return runs


def _pm(mean_std_pair: tuple[float, float], decimals: int = 4) -> str:
    mean, std = mean_std_pair
    if math.isnan(mean):
        return "–"
    return (
        f"{mean:.{decimals}f}" if math.isnan(std) else f"{mean:.{decimals}f} ± {std:.{decimals}f}"
    )


def _num(value: float) -> str:
    return "–" if math.isnan(value) else f"{value:.4f}"


def _target_cells(target: TargetSummary) -> list[str]:
    """Seeds reaching, rounds, sim time, bytes (means over the seeds that reached it)."""
    reached = f"{target.num_reached}/{target.num_runs}"
    if target.num_reached == 0:
        return [reached, NOT_REACHED, NOT_REACHED, NOT_REACHED]
    time_unit, time_scale = _pick_unit(target.sim_time_s[0], "sim_time")
    byte_unit, byte_scale = _pick_unit(target.bytes[0], "bytes")
    return [
        reached,
        _three_digits(target.rounds),
        _three_digits(target.sim_time_s, time_scale, time_unit),
        _three_digits(target.bytes, byte_scale, byte_unit),
    ]


def _row_order(splits: Sequence[MethodSplit], ranks: Sequence[int]) -> list[int]:
    return sorted(range(len(splits)), key=lambda i: (splits[i].setting, ranks[i], splits[i].method))


def _lead(split: MethodSplit, with_setting: bool) -> list[str]:
    return [split.setting, split.method] if with_setting else [split.method]


def accuracy_table(
    configurations: Sequence[Configuration],
    splits: Sequence[MethodSplit],
    fairness: Sequence[FairnessSummary],
) -> str:
    """Final accuracy (mean, std, rank within the setting) and per-client accuracy per method."""
    finals = [mean_std([run.final_accuracy for run in c.runs]) for c in configurations]
    bests = [mean_std([run.best_accuracy for run in c.runs]) for c in configurations]
    ranks = rank_within([mean for mean, _ in finals], [s.setting for s in splits])
    with_setting = any(s.setting for s in splits)
    worst = f"worst {WORST_SHARE:.0%} clients"
    header = ["setting"] if with_setting else []
    header += ["method", "seeds", "final accuracy", "std", "rank", "best accuracy"]
    header += ["clients scored", "client accuracy", "client std", worst]
    rows = []
    for i in _row_order(splits, ranks):
        low, high = fairness[i].num_clients
        row = _lead(splits[i], with_setting) + [str(len(configurations[i].runs))]
        row += [_num(finals[i][0]), _num(finals[i][1]), str(ranks[i]), _pm(bests[i])]
        row += [str(high) if low == high else f"{low}–{high}"]
        row += [_pm(fairness[i].mean), _pm(fairness[i].std), _pm(fairness[i].worst)]
        rows.append(row)
    return markdown_table(header, rows)


def target_table(
    configurations: Sequence[Configuration], splits: Sequence[MethodSplit], target: float
) -> str:
    """Rounds, simulated time and bytes to first reach ``target`` accuracy, per method."""
    summaries = [summarize_target(c.runs, target) for c in configurations]
    finals = [mean_std([run.final_accuracy for run in c.runs])[0] for c in configurations]
    ranks = rank_within(finals, [s.setting for s in splits])
    with_setting = any(s.setting for s in splits)
    header = ["setting"] if with_setting else []
    header += ["method", f"seeds reaching {target:g}", "rounds", "simulated time", "bytes up+down"]
    rows = [
        _lead(splits[i], with_setting) + _target_cells(summaries[i])
        for i in _row_order(splits, ranks)
    ]
    return markdown_table(header, rows)


def plot_client_accuracy(
    configurations: Sequence[Configuration],
    splits: Sequence[MethodSplit],
    fairness: Sequence[FairnessSummary],
    out: Path,
) -> None:
    """One box per configuration of its clients' accuracies (all seeds), points on top."""
    fig, (ax,) = _new_figure(1, "per-client accuracy of the final global model")
    fig.set_figwidth(max(5.5, 1.3 * len(configurations) + 1.5))
    positions = np.arange(1, len(configurations) + 1)
    methods = list(dict.fromkeys(s.method for s in splits))
    rng = np.random.default_rng(0)  # jitter of the points only: not a result
    for position, split, summary in zip(positions, splits, fairness, strict=True):
        color = f"C{methods.index(split.method) % 10}"
        ax.boxplot(
            [summary.pooled],
            positions=[position],
            widths=0.5,
            showfliers=False,
            showmeans=True,
            meanprops={"marker": "^", "markerfacecolor": "black", "markeredgecolor": "black"},
            medianprops={"color": color},
        )
        x = position + rng.uniform(-JITTER, JITTER, summary.pooled.size) * 2
        ax.scatter(x, summary.pooled, s=8, color=color, alpha=POINT_ALPHA, linewidths=0)
    labels = [
        "\n".join(filter(None, [s.method.replace(", ", "\n"), s.setting.replace(", ", "\n")]))
        + f"\n(n={f.pooled.size})"
        for s, f in zip(splits, fairness, strict=True)
    ]
    ax.set_xticks(positions, labels, fontsize="small")
    ax.set_ylabel("accuracy on the client's own data")
    ax.set_xlabel(
        "box: quartiles, whiskers to 1.5 IQR; line: median; triangle: mean; n = clients x seeds"
    )
    _save(fig, out)


def _intro(
    runs: Sequence[Run],
    configurations: Sequence[Configuration],
    splits: Sequence[MethodSplit],
    method_keys: Sequence[str],
) -> str:
    """One paragraph: what was compared, and how runs were grouped."""
    seeds = sorted({run.config.get("seed") for run in runs}, key=str)
    num_methods = len({s.method for s in splits})
    num_settings = len({s.setting for s in splits if s.setting})
    shape = f"{num_methods} method(s)" + (f" x {num_settings} settings" if num_settings else "")
    text = (
        f"{len(runs)} runs in {len(configurations)} configurations ({shape}), seeds "
        f"{', '.join(map(str, seeds))}. Runs whose configs differ only in `seed` form a "
        f"configuration; methods differ in `{'`, `'.join(method_keys)}` keys"
    )
    if num_settings:
        text += ", settings in the other keys that differ; methods are ranked within a setting"
    return text + "."


def write_report(
    sweep_dir: Path, runs: Sequence[Run], out: Path, target: float | None, method_keys: list[str]
) -> str:
    """Write ``out``/report.md and its figures; return the report text."""
    configurations = group_runs(runs)
    splits = split_methods(configurations, method_keys)
    fairness = [summarize_fairness(c) for c in configurations]  # raises before writing
    finals = [mean_std([run.final_accuracy for run in c.runs])[0] for c in configurations]
    chosen = target if target is not None else target_default(finals, DEFAULT_TARGET_SHARE)
    xs = ["round", "sim_time", "bytes"]
    if not all(run.values("sim_time_s") for run in runs):
        xs.remove("sim_time")
    out.mkdir(parents=True, exist_ok=True)
    title = f"accuracy: {len(configurations)} configuration(s), {len(runs)} run(s)"
    plot_curves(configurations, "accuracy", xs, out / CURVES_FILE, title, target=chosen)
    plot_client_accuracy(configurations, splits, fairness, out / CLIENTS_FIGURE_FILE)
    how = (
        f"given by --target {chosen:g}"
        if target is not None
        else f"default: {DEFAULT_TARGET_SHARE:g} x the best mean final accuracy, rounded down"
    )
    lines = [
        f"# Comparison of `{sweep_dir}`",
        "",
        _intro(runs, configurations, splits, method_keys),
        "",
        "## Final accuracy and per-client accuracy",
        "",
        accuracy_table(configurations, splits, fairness),
        "Final accuracy: test accuracy after the last round, mean and sample std (ddof=1) over "
        "seeds; rank 1 = highest mean. Client columns: the final global model on each scored "
        "client's own data (`client_eval.jsonl`): per run the mean over clients, the std over "
        f"clients and the mean of the worst {WORST_SHARE:.0%} of clients, then mean ± sample std "
        "over seeds.",
        "",
        f"![per-client accuracy]({CLIENTS_FIGURE_FILE})",
        "",
        f"## Cost to reach accuracy {chosen:g}",
        "",
        f"Target accuracy {chosen:g} ({how}).",
        "",
        target_table(configurations, splits, chosen),
        "At the first round with test accuracy ≥ the target: rounds, simulated time and "
        "traffic up + down through that round, mean ± sample std over the seeds that reached "
        f"it; {NOT_REACHED}: no seed did.",
        "",
        f"![accuracy curves]({CURVES_FILE})",
        "",
        f"In the figure, {BAND_CAPTION}; dashed: the target accuracy.",
        "",
        "## What each method ran",
        "",
        markdown_table(
            ["method", "knobs"],
            [[name, knobs] for name, knobs in method_knobs(configurations, splits, method_keys)],
        ),
        "",
    ]
    text = "\n".join(lines)
    (out / REPORT_FILE).write_text(text)
    return text


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``fedsim-compare``; return the exit code (0, or 2 for bad input)."""
    args = build_parser().parse_args(argv)
    try:
        if args.target is not None and not 0.0 < args.target <= 1.0:  # also refuses nan
            raise ConfigError("--target", args.target, "must be an accuracy in (0, 1]")
        _check_out(args.out, args.force)
        runs = _load(args.sweep_dir)
        text = write_report(args.sweep_dir, runs, args.out, args.target, args.method)
    except ConfigError as err:
        print(f"{PROG}: error: {err.one_line()}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(text)
    for name in (REPORT_FILE, CURVES_FILE, CLIENTS_FIGURE_FILE):
        print(f"wrote {args.out / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
