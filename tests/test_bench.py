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


def test_bench_cli_writes_cases_and_targets(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedsim.scripts.bench",
            "--cases",
            "sweep_startup",
            "--sweep-runs",
            "2",
            "--work-dir",
            str(tmp_path / "work"),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads(out.read_text())
    case = report["sweep_startup"]
    assert case["runs"] == 2 and len(case["startup_s"]) == 2
    assert all(s > 0 for s in case["startup_s"])
    target = report["targets"]["sweep_startup_s"]
    assert target["value"] == case["later_runs_mean_startup_s"]
    assert target["met"] == (case["later_over_first"] < 0.1)
    assert "[bench] sweep_startup_s =" in proc.stdout
