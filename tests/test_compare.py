"""fedsim-compare, the per-client evaluation it reads, and the Optuna sweeper.

Hand-checked numbers on run folders written here (fast), then a real ``fedsim --multirun`` sweep
(slow) whose report is checked against its summaries and client_eval.jsonl files.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from test_plot import make_config, overflow_in, saved_figures, write_long_label_runs, write_run

from fedsim.learning.evaluation import evaluate_clients, sample_eval_clients
from fedsim.scripts.compare import main
from fedsim.scripts.fairness import rank_within, target_default, worst_share_mean
from fedsim.scripts.runs import group_runs, load_runs
from fedsim.scripts.stats import paired_test, tied_ranks

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FEDSIM = [sys.executable, "-m", "fedsim"]
COMPARE = [sys.executable, "-m", "fedsim.scripts.compare"]


# --- per-client evaluation ------------------------------------------------------------------------
class Identity(torch.nn.Module):
    """Logits = the input itself: predictions and losses can be worked out by hand."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


CLIENT_DATA = {
    # predictions argmax: 0, 1, 0 -> 2 of 3 right
    0: {"x": torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 0.0]]), "label": torch.tensor([0, 1, 1])},
    1: {"x": torch.zeros(0, 2), "label": torch.zeros(0, dtype=torch.long)},  # no local data
    2: {"x": torch.tensor([[0.0, 3.0]]), "label": torch.tensor([1])},
}


def test_evaluate_clients_hand_checked() -> None:
    rows = evaluate_clients(Identity(), CLIENT_DATA.__getitem__, [2, 0, 1], batch_size=2)
    assert [r["partition_id"] for r in rows] == [2, 0, 1]  # the order asked for
    assert [r["num_examples"] for r in rows] == [1, 3, 0]
    assert rows[0]["accuracy"] == 1.0
    assert rows[0]["loss"] == pytest.approx(math.log(1 + math.exp(-3)))  # 0.0486
    assert rows[1]["accuracy"] == pytest.approx(2 / 3)
    # cross-entropy of two logits = log(1 + e^(other - true)): (log(1+e^-2) + log(1+e^-1)
    # + log(1+e^1)) / 3 = (0.1269 + 0.3133 + 1.3133) / 3 = 0.5845
    expected = (math.log(1 + math.e**-2) + math.log(1 + math.e**-1) + math.log(1 + math.e)) / 3
    assert rows[1]["loss"] == pytest.approx(expected)
    assert rows[2]["accuracy"] is None and rows[2]["loss"] is None


@pytest.mark.parametrize(
    ("num_final", "expected_size"), [("all", 10), (10, 10), (25, 10), (3, 3), (0, 0)]
)
def test_sample_eval_clients_all_or_a_seeded_sample(num_final: Any, expected_size: int) -> None:
    pids = sample_eval_clients(10, num_final, seed=7)
    assert len(pids) == len(set(pids)) == expected_size
    assert pids == sorted(pids) and all(0 <= p < 10 for p in pids)
    assert pids == sample_eval_clients(10, num_final, seed=7)  # a function of the seed


def test_sample_eval_clients_depends_on_seed() -> None:
    samples = {tuple(sample_eval_clients(1000, 5, seed=s)) for s in range(5)}
    assert len(samples) == 5


# --- fairness and ranking helpers -----------------------------------------------------------------
@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([0.9, 0.1, 0.5], 0.1),  # ceil(0.3) = 1 client: the lowest
        ([0.1 * i for i in range(1, 21)], 0.15),  # 20 clients -> worst 2: (0.1 + 0.2) / 2
        ([0.1 * i for i in range(1, 31)], 0.2),  # 30 clients -> worst 3 (not 4): 0.6 / 3
        ([0.1 * i for i in range(1, 12)], 0.15),  # 11 clients -> ceil(1.1) = 2: (0.1 + 0.2) / 2
    ],
)
def test_worst_share_mean(values: list[float], expected: float) -> None:
    assert worst_share_mean(values) == pytest.approx(expected)


def test_rank_within_groups_ties_and_nan() -> None:
    values = [0.8, 0.9, 0.9, 0.5, math.nan, 0.7]
    groups = ["a", "a", "a", "b", "b", "b"]
    # a: 0.9 and 0.9 share rank 1, 0.8 comes 3rd; b: 0.7 first, 0.5 second, nan last
    assert rank_within(values, groups) == [3, 1, 1, 2, 3, 1]


def test_paired_test_hand_checked() -> None:
    # Paired on seeds 0-2 (seed 3 is in one config only): a - b = 0.10 0.11 0.12, mean 0.11, sd
    # 0.01, t = 0.11 / (0.01 / sqrt 3) = 19.053; with 2 degrees of freedom the t distribution
    # has a closed form: two-sided p = 1 - t / sqrt(t² + 2) = 1 - 19.053 / 19.105 = 0.00274.
    a = {0: 0.80, 1: 0.83, 2: 0.86, 3: 0.99}
    b = {0: 0.70, 1: 0.72, 2: 0.74}
    test = paired_test(a, b)
    t = 0.11 / (0.01 / math.sqrt(3))
    assert test.num_pairs == 3 and test.mean_difference == pytest.approx(0.11)
    assert test.t_p == pytest.approx(1 - t / math.sqrt(t**2 + 2), rel=1e-6)
    assert test.a_better and not paired_test(b, a).a_better
    assert math.isnan(test.wilcoxon_p)  # 3 pairs: its smallest p, 2 / 2³ = 0.25, can't reach 0.05
    # 6 pairs all in a's favour: the exact Wilcoxon p is 2 / 2⁶ = 0.03125
    six = paired_test({s: 1.0 + s for s in range(6)}, {s: 0.5 * s for s in range(6)})
    assert six.wilcoxon_p == pytest.approx(0.03125)


@pytest.mark.parametrize(
    ("by_seed", "expected"),
    [
        # one clearly better, two within noise of each other
        (
            [{0: 0.9, 1: 0.91, 2: 0.92}, {0: 0.8, 1: 0.82, 2: 0.81}, {0: 0.81, 1: 0.80, 2: 0.82}],
            ["1", "2=", "2="],
        ),
        # noise only: all share rank 1
        ([{0: 0.8, 1: 0.9}, {0: 0.9, 1: 0.8}, {0: 0.85, 1: 0.84}], ["1=", "1=", "1="]),
        # one seed each: no test can separate them
        ([{0: 0.9}, {0: 0.5}], ["1=", "1="]),
        # no shared seeds: nothing to pair
        ([{0: 0.9, 1: 0.91}, {2: 0.5, 3: 0.51}], ["1=", "1="]),
        # a configuration without a finite value gets no rank
        ([{0: 0.9, 1: 0.92}, {0: math.nan, 1: math.nan}], ["1", "–"]),
    ],
)
def test_tied_ranks(by_seed: list[dict[int, float]], expected: list[str]) -> None:
    assert [str(rank) for rank in tied_ranks(by_seed)] == expected


def test_target_default_rounds_down_from_the_best_mean() -> None:
    assert target_default([0.5, 0.83, math.nan], 0.9) == pytest.approx(0.74)  # 0.747 -> 0.74
    assert target_default([0.5, 0.8], 0.9) == pytest.approx(0.72)  # exact: not 0.71


# --- the report on hand-written run folders ----------------------------------------------------
# 2 strategies x 2 alphas x 2 seeds. Final accuracy per seed (round 2 = final + 0.05, round 1 0.5):
#   alpha 0.1: FedAvg 0.60 0.64 -> 0.62 ± 0.0283 (sqrt(2 * 0.02² / 1)); FedProx 0.70 0.74 -> 0.72
#   alpha 1.0: FedAvg 0.90 0.94 -> 0.92;                                  FedProx 0.80 0.84 -> 0.82
# so FedProx ranks 1 at alpha 0.1 and FedAvg ranks 1 at alpha 1.0.
FINALS = {
    ("FedAvg", 0.1): (0.60, 0.64),
    ("FedProx", 0.1): (0.70, 0.74),
    ("FedAvg", 1.0): (0.90, 0.94),
    ("FedProx", 1.0): (0.80, 0.84),
}
# Client accuracies of every run: 10 clients, worst 10% = the lowest one.
CLIENT_ACCURACIES = [0.2, 0.4, 0.6, 0.8, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
# mean 0.8; population std sqrt(mean of squares 0.72 - 0.64) = sqrt(0.08) = 0.2828; worst 0.2


def write_client_eval(run: Path, accuracies: list[float | None]) -> None:
    rows = [
        {"round": 3, "partition_id": pid, "num_examples": 0 if acc is None else 10,
         "accuracy": acc, "loss": None if acc is None else 1.0 - acc}
        for pid, acc in enumerate(accuracies)
    ]  # fmt: skip
    (run / "client_eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture()
def grid_sweep(tmp_path: Path) -> Path:
    root = tmp_path / "sweep"
    job = 0
    for (strategy, alpha), finals in FINALS.items():
        kwargs = {"proximal_mu": 0.1} if strategy == "FedProx" else {}
        for seed, final in enumerate(finals):
            config = make_config(strategy, seed, **kwargs)
            config["partition"]["alpha"] = alpha
            run = write_run(root / str(job), config, final, sim_time=True)
            write_client_eval(run, [*CLIENT_ACCURACIES, None])  # + a client without data
            job += 1
    return root


def table_rows(report: str, heading: str) -> list[dict[str, str]]:
    """The first markdown table after the ``## heading`` line, as dicts keyed by column name."""
    section = report.split(f"## {heading}", 1)[1].splitlines()
    start = next(i for i, line in enumerate(section) if line.startswith("|"))
    end = next((i for i in range(start, len(section)) if not section[i].startswith("|")), None)
    lines = section[start:end]

    def cells(line: str) -> list[str]:
        return [cell.strip() for cell in line.strip("|").split("|")]

    return [dict(zip(cells(lines[0]), cells(line), strict=True)) for line in lines[2:]]


def test_report_ranks_methods_within_settings(grid_sweep: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    assert main([str(grid_sweep), "--out", str(out), "--target", "0.7"]) == 0
    report = (out / "report.md").read_text()
    assert "8 runs in 4 configurations (2 method(s) x 2 settings), seeds 0, 1" in report
    rows = table_rows(report, "Final accuracy and per-client accuracy")
    got = {(r["setting"], r["method"]): r for r in rows}
    assert list(got) == [  # by setting, then rank
        ("alpha=0.1", "strategy=FedProx"),
        ("alpha=0.1", "strategy=FedAvg"),
        ("alpha=1", "strategy=FedAvg"),
        ("alpha=1", "strategy=FedProx"),
    ]
    fedavg_low = got[("alpha=0.1", "strategy=FedAvg")]
    # 0.60 0.64: sd 0.0283, 95% CI t(0.975, 1) x 0.0283 / sqrt 2 = 12.706 x 0.02 = 0.2541
    assert fedavg_low["final accuracy"] == "0.6200 ± 0.2541"
    # paired by seed FedProx - FedAvg = 0.10 0.10: no spread, so the t-test's p is 0 (its limit)
    assert fedavg_low["rank"] == "2" and fedavg_low["seeds"] == "2"
    assert fedavg_low["p vs best (paired t)"] == "< 0.001"
    assert fedavg_low["p vs best (Wilcoxon)"] == "–"  # 2 seeds: fewer than 6
    assert got[("alpha=1", "strategy=FedAvg")]["rank"] == "1"
    assert got[("alpha=1", "strategy=FedAvg")]["p vs best (paired t)"] == "best"
    assert "> Warning: fewer than 5 seeds in " in report
    for row in rows:
        assert row["clients scored"] == "10"  # the client without data is not scored
        assert row["client accuracy"] == "0.8000 ± 0.0000"
        assert row["client std"] == "0.2828 ± 0.0000"
        assert row["worst 10% clients"] == "0.2000 ± 0.0000"
    # Target 0.7: round 2 (final + 0.05) or round 3 reach it; round 1 (0.5) never does.
    # alpha 0.1 FedAvg: 0.65/0.69 at round 2, 0.60/0.64 at 3 -> never; FedProx: round 2 both.
    cost = {(r["setting"], r["method"]): r for r in table_rows(report, "Cost to reach")}
    never = cost[("alpha=0.1", "strategy=FedAvg")]
    assert never["seeds reaching 0.7"] == "0/2"
    assert never["rounds"] == never["simulated time"] == never["bytes up+down"] == "not reached"
    fedprox = cost[("alpha=0.1", "strategy=FedProx")]
    assert fedprox["seeds reaching 0.7"] == "2/2" and fedprox["rounds"] == "2.00 ± 0.00"
    assert fedprox["simulated time"] == "2.00 ± 0.00 min"  # 60 s per round
    assert fedprox["bytes up+down"] == "6.00 ± 0.00 MB"  # 3 MB per round
    # AUC to 3.0 min (every run ends at 180 s): (0.5 x 60 + (final + 0.05) x 60) / 180;
    # FedProx finals 0.70 0.74 -> (0.5 + 0.75) / 3 = 0.4167 and (0.5 + 0.79) / 3 = 0.43
    assert fedprox["AUC horizon"] == "3.0 min"
    assert fedprox["accuracy AUC"].startswith("0.4233 ± ")
    for name in ("accuracy_curves.png", "client_accuracy.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC


def test_report_early_rounds_table(grid_sweep: Path, tmp_path: Path) -> None:
    """Accuracy after rounds 1..K (issue 14 item 7): capped at the longest run's 3 rounds."""
    out = tmp_path / "report"
    assert main([str(grid_sweep), "--out", str(out), "--early-rounds", "5"]) == 0
    report = (out / "report.md").read_text()
    rows = table_rows(report, "Accuracy in the first 3 rounds")
    got = {(r["setting"], r["method"]): r for r in rows}
    assert list(got)[0] == ("alpha=0.1", "strategy=FedProx")  # the accuracy table's order
    fedprox = got[("alpha=0.1", "strategy=FedProx")]
    assert "round 4" not in fedprox
    # round 1: 0.5 on both seeds; round 2: 0.75 0.79 -> 0.77 ± 12.706 x 0.02 = 0.254; round 3
    # is the final accuracy 0.70 0.74
    assert (fedprox["round 1"], fedprox["round 2"], fedprox["round 3"]) == (
        "0.500 ± 0.000",
        "0.770 ± 0.254",
        "0.720 ± 0.254",
    )
    assert got[("alpha=1", "strategy=FedAvg")]["round 3"] == "0.920 ± 0.254"
    out_off = tmp_path / "off"
    assert main([str(grid_sweep), "--out", str(out_off), "--early-rounds", "0"]) == 0
    assert "## Accuracy in the first" not in (out_off / "report.md").read_text()


def test_report_lists_the_knobs_the_labels_leave_out(grid_sweep: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    assert main([str(grid_sweep), "--out", str(out)]) == 0
    legend = table_rows((out / "report.md").read_text(), "What each method ran")
    assert legend == [  # configurations come sorted by label
        {"method": "strategy=FedAvg", "knobs": "(none)"},
        {"method": "strategy=FedProx", "knobs": "proximal_mu=0.1"},
    ]


def test_report_default_target_and_single_setting(grid_sweep: Path, tmp_path: Path) -> None:
    for run in grid_sweep.iterdir():  # keep alpha 0.1 only: one setting, no setting column
        if yaml.safe_load((run / "config.yaml").read_text())["partition"]["alpha"] != 0.1:
            shutil.rmtree(run)
    out = tmp_path / "report"
    assert main([str(grid_sweep), "--out", str(out)]) == 0
    report = (out / "report.md").read_text()
    # best mean final 0.72 -> 0.9 x 0.72 = 0.648 -> 0.64
    assert "## Cost to reach accuracy 0.64" in report
    rows = table_rows(report, "Final accuracy and per-client accuracy")
    assert "setting" not in rows[0]
    assert [(r["method"], r["rank"]) for r in rows] == [
        ("strategy=FedProx", "1"),
        ("strategy=FedAvg", "2"),
    ]


# 3 methods x 6 seeds, one setting: FedAdam clearly ahead on every seed, FedAvg and FedYogi
# within noise of each other. Paired by seed:
#   FedAdam - FedAvg  = 0.10 0.09 0.11 0.10 0.14 0.13 (t-test p 3e-5; every difference > 0, so
#   the exact Wilcoxon p is 2 / 2⁶ = 0.03125); FedAdam - FedYogi likewise (p 4e-5, 0.03125);
#   FedAvg - FedYogi = -0.01 0.02 -0.01 0.02 -0.02 0.02 (t-test p 0.68): a tie.
# -> ranks FedAdam 1, FedAvg 2= (mean 0.8133), FedYogi 2= (mean 0.81).
# FedAdam 0.90 ... 0.95: mean 0.925, sd sqrt(17.5e-4 / 5) = 0.018708, CI t(0.975, 5) = 2.5706
# x 0.018708 / sqrt 6 = 0.0196.
TIED_FINALS = {
    "FedAdam": (0.90, 0.91, 0.92, 0.93, 0.94, 0.95),
    "FedAvg": (0.80, 0.82, 0.81, 0.83, 0.80, 0.82),
    "FedYogi": (0.81, 0.80, 0.82, 0.81, 0.82, 0.80),
}


@pytest.fixture()
def tied_sweep(tmp_path: Path) -> Path:
    root = tmp_path / "tied"
    for job, (strategy, seed) in enumerate(
        (strategy, seed) for strategy in TIED_FINALS for seed in range(6)
    ):
        run = write_run(
            root / str(job), make_config(strategy, seed), TIED_FINALS[strategy][seed], sim_time=True
        )
        write_client_eval(run, CLIENT_ACCURACIES)
    return root


def test_report_paired_tests_and_tied_ranks(tied_sweep: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    assert main([str(tied_sweep), "--out", str(out)]) == 0
    report = (out / "report.md").read_text()
    assert "18 runs in 3 configurations (3 method(s)), seeds 0, 1, 2, 3, 4, 5." in report
    assert "Warning" not in report  # 6 seeds each
    rows = table_rows(report, "Final accuracy and per-client accuracy")
    got = {r["method"]: r for r in rows}
    assert [r["method"] for r in rows] == [
        "strategy=FedAdam",
        "strategy=FedAvg",
        "strategy=FedYogi",
    ]
    assert [r["rank"] for r in rows] == ["1", "2=", "2="]
    assert got["strategy=FedAdam"]["final accuracy"] == "0.9250 ± 0.0196"
    assert got["strategy=FedAdam"]["p vs best (paired t)"] == "best"
    for method in ("strategy=FedAvg", "strategy=FedYogi"):
        assert got[method]["p vs best (paired t)"] == "< 0.001"
        assert got[method]["p vs best (Wilcoxon)"] == "0.031"
    assert "paired t-test across seeds" in report and "scipy.stats.ttest_rel" in report
    assert "Wilcoxon signed-rank" in report


def test_report_counts_a_repeated_seed_once(tied_sweep: Path, tmp_path: Path) -> None:
    """A copy of FedAvg's seed 0 written earlier, with a wild accuracy, is left out and named."""
    stale = write_run(tied_sweep / "old", make_config("FedAvg", 0), 0.10, sim_time=True)
    write_client_eval(stale, CLIENT_ACCURACIES)
    older = (tied_sweep / "6" / "metrics.jsonl").stat().st_mtime_ns - 10**9  # job 6: FedAvg seed 0
    os.utime(stale / "metrics.jsonl", ns=(older, older))
    out = tmp_path / "report"
    assert main([str(tied_sweep), "--out", str(out)]) == 0
    report = (out / "report.md").read_text()
    assert "18 runs in 3 configurations" in report
    fedavg = {r["method"]: r for r in table_rows(report, "Final accuracy")}["strategy=FedAvg"]
    assert fedavg["seeds"] == "6" and fedavg["final accuracy"].startswith("0.8133 ± ")
    assert "> 1 run(s) repeat a seed of their configuration and are left out" in report
    assert f"{stale.resolve()} (seed 0 of strategy=FedAvg)" in report


def _one_error_line(capsys: Any) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("fedsim-compare: error: "), err
    return err


def test_bad_input_exits_2_with_one_line(grid_sweep: Path, tmp_path: Path, capsys: Any) -> None:
    out = tmp_path / "report"
    missing = tmp_path / "nowhere"
    assert main([str(missing), "--out", str(out)]) == 2
    assert f"SWEEP_DIR={missing}: folder does not exist" in _one_error_line(capsys)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main([str(empty), "--out", str(out)]) == 2
    assert f"SWEEP_DIR={empty}: holds no run folder" in _one_error_line(capsys)
    assert main([str(grid_sweep), "--out", str(out), "--target", "1.5"]) == 2
    assert "--target=1.5: must be an accuracy in (0, 1]" in _one_error_line(capsys)
    assert main([str(grid_sweep), "--out", str(out), "--early-rounds", "-1"]) == 2
    assert "--early-rounds=-1: must be an integer >= 0" in _one_error_line(capsys)
    (grid_sweep / "3" / "client_eval.jsonl").unlink()
    assert main([str(grid_sweep), "--out", str(out)]) == 2
    assert f"{(grid_sweep / '3').resolve()}: run folder has no client_eval.jsonl" in (
        _one_error_line(capsys)
    )
    for summary in grid_sweep.glob("*/summary.json"):
        summary.unlink()
    assert main([str(grid_sweep), "--out", str(out)]) == 2
    assert "holds no finished run (none completed or diverged: 8 killed or still going;" in (
        _one_error_line(capsys)
    )
    assert not out.exists()  # nothing written on bad input


def test_existing_report_folder_needs_force(grid_sweep: Path, tmp_path: Path, capsys: Any) -> None:
    out = tmp_path / "report"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main([str(grid_sweep), "--out", str(out)]) == 2
    assert f"--out={out}: is not empty" in _one_error_line(capsys)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert main([str(grid_sweep), "--out", str(out), "--force"]) == 0
    assert (out / "report.md").is_file() and (out / "notes.txt").read_text() == "mine"


# --- a real sweep ---------------------------------------------------------------------------------
TINY = [
    "num_clients=6",
    "num_rounds=2",
    "strategy.fraction_train=0.5",
    "runtime.progress=false",
    "runtime.engine=inline",
]


@pytest.fixture(scope="module")
def real_sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    sweep = tmp_path_factory.mktemp("real") / "sweep"
    proc = subprocess.run(
        [*FEDSIM, "--multirun", "strategy=fedavg,fedprox", "seed=0,1", *TINY,
         "eval.num_clients_final=4", f"hydra.sweep.dir={sweep}"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return sweep


def _client_accuracies(run: Path) -> list[float]:
    lines = (run / "client_eval.jsonl").read_text().splitlines()
    return [json.loads(line)["accuracy"] for line in lines]


@pytest.mark.slow
def test_compare_real_sweep_matches_summaries_and_client_eval(
    real_sweep: Path, tmp_path: Path
) -> None:
    out = tmp_path / "report"
    proc = subprocess.run(
        [*COMPARE, str(real_sweep), "--out", str(out)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    report = (out / "report.md").read_text()
    assert proc.stdout.startswith(report)
    for name in ("accuracy_curves.png", "client_accuracy.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
    runs = {"FedAvg": [], "FedProx": []}  # strategy -> run folders
    for summary in real_sweep.rglob("summary.json"):
        target = yaml.safe_load((summary.parent / "config.yaml").read_text())["strategy"]
        runs[target["_target_"].rsplit(".", 1)[-1]].append(summary.parent)
    assert [len(v) for v in runs.values()] == [2, 2]
    rows = {
        r["method"].split(",")[0]: r
        for r in table_rows(report, "Final accuracy and per-client accuracy")
    }
    means = {}
    t_2_seeds = 12.7062  # t(0.975, 1): the 95% CI half-width is 12.7062 x sd / sqrt 2
    for strategy, folders in runs.items():
        row = rows[f"strategy={strategy}"]
        finals = [json.loads((f / "summary.json").read_text())["final_accuracy"] for f in folders]
        means[strategy] = statistics.mean(finals)
        mean, half_width = (float(x) for x in row["final accuracy"].split(" ± "))
        assert mean == pytest.approx(means[strategy], abs=5e-5)
        ci = t_2_seeds * statistics.stdev(finals) / math.sqrt(2)
        assert half_width == pytest.approx(ci, abs=5e-5)
        clients = [_client_accuracies(f) for f in folders]
        assert all(len(c) == 4 for c in clients) and row["clients scored"] == "4"
        worst = [min(c) for c in clients]  # 4 clients: the worst 10% is ceil(0.4) = 1 client
        spread = [statistics.pstdev(c) for c in clients]
        for column, per_run in (("worst 10% clients", worst), ("client std", spread)):
            mean, half_width = (float(x) for x in row[column].split(" ± "))
            assert mean == pytest.approx(statistics.mean(per_run), abs=5e-5), column
            ci = t_2_seeds * statistics.stdev(per_run) / math.sqrt(2)
            assert half_width == pytest.approx(ci, abs=5e-5), column
    ranks = {s: rows[f"strategy={s}"]["rank"] for s in runs}
    best = max(means, key=means.get)
    # two seeds: the paired t-test separates them (1, 2) or cannot (1=, 1=)
    assert ranks[best] in ("1", "1=") and sorted(ranks.values()) in (["1", "2"], ["1=", "1="])
    assert "> Warning: fewer than 5 seeds" in report


@pytest.mark.slow
def test_compare_real_sweep_reports_a_crashed_run_and_counts_the_rest(
    real_sweep: Path, tmp_path: Path
) -> None:
    """Issue 16 item 4: a run without summary.json (killed) is listed, not fatal."""
    sweep = tmp_path / "copy"
    shutil.copytree(real_sweep, sweep)
    (sweep / "2" / "summary.json").unlink()
    out = tmp_path / "report"
    proc = subprocess.run(
        [*COMPARE, str(sweep), "--out", str(out)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    report = (out / "report.md").read_text()
    assert "> Left out: 1 run(s) that did not finish (1 killed or still going;" in report
    assert ": `2` (no summary: killed or still going, after round 2). No number below" in report
    assert report.count("3 runs in 2 configurations") == 1
    seeds = {r["method"]: r["seeds"] for r in table_rows(report, "Final accuracy")}
    assert sorted(seeds.values()) == ["1", "2"]  # the crashed run's configuration lost a seed


@pytest.mark.slow
def test_real_runs_group_into_two_configurations(real_sweep: Path) -> None:
    configurations = group_runs(load_runs([real_sweep]))
    assert [len(c.runs) for c in configurations] == [2, 2]


# --- hyper-parameter search with the Optuna sweeper -----------------------------------------------
@pytest.mark.slow
def test_optuna_sweeper_two_trials_writes_best_params(tmp_path: Path) -> None:
    sweep = tmp_path / "hpo"
    proc = subprocess.run(
        [*FEDSIM, "--multirun", "experiment=hpo_fedprox", "hydra.sweeper.n_trials=2",
         "num_clients=6", "num_rounds=2", "runtime.progress=false", "runtime.engine=inline",
         f"hydra.sweep.dir={sweep}"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert result["name"] == "optuna"
    best = result["best_params"]
    assert set(best) == {"strategy.proximal_mu", "client.lr"}
    assert 0.001 <= best["strategy.proximal_mu"] <= 1.0 and 0.02 <= best["client.lr"] <= 0.5
    trials = {}  # (mu, lr) -> final accuracy, from the trials' own run folders
    for job in ("0", "1"):
        config = yaml.safe_load((sweep / job / "config.yaml").read_text())
        assert config["strategy"]["_target_"] == "flwr.serverapp.strategy.FedProx"
        summary = json.loads((sweep / job / "summary.json").read_text())
        trials[(config["strategy"]["proximal_mu"], config["client"]["lr"])] = summary[
            "final_accuracy"
        ]
    assert len(trials) == 2  # two different proposals
    # The sweeper's objective is what fedsim returns: the best trial's final accuracy.
    assert result["best_value"] == pytest.approx(max(trials.values()))
    best_key = (best["strategy.proximal_mu"], best["client.lr"])
    assert trials[best_key] == pytest.approx(result["best_value"])


def test_report_figures_keep_long_labels_and_the_caption_inside(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Labels of five differing knobs (about 100 characters): the curves' legend (it used to
    lose 2 in at both ends), the client figure's tick labels and the caption under them lie
    inside the saved figures; the caption is one text wrapped to the figure's width."""
    sweep = write_long_label_runs(tmp_path / "sweep", ["FedAvg", "FedProx"])
    for run in sweep.iterdir():
        write_client_eval(run, CLIENT_ACCURACIES)
    figures = saved_figures(monkeypatch)
    assert main([str(sweep), "--out", str(tmp_path / "report")]) == 0
    curves, clients = figures
    assert overflow_in(curves) == 0.0
    assert overflow_in(clients) == 0.0
    caption = clients.axes[0].get_xlabel()
    assert " ".join(caption.split()) == (
        "box: quartiles, whiskers to 1.5 IQR; line: median; triangle: mean; n = clients x seeds"
    )
    labels = [text.get_text() for text in curves.legends[0].get_texts()]
    assert len(labels) == 4 and all("\n" in label for label in labels)  # wrapped, not cut
