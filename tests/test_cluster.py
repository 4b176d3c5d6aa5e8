"""A simulation on an existing Ray cluster: a head and a worker node started on loopback."""

import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from fedsim.config import compose_config
from fedsim.engine.simulation import release_engine, simulate
from fedsim.records.results import read_metrics

pytestmark = pytest.mark.slow

RAY = str(Path(sys.executable).with_name("ray"))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _stop_cluster(temp_dir: str) -> None:
    """Stop only this cluster's processes (`ray stop` would stop every Ray on the machine)."""
    subprocess.run(["pkill", "-f", temp_dir], capture_output=True)
    for _ in range(100):
        if subprocess.run(["pgrep", "-f", temp_dir], capture_output=True).returncode:
            return
        time.sleep(0.1)
    subprocess.run(["pkill", "-9", "-f", temp_dir], capture_output=True)


@pytest.fixture
def ray_cluster():
    """`ray start --head` plus one worker node (1 CPU each) on loopback; stopped afterwards."""
    # A short temp dir: Ray's Unix socket paths must stay under ~107 characters.
    temp_dir = tempfile.mkdtemp(prefix="fedsim-ray-", dir="/tmp")
    port = _free_port()
    address = f"127.0.0.1:{port}"
    common = ["--num-cpus=1", "--disable-usage-stats", "--node-ip-address=127.0.0.1"]
    head = [
        RAY,
        "start",
        "--head",
        f"--port={port}",
        "--include-dashboard=false",
        f"--temp-dir={temp_dir}",
        *common,
    ]
    worker = [RAY, "start", f"--address={address}", *common]
    try:
        for command in (head, worker):
            proc = subprocess.run(command, capture_output=True, text=True, timeout=180)
            assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        yield address
    finally:
        _stop_cluster(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_simulation_runs_on_an_existing_cluster(ray_cluster: str, tmp_path: Path) -> None:
    import ray

    cfg = compose_config(
        [
            "num_clients=6",
            "num_rounds=2",
            "strategy.fraction_train=0.5",
            f"runtime.ray_address={ray_cluster}",
            "runtime.progress=false",
        ]
    )
    summary = simulate(cfg, tmp_path / "run")
    assert summary["status"] == "completed"
    rows = read_metrics(tmp_path / "run")
    assert [r["num_clients"] for r in rows] == [3, 3]
    # fedsim keeps its connection and actors for a next run until released...
    assert ray.is_initialized()
    release_engine()
    assert not ray.is_initialized()
    # ...then only disconnects: both nodes' CPUs count (2 lanes) and the cluster outlives the run.
    ray.init(address=ray_cluster, logging_level="ERROR")
    try:
        assert len([n for n in ray.nodes() if n["Alive"]]) == 2
        assert ray.cluster_resources()["CPU"] == 2
    finally:
        ray.shutdown()
    # Same metrics as a local run of the same config: where it runs never changes what it computes
    local = compose_config(
        ["num_clients=6", "num_rounds=2", "strategy.fraction_train=0.5", "runtime.progress=false"]
    )
    simulate(local, tmp_path / "local")
    strip = [{k: v for k, v in r.items() if k != "wall_time_s"} for r in rows]
    assert strip == [
        {k: v for k, v in r.items() if k != "wall_time_s"} for r in read_metrics(tmp_path / "local")
    ]
