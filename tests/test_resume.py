"""A run killed with SIGKILL mid-round and resumed ends exactly like an uninterrupted run."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedsim.config import compose_config
from fedsim.results import read_metrics
from fedsim.simulation import simulate

pytestmark = pytest.mark.slow

FEDSIM = [sys.executable, "-m", "fedsim"]
# FedAvgM keeps server momentum, phones_mixed a per-client channel state: both must survive.
ARGS = ["num_clients=8", "num_rounds=6", "strategy=fedavgm", "strategy.fraction_train=0.5",
        "devices=phones_mixed", "runtime.progress=false"]


def _strip(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "wall_time_s"} for r in rows]


def _wait_for_rows(path: Path, count: int, proc: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists() and len(path.read_text().splitlines()) >= count:
            return
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.05)
    raise AssertionError(f"{path} never reached {count} rows")


def test_sigkilled_run_resumes_bit_for_bit(tmp_path: Path) -> None:
    simulate(compose_config(ARGS), tmp_path / "reference")
    run = tmp_path / "run"
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen([*FEDSIM, *ARGS, f"hydra.run.dir={run}"], stdout=log,
                                stderr=log, start_new_session=True)
        _wait_for_rows(run / "metrics.jsonl", 3, proc, timeout_s=300)
        os.killpg(proc.pid, signal.SIGKILL)  # the driver, its Ray head and workers: no goodbye
        proc.wait()
    assert 3 <= len(read_metrics(run)) < 6
    assert not (run / "summary.json").exists()
    resumed = subprocess.run([*FEDSIM, f"resume={run}", "runtime.progress=false"],
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _strip(read_metrics(run)) == _strip(read_metrics(tmp_path / "reference"))
    assert _strip(read_metrics(run, "clients.jsonl")) == _strip(
        read_metrics(tmp_path / "reference", "clients.jsonl"))


def test_resume_refuses_a_config_change(tmp_path: Path) -> None:
    proc = subprocess.run([*FEDSIM, f"resume={tmp_path}", "num_rounds=9"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("fedsim: error: resume=")
