"""``fedsim-compare``: a markdown report comparing the methods of one sweep, with figures.

From a Hydra multirun folder (``results/sweeps/<time>/<job>/``, each job a run folder holding
``config.yaml``, ``metrics.jsonl``, ``summary.json`` and ``client_eval.jsonl``) it writes
``REPORT_DIR/report.md`` and, beside it:

- ``accuracy_curves.png``: test accuracy against round, simulated time and bytes (mean over
  seeds, a 95% CI band by default, ``--band``), drawn by :func:`fedsim.scripts.plot.plot_curves`;
- ``client_accuracy.png``: per-client accuracy of the final model, one box per configuration.

Runs whose configs differ only in the seed form one configuration (one run per seed: see
:func:`fedsim.scripts.runs.group_runs`). A configuration's *method* is its value of the keys
under ``--method`` (default ``strategy``) and its *setting* the other keys that differ (e.g.
``partition.alpha``): methods are ranked within each setting, with ties where a paired test
across seeds finds no significant difference (:func:`fedsim.scripts.fairness.standings`).
Every number is a mean over seeds with its 95% confidence interval.

Example::

    fedsim -m strategy=fedavg,fedprox seed=range(5) partition=dirichlet partition.alpha=0.1,1
    fedsim-compare results/sweeps/<time> --out results/reports/alpha --target 0.8

"""

from __future__ import annotations

import argparse
import math
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fedsim.errors import EXIT_BAD_INPUT, ConfigError
from fedsim.scripts.fairness import (
    WORST_SHARE,
    FairnessSummary,
    MethodSplit,
    Standing,
    method_knobs,
    split_methods,
    standings,
    summarize_fairness,
    target_default,
)
from fedsim.scripts.plot import (
    AUC_CAPTION,
    BAND_CAPTIONS,
    CI_CAPTION,
    DEFAULT_BAND,
    _new_figure,
    _OneLineParser,
    _pick_unit,
    _save,
    _text_width_px,
    _three_digits,
    _time_text,
    few_seeds_warning,
    p_cell,
    plot_curves,
    repeated_seeds_note,
    wrap_to_width,
)
from fedsim.scripts.runs import (
    Configuration,
    Run,
    TargetSummary,
    auc_horizon_s,
    group_runs,
    load_runs,
    markdown_table,
    run_auc,
    seeds_of,
    summarize_target,
)
from fedsim.scripts.stats import ALPHA, MIN_WILCOXON_PAIRS, mean_ci

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
# client_accuracy.png: inches of figure width per box, at least (and at most: a label part wider
# than that wraps), the gap between two boxes' labels, the figure's least width; the room its
# tick labels have before the figure grows (about 5 lines of small type), and the caption
# under them, wrapped to the figure width less the y axis' margin.
BOX_PITCH_IN = 1.3
MAX_BOX_PITCH_IN = 2.4
BOX_GAP_IN = 0.15
MIN_WIDTH_IN = 5.5
TICK_LABELS_ROOM_IN = 0.9
CAPTION_MARGIN_IN = 1.0
CLIENTS_CAPTION = (
    "box: quartiles, whiskers to 1.5 IQR; line: median; triangle: mean; n = clients x seeds"
)
NOT_REACHED = "not reached"
# --early-rounds default: CyclicFL's claim is about the first rounds (issue 14 item 7).
DEFAULT_EARLY_ROUNDS = 5


def build_parser() -> argparse.ArgumentParser:
    """Return the command-line parser of ``fedsim-compare``."""
    parser = _OneLineParser(
        prog=PROG,
        description="Compare the methods of a sweep: writes REPORT_DIR/report.md (final "
        "accuracy per method with its 95% CI, a rank that ties where a paired test across seeds "
        "finds no difference; per-client accuracy of the final model; time, rounds and bytes "
        "to a target accuracy and the accuracy AUC over simulated time) and its figures.",
        epilog="Runs that differ only by seed form a configuration, one run per seed (of two "
        "runs of a seed, the finished one written last counts). Means come with the half-width "
        "of their 95% CI (Student t over seeds); ranks use the paired t-test (scipy "
        "ttest_rel) at p < 0.05, with the Wilcoxon signed-rank p beside it from 6 seeds. Every "
        "run folder needs summary.json and client_eval.jsonl.",
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
        "--early-rounds",
        type=int,
        default=DEFAULT_EARLY_ROUNDS,
        metavar="K",
        help="table of the accuracy after each of rounds 1..K, mean ± 95%% CI per method "
        f"(how fast a warm start pays off; default: {DEFAULT_EARLY_ROUNDS}, 0: no table)",
    )
    parser.add_argument(
        "--band",
        choices=list(BAND_CAPTIONS),
        default=DEFAULT_BAND,
        help=f"band around the mean curves: ci95, minmax or std (default: {DEFAULT_BAND})",
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


def _load(sweep_dir: Path) -> tuple[list[Run], list[Run]]:
    """Finished runs under ``sweep_dir``, and the ones the report lists as left out.

    Left out: runs that did not end for good (:attr:`Run.complete`: interrupted, failed,
    crashed, killed or still going). No finished run at all is a one-line error.
    """
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
    finished = [run for run in runs if run.complete]
    if not finished:
        raise ConfigError(
            "SWEEP_DIR",
            sweep_dir,
            "holds no finished run (none completed or diverged: "
            f"{_statuses(runs)}; `fedsim --multirun` with the same arguments resumes them)",
        )
    return finished, [run for run in runs if not run.complete]


def _statuses(runs: Sequence[Run]) -> str:
    """``2 interrupted, 1 crashed``: how many runs ended how (no status: killed or going)."""
    counts = Counter(run.status or "killed or still going" for run in runs)
    return ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))


def _left_out_note(sweep_dir: Path, left_out: Sequence[Run]) -> list[str]:
    """A quoted note naming the runs that did not finish, which no number below counts."""
    if not left_out:
        return []
    names = "; ".join(
        f"`{run.path.relative_to(sweep_dir.resolve())}` ({run.ending})" for run in left_out
    )
    return [
        f"> Left out: {len(left_out)} run(s) that did not finish ({_statuses(left_out)}; "
        f"`fedsim --multirun` with the same arguments resumes them): {names}. No number below "
        "counts them.",
        "",
    ]


def _pm(mean_ci_pair: tuple[float, float], decimals: int = 4) -> str:
    mean, half_width = mean_ci_pair
    if math.isnan(mean):
        return "–"
    if math.isnan(half_width):
        return f"{mean:.{decimals}f}"
    return f"{mean:.{decimals}f} ± {half_width:.{decimals}f}"


def _target_cells(target: TargetSummary) -> list[str]:
    """Seeds reaching, rounds, sim time, bytes (means and CIs over the seeds that reached it)."""
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


def _row_order(splits: Sequence[MethodSplit], ranked: Sequence[Standing]) -> list[int]:
    def key(i: int) -> tuple[str, float, str]:
        position = ranked[i].rank.position
        return splits[i].setting, math.inf if position is None else position, splits[i].method

    return sorted(range(len(splits)), key=key)


def _lead(split: MethodSplit, with_setting: bool) -> list[str]:
    return [split.setting, split.method] if with_setting else [split.method]


def accuracy_table(
    configurations: Sequence[Configuration],
    splits: Sequence[MethodSplit],
    fairness: Sequence[FairnessSummary],
    ranked: Sequence[Standing],
) -> str:
    """Final accuracy per method (mean ± CI, tied rank, tests against the best); client accuracy."""
    finals = [mean_ci([run.final_accuracy for run in c.runs]) for c in configurations]
    bests = [mean_ci([run.best_accuracy for run in c.runs]) for c in configurations]
    with_setting = any(s.setting for s in splits)
    worst = f"worst {WORST_SHARE:.0%} clients"
    header = ["setting"] if with_setting else []
    header += ["method", "seeds", "final accuracy", "rank", "p vs best (paired t)"]
    header += ["p vs best (Wilcoxon)", "best accuracy"]
    header += ["clients scored", "client accuracy", "client std", worst]
    rows = []
    for i in _row_order(splits, ranked):
        low, high = fairness[i].num_clients
        row = _lead(splits[i], with_setting) + [str(len(configurations[i].runs))]
        row += [_pm(finals[i]), str(ranked[i].rank), p_cell(ranked[i])]
        row += [p_cell(ranked[i], "wilcoxon_p"), _pm(bests[i])]
        row += [str(high) if low == high else f"{low}–{high}"]
        row += [_pm(fairness[i].mean), _pm(fairness[i].std), _pm(fairness[i].worst)]
        rows.append(row)
    return markdown_table(header, rows)


def early_table(
    configurations: Sequence[Configuration],
    splits: Sequence[MethodSplit],
    ranked: Sequence[Standing],
    num_rounds: int,
) -> str:
    """Test accuracy after each of rounds 1..``num_rounds``: mean ± 95% CI over seeds."""
    with_setting = any(s.setting for s in splits)
    header = (["setting"] if with_setting else []) + ["method"]
    header += [f"round {r}" for r in range(1, num_rounds + 1)]
    rows = []
    for i in _row_order(splits, ranked):
        row = _lead(splits[i], with_setting)
        for r in range(1, num_rounds + 1):
            values = [run.accuracy_at(r) for run in configurations[i].runs]
            finite = [v for v in values if math.isfinite(v)]
            row.append(_pm(mean_ci(finite), 3) if finite else "–")
        rows.append(row)
    return markdown_table(header, rows)


def target_table(
    configurations: Sequence[Configuration],
    splits: Sequence[MethodSplit],
    target: float,
    ranked: Sequence[Standing],
) -> str:
    """Rounds, simulated time and bytes to first reach ``target``; accuracy AUC over sim time.

    The AUC's horizon is the shortest run's end among the runs of the row's setting; the
    columns are left out when a run has no simulated time.
    """
    summaries = [summarize_target(c.runs, target) for c in configurations]
    with_setting = any(s.setting for s in splits)
    horizons = {
        setting: auc_horizon_s(
            run for c, s in zip(configurations, splits, strict=True) if s.setting == setting
            for run in c.runs
        )
        for setting in {s.setting for s in splits}
    }  # fmt: skip
    with_auc = all(math.isfinite(h) for h in horizons.values())
    header = ["setting"] if with_setting else []
    header += ["method", f"seeds reaching {target:g}", "rounds", "simulated time", "bytes up+down"]
    header += ["AUC horizon", "accuracy AUC"] if with_auc else []
    rows = []
    for i in _row_order(splits, ranked):
        row = _lead(splits[i], with_setting) + _target_cells(summaries[i])
        if with_auc:
            horizon_s = horizons[splits[i].setting]
            aucs = [run_auc(run, horizon_s) for run in configurations[i].runs]
            row += [_time_text(horizon_s), _pm(mean_ci(aucs))]
        rows.append(row)
    return markdown_table(header, rows)


def plot_client_accuracy(
    configurations: Sequence[Configuration],
    splits: Sequence[MethodSplit],
    fairness: Sequence[FairnessSummary],
    out: Path,
) -> None:
    """One box per configuration of its clients' accuracies (all seeds), points on top.

    Each box gets the width its label's widest part needs (from :data:`BOX_PITCH_IN` up to
    :data:`MAX_BOX_PITCH_IN`; a wider part is wrapped), the figure the height its tallest label
    needs, and the caption under the axes is wrapped to the figure width.
    """
    fig, (ax,) = _new_figure(1, "per-client accuracy of the final global model")
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
    renderer = fig.canvas.get_renderer()
    prop = ax.get_xticklabels()[0].get_fontproperties()
    widest_in = max(_text_width_px(renderer, label, prop) for label in labels) / fig.dpi
    pitch_in = min(max(BOX_PITCH_IN, widest_in + BOX_GAP_IN), MAX_BOX_PITCH_IN)
    fig.set_figwidth(max(MIN_WIDTH_IN, pitch_in * len(configurations) + 1.5))
    room = (pitch_in - BOX_GAP_IN) * fig.dpi
    ax.set_xticks(
        positions, [wrap_to_width(t, room, renderer, prop) for t in labels], fontsize="small"
    )
    tallest_in = max(t.get_window_extent(renderer).height for t in ax.get_xticklabels()) / fig.dpi
    fig.set_figheight(fig.get_figheight() + max(0.0, tallest_in - TICK_LABELS_ROOM_IN))
    ax.set_ylabel("accuracy on the client's own data")
    caption = ax.set_xlabel(CLIENTS_CAPTION)
    width_px = (fig.get_figwidth() - CAPTION_MARGIN_IN) * fig.dpi
    caption.set_text(
        wrap_to_width(CLIENTS_CAPTION, width_px, renderer, caption.get_fontproperties())
    )
    _save(fig, out)


def _intro(
    runs: Sequence[Run],
    configurations: Sequence[Configuration],
    splits: Sequence[MethodSplit],
    method_keys: Sequence[str],
) -> str:
    """One paragraph: what was compared, and how runs were grouped."""
    kept = [run for c in configurations for run in c.runs]
    num_methods = len({s.method for s in splits})
    num_settings = len({s.setting for s in splits if s.setting})
    shape = f"{num_methods} method(s)" + (f" x {num_settings} settings" if num_settings else "")
    text = (
        f"{len(kept)} runs in {len(configurations)} configurations ({shape}), seeds "
        f"{', '.join(map(str, seeds_of(kept)))}. Runs whose configs differ only in `seed` form a "
        f"configuration, one run per seed; methods differ in `{'`, `'.join(method_keys)}` keys"
    )
    if num_settings:
        text += ", settings in the other keys that differ; methods are ranked within a setting"
    return text + "."


def _notes(configurations: Sequence[Configuration]) -> list[str]:
    """Warning and note lines (fewer than 5 seeds, repeated seeds) as markdown quotes."""
    notes = [few_seeds_warning(configurations), repeated_seeds_note(configurations)]
    return [line for note in notes if note for line in (f"> {note}", "")]


def _accuracy_caption() -> str:
    return (
        f"Final accuracy: test accuracy after the last round, {CI_CAPTION}. Rank: by mean final "
        "accuracy within a setting; a method that the paired t-test across seeds (runs of two "
        "methods paired by seed, `scipy.stats.ttest_rel`, two-sided) does not find "
        f"significantly worse at p < {ALPHA:g} than the best method not yet ranked shares its "
        "rank, marked `=` (a method sharing fewer than 2 seeds with it cannot be told apart "
        "either). p vs best: the tests against the setting's best mean; Wilcoxon signed-rank "
        f"(`scipy.stats.wilcoxon`, exact) from {MIN_WILCOXON_PAIRS} paired seeds, where it can "
        f"first reach p < {ALPHA:g}, as a check that does not assume normal differences; the "
        "ranks use the t-test. Client columns: the final global model on each scored client's "
        "own data (`client_eval.jsonl`): per run the mean over clients, the std over clients "
        f"and the mean of the worst {WORST_SHARE:.0%} of clients, then mean ± 95% CI over seeds."
    )


def _target_caption(with_auc: bool, with_setting: bool) -> str:
    text = (
        "At the first round with test accuracy ≥ the target: rounds, simulated time and "
        "traffic up + down through that round, mean ± 95% CI over the seeds that reached it "
        f"(k/n: k of the n seeds did; {NOT_REACHED}: none did)."
    )
    if with_auc:
        text += f" {AUC_CAPTION}; mean ± 95% CI over seeds."
    if with_auc and with_setting:
        text += " Methods are compared within a setting, so each setting has its own horizon."
    return text


def _early_section(
    configurations: Sequence[Configuration],
    splits: Sequence[MethodSplit],
    ranked: Sequence[Standing],
    early_rounds: int,
) -> list[str]:
    if early_rounds == 0:
        return []
    shown = min(early_rounds, max(run.num_rounds for c in configurations for run in c.runs))
    return [
        f"## Accuracy in the first {shown} rounds",
        "",
        early_table(configurations, splits, ranked, shown),
        "Test accuracy after each round (a warm start's rounds not counted), mean ± 95% CI "
        "over seeds.",
        "",
    ]


def write_report(
    sweep_dir: Path,
    runs: Sequence[Run],
    out: Path,
    target: float | None,
    method_keys: list[str],
    band: str = DEFAULT_BAND,
    early_rounds: int = DEFAULT_EARLY_ROUNDS,
    left_out: Sequence[Run] = (),
) -> str:
    """Write ``out``/report.md and its figures; return the report text."""
    configurations = group_runs(runs)
    splits = split_methods(configurations, method_keys)
    fairness = [summarize_fairness(c) for c in configurations]  # raises before writing
    ranked = standings(configurations, [s.setting for s in splits])
    finals = [mean_ci([run.final_accuracy for run in c.runs])[0] for c in configurations]
    chosen = target if target is not None else target_default(finals, DEFAULT_TARGET_SHARE)
    kept = [run for c in configurations for run in c.runs]
    xs = ["round", "sim_time", "bytes"]
    if not all(run.values("sim_time_s") for run in kept):
        xs.remove("sim_time")
    out.mkdir(parents=True, exist_ok=True)
    title = f"accuracy: {len(configurations)} configuration(s), {len(kept)} run(s)"
    plot_curves(configurations, "accuracy", xs, out / CURVES_FILE, title, chosen, band)
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
        *_left_out_note(sweep_dir, left_out),
        *_notes(configurations),
        "## Final accuracy and per-client accuracy",
        "",
        accuracy_table(configurations, splits, fairness, ranked),
        _accuracy_caption(),
        "",
        f"![per-client accuracy]({CLIENTS_FIGURE_FILE})",
        "",
        *_early_section(configurations, splits, ranked, early_rounds),
        f"## Cost to reach accuracy {chosen:g}",
        "",
        f"Target accuracy {chosen:g} ({how}).",
        "",
        target_table(configurations, splits, chosen, ranked),
        _target_caption("sim_time" in xs, any(s.setting for s in splits)),
        "",
        f"![accuracy curves]({CURVES_FILE})",
        "",
        f"In the figure, {BAND_CAPTIONS[band]}; dashed: the target accuracy.",
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
        if args.early_rounds < 0:
            raise ConfigError("--early-rounds", args.early_rounds, "must be an integer >= 0")
        _check_out(args.out, args.force)
        runs, left_out = _load(args.sweep_dir)
        text = write_report(
            args.sweep_dir,
            runs,
            args.out,
            args.target,
            args.method,
            args.band,
            args.early_rounds,
            left_out,
        )
    except ConfigError as err:
        print(f"{PROG}: error: {err.one_line()}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(text)
    for name in (REPORT_FILE, CURVES_FILE, CLIENTS_FIGURE_FILE):
        print(f"wrote {args.out / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
