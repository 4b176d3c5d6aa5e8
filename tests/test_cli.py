"""Bad input on the command line: exit code 2, one line naming key/value/accepted, no folder."""

import subprocess
import sys
from pathlib import Path

import pytest

FEDSIM = [sys.executable, "-m", "fedsim"]


def _run(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    run_dir = tmp_path / "run"
    return subprocess.run(
        [*FEDSIM, *args, f"hydra.run.dir={run_dir}", "runtime.progress=false"],
        capture_output=True, text=True, timeout=180,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
    )


@pytest.mark.parametrize(
    ("args", "key", "accepted"),
    [
        (["strategy=fedavgg"], "strategy=fedavgg", "fedavg, fedavgm"),
        (["data=mnist"], "data=mnist", "chatterbot, digits, hf"),
        (["num_clients=0"], "num_clients=0", "integer >= 1"),
        (["num_clients=abc"], "num_clients=abc", "integer >= 1"),
        (["num_clients=5000"], "num_clients=5000", "from 1 to 1438"),
        (["num_rounds=0"], "num_rounds=0", "integer >= 1"),
        (["partition=dirichlet", "partition.alpha=0"], "partition.alpha=0", "> 0"),
        (["partition=dirichlet", "partition.alpha=-1.5"], "partition.alpha=-1.5", "> 0"),
        (["data=hf", "data.path=/nonexistent/x.csv"], "data.path=/nonexistent/x.csv", "not found"),
        (["data=hf"], "data.path", ""),
        (["client.lr=-1"], "client.lr=-1", "> 0"),
        (["strategy.fraction_train=1.5"], "strategy.fraction_train=1.5", "(0, 1]"),
        (["strategy.min_available_nodes=99"], "strategy.min_available_nodes=99", "<= num_clients"),
        (["num_clientz=3"], "num_clientz", "not a config key"),
        (["clock.deadline_s=-2"], "clock.deadline_s=-2", "> 0"),
    ],
)
def test_bad_input_exits_2_with_one_line_and_no_folder(args, key, accepted, tmp_path) -> None:
    proc = _run(args, tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("fedsim: error: ")
    assert key in lines[0] and accepted in lines[0], lines[0]
    assert not (tmp_path / "run").exists()  # a refused run leaves no folder behind


def test_existing_run_folder_is_never_overwritten(tmp_path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"round": 1}\n')
    proc = _run(["num_clients=4", "num_rounds=1"], tmp_path)
    assert proc.returncode == 2
    assert "hydra.run.dir=" in proc.stderr and "never overwritten" in proc.stderr
    assert (run_dir / "metrics.jsonl").read_text() == '{"round": 1}\n'


def test_cfg_job_prints_the_composed_config(tmp_path) -> None:
    proc = subprocess.run([*FEDSIM, "--cfg", "job", "strategy=fedprox"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "flwr.serverapp.strategy.FedProx" in proc.stdout and "proximal_mu" in proc.stdout
