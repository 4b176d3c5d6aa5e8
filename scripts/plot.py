"""``fedsim-plot``: learning curves (or per-client latency) of the runs under results folders.

Each figure gets a markdown table beside it (same stem, ``.md``), also printed to stdout.
Loading, grouping and aggregation live in :mod:`fedsim.scripts.runs` (per-client rows in
:mod:`fedsim.scripts.clients_stats`); this file only draws and formats.

Examples
--------
Accuracy against round and against communicated bytes, one line per configuration::

    fedsim-plot results/sweep --out results/figures/sweep.png
    fedsim-plot results/a results/b --out fig.png --x round sim_time --metric loss

Add, per configuration, the simulated time, rounds and traffic to first reach 80% accuracy::

    fedsim-plot results/sweeps/devices --out fig.png --x round sim_time --target 0.8

Table numbers are means over seeds with the half-width of their 95% confidence interval; ranks
tie where a paired t-test across seeds finds no significant difference
(:mod:`fedsim.scripts.stats`). ``--band`` picks the figure's band: ``ci95`` (default),
``minmax`` or ``std``.

Per-client latency by device tier, from the runs' ``clients.jsonl`` (their ``clock.deadline_s``
a dashed line)::

    fedsim-plot results/fleet --latency --out results/figures/latency.png

"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import NoReturn

import matplotlib
import numpy as np
from matplotlib.artist import Artist
from matplotlib.axes import Axes
from matplotlib.backend_bases import RendererBase
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.font_manager import FontProperties
from matplotlib.ticker import MaxNLocator

from fedsim.errors import EXIT_BAD_INPUT, ConfigError
from fedsim.keys import Outcome
from fedsim.scripts.clients_stats import (
    LATENCY_PARTS,
    TierStats,
    deadlines_of,
    load_client_rows,
    tier_stats,
)
from fedsim.scripts.fairness import Standing, standings
from fedsim.scripts.runs import (
    X_AXES,
    Configuration,
    Curve,
    Run,
    TargetSummary,
    aggregate_curve,
    auc_horizon_s,
    available_metrics,
    group_runs,
    load_runs,
    markdown_table,
    run_auc,
    summarize,
    summarize_target,
)
from fedsim.scripts.stats import ALPHA, MIN_SEEDS, mean_ci

__all__ = ["build_parser", "main", "plot_curves", "plot_latency", "summary_table"]

PROG = "fedsim-plot"
DPI = 150
PANEL_SIZE_IN = (5.5, 4.0)  # width, height of one panel in inches
LEGEND_ROW_IN = 0.22  # height of one row of a small-font legend in inches
# --style paper: a one-column figure of a two-column paper (3.3 in wide, as IEEE and ACM
# templates), 8 pt type, no title unless --title, and a vector copy (.pdf) beside a raster --out.
PAPER_WIDTH_IN = 3.3
PAPER_PANEL_HEIGHT_IN = 2.2
PAPER_RC = {
    "font.size": 8,
    "axes.labelsize": 8,
    "xtick.labelsize": 7,
    "ytick.labelsize": 7,
    "legend.fontsize": 7,
    "lines.linewidth": 1.0,
    "lines.markersize": 2.5,
    "pdf.fonttype": 42,
    "ps.fonttype": 42,
}  # fmt: skip  (42: fonts embedded as TrueType)
VECTOR_FORMATS = ("pdf", "svg", "eps", "ps")
STYLES = ("screen", "paper")
# Text that would not fit the figure: wrapped after these (in this order of preference), a
# word longer than a line cut after one of CUT_AFTER; the figure then grows (at most FIT_ROUNDS
# times) to hold what is left, keeping FIT_PAD_IN inches from the edge.
WRAP_AFTER = ("; ", ", ", " ")
CUT_AFTER = "=_/-"
FIT_ROUNDS = 4
FIT_PAD_IN = 0.05
BAND_ALPHA = 0.2
MAX_ROUNDS_WITH_MARKERS = 30  # beyond this, markers clutter the line
# --band -> what the band around the mean line shows, for the legend title and captions.
BAND_CAPTIONS = {
    "ci95": "line: mean over seeds; band: its 95% CI (Student t)",
    "minmax": "line: mean over seeds; band: min–max over seeds",
    "std": "line: mean over seeds; band: ± sample std over seeds",
}
DEFAULT_BAND = "ci95"
CI_CAPTION = (
    "mean over seeds ± the half-width of its 95% confidence interval (Student t, n − 1 "
    "degrees of freedom; no ± for one seed)"
)
RANK_CAPTION = (
    "Rank by mean final accuracy; a configuration the paired t-test across seeds (runs paired "
    f"by seed) does not find significantly worse (p ≥ {ALPHA:g}, or fewer than 2 shared seeds) "
    "than the best configuration not yet ranked shares its rank, marked =. p vs best: that "
    "test's two-sided p against the rank-1 configuration with the highest mean"
)
AUC_CAPTION = (
    "Accuracy AUC: area under accuracy against simulated time from 0 to the horizon (the "
    "shortest run's end, the same for every configuration compared), divided by the horizon: "
    "the time-averaged accuracy of the latest global model, 0 before round 1 ends"
)
# Decimal units (1 MB = 10**6 bytes), largest that keeps the axis maximum >= 1.
BYTE_UNITS = (("B", 1.0), ("kB", 1e3), ("MB", 1e6), ("GB", 1e9), ("TB", 1e12))
# Seconds shown in s below 2 min, in min below 2 h, else in h.
TIME_UNITS = (("s", 1.0, 0.0), ("min", 60.0, 120.0), ("h", 3600.0, 7200.0))
# --latency: the dashed lines of the runs' distinct clock.deadline_s, in this order.
DEADLINE_COLORS = ("tab:red", "tab:purple", "tab:brown", "tab:olive", "tab:cyan", "tab:pink")
OUTCOME_COLORS = {Outcome.OK: "tab:green", Outcome.STRAGGLER: "tab:orange",
                  Outcome.OFFLINE: "tab:gray", Outcome.INFEASIBLE: "tab:red",
                  Outcome.FAILED: "tab:purple", Outcome.INTERRUPTED: "tab:brown",
                  Outcome.LATE: "tab:olive", Outcome.STALE: "tab:pink"}  # fmt: skip
# Table columns for runs.TOTAL_KEYS: a run's sum over rounds, mean over seeds.
TOTAL_COLUMNS = {"num_stragglers": "stragglers", "num_offline": "offline",
                 "num_infeasible": "infeasible", "num_failed": "failed",
                 "energy_j": "energy (J)"}  # fmt: skip
TOTALS_CAPTION = (
    "Stragglers, offline, infeasible, failed, energy: sum over a run's rounds, mean over seeds"
)
COST_BACKBONE_CAPTION = (
    "Simulated time, bytes and energy are charged for {names} (model.cost_backbone) while the "
    "small model trains: accuracy is the trained model's, the costs are the LLM's"
)
METRIC_CAPTION = (
    "Final {metric} (--metric {metric}): a run's {metric} after its last round (summary.json's "
    "final_{metric} where the run wrote one)"
)
TARGET_CAPTION = (
    "Columns '… to {target:g}': at the first round with accuracy ≥ {target:g} (sim time and "
    "traffic cumulative through it), mean ± 95% CI over the seeds that reached it (k/n: k of "
    "the n seeds reached it)"
)


class _OneLineParser(argparse.ArgumentParser):
    """Argument errors as one line on stderr and exit code 2 (argparse prints usage too)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """Return the command-line parser of ``fedsim-plot``."""
    parser = _OneLineParser(
        prog=PROG,
        description="Plot the runs found under DIRs (folders holding metrics.jsonl and "
        "config.yaml, at any depth). Runs that differ only by seed form one configuration: a "
        "line (mean over seeds) with a band (--band), labelled by the config keys "
        "that differ between configurations. Writes FILE.png and a table FILE.md beside it.",
        epilog="labels: keys whose values differ between configurations; <group>._target_ "
        "shows as <group>=<ClassName>, other keys as <last part>=<value> (the full dotted key if "
        "two share a last part); seed, runtime.* and hydra* never count. A single "
        "configuration is labelled by its strategy class. Two runs of one seed in one "
        "configuration count once (the finished one written last). FILE.md: final and best "
        "accuracy as mean ± 95% CI over seeds, a rank that ties where a paired t-test across "
        "seeds finds no difference at p < 0.05; with a device fleet, the accuracy AUC over "
        "simulated time and totals of stragglers, offline, infeasible and failed "
        "client-rounds and of device energy (sum over rounds, mean over seeds); with --target, "
        "the cost to reach it. Fewer than 5 seeds in a configuration gives a warning.",
    )
    parser.add_argument("dirs", nargs="+", metavar="DIR", help="results folder(s) to search")
    parser.add_argument("--out", required=True, type=Path, metavar="FILE.png", help="figure path")
    parser.add_argument(
        "--x",
        nargs="+",
        choices=list(X_AXES),
        default=["round", "bytes"],
        help="one panel per x axis: round, cumulative bytes up+down, simulated time "
        "(default: round bytes)",
    )
    parser.add_argument(
        "--metric",
        default="accuracy",
        help="per-round key of metrics.jsonl (default: accuracy); another metric adds its final "
        "value (mean ± 95%% CI over seeds) to the table, before the accuracy columns",
    )
    parser.add_argument("--title", default=None, help="figure title")
    parser.add_argument(
        "--target",
        type=float,
        default=None,
        metavar="ACC",
        help="target accuracy in (0, 1]: the table adds, per configuration, how many seeds "
        "reached it and the simulated time, rounds and cumulative bytes up+down to the first "
        "round at or above it (mean ± 95%% CI over those seeds); a dashed line marks it when "
        "--metric is accuracy",
    )
    parser.add_argument(
        "--band",
        choices=list(BAND_CAPTIONS),
        default=DEFAULT_BAND,
        help="band around each mean line: 95%% CI of the mean (Student t), min-max or ± "
        f"sample std over seeds (default: {DEFAULT_BAND})",
    )
    parser.add_argument(
        "--labels",
        nargs="+",
        default=[],
        metavar="OLD=NEW",
        help="rename configurations in the legend and the table: the label fedsim gives "
        "(as printed in the table) = the name to show, e.g. 'strategy=FedAvg=FedAvg (baseline)'; "
        "the split is at the last '=' that leaves a known label on its left",
    )
    parser.add_argument(
        "--style",
        choices=STYLES,
        default="screen",
        help="screen (default): wide panels and a title; paper: stacked one-column panels "
        f"({PAPER_WIDTH_IN} in wide), 8 pt type, no title unless --title, and a .pdf copy "
        "beside a raster --out",
    )
    parser.add_argument(
        "--latency",
        action="store_true",
        help="instead of curves, plot per-client latency by device tier from clients.jsonl "
        "(box plot, mean download/compute/upload, outcome counts); the runs' clock.deadline_s "
        "is a dashed line on the box plot",
    )
    return parser


def _pick_unit(max_value: float, x: str) -> tuple[str, float]:
    """Return (unit, divisor) for an x axis whose largest value is ``max_value``."""
    if x == "bytes":
        unit, scale = BYTE_UNITS[0]
        for name, size in BYTE_UNITS:
            if max_value >= size:
                unit, scale = name, size
        return unit, scale
    if x == "sim_time":
        unit, scale = TIME_UNITS[0][:2]
        for name, size, threshold in TIME_UNITS:
            if max_value >= threshold:
                unit, scale = name, size
        return unit, scale
    return "", 1.0


def _x_label(x: str, unit: str) -> str:
    return {
        "round": "round",
        "bytes": f"communication, cumulative up + down ({unit})",
        "sim_time": f"simulated time ({unit})",
    }[x]


def cost_backbones(configurations: Sequence[Configuration]) -> list[str]:
    """The cost backbones (``model.cost_backbone``) the runs' clocks charged, sorted; [] if none.

    Such a run's simulated time, bytes and energy are an LLM's, not the trained model's: the
    axes and the caption say so (fedsim/learning/cost_backbone.py).
    """
    names = {run.summary.get("cost_backbone") for c in configurations for run in c.runs}
    return sorted(str(name) for name in names if name is not None)


def _band(curve: Curve, band: str) -> tuple[np.ndarray, np.ndarray]:
    """(low, high) of the band around the mean line, per round."""
    if band == "minmax":
        return curve.low, curve.high
    width = curve.ci95 if band == "ci95" else curve.std
    return curve.mean - width, curve.mean + width


def _legend_label(configuration: Configuration) -> str:
    incomplete = sum(not run.complete for run in configuration.runs)
    extra = f", {incomplete} incomplete" if incomplete else ""
    return f"{configuration.label} (n={len(configuration.runs)}{extra})"


def _new_figure(
    num_panels: int, title: str | None, legend_rows: int = 0, style: str = "screen"
) -> tuple[Figure, list[Axes]]:
    """Panels side by side (screen) or stacked in one column (paper); no title if None."""
    if style == "paper":
        height = PAPER_PANEL_HEIGHT_IN * num_panels + 0.35 + 0.16 * legend_rows
        fig = Figure(figsize=(PAPER_WIDTH_IN, height), layout="constrained")
        FigureCanvasAgg(fig)
        axes = list(np.atleast_1d(fig.subplots(num_panels, 1, squeeze=False)[:, 0]))
    else:
        width, height = PANEL_SIZE_IN
        height += 0.8 + LEGEND_ROW_IN * legend_rows  # title and x label, then a figure legend
        fig = Figure(figsize=(width * num_panels, height), layout="constrained")
        FigureCanvasAgg(fig)  # render with Agg whatever the session's default backend is
        axes = list(np.atleast_1d(fig.subplots(1, num_panels, squeeze=False)[0]))
    if title:
        fig.suptitle(title)
    for ax in axes:
        ax.grid(True, alpha=0.3)
    return fig, axes


def _text_width_px(renderer: RendererBase, text: str, prop: FontProperties) -> float:
    """Width in pixels of the widest line of ``text`` drawn with ``prop``."""
    lines = text.split("\n")
    return max(renderer.get_text_width_height_descent(s, prop, ismath=False)[0] for s in lines)


def _cut(line: str, fits: Callable[[str], bool]) -> list[str]:
    """``line`` in pieces that fit, each cut after its last ``=_/-`` (else where it must)."""
    pieces = []
    while line and not fits(line):
        end = 1
        while end < len(line) and fits(line[: end + 1]):
            end += 1
        soft = max(line.rfind(char, 0, end) for char in CUT_AFTER)
        end = soft + 1 if soft > 0 else end
        pieces.append(line[:end])
        line = line[end:]
    return [*pieces, line] if line else pieces


def _wrap_line(line: str, fits: Callable[[str], bool], separators: Sequence[str]) -> list[str]:
    if fits(line):
        return [line]
    if not separators:
        return _cut(line, fits)
    separator, rest = separators[0], separators[1:]
    parts = line.split(separator)
    if len(parts) == 1:
        return _wrap_line(line, fits, rest)
    pieces = [part + separator for part in parts[:-1]] + [parts[-1]]
    lines: list[str] = []
    current = ""
    for piece in pieces:
        if fits((current + piece).rstrip()):
            current += piece
            continue
        if current:
            lines.append(current.rstrip())
        *done, last = _wrap_line(piece.rstrip(), fits, rest)
        lines += done
        current = last + piece[len(piece.rstrip()) :]  # the separator's space, if any
    return [*lines, current.rstrip()] if current.strip() else lines


def wrap_to_width(text: str, width_px: float, renderer: RendererBase, prop: FontProperties) -> str:
    """``text`` with line breaks so that no line is wider than ``width_px`` drawn with ``prop``.

    A line breaks after ``"; "`` where it can, else after ``", "``, else after a space; a word
    wider than a line is cut (see :func:`_cut`). Line breaks already in ``text`` stay.
    """

    def fits(line: str) -> bool:
        return _text_width_px(renderer, line, prop) <= width_px

    return "\n".join(
        wrapped for line in text.split("\n") for wrapped in _wrap_line(line, fits, WRAP_AFTER)
    )


def _fit_inside(fig: Figure, dpi: float, grow_width: bool = True) -> None:
    """Grow ``fig`` until everything drawn at ``dpi`` lies inside it.

    Constrained layout moves and shrinks the axes, never the text: tick labels taller than the
    room a figure has push its caption (the x label) off the bottom edge, and a legend wider
    than the figure loses both ends. Text is wrapped where it is made (:func:`wrap_to_width`);
    this is the guard for what still overflows. ``grow_width`` False keeps a paper column's
    width (only the height grows).
    """
    shown_dpi = fig.dpi
    fig.set_dpi(dpi)
    try:
        for _ in range(FIT_ROUNDS):
            fig.canvas.draw()
            box = fig.get_tightbbox(fig.canvas.get_renderer())
            width, height = fig.get_size_inches()
            wider = max(0.0, -box.x0) + max(0.0, box.x1 - width) if grow_width else 0.0
            taller = max(0.0, -box.y0) + max(0.0, box.y1 - height)
            if max(wider, taller) <= 1 / dpi:  # within a pixel
                return
            wider, taller = (extra + 2 * FIT_PAD_IN if extra else 0.0 for extra in (wider, taller))
            fig.set_size_inches(width + wider, height + taller)
    finally:
        fig.set_dpi(shown_dpi)


def _save(fig: Figure, out: Path, style: str = "screen") -> list[Path]:
    """Write the figure; in paper style a raster ``out`` also gets a .pdf copy. Return paths.

    The figure first grows to hold whatever would be cut at its edges (:func:`_fit_inside`).
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    _fit_inside(fig, DPI, grow_width=style != "paper")
    fig.savefig(out, dpi=DPI)
    written = [out]
    if style == "paper" and out.suffix.lstrip(".").lower() not in VECTOR_FORMATS:
        written.append(out.with_suffix(".pdf"))
        fig.savefig(written[-1])
    return written


def plot_curves(
    configurations: Sequence[Configuration],
    metric: str,
    xs: Sequence[str],
    out: Path,
    title: str | None,
    target: float | None = None,
    band: str = DEFAULT_BAND,
    style: str = "screen",
) -> list[Path]:
    """Draw one panel per x axis: per configuration, mean over seeds and a band (``--band``).

    ``target`` (a value of ``metric``) is drawn as a dashed horizontal line. Returns the files
    written (``style`` paper: a .pdf copy too, see :func:`_save`).
    """
    columns = 1 if style == "paper" else len(xs)
    legend_rows = 1 + -(-len(configurations) // columns)  # title + ceil(labels / columns)
    with matplotlib.rc_context(PAPER_RC if style == "paper" else {}):
        fig, axes = _new_figure(len(xs), title, legend_rows, style)
        _draw_curves(fig, axes, configurations, metric, xs, target, band, columns)
        return _save(fig, out, style)


def _draw_curves(
    fig: Figure,
    axes: Sequence[Axes],
    configurations: Sequence[Configuration],
    metric: str,
    xs: Sequence[str],
    target: float | None,
    band: str,
    columns: int,
) -> None:
    colors = [f"C{i % 10}" for i in range(len(configurations))]
    for ax, x in zip(axes, xs, strict=True):
        curves = [aggregate_curve(c.runs, metric, x) for c in configurations]
        max_x = max((float(curve.x.max()) for curve in curves if curve.x.size), default=0.0)
        unit, scale = _pick_unit(max_x, x)
        for configuration, curve, color in zip(configurations, curves, colors, strict=True):
            marker = "o" if curve.rounds.size <= MAX_ROUNDS_WITH_MARKERS else None
            x_scaled = curve.x / scale
            ax.plot(
                x_scaled,
                curve.mean,
                color=color,
                marker=marker,
                markersize=3,
                label=_legend_label(configuration),
            )
            low, high = _band(curve, band)
            ax.fill_between(x_scaled, low, high, color=color, alpha=BAND_ALPHA, lw=0)
        if target is not None:
            ax.axhline(target, color="gray", linestyle="--", linewidth=1)
        if x == "round":
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        charged = cost_backbones(configurations) if x != "round" else []
        ax.set_xlabel(_x_label(x, unit) + (f", charged as {', '.join(charged)}" if charged else ""))
        ax.set_ylabel(metric)
    handles, labels = axes[0].get_legend_handles_labels()
    _figure_legend(fig, handles, labels, min(len(labels), columns), BAND_CAPTIONS[band])


def _figure_legend(
    fig: Figure, handles: Sequence[Artist], labels: Sequence[str], ncols: int, title: str
) -> None:
    """The legend below the panels, ``ncols`` labels a row (about one per panel width).

    Labels and title too wide for the figure together are wrapped (:func:`wrap_to_width`) until
    the legend fits its width, and the figure grows by the height that wrapping adds.
    """
    renderer = fig.canvas.get_renderer()
    limit = fig.bbox.width - 2 * FIT_PAD_IN * fig.dpi
    prop = FontProperties(size="small")  # of the labels and the title
    title = wrap_to_width(title, 0.9 * limit, renderer, prop)
    style = {"loc": "outside lower center", "fontsize": "small", "title_fontsize": "small"}
    legend = fig.legend(handles, labels, ncols=ncols, title=title, **style)
    first = box = legend.get_window_extent(renderer)
    room = max((_text_width_px(renderer, label, prop) for label in labels), default=0.0)
    for _ in range(FIT_ROUNDS):
        if box.width <= limit or not labels:
            break
        room -= (box.width - limit) / ncols  # each column gives up its share
        legend.remove()
        wrapped = [wrap_to_width(label, room, renderer, prop) for label in labels]
        legend = fig.legend(handles, wrapped, ncols=ncols, title=title, **style)
        box = legend.get_window_extent(renderer)
    if box.height > first.height:
        fig.set_figheight(fig.get_figheight() + (box.height - first.height) / fig.dpi)


def _pm(pair: tuple[float, float]) -> str:
    """``mean ± CI half-width`` with 4 decimals; the mean alone for one seed, ``–`` for none."""
    mean, half_width = pair
    if np.isnan(mean):
        return "–"
    return f"{mean:.4f}" if np.isnan(half_width) else f"{mean:.4f} ± {half_width:.4f}"


def _metric_pm(pair: tuple[float, float]) -> str:
    """A metric's ``mean ± CI``: 4 decimals as accuracy, 3 significant digits from 1000 up."""
    return _pm(pair) if np.isnan(pair[0]) or abs(pair[0]) < 1000 else _three_digits(pair)


def _time_text(seconds: float) -> str:
    unit, scale = _pick_unit(seconds, "sim_time")
    return f"{seconds / scale:.1f} {unit}"


def _three_digits(pair: tuple[float, float], scale: float = 1.0, unit: str = "") -> str:
    """``mean ± spread`` over ``scale``: 3 significant digits of the mean, at least 1 decimal."""
    mean, spread = (value / scale for value in pair)
    if np.isnan(mean):
        return "–"
    decimals = max(1, 2 - int(np.floor(np.log10(abs(mean))))) if mean else 1
    text = f"{mean:.{decimals}f}"
    text += "" if np.isnan(spread) else f" ± {spread:.{decimals}f}"
    return f"{text} {unit}".rstrip()


def _target_cells(target: TargetSummary, with_sim_time: bool) -> list[str]:
    """Cells: seeds reached, [sim time], rounds, traffic to the target (units from the means)."""
    cells = [f"{target.num_reached}/{target.num_runs}"]
    if with_sim_time:
        unit, scale = _pick_unit(target.sim_time_s[0], "sim_time")
        cells.append(_three_digits(target.sim_time_s, scale, unit))
    unit, scale = _pick_unit(target.bytes[0], "bytes")
    cells += [_three_digits(target.rounds), _three_digits(target.bytes, scale, unit)]
    return cells


def p_text(p: float) -> str:
    """A p-value with 3 decimals, ``< 0.001`` below that, ``–`` for nan (no test possible)."""
    if np.isnan(p):
        return "–"
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


def p_cell(standing: Standing, which: str = "t_p") -> str:
    """``best`` for the best configuration, else the p-value of its test against the best."""
    if standing.against_best is None:
        return "best" if standing.rank.position is not None else "–"
    return p_text(getattr(standing.against_best, which))


def few_seeds_warning(configurations: Sequence[Configuration]) -> str | None:
    """One line naming the configurations with fewer than MIN_SEEDS seeds, or None."""
    few = [f"{c.label} ({len(c.runs)})" for c in configurations if len(c.runs) < MIN_SEEDS]
    if not few:
        return None
    return (
        f"Warning: fewer than {MIN_SEEDS} seeds in {', '.join(few)}: wide confidence intervals, "
        "and the paired test can rarely tell configurations apart."
    )


def repeated_seeds_note(configurations: Sequence[Configuration]) -> str | None:
    """One line naming the runs left out because their seed was already in their configuration."""
    ignored = [(c, run) for c in configurations for run in c.ignored]
    if not ignored:
        return None
    names = "; ".join(f"{run.path} (seed {run.seed} of {c.label})" for c, run in ignored)
    return (
        f"{len(ignored)} run(s) repeat a seed of their configuration and are left out (per seed "
        f"the finished run written last counts): {names}."
    )


def summary_table(
    configurations: Sequence[Configuration],
    target: float | None = None,
    metric: str = "accuracy",
) -> str:
    """Return the markdown table: one row per configuration, accuracy mean ± 95% CI over seeds.

    Columns are added for the final value of ``metric`` when it is not accuracy (mean ± 95% CI
    over seeds, before the accuracy columns), a final simulated time and the accuracy AUC over
    it, the totals of :data:`TOTAL_COLUMNS` when some run reports them, and the cost to reach
    ``target`` accuracy when it is given.
    """
    summaries = [summarize(c) for c in configurations]
    ranked = standings(configurations, [""] * len(configurations))
    with_sim_time = any(s.final_sim_time_s is not None for s in summaries)
    horizon_s = auc_horizon_s(run for c in configurations for run in c.runs)
    with_auc = not np.isnan(horizon_s)
    totals = [key for key in TOTAL_COLUMNS if any(key in s.totals for s in summaries)]
    with_metric = metric != "accuracy"
    header = ["configuration", "seeds"] + ([f"final {metric}"] if with_metric else [])
    header += ["final accuracy", "rank", "p vs best", "best accuracy", "rounds"]
    header += ["final sim time"] if with_sim_time else []
    header += [f"accuracy AUC to {_time_text(horizon_s)}"] if with_auc else []
    if target is not None:
        header += [f"seeds reaching {target:g}"]
        header += [f"sim time to {target:g}"] if with_sim_time else []
        header += [f"rounds to {target:g}", f"traffic to {target:g}"]
    header += [TOTAL_COLUMNS[key] for key in totals]
    rows = []
    for i, (configuration, s) in enumerate(zip(configurations, summaries, strict=True)):
        seeds = (
            f"{s.num_runs} ({s.num_incomplete} incomplete)" if s.num_incomplete else str(s.num_runs)
        )
        low, high = s.rounds
        row = [s.label, seeds]
        if with_metric:
            row.append(_metric_pm(mean_ci([run.final_value(metric) for run in configuration.runs])))
        row += [_pm(s.final_accuracy), str(ranked[i].rank), p_cell(ranked[i])]
        row += [_pm(s.best_accuracy), str(high) if low == high else f"{low}–{high}"]
        if with_sim_time:
            sim = s.final_sim_time_s
            row.append("–" if sim is None else _time_text(sim))
        if with_auc:
            row.append(_pm(mean_ci([run_auc(run, horizon_s) for run in configuration.runs])))
        if target is not None:
            row += _target_cells(summarize_target(configuration.runs, target), with_sim_time)
        row += [_total_text(key, s.totals.get(key)) for key in totals]
        rows.append(row)
    return markdown_table(header, rows)


def _total_text(key: str, value: float | None) -> str:
    if value is None:
        return "–"
    return _three_digits((value, np.nan)) if key == "energy_j" else f"{value:.1f}"


def plot_latency(
    stats: Sequence[TierStats],
    out: Path,
    title: str,
    deadlines: Mapping[float | None, int] | None = None,
) -> None:
    """Draw latency per tier (box), mean latency parts (stacked bars), outcomes (stacked bars).

    ``deadlines`` (:func:`~fedsim.scripts.clients_stats.deadlines_of` the runs drawn): each
    deadline set is a labelled dashed horizontal line on the box panel; None (no deadline)
    draws nothing.
    """
    fig, (box_ax, parts_ax, outcome_ax) = _new_figure(3, title)
    tiers = [s.tier for s in stats]
    positions = np.arange(1, len(stats) + 1)
    box_ax.boxplot(
        [s.latency_s for s in stats], positions=positions, widths=0.5, flierprops={"markersize": 2}
    )
    box_ax.set_xticks(positions, [f"{s.tier}\n(n={s.latency_s.size})" for s in stats])
    box_ax.set_xlabel("device tier (n = client-rounds with a latency)")
    box_ax.set_ylabel("latency per client-round (s)")
    box_ax.set_title("latency by tier", fontsize="medium")
    deadlines = deadlines or {}
    total = sum(deadlines.values())
    for i, deadline in enumerate(d for d in deadlines if d is not None):
        label = f"deadline {deadline:g} s"
        if deadlines[deadline] < total:
            label += f" ({deadlines[deadline]} of {total} runs)"
        color = DEADLINE_COLORS[i % len(DEADLINE_COLORS)]
        box_ax.axhline(deadline, color=color, linestyle="--", linewidth=1, label=label)
    if any(d is not None for d in deadlines):
        box_ax.legend(loc="best", fontsize="small")
    bottom = np.zeros(len(stats))
    for i, part in enumerate(LATENCY_PARTS):
        heights = np.array([s.mean_parts_s[part] for s in stats])
        parts_ax.bar(tiers, heights, bottom=bottom, label=part.removesuffix("_s"), color=f"C{i}")
        bottom += heights
    parts_ax.set_xlabel("device tier")
    parts_ax.set_ylabel("mean time per client-round (s)")
    parts_ax.set_title("where the time goes", fontsize="medium")
    parts_ax.legend(loc="best", fontsize="small")
    outcomes = list(dict.fromkeys(o for s in stats for o in s.outcomes))
    bottom = np.zeros(len(stats))
    for i, outcome in enumerate(outcomes):
        counts = np.array([s.outcomes.get(outcome, 0) for s in stats], dtype=float)
        color = OUTCOME_COLORS.get(outcome, f"C{i}")
        outcome_ax.bar(tiers, counts, bottom=bottom, label=outcome, color=color)
        bottom += counts
    outcome_ax.set_xlabel("device tier")
    outcome_ax.set_ylabel("client-rounds")
    outcome_ax.set_title("outcomes", fontsize="medium")
    outcome_ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize="small")
    _save(fig, out)


def latency_caption(deadlines: Mapping[float | None, int]) -> str:
    """The caption of ``--latency``: pooling, and the runs' deadlines where any is set."""
    text = "Pooled over all client-rounds of all runs."
    given = {d: n for d, n in deadlines.items() if d is not None}
    if not given:
        return text
    parts = [f"{d:g} s ({n} run{'s' if n > 1 else ''})" for d, n in given.items()]
    unset = deadlines.get(None, 0)
    none = f"; {unset} run{'s have' if unset > 1 else ' has'} none" if unset else ""
    return (
        f"{text} Dashed on the latency panel: the round deadline (clock.deadline_s), "
        f"{', '.join(parts)}{none}; a client-round slower than its run's deadline is a "
        "straggler, its update dropped."
    )


def latency_table(stats: Sequence[TierStats]) -> str:
    """Return the markdown table of per-tier latency (seconds) and outcome counts."""
    outcomes = list(dict.fromkeys(o for s in stats for o in s.outcomes))
    header = ["tier", "client-rounds", "median latency (s)", "p90 latency (s)"]
    header += [f"mean {p}" for p in LATENCY_PARTS] + outcomes
    rows = []
    for s in stats:
        has = s.latency_s.size > 0
        median = _three_digits((float(np.median(s.latency_s)), np.nan)) if has else "–"
        p90 = _three_digits((float(np.percentile(s.latency_s, 90)), np.nan)) if has else "–"
        row = [s.tier, str(s.num_rows), median, p90]
        row += [_three_digits((s.mean_parts_s[p], np.nan)) for p in LATENCY_PARTS]
        row += [str(s.outcomes.get(o, 0)) for o in outcomes]
        rows.append(row)
    return markdown_table(header, rows)


def rename(configurations: Sequence[Configuration], items: Sequence[str]) -> list[Configuration]:
    """``--labels OLD=NEW ...``: the configurations with those labels renamed.

    A label itself holds ``=`` (``strategy=FedAvg``), so each item splits at the ``=`` whose
    left part is a configuration's label. An item naming no label is a one-line error.
    """
    labels = [c.label for c in configurations]
    names: dict[str, str] = {}
    for item in items:
        cuts = [i for i, char in enumerate(item) if char == "=" and item[:i] in labels]
        if not cuts:
            raise ConfigError(
                "--labels", item, f"names no configuration; expected OLD=NEW with OLD one of: "
                f"{'; '.join(labels)}",
            )  # fmt: skip
        old, new = item[: cuts[-1]], item[cuts[-1] + 1 :]
        if not new.strip():
            raise ConfigError("--labels", item, "gives an empty name; expected OLD=NEW")
        names[old] = new
    return [replace(c, label=names.get(c.label, c.label)) for c in configurations]


def _check_inputs(
    runs: Sequence[Run], metric: str, xs: Sequence[str], target: float | None
) -> None:
    metrics = available_metrics(runs)
    if metric not in metrics:
        raise ConfigError("--metric", metric, f"must be one of: {', '.join(metrics)}")
    if target is not None and not 0.0 < target <= 1.0:  # also refuses nan
        raise ConfigError("--target", target, "must be an accuracy in (0, 1]")
    if target is not None and "accuracy" not in metrics:
        raise ConfigError("--target", target, "needs runs whose metrics.jsonl has accuracy")
    if "sim_time" in xs:
        lacking = [run for run in runs if not run.values("sim_time_s")]
        if lacking:
            raise ConfigError(
                "--x",
                "sim_time",
                f"{len(lacking)} of {len(runs)} runs have no sim_time_s "
                f"(e.g. {lacking[0].path}); run with a device fleet (devices=<fleet>)",
            )


def _run(args: argparse.Namespace) -> tuple[str, str, list[str]]:
    """Load, draw and write; return (markdown table, caption, warning and note lines)."""
    if args.latency and args.target is not None:
        raise ConfigError("--target", args.target, "applies to learning curves, not --latency")
    runs = load_runs(args.dirs)
    if args.latency:
        rows = load_client_rows(runs)
        drawn = {row["run"] for row in rows}  # the runs with client rows
        title = args.title or f"per-client latency by device tier ({len(drawn)} run(s))"
        stats = tier_stats(rows)
        deadlines = deadlines_of(run for run in runs if str(run.path) in drawn)
        plot_latency(stats, args.out, title, deadlines)
        return latency_table(stats), latency_caption(deadlines), []
    _check_inputs(runs, args.metric, args.x, args.target)
    configurations = rename(group_runs(runs), args.labels)
    title = args.title
    if title is None and args.style == "screen":
        title = (
            f"{args.metric}: {len(configurations)} configuration(s), "
            f"{sum(len(c.runs) for c in configurations)} run(s)"
        )
    line = args.target if args.metric == "accuracy" else None
    args.written = plot_curves(
        configurations, args.metric, args.x, args.out, title, line, args.band, args.style
    )
    table = summary_table(configurations, target=args.target, metric=args.metric)
    captions = [f"Accuracy, AUC and cost to the target: {CI_CAPTION}", RANK_CAPTION]
    if args.metric != "accuracy":
        captions[0] = f"Final {args.metric}, accuracy, AUC and cost to the target: {CI_CAPTION}"
        captions.insert(1, METRIC_CAPTION.format(metric=args.metric))
    if "accuracy AUC to" in table.splitlines()[0]:
        captions += [AUC_CAPTION]
    captions += [TARGET_CAPTION.format(target=args.target)] if args.target is not None else []
    captions += [TOTALS_CAPTION] if any(summarize(c).totals for c in configurations) else []
    charged = cost_backbones(configurations)
    if charged:
        captions += [COST_BACKBONE_CAPTION.format(names=", ".join(charged))]
    captions += [f"In the figure, {BAND_CAPTIONS[args.band]}"]
    if line is not None:
        captions[-1] += f"; dashed: accuracy {line:g}"
    notes = [few_seeds_warning(configurations), repeated_seeds_note(configurations)]
    return table, ". ".join(captions) + ".", [note for note in notes if note]


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``fedsim-plot``; return the exit code (0, or 2 for bad input)."""
    args = build_parser().parse_args(argv)
    if not args.out.suffix:
        args.out = args.out.with_suffix(".png")
    try:
        formats = FigureCanvasAgg(Figure()).get_supported_filetypes()
        if args.out.suffix.lstrip(".").lower() not in formats:
            raise ConfigError("--out", args.out, f"must end in .{', .'.join(formats)}")
        table, caption, notes = _run(args)
    except ConfigError as err:
        print(f"{PROG}: error: {err.one_line()}", file=sys.stderr)
        return EXIT_BAD_INPUT
    table_path = args.out.with_suffix(".md")
    notes_text = "".join(f"\n{note}\n" for note in notes)
    table_path.write_text(f"{table}\n{caption} Figure: `{args.out.name}`.\n{notes_text}")
    print(table)
    for note in notes:
        print(f"{PROG}: {note[0].lower()}{note[1:]}", file=sys.stderr)
    for path in getattr(args, "written", [args.out]):
        print(f"wrote {path}")
    print(f"wrote {table_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
