"""A run killed with SIGKILL mid-round and resumed ends exactly like an uninterrupted run."""

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import strip_wall_time

from fedsim.config import compose_config
from fedsim.engine.simulation import simulate
from fedsim.records.results import read_metrics

pytestmark = pytest.mark.slow

FEDSIM = [sys.executable, "-m", "fedsim"]
# FedAvgM keeps server momentum, phones_mixed a per-client channel state: both must survive.
ARGS = [
    "num_clients=8",
    "num_rounds=6",
    "strategy=fedavgm",
    "strategy.fraction_train=0.5",
    "devices=phones_mixed",
    "runtime.progress=false",
]


def test_sigkilled_run_resumes_bit_for_bit(tmp_path: Path, kill_and_resume) -> None:
    # The reference inline (its rows are Ray's); the killed and resumed run is a Ray run.
    simulate(compose_config([*ARGS, "runtime.engine=inline"]), tmp_path / "reference")
    run, killed_at = kill_and_resume(ARGS, rows=3)
    assert 3 <= killed_at < 6
    for name in ("metrics.jsonl", "clients.jsonl"):
        assert strip_wall_time(read_metrics(run, name)) == strip_wall_time(
            read_metrics(tmp_path / "reference", name)
        )


def test_resume_refuses_a_config_change(tmp_path: Path) -> None:
    proc = subprocess.run(
        [*FEDSIM, f"resume={tmp_path}", "num_rounds=9"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("fedsim: error: resume=")
