"""fedsim-plot and its loading helpers, on real run folders written to tmp_path."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

from fedsim.scripts.clients_stats import OUTCOMES, load_client_rows, tier_stats
from fedsim.scripts.plot import _band, main
from fedsim.scripts.runs import (
    Reach,
    aggregate_curve,
    first_reach,
    group_runs,
    label_configurations,
    load_runs,
    summarize,
    summarize_target,
)
from fedsim.scripts.stats import accuracy_time_auc, mean_ci

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SEEDS = (0, 1, 2)
# Final accuracy per seed; round 2 peaks 0.05 above it (best), round 1 is 0.5 for everyone.
# FedAvg  final 0.70 0.72 0.74 -> mean 0.72, sample std sqrt((0.02²+0+0.02²)/2) = 0.02
#         best  0.75 0.77 0.79 -> mean 0.77, std 0.02
# FedProx final 0.80 0.83 0.86 -> mean 0.83, sample std sqrt((0.03²+0+0.03²)/2) = 0.03
#         best  0.85 0.88 0.91 -> mean 0.88, std 0.03
# 95% CI half-width over 3 seeds: t(0.975, 2) x std / sqrt(3) = 4.3027 x std / 1.7321
#   = 2.4841 x std: 0.0497 for FedAvg, 0.0745 for FedProx.
# Paired by seed, FedProx - FedAvg = 0.10 0.11 0.12: mean 0.11, sd 0.01, t = 0.11 / (0.01 /
# sqrt 3) = 19.05; with 2 dof the two-sided p is 1 - t / sqrt(t² + 2) = 0.0027 < 0.05.
FINALS = {"FedAvg": (0.70, 0.72, 0.74), "FedProx": (0.80, 0.83, 0.86)}
BYTES_UP, BYTES_DOWN = 1_000_000, 2_000_000  # per round: 3 MB, so 9 MB after round 3


def make_config(strategy: str, seed: int, **strategy_kwargs: Any) -> dict[str, Any]:
    return {
        "seed": seed,
        "num_clients": 10,
        "num_rounds": 3,
        "experiment": None,
        # As fedsim saves it: `${seed}` resolved into the data split and the partitioner.
        "data": {"_target_": "fedsim.learning.data.DigitsData", "test_fraction": 0.2, "seed": seed},
        "partition": {
            "_target_": "flwr_datasets.partitioner.DirichletPartitioner",
            "alpha": 0.5,
            "seed": seed,
        },
        "model": {"_target_": "fedsim.learning.models.SmallCNN", "hidden_size": 128},
        "strategy": {"_target_": f"flwr.serverapp.strategy.{strategy}", **strategy_kwargs},
        "client": {"_target_": "fedsim.clients.local_sgd.LocalSGD", "local_epochs": 1},
        "devices": {"_target_": "fedsim.clock.devices.Fleet", "server_gflops": 10000.0},
        # runtime differs per run (engine settings): it must not split configurations.
        "runtime": {"num_cpus": 1 + seed, "ray_address": f"local-{seed}"},
    }


def write_run(
    folder: Path,
    config: dict[str, Any],
    final: float,
    *,
    summary: bool = True,
    sim_time: bool = False,
    accuracies: Sequence[float] | None = None,
    per_round: dict[str, Sequence[float]] | None = None,
) -> Path:
    """Write a run folder; ``per_round`` adds metrics.jsonl keys, one value per round."""
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    accuracies = accuracies or [0.5, final + 0.05, final]
    rows: list[dict[str, Any]] = [{"phase": "warm_start", "round": 0, "accuracy": 0.99}]
    for rnd, acc in enumerate(accuracies, start=1):
        row = {
            "round": rnd,
            "accuracy": acc,
            "loss": 1.0 - acc,
            "macro_f1": acc - 0.1,
            "num_clients": 5,
            "bytes_up": BYTES_UP,
            "bytes_down": BYTES_DOWN,
            "wall_time_s": 2.0 * rnd,
        }
        if sim_time:
            row["sim_time_s"] = 60.0 * rnd
        row.update({key: values[rnd - 1] for key, values in (per_round or {}).items()})
        rows.append(row)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if summary:
        best = max(accuracies)
        summary_data = {"final_accuracy": final, "best_accuracy": best, "num_rounds": len(rows) - 1}
        (folder / "summary.json").write_text(json.dumps(summary_data))
    return folder


@pytest.fixture()
def sweep(tmp_path: Path) -> Path:
    """2 strategies x 3 seeds, nested at different depths like a Hydra multirun."""
    root = tmp_path / "sweep"
    for strategy, finals in FINALS.items():
        kwargs = {"proximal_mu": 0.1} if strategy == "FedProx" else {}
        for seed, final in zip(SEEDS, finals, strict=True):
            write_run(
                root / strategy / "day1" / str(seed), make_config(strategy, seed, **kwargs), final
            )
    return root


def test_group_runs_two_configurations_three_seeds(sweep: Path) -> None:
    configurations = group_runs(load_runs([sweep]))
    assert [len(c.runs) for c in configurations] == [3, 3]
    assert configurations[0].label == "strategy=FedAvg"
    assert configurations[1].label == "strategy=FedProx"


def test_a_null_key_and_a_missing_key_are_one_configuration(tmp_path: Path) -> None:
    """A run made before a default-null knob existed groups with the runs made after it."""
    for seed in SEEDS:
        config = make_config("FedAvg", seed)
        if seed > 0:
            config["clock"] = {"max_sim_time_s": None}
        write_run(tmp_path / str(seed), config, 0.7)
    write_run(tmp_path / "cut", {**make_config("FedAvg", 0), "clock": {"max_sim_time_s": 9}}, 0.6)
    configurations = group_runs(load_runs([tmp_path]))
    assert sorted(len(c.runs) for c in configurations) == [1, 3]


def test_a_seed_resolved_into_a_group_separates_seeds_not_configurations(tmp_path: Path) -> None:
    """``model.init_seed: ${seed}`` (model=text_scratch) is saved as the run seed: three seeds of
    one configuration, not three configurations; a fixed init_seed that differs still splits."""
    for seed in SEEDS:  # 0, 1, 2; a fixed knob ending in _seed equals the run seed on seed 0 only
        config = make_config("FedAvg", seed)
        config["model"] = {"_target_": "fedsim.learning.models.TextClassifier", "init_seed": seed}
        config["client"]["label_key_seed"] = 0
        write_run(tmp_path / str(seed), config, 0.7)
    fixed = make_config("FedAvg", 0)
    fixed["model"] = {"_target_": "fedsim.learning.models.TextClassifier", "init_seed": 7}
    fixed["client"]["label_key_seed"] = 0
    write_run(tmp_path / "fixed", fixed, 0.6)
    configurations = group_runs(load_runs([tmp_path]))
    assert sorted(len(c.runs) for c in configurations) == [1, 3]


def test_mean_ci_hand_checked_on_five_numbers() -> None:
    # mean 0.84; deviations -0.04 -0.02 0 0.02 0.04, squares sum 0.004, sample variance
    # 0.004 / 4 = 0.001, sd 0.031623; t(0.975, 4) = 2.776; half-width 2.7764 x 0.031623 /
    # sqrt 5 = 0.039264
    mean, half_width = mean_ci([0.80, 0.82, 0.84, 0.86, 0.88])
    assert mean == pytest.approx(0.84)
    assert half_width == pytest.approx(2.7764 * 0.031623 / math.sqrt(5), rel=1e-4)
    assert half_width == pytest.approx(0.039264, abs=1e-6)


@pytest.mark.parametrize(
    ("values", "expected"),
    [([0.7], (0.7, math.nan)), ([], (math.nan, math.nan)), ([0.5, math.nan, 0.5], (0.5, 0.0))],
)
def test_mean_ci_one_value_none_or_nan(values: list[float], expected: tuple[float, float]) -> None:
    assert mean_ci(values) == pytest.approx(expected, nan_ok=True)  # nan values are skipped


# A 3-point curve: rounds end at 1, 3 and 4 s with accuracy 0.5, 0.7, 0.9. Each accuracy holds
# from its round's end to the next; 0 before the first round ends.
@pytest.mark.parametrize(
    ("horizon_s", "expected"),
    [
        (4.0, 0.425),  # (0 x 1 + 0.5 x 2 + 0.7 x 1) / 4 = 1.7 / 4; 0.9 arrives at the horizon
        (3.5, 1.35 / 3.5),  # (0.5 x 2 + 0.7 x 0.5) / 3.5 = 0.3857: the cut is mid-round
        (0.5, 0.0),  # before round 1 ends there is no trained model to score
        (6.0, 3.5 / 6),  # (0.5 x 2 + 0.7 x 1 + 0.9 x 2) / 6: the last accuracy holds on
    ],
)
def test_accuracy_time_auc_hand_checked(horizon_s: float, expected: float) -> None:
    assert accuracy_time_auc([1.0, 3.0, 4.0], [0.5, 0.7, 0.9], horizon_s) == pytest.approx(expected)


def test_duplicate_seed_counts_once_the_later_run_kept(sweep: Path, tmp_path: Path) -> None:
    """A seed run twice in one configuration is one seed: the run written last counts."""
    original = sweep / "FedAvg" / "day1" / "0"
    rerun = write_run(sweep / "FedAvg" / "day2" / "0", make_config("FedAvg", 0), 0.60)
    older = (original / "metrics.jsonl").stat().st_mtime_ns
    os.utime(rerun / "metrics.jsonl", ns=(older + 10**9, older + 10**9))  # 1 s later
    fedavg, _ = group_runs(load_runs([sweep]))
    assert len(fedavg.runs) == 3 and [r.path for r in fedavg.ignored] == [original.resolve()]
    # finals 0.60 (the re-run of seed 0), 0.72, 0.74: mean 0.6867, not the 4-run mean 0.69
    assert summarize(fedavg).final_accuracy[0] == pytest.approx(0.6867, abs=1e-4)
    out = tmp_path / "dup.png"
    assert main([str(sweep), "--out", str(out)]) == 0
    table = out.with_suffix(".md").read_text()
    assert "| strategy=FedAvg | 3 | 0.6867 ± " in table
    assert "1 run(s) repeat a seed of their configuration and are left out" in table
    assert f"{original.resolve()} (seed 0 of strategy=FedAvg)" in table


def test_duplicate_seed_a_finished_run_beats_a_later_crashed_one(sweep: Path) -> None:
    original = sweep / "FedAvg" / "day1" / "0"
    crashed = write_run(
        sweep / "FedAvg" / "day2" / "0", make_config("FedAvg", 0), 0.1, summary=False
    )
    newer = (original / "metrics.jsonl").stat().st_mtime_ns + 10**9
    os.utime(crashed / "metrics.jsonl", ns=(newer, newer))
    fedavg, _ = group_runs(load_runs([sweep]))
    assert [r.path for r in fedavg.ignored] == [crashed.resolve()]
    assert all(run.complete for run in fedavg.runs)


@pytest.mark.parametrize(
    ("band", "expected_last"),
    [
        ("minmax", (0.70, 0.74)),
        ("std", (0.72 - 0.02, 0.72 + 0.02)),
        ("ci95", (0.72 - 2.4841 * 0.02, 0.72 + 2.4841 * 0.02)),  # t(0.975, 2) / sqrt 3 = 2.4841
    ],
)
def test_band_choices(sweep: Path, tmp_path: Path, band: str, expected_last: tuple) -> None:
    fedavg = group_runs(load_runs([sweep]))[0]
    low, high = _band(aggregate_curve(fedavg.runs, "accuracy"), band)
    assert (low[-1], high[-1]) == pytest.approx(expected_last, abs=1e-5)
    out = tmp_path / f"{band}.png"
    assert main([str(sweep), "--out", str(out), "--band", band]) == 0
    assert out.read_bytes()[:8] == PNG_MAGIC


def test_summarize_mean_and_ci95(sweep: Path) -> None:
    fedavg, fedprox = (summarize(c) for c in group_runs(load_runs([sweep])))
    assert fedavg.final_accuracy == pytest.approx((0.72, 2.4841 * 0.02), abs=1e-5)
    assert fedavg.best_accuracy == pytest.approx((0.77, 2.4841 * 0.02), abs=1e-5)
    assert fedprox.final_accuracy == pytest.approx((0.83, 2.4841 * 0.03), abs=1e-5)
    assert fedprox.best_accuracy == pytest.approx((0.88, 2.4841 * 0.03), abs=1e-5)
    assert fedavg.rounds == (3, 3) and fedavg.num_incomplete == 0


def test_aggregate_curve_aligns_rounds_and_cumulates_bytes(sweep: Path) -> None:
    fedavg = group_runs(load_runs([sweep]))[0]
    curve = aggregate_curve(fedavg.runs, "accuracy", "bytes")
    assert curve.rounds.tolist() == [1, 2, 3]  # the warm_start row (round 0) is not a round
    assert curve.x.tolist() == [3e6, 6e6, 9e6]  # cumulative 1 MB up + 2 MB down per round
    assert curve.mean[-1] == pytest.approx(0.72)
    assert (curve.low[-1], curve.high[-1]) == pytest.approx((0.70, 0.74))
    assert curve.std[-1] == pytest.approx(0.02)
    assert curve.ci95[-1] == pytest.approx(2.4841 * 0.02, abs=1e-5)
    assert curve.ci95[0] == 0.0  # round 1 is 0.5 for every seed
    assert curve.num_runs.tolist() == [3, 3, 3]


# Four rounds, each moving 1 MB up + 2 MB down, ending at 60 / 150 / 200 / 260 simulated s.
REACH_ROWS = [
    {"round": r, "accuracy": a, "sim_time_s": t, "bytes_up": 1_000_000, "bytes_down": 2_000_000}
    for r, a, t in [(1, 0.5, 60.0), (2, 0.75, 150.0), (3, 0.72, 200.0), (4, 0.81, 260.0)]
]


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        (0.5, Reach(round=1, sim_time_s=60.0, bytes=3_000_000)),  # >= counts: 0.5 reaches 0.5
        (0.7, Reach(round=2, sim_time_s=150.0, bytes=6_000_000)),  # 2 rounds x 3 MB
        (0.8, Reach(round=4, sim_time_s=260.0, bytes=12_000_000)),  # the dip in round 3 is kept
        (0.9, None),  # never reached
    ],
)
def test_first_reach_first_round_at_or_above_target(target: float, expected: Reach | None) -> None:
    assert first_reach(REACH_ROWS, target) == expected


def test_first_reach_without_sim_time_or_with_missing_accuracy() -> None:
    rows = [{"round": 1, "bytes_up": 5}, {"round": 2, "accuracy": 0.9, "bytes_down": 7}]
    # round 1 has no accuracy (skipped) but its bytes count: 5 + 7 = 12; no fleet -> no sim time
    assert first_reach(rows, 0.8) == Reach(round=2, sim_time_s=None, bytes=12)


# Three seeds against target 0.8 (sim time 60 s per round, 3 MB per round):
#   seed 0: 0.5 0.7  0.85 -> round 3, 180 s, 9 MB
#   seed 1: 0.6 0.82 0.85 -> round 2, 120 s, 6 MB
#   seed 2: 0.5 0.6  0.7  -> never
# over the 2 seeds that reached: rounds mean 2.5, sample std sqrt((0.5² + 0.5²) / 1) = 0.7071,
# 95% CI half-width t(0.975, 1) x 0.7071 / sqrt 2 = 12.706 x 0.5 = 6.353 (two seeds: wide);
# time 150 ± 381.2 s (60 x the rounds); bytes 7.5e6 ± 1.9059e7 (3e6 x the rounds).
# Accuracy AUC to the horizon 180 s (every run ends there), each accuracy held from its round's
# end, 0 before round 1: seed 0 (0.5 x 60 + 0.7 x 60) / 180 = 0.4, seed 1 (0.6 + 0.82) x 60 /
# 180 = 0.4733, seed 2 (0.5 + 0.6) x 60 / 180 = 0.3667 -> mean 0.4133, sample std 0.05457, CI
# 4.3027 x 0.05457 / sqrt 3 = 0.1356.
TARGET_ACCURACIES = {0: (0.5, 0.7, 0.85), 1: (0.6, 0.82, 0.85), 2: (0.5, 0.6, 0.7)}
# Per-round device counters by seed; run totals (sum over 3 rounds), then mean over seeds:
#   stragglers = seed each round -> 0, 3, 6 -> 3.0;  offline 1 each round -> 3, 3, 3 -> 3.0
#   failed: only seed 2, round 1  -> 0, 0, 1 -> 0.333;  infeasible 0 -> 0.0
#   energy 10 J x (seed + 1) each round -> 30, 60, 90 -> 60.0 J
DEVICE_COUNTERS = {
    seed: {
        "num_stragglers": [seed] * 3,
        "num_offline": [1] * 3,
        "num_infeasible": [0] * 3,
        "num_failed": [1 if seed == 2 else 0, 0, 0],
        "energy_j": [10.0 * (seed + 1)] * 3,
    }
    for seed in SEEDS
}


@pytest.fixture()
def device_runs(tmp_path: Path) -> Path:
    root = tmp_path / "device"
    for seed, accuracies in TARGET_ACCURACIES.items():
        write_run(
            root / str(seed),
            make_config("FedAvg", seed),
            accuracies[-1],
            sim_time=True,
            accuracies=accuracies,
            per_round=DEVICE_COUNTERS[seed],
        )
    return root


def test_summarize_target_over_seeds_that_reached(device_runs: Path) -> None:
    (configuration,) = group_runs(load_runs([device_runs]))
    reach = summarize_target(configuration.runs, 0.8)
    assert (reach.num_reached, reach.num_runs) == (2, 3)
    assert reach.rounds == pytest.approx((2.5, 6.3531), abs=1e-4)
    assert reach.sim_time_s == pytest.approx((150.0, 381.186), abs=1e-3)
    assert reach.bytes == pytest.approx((7.5e6, 1.90593e7), rel=1e-4)
    nobody = summarize_target(configuration.runs, 0.95)
    assert nobody.num_reached == 0 and all(math.isnan(v) for v in nobody.rounds)


def test_summarize_totals_sum_rounds_then_mean_seeds(device_runs: Path) -> None:
    (configuration,) = group_runs(load_runs([device_runs]))
    totals = summarize(configuration).totals
    assert totals == pytest.approx(
        {
            "num_stragglers": 3.0,
            "num_offline": 3.0,
            "num_infeasible": 0.0,
            "num_failed": 1 / 3,
            "energy_j": 60.0,
        }
    )


def test_a_warm_starts_bytes_and_energy_count_before_round_1(device_runs: Path) -> None:
    """CyclicFL's stage (two ``phase: warm_start`` rows) moved 4 MB and spent 5 J per cycle:
    the bytes axis, the bytes to a target and the energy total start from its 8 MB and 10 J,
    as the simulated time already did (issue 14 item 7)."""
    stage = [
        {"phase": "warm_start", "round": 0, "cycle": c, "accuracy": 0.4, "sim_time_s": 50.0 * c,
         "bytes_up": 1_000_000, "bytes_down": 3_000_000, "energy_j": 5.0}
        for c in (1, 2)
    ]  # fmt: skip
    metrics = device_runs / "1" / "metrics.jsonl"  # seed 1: 0.6 0.82 0.85, 3 MB a round
    metrics.write_text("".join(json.dumps(r) + "\n" for r in stage) + metrics.read_text())
    runs = {run.seed: run for run in load_runs([device_runs])}
    assert runs[1].stage == {"bytes": 8e6, "energy_j": 10.0}
    assert runs[0].stage == {}  # the fixture's stage row moved nothing and spent nothing
    assert first_reach(runs[1].rows, 0.8, start_bytes=runs[1].stage["bytes"]) == Reach(
        round=2, sim_time_s=120.0, bytes=14_000_000
    )
    (configuration,) = group_runs(list(runs.values()))
    bytes_curve = aggregate_curve([runs[1]], "accuracy", "bytes")
    assert bytes_curve.x.tolist() == [11e6, 14e6, 17e6]
    # seeds' energy 30, 60 + 10, 90 -> mean 63.33 J; reach bytes: seed 0 9 MB, seed 1 14 MB
    assert summarize(configuration).totals["energy_j"] == pytest.approx(190 / 3)
    assert summarize_target(configuration.runs, 0.8).bytes[0] == pytest.approx(11.5e6)


def test_summarize_no_device_counters_no_totals(sweep: Path) -> None:
    assert all(not summarize(c).totals for c in group_runs(load_runs([sweep])))


def test_main_target_and_totals_columns(device_runs: Path, tmp_path: Path) -> None:
    out = tmp_path / "target.png"
    argv = [str(device_runs), "--out", str(out), "--x", "round", "sim_time", "--target", "0.8"]
    assert main(argv) == 0
    header, _, row = out.with_suffix(".md").read_text().splitlines()[:3]
    assert header.endswith(
        "| final sim time | accuracy AUC to 3.0 min | seeds reaching 0.8 | sim time to 0.8 "
        "| rounds to 0.8 | traffic to 0.8 | stragglers | offline | infeasible | failed "
        "| energy (J) |"
    )
    # 150 ± 381.2 s shows in min (>= 2 min): 2.50 ± 6.35; 7.5e6 ± 1.906e7 B -> MB; AUC and
    # totals above
    assert row.endswith(
        "| 3.0 min | 0.4133 ± 0.1356 | 2/3 | 2.50 ± 6.35 min | 2.50 ± 6.35 | 7.50 ± 19.06 MB "
        "| 3.0 | 3.0 | 0.0 | 0.3 | 60.0 |"
    )
    caption = out.with_suffix(".md").read_text()
    assert "first round with accuracy ≥ 0.8" in caption and "sum over a run's rounds" in caption
    assert "the shortest run's end" in caption


def test_main_target_without_device_fleet_has_no_sim_time(sweep: Path, tmp_path: Path) -> None:
    out = tmp_path / "target.png"
    assert main([str(sweep), "--out", str(out), "--target", "0.76"]) == 0
    table = out.with_suffix(".md").read_text()
    assert "sim time to" not in table and "stragglers" not in table
    # round 2 peaks at final + 0.05: FedAvg 0.75 0.77 0.79 -> 2 of 3 seeds reach 0.76 there;
    # FedProx 0.85 0.88 0.91 -> all 3. Both after 2 rounds x 3 MB = 6 MB (3 significant digits).
    assert "| 2/3 | 2.00 ± 0.00 | 6.00 ± 0.00 MB |" in table
    assert "| 3/3 | 2.00 ± 0.00 | 6.00 ± 0.00 MB |" in table


def test_main_target_nobody_reached_shows_dashes(device_runs: Path, tmp_path: Path) -> None:
    out = tmp_path / "target.png"
    assert main([str(device_runs), "--out", str(out), "--target", "0.95"]) == 0
    row = out.with_suffix(".md").read_text().splitlines()[2]
    assert "| 0/3 | – | – | – |" in row  # sim time, rounds, traffic


@pytest.mark.parametrize(
    ("configs", "expected"),
    [
        # different classes: the class names tell them apart, their knobs are left out
        (
            [
                {"strategy._target_": "a.FedAvg"},
                {"strategy._target_": "a.FedProx", "strategy.proximal_mu": 0.1},
            ],
            ["strategy=FedAvg", "strategy=FedProx"],
        ),
        # ... unless a knob also separates two configs of one class
        (
            [
                {"strategy._target_": "a.FedAvg", "strategy.fraction_train": 0.2},
                {"strategy._target_": "a.FedProx", "strategy.proximal_mu": 0.1},
                {"strategy._target_": "a.FedProx", "strategy.proximal_mu": 1.0},
            ],
            [
                "strategy=FedAvg",
                "strategy=FedProx, proximal_mu=0.1",
                "strategy=FedProx, proximal_mu=1",
            ],
        ),
        # same class: only the differing kwarg is named, the class is left out
        (
            [
                {"strategy._target_": "a.FedProx", "strategy.proximal_mu": 0.1},
                {"strategy._target_": "a.FedProx", "strategy.proximal_mu": 1.0},
            ],
            ["proximal_mu=0.1", "proximal_mu=1"],
        ),
        # two differing keys share a last part: the full dotted key disambiguates
        (
            [
                {"data.alpha": 0.1, "partition.alpha": 0.5},
                {"data.alpha": 1.0, "partition.alpha": 5.0},
            ],
            ["data.alpha=0.1, partition.alpha=0.5", "data.alpha=1, partition.alpha=5"],
        ),
        # a key set to null is the same as a missing one (a knob added later, default null)
        ([{"x": 1, "clock.max_sim_time_s": None}, {"x": 2}], ["x=1", "x=2"]),
        # None is spelled as in YAML and Hydra overrides
        (
            [{"clock.deadline_s": None}, {"clock.deadline_s": 0.3}],
            ["deadline_s=null", "deadline_s=0.3"],
        ),
        # a config whose label would be empty shows the key as unset
        ([{"x": 1}, {"x": 1, "extra": 2}], ["extra=unset", "extra=2"]),
        # a single configuration is named by its strategy class
        ([{"strategy._target_": "flwr.serverapp.strategy.FedAvg"}], ["FedAvg"]),
    ],
)
def test_label_configurations_names_differences(
    configs: list[dict[str, Any]], expected: list[str]
) -> None:
    assert label_configurations(configs) == expected


def test_main_writes_png_and_table(sweep: Path, tmp_path: Path, capsys: Any) -> None:
    out = tmp_path / "figs" / "new" / "sweep.png"  # parent folders do not exist yet
    assert main([str(sweep), "--out", str(out), "--title", "test sweep"]) == 0
    header = out.read_bytes()[:8]
    assert header == PNG_MAGIC and out.stat().st_size > 1000
    table = out.with_suffix(".md").read_text()
    # seeds, final accuracy ± 95% CI, rank, paired t-test p against the best, best accuracy
    assert "| strategy=FedAvg | 3 | 0.7200 ± 0.0497 | 2 | 0.003 | 0.7700 ± 0.0497 | 3 |" in table
    assert "| strategy=FedProx | 3 | 0.8300 ± 0.0745 | 1 | best | 0.8800 ± 0.0745 | 3 |" in table
    captured = capsys.readouterr()
    assert "0.8300 ± 0.0745" in captured.out and f"wrote {out}" in captured.out
    # 3 seeds each: a warning, in the table file and on stderr
    warning = "fewer than 5 seeds in strategy=FedAvg (3), strategy=FedProx (3)"
    assert warning in table and warning in captured.err


def test_labels_rename_configurations_in_legend_and_table(
    sweep: Path, tmp_path: Path, capsys: Any
) -> None:
    out = tmp_path / "renamed.png"
    args = [str(sweep), "--out", str(out), "--labels", "strategy=FedAvg=FedAvg (baseline)",
            "strategy=FedProx=FedProx, mu=0.1"]  # fmt: skip
    assert main(args) == 0
    table = out.with_suffix(".md").read_text()
    assert "| FedAvg (baseline) | 3 | 0.7200 ± 0.0497 | 2 |" in table
    assert "| FedProx, mu=0.1 | 3 | 0.8300 ± 0.0745 | 1 |" in table
    assert "strategy=FedAvg" not in table  # the warning names the new labels too
    capsys.readouterr()
    assert main([str(sweep), "--out", str(out), "--labels", "strategy=FedAvgg=x"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--labels=strategy=FedAvgg=x: names no configuration" in err
    assert "strategy=FedAvg; strategy=FedProx" in err


def test_paper_style_is_one_column_untitled_with_a_vector_copy(
    sweep: Path, tmp_path: Path, capsys: Any
) -> None:
    from matplotlib.image import imread

    out = tmp_path / "paper.png"
    assert main([str(sweep), "--out", str(out), "--x", "round", "bytes", "--style", "paper"]) == 0
    assert f"wrote {out.with_suffix('.pdf')}" in capsys.readouterr().out
    assert out.with_suffix(".pdf").read_bytes()[:5] == b"%PDF-"
    height, width = imread(out).shape[:2]
    assert width == round(3.3 * 150)  # one column of a two-column paper, at the PNG's 150 dpi
    assert height > width  # the two panels stacked
    screen = tmp_path / "screen.png"
    assert main([str(sweep), "--out", str(screen), "--x", "round", "bytes"]) == 0
    assert imread(screen).shape[1] > 2 * width and not screen.with_suffix(".pdf").exists()


def test_main_incomplete_run_and_sim_time(tmp_path: Path) -> None:
    # seed 1 crashed before summary.json: final/best come from metrics.jsonl, flagged incomplete
    for seed, final in zip(SEEDS, FINALS["FedAvg"], strict=True):
        write_run(
            tmp_path / "runs" / str(seed),
            make_config("FedAvg", seed),
            final,
            summary=seed != 1,
            sim_time=True,
        )
    with (tmp_path / "runs" / "1" / "metrics.jsonl").open("a") as metrics:
        metrics.write('{"round": 4, "accur')  # killed mid-write: the partial line is dropped
    out = tmp_path / "sim.png"
    assert main([str(tmp_path / "runs"), "--out", str(out), "--x", "round", "sim_time"]) == 0
    table = out.with_suffix(".md").read_text()
    # single configuration -> labelled by class; sim_time 180 s -> shown as 3.0 min
    assert (
        "| FedAvg | 3 (1 incomplete) | 0.7200 ± 0.0497 | 1 | best | 0.7700 ± 0.0497 | 3 | 3.0 min |"
        in table
    )


def test_console_script_subprocess(sweep: Path, tmp_path: Path) -> None:
    script = Path(sys.executable).parent / "fedsim-plot"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "fedsim.scripts.plot"]
    out = tmp_path / "cli.png"
    done = subprocess.run(
        [*command, str(sweep), "--out", str(out)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    assert out.read_bytes()[:8] == PNG_MAGIC
    assert "strategy=FedProx" in done.stdout


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--x", "sim_time"], "run with a device fleet"),
        (["--metric", "perplexity"], "--metric=perplexity: must be one of: accuracy, bytes_down"),
        (["--latency"], "clients.jsonl=missing"),
        (["--out", "x.txt"], "--out=x.txt: must end in"),
        (["--target", "80"], "--target=80.0: must be an accuracy in (0, 1]"),
        (["--target", "nan"], "--target=nan: must be an accuracy in (0, 1]"),
        (["--latency", "--target", "0.8"], "applies to learning curves, not --latency"),
    ],
)
def test_main_bad_input_exits_2_with_one_line(
    sweep: Path, tmp_path: Path, capsys: Any, extra: list[str], message: str
) -> None:
    assert main([str(sweep), "--out", str(tmp_path / "x.png"), *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
    assert not (tmp_path / "x.png").exists()


def test_main_bad_argument_exits_2_with_one_line(sweep: Path, tmp_path: Path, capsys: Any) -> None:
    with pytest.raises(SystemExit) as caught:
        main([str(sweep), "--out", str(tmp_path / "x.png"), "--x", "epochs"])
    err = capsys.readouterr().err
    assert caught.value.code == 2
    assert err.count("\n") == 1 and "invalid choice: 'epochs'" in err


def test_main_no_runs_names_the_dirs(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    done = subprocess.run(
        [sys.executable, "-m", "fedsim.scripts.plot", str(empty), "--out", str(tmp_path / "x.png")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and str(empty) in done.stderr
    assert "holds no run folder" in done.stderr


def test_latency_plot_from_clients_jsonl(sweep: Path, tmp_path: Path) -> None:
    run = sweep / "FedAvg" / "day1" / "0"
    # low: latencies 10, 20, 30 (+1 offline, no latency); high: 1, 2 -> low (slower) comes first
    rows = [
        {
            "tier": "high",
            "latency_s": 1.0,
            "download_s": 0.2,
            "compute_s": 0.6,
            "upload_s": 0.2,
            "outcome": "ok",
        },
        {
            "tier": "high",
            "latency_s": 2.0,
            "download_s": 0.4,
            "compute_s": 1.2,
            "upload_s": 0.4,
            "outcome": "ok",
        },
        {
            "tier": "low",
            "latency_s": 10.0,
            "download_s": 2.0,
            "compute_s": 6.0,
            "upload_s": 2.0,
            "outcome": "ok",
        },
        {
            "tier": "low",
            "latency_s": 20.0,
            "download_s": 4.0,
            "compute_s": 12.0,
            "upload_s": 4.0,
            "outcome": "ok",
        },
        {
            "tier": "low",
            "latency_s": 30.0,
            "download_s": 6.0,
            "compute_s": 18.0,
            "upload_s": 6.0,
            "outcome": "straggler",
        },
        {"tier": "low", "latency_s": None, "outcome": "offline"},
        {"tier": "high", "latency_s": None, "outcome": "failed"},
    ]
    common = {
        "round": 1,
        "partition_id": 0,
        "train_flops": 1e9,
        "bytes_up": 1,
        "bytes_down": 1,
        "energy_j": 1.0,
    }
    (run / "clients.jsonl").write_text("".join(json.dumps({**common, **r}) + "\n" for r in rows))

    low, high = tier_stats(load_client_rows(load_runs([sweep])))
    assert (low.tier, high.tier) == ("low", "high")
    assert low.num_rows == 4 and low.latency_s.tolist() == [10.0, 20.0, 30.0]
    assert low.mean_parts_s["compute_s"] == pytest.approx(12.0)  # (6 + 12 + 18) / 3
    assert low.outcomes == {"ok": 2, "straggler": 1, "offline": 1, "infeasible": 0, "failed": 0}
    assert high.num_rows == 3 and high.outcomes["failed"] == 1
    assert OUTCOMES[-1] == "failed"

    out = tmp_path / "latency.png"
    assert main([str(sweep), "--latency", "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == PNG_MAGIC and out.stat().st_size > 1000
    table = out.with_suffix(".md").read_text()
    # Three significant digits. low: median 20; p90 of 10, 20, 30 interpolates
    # 20 + 0.8 * (30 - 20) = 28. high: median 1.5, p90 1 + 0.9 * (2 - 1) = 1.9, parts (0.2 + 0.4)
    # / 2 = 0.3, (0.6 + 1.2) / 2 = 0.9. Outcome columns: ok, straggler, offline, infeasible, failed.
    assert "| low | 4 | 20.0 | 28.0 | 4.00 | 12.0 | 4.00 | 2 | 1 | 1 | 0 | 0 |" in table
    assert "| high | 3 | 1.50 | 1.90 | 0.300 | 0.900 | 0.300 | 2 | 0 | 0 | 0 | 1 |" in table


# --- figures as saved: what a spy on _save sees --------------------------------------------------
def saved_figures(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Spy on ``_save`` (fedsim-plot's and fedsim-compare's): the figures written, in order."""
    import fedsim.scripts.compare as compare_module
    import fedsim.scripts.plot as plot_module

    figures: list[Any] = []
    save = plot_module._save

    def spy(fig: Any, out: Path, style: str = "screen") -> list[Path]:
        written = save(fig, out, style)
        figures.append(fig)
        return written

    monkeypatch.setattr(plot_module, "_save", spy)
    monkeypatch.setattr(compare_module, "_save", spy)
    return figures


def overflow_in(fig: Any, dpi: float = 150) -> float:
    """How far (inches) anything drawn at ``dpi`` (the PNGs') sticks out of the figure; 0 if
    nothing does."""
    fig.set_dpi(dpi)
    fig.canvas.draw()  # the layout as savefig made it
    box = fig.get_tightbbox(fig.canvas.get_renderer())
    width, height = fig.get_size_inches()
    return max(0.0, -box.x0, -box.y0, box.x1 - width, box.y1 - height)


# --- --metric in the table (issue: the table showed accuracy only) -------------------------------
def test_metric_other_than_accuracy_gets_a_final_column(sweep: Path, tmp_path: Path) -> None:
    """``--metric loss``: the table adds the final loss, mean ± 95% CI over seeds (the accuracy
    columns unchanged), and the caption says what it is."""
    # write_run: loss = 1 - accuracy each round, so FedAvg's final losses are 0.30 0.28 0.26:
    # mean 0.28, sd 0.02, CI 2.4841 x 0.02 = 0.0497. FedProx seed 0's summary.json says its final
    # loss is 0.23 (not its last row's 0.20): the summary wins, as for accuracy -> 0.23 0.17 0.14,
    # mean 0.18, sd sqrt((0.05² + 0.01² + 0.04²) / 2) = 0.045826, CI 2.4841 x 0.045826 = 0.1138.
    summary_path = sweep / "FedProx" / "day1" / "0" / "summary.json"
    summary_path.write_text(
        json.dumps({**json.loads(summary_path.read_text()), "final_loss": 0.23})
    )
    assert mean_ci([0.23, 0.17, 0.14]) == pytest.approx((0.18, 0.1138), abs=5e-5)
    out = tmp_path / "loss.png"
    assert main([str(sweep), "--out", str(out), "--metric", "loss"]) == 0
    text = out.with_suffix(".md").read_text()
    header, _, fedavg, fedprox = text.splitlines()[:4]
    assert header == (
        "| configuration | seeds | final loss | final accuracy | rank | p vs best | best accuracy "
        "| rounds |"
    )
    # the final loss, then the accuracy columns as without --metric
    assert fedavg == (
        "| strategy=FedAvg | 3 | 0.2800 ± 0.0497 | 0.7200 ± 0.0497 | 2 | 0.003 "
        "| 0.7700 ± 0.0497 | 3 |"
    )
    assert fedprox == (
        "| strategy=FedProx | 3 | 0.1800 ± 0.1138 | 0.8300 ± 0.0745 | 1 | best "
        "| 0.8800 ± 0.0745 | 3 |"
    )
    assert (
        "Final loss, accuracy, AUC and cost to the target: mean over seeds ± the half-width" in text
    )
    assert "Final loss (--metric loss): a run's loss after its last round" in text
    default = tmp_path / "accuracy.png"
    assert main([str(sweep), "--out", str(default)]) == 0
    assert "final loss" not in default.with_suffix(".md").read_text().lower()


# --- the deadline on latency plots ----------------------------------------------------------------
LATENCY_ROWS = [  # latency_s, tier; with a 25 s deadline the 30 s client-round is a straggler
    (10.0, "low", "ok"), (20.0, "low", "ok"), (30.0, "low", "straggler"), (2.0, "high", "ok"),
]  # fmt: skip


def write_fleet_run(folder: Path, seed: int, deadline_s: float | None) -> None:
    config = {**make_config("FedAvg", seed), "clock": {"deadline_s": deadline_s}}
    run = write_run(folder, config, 0.7, sim_time=True)
    rows = [
        {"round": 1, "partition_id": i, "tier": tier, "outcome": outcome, "latency_s": latency,
         "download_s": 0.1 * latency, "compute_s": 0.8 * latency, "upload_s": 0.1 * latency}
        for i, (latency, tier, outcome) in enumerate(LATENCY_ROWS)
    ]  # fmt: skip
    (run / "clients.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))


def test_latency_plot_draws_each_deadline_as_a_labelled_dashed_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """clock.deadline_s of the runs: one dashed line per distinct deadline on the box panel,
    named in its legend and in the caption; a run with deadline null draws none."""
    for seed, deadline in enumerate([25.0, 25.0, 40.0, None]):
        write_fleet_run(tmp_path / "fleet" / str(seed), seed, deadline)
    figures = saved_figures(monkeypatch)
    out = tmp_path / "latency.png"
    assert main([str(tmp_path / "fleet"), "--latency", "--out", str(out)]) == 0
    box_ax = figures[0].axes[0]
    dashed = [line for line in box_ax.get_lines() if line.get_linestyle() == "--"]
    assert sorted(float(line.get_ydata()[0]) for line in dashed) == [25.0, 40.0]
    assert box_ax.get_ylim()[1] > 40.0  # the highest deadline is in view
    legend = [text.get_text() for text in box_ax.get_legend().get_texts()]
    assert legend == ["deadline 25 s (2 of 4 runs)", "deadline 40 s (1 of 4 runs)"]
    text = out.with_suffix(".md").read_text()
    assert (
        "Pooled over all client-rounds of all runs. Dashed on the latency panel: the round "
        "deadline (clock.deadline_s), 25 s (2 runs), 40 s (1 run); 1 run has none; a "
        "client-round slower than its run's deadline is a straggler, its update dropped."
    ) in text
    # every run without a deadline: no line, no legend, the caption as before
    for seed in range(4):
        config_path = tmp_path / "fleet" / str(seed) / "config.yaml"
        config = yaml.safe_load(config_path.read_text())
        config_path.write_text(yaml.safe_dump({**config, "clock": {"deadline_s": None}}))
    assert main([str(tmp_path / "fleet"), "--latency", "--out", str(out)]) == 0
    box_ax = figures[1].axes[0]
    assert not [line for line in box_ax.get_lines() if line.get_linestyle() == "--"]
    assert box_ax.get_legend() is None
    assert (
        "Pooled over all client-rounds of all runs. Figure:" in out.with_suffix(".md").read_text()
    )


# --- long labels stay inside the figure -----------------------------------------------------------
# Five knobs of one sweep differ between configurations: every label is about 100 characters,
# three of them side by side are wider than the figure.
LONG_KNOBS = {
    ("partition", "alpha"): (0.1, 1.0),
    ("client", "local_epochs"): (1, 5),
    ("data", "test_fraction"): (0.2, 0.25),
    ("model", "hidden_size"): (128, 256),
    ("devices", "server_gflops"): (10000.0, 20000.0),
}


def write_long_label_runs(root: Path, strategies: Sequence[str], sim_time: bool = True) -> Path:
    job = 0
    for strategy in strategies:
        for setting in range(2):
            for seed in range(2):
                config = make_config(strategy, seed)
                for (group, key), values in LONG_KNOBS.items():
                    config[group][key] = values[setting]
                write_run(root / str(job), config, 0.6 + 0.1 * setting, sim_time=sim_time)
                job += 1
    return root


def test_paper_style_wraps_long_labels_inside_the_column(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--style paper keeps its 3.3 in column: a legend of long labels wraps, the figure grows
    taller, nothing is cut at the edges."""
    from matplotlib.image import imread

    runs = write_long_label_runs(tmp_path / "runs", ["FedAvg"])
    figures = saved_figures(monkeypatch)
    out = tmp_path / "paper.png"
    assert main([str(runs), "--out", str(out), "--x", "round", "--style", "paper"]) == 0
    assert imread(out).shape[1] == round(3.3 * 150)
    (fig,) = figures
    assert overflow_in(fig) == 0.0
    labels = [text.get_text() for text in fig.legends[0].get_texts()]
    assert all("\n" in label for label in labels)  # wrapped, not cut
    assert " ".join(labels[0].split()) == (  # config.yaml's order: groups alphabetically
        "local_epochs=1, test_fraction=0.2, server_gflops=10000, hidden_size=128, alpha=0.1 (n=2)"
    )


# --- list-valued keys in labels -------------------------------------------------------------------
@pytest.mark.parametrize(
    ("configs", "expected"),
    [
        # the list alone tells two HeteroFL runs apart: shown compactly
        (
            [{"strategy.widths": "[1.0, 0.5, 0.25]"}, {"strategy.widths": "[1.0, 0.5]"}],
            ["widths=1/0.5/0.25", "widths=1/0.5"],
        ),
        # another differing key tells them apart: the list is left out
        (
            [
                {"strategy.widths": "[1.0, 0.5, 0.25]", "strategy.latency_budget_s": 0.1},
                {"strategy.widths": "[1.0, 0.5]", "strategy.latency_budget_s": 0.2},
            ],
            ["latency_budget_s=0.1", "latency_budget_s=0.2"],
        ),
        # ... but only where it does: two configs share alpha, the list separates them
        (
            [
                {"partition.alpha": 0.1, "strategy.widths": "[1.0, 0.5]"},
                {"partition.alpha": 0.1, "strategy.widths": "[1.0]"},
                {"partition.alpha": 1.0, "strategy.widths": "[1.0]"},
            ],
            ["alpha=0.1, widths=1/0.5", "alpha=0.1, widths=1", "alpha=1, widths=1"],
        ),
        # a list of mappings (a fleet's profiles) by their names
        (
            [
                {"devices.profiles": '[{"name": "low_end_phone", "memory_gb": 2.0}]'},
                {"devices.profiles": '[{"name": "low_end_phone"}, {"name": "high_end_phone"}]'},
            ],
            ["profiles=low_end_phone", "profiles=low_end_phone/high_end_phone"],
        ),
        # ... unless two fleets would then read the same: as stored
        (
            [
                {"devices.profiles": '[{"name": "phone", "memory_gb": 2.0}]'},
                {"devices.profiles": '[{"name": "phone", "memory_gb": 4.0}]'},
            ],
            [
                'profiles=[{"name": "phone", "memory_gb": 2.0}]',
                'profiles=[{"name": "phone", "memory_gb": 4.0}]',
            ],
        ),
    ],
)
def test_label_configurations_lists_compact_or_left_out(
    configs: list[dict[str, Any]], expected: list[str]
) -> None:
    assert label_configurations(configs) == expected


def test_list_valued_knobs_stay_out_of_legends_and_tables(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """HeteroFL's strategy.widths (a list, stored as JSON): left out where latency_budget_s tells
    the configurations apart, shown as widths=1/0.5/0.25 where it alone does."""
    apart = tmp_path / "apart"
    for job, (widths, budget) in enumerate([([1.0, 0.5, 0.25], 0.1), ([1.0, 0.5], 0.2)] * 2):
        config = make_config("HeteroFL", job // 2, widths=widths, latency_budget_s=budget)
        write_run(apart / str(job), config, 0.7)
    figures = saved_figures(monkeypatch)
    out = tmp_path / "apart.png"
    assert main([str(apart), "--out", str(out)]) == 0
    table = out.with_suffix(".md").read_text()
    assert "| latency_budget_s=0.1 | 2 |" in table and "| latency_budget_s=0.2 | 2 |" in table
    assert "widths" not in table
    legend = [text.get_text() for text in figures[0].legends[0].get_texts()]
    assert legend == ["latency_budget_s=0.1 (n=2)", "latency_budget_s=0.2 (n=2)"]

    only = tmp_path / "only"
    for job, widths in enumerate([[1.0, 0.5, 0.25], [1.0, 0.5], [1.0, 0.5, 0.25], [1.0, 0.5]]):
        write_run(only / str(job), make_config("HeteroFL", job // 2, widths=widths), 0.7)
    out = tmp_path / "only.png"
    assert main([str(only), "--out", str(out)]) == 0
    table = out.with_suffix(".md").read_text()
    assert "| widths=1/0.5 | 2 |" in table and "| widths=1/0.5/0.25 | 2 |" in table
    assert "[" not in table.split("\n\n")[0]  # no JSON in the table
    legend = [text.get_text() for text in figures[1].legends[0].get_texts()]
    assert legend == ["widths=1/0.5 (n=2)", "widths=1/0.5/0.25 (n=2)"]


def test_every_outcome_has_its_own_colour() -> None:
    """The clients plot colours each outcome (fedsim.keys.Outcome) apart; none falls back to
    matplotlib's cycle, which could give an interrupted phone the colour of another outcome."""
    from fedsim.keys import Outcome
    from fedsim.scripts.plot import OUTCOME_COLORS

    assert set(OUTCOME_COLORS) == set(Outcome)
    assert len(set(OUTCOME_COLORS.values())) == len(Outcome)
