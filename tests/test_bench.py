"""The benchmark's baselines do the same work as fedsim, and its CLI writes the headline keys."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fedsim.config import compose_config
from fedsim.engine.simulation import simulate
from fedsim.records.results import read_metrics
from fedsim.scripts.plain_loop import plain_fedavg

pytestmark = pytest.mark.slow

WORK = [
    "num_clients=8",
    "strategy.fraction_train=1.0",
    "num_rounds=3",
    "seed=5",
    "runtime.progress=false",
]


def test_plain_loop_trains_what_fedsim_trains(tmp_path: Path) -> None:
    cfg = compose_config(WORK)
    plain = plain_fedavg(cfg)
    simulate(cfg, tmp_path / "run")
    ours = [row["accuracy"] for row in read_metrics(tmp_path / "run")]
    assert plain.client_rounds == 24
    # Same clients, batches and seeds; only float32 summation order differs (torch vs numpy),
    # which can flip at most a test example or two of 360.
    assert ours == pytest.approx(plain.accuracies, abs=2 / 360)
    assert ours[-1] > ours[0]  # it learned


def _bench(tmp_path: Path, *args: str) -> tuple[dict, str]:
    """``fedsim.scripts.bench ARGS`` in a fresh process, its work under ``tmp_path``: the JSON
    report and stdout (the run must succeed)."""
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "fedsim.scripts.bench", *args]
        + ["--work-dir", str(tmp_path / "work"), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return json.loads(out.read_text()), proc.stdout


def test_bench_cli_writes_cases_and_targets(tmp_path: Path) -> None:
    report, stdout = _bench(tmp_path, "--cases", "sweep_startup", "--sweep-runs", "2")
    case = report["sweep_startup"]
    assert case["runs"] == 2 and len(case["startup_s"]) == 2
    assert all(s > 0 for s in case["startup_s"])
    target = report["targets"]["sweep_startup_s"]
    assert target["value"] == case["later_runs_mean_startup_s"]
    assert target["met"] == (case["later_over_first"] < 0.1)
    assert "[bench] sweep_startup_s =" in stdout


def test_compare_with_a_cost_backbone_reports_who_can_train(tmp_path: Path) -> None:
    """Issue 20 item 4's table: with TinyLlama's costs nobody can fully fine-tune (0%, nothing
    trained, no bytes, never at the target) while PAE's rows are the run's own files."""
    from fedsim.records.results import read_jsonl

    work = tmp_path / "work"
    small = ["model.max_length=16", "client.max_steps=2", "num_clients=6", "num_rounds=2"]
    small += ["runtime.engine=inline"]  # the table is the point here, not the engine
    full, _ = _bench(
        tmp_path,
        *["--cases", "compare", "--variants", "PAE all three", "full_ft", "--rounds", "2"],
        *["--no-memory", "--target-accuracy", "0.99"],
        *["--overrides", "model.cost_backbone=TinyLlama-1.1B", *small],
    )
    report = full["compare"]
    assert report["overrides"] == ["model.cost_backbone=TinyLlama-1.1B", *small]
    full_ft = report["variants"]["full_ft"]["runs"][0]
    assert full_ft["cost_backbone"] == "TinyLlama-1.1B"
    assert full_ft["share_of_clients_fitting"] == 0.0
    assert full_ft["client_rounds_trained"] == 0 and full_ft["client_rounds_sent"] > 0
    assert full_ft["bytes_up_per_client_round"] is None
    assert full_ft["energy_j_per_client_round"] is None
    assert "| full_ft |" in report["table_markdown"]
    line = next(r for r in report["table_markdown"].splitlines() if r.startswith("| full_ft |"))
    assert "| 0 | 0.0 | - | - | - | - | never | never |" in line  # 0 % of the clients fit

    pae = report["variants"]["PAE all three"]["runs"][0]
    run_dir = work / "compare" / "PAE_all_three" / "seed0"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert pae["share_of_clients_fitting"] == summary["num_clients_fitting"] / 6 > 0
    trained = [r for r in read_jsonl(run_dir / "clients.jsonl") if r["outcome"] == "ok"]
    assert pae["client_rounds_trained"] == len(trained) > 0
    energy = sum(r["energy_j"] for r in trained) / len(trained)
    assert pae["energy_j_per_client_round"] == pytest.approx(energy)
    assert pae["rounds_to_target"] is None  # 0.99 is out of reach in two rounds


def test_overhead_case_reports_issue_19s_cold_figures(tmp_path: Path) -> None:
    """cold_startup_s is the cold process outside its rounds, cold_overhead_vs_plain that process
    over the plain loop's own process; both are headline targets with a verdict."""
    report, _ = _bench(tmp_path, "--cases", "overhead_vs_plain", "--rounds", "2")
    case = report["overhead_vs_plain"]
    cold = case["fedsim_cold"]
    assert case["cold_startup_s"] == pytest.approx(cold["process_s"] - cold["rounds_s"])
    assert 0 < case["cold_startup_s"] < cold["process_s"]
    assert case["plain_cold_process_s"] > case["plain"]["rounds_s"] > 0
    assert case["cold_overhead_vs_plain"] == pytest.approx(
        cold["process_s"] / case["plain_cold_process_s"]
    )
    inline = case["inline"]["cold"]  # the same figures on runtime.engine=inline
    assert case["cold_startup_s_inline"] == pytest.approx(inline["process_s"] - inline["rounds_s"])
    assert case["cold_overhead_vs_plain_inline"] == pytest.approx(
        inline["process_s"] / case["plain_cold_process_s"]
    )
    assert case["inline"]["same_accuracy_curve_as_ray"] is True
    for name, limit in (
        ("cold_startup_s", 5),
        ("cold_overhead_vs_plain", 1.5),
        ("cold_startup_s_inline", 5),
        ("cold_overhead_vs_plain_inline", 1.5),
    ):
        target = report["targets"][name]
        assert target["value"] == case[name] and target["met"] == (case[name] <= limit)


def test_cold_start_script_times_each_phase_of_a_cold_process(capsys) -> None:
    """One cold process: its phases add up to less than the time to round 1, in order."""
    from fedsim.scripts.cold_start import main

    medians = main(["--runs", "1", "num_rounds=1", "num_clients=4", "eval.num_clients_final=0"])
    marks = medians["fedsim"]
    phases = [key for key in marks if key.startswith("phase: ")]
    assert {"phase: data and model", "phase: Ray workers"} <= set(phases)
    assert sum(marks[key] for key in phases) < marks["to start-up line"]
    assert (
        0
        < marks["to start-up line"]
        <= marks["to round 1"]
        <= marks["to results line"]
        <= marks["to exit"]
    )
    assert "fedsim median of 1:" in capsys.readouterr().out
