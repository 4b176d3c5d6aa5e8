"""``make flwr-run``: every run on a SuperLink of its own, stopped by its process id afterwards."""

import re
import socket
import subprocess
from pathlib import Path

import pytest

from fedsim.records.results import read_metrics

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1.0)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_concurrent_flwr_runs_neither_share_nor_stop_each_others_superlink(tmp_path) -> None:
    # The shorter run ends while the longer one is still going: with one shared SuperLink on
    # Flower's fixed port, stopping "the" SuperLink afterwards killed the longer run's.
    runs = {2: tmp_path / "short", 6: tmp_path / "long"}
    procs = {}
    for num_rounds, results in runs.items():
        overrides = f"num_clients=6 num_rounds={num_rounds} runtime.progress=false"
        log = open(tmp_path / f"{num_rounds}.log", "w")  # noqa: SIM115 - closed with the process
        procs[num_rounds] = (
            subprocess.Popen(
                ["make", "-s", "flwr-run", f"OVERRIDES={overrides}", f"RESULTS_DIR={results}"],
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
            ),
            log,
        )
    ports = set()
    try:
        for proc, log in procs.values():
            proc.wait(timeout=900)
            log.close()
    finally:
        for proc, _log in procs.values():
            proc.kill()  # only if one is still going after another failed
    for num_rounds, (proc, _log) in procs.items():
        output = (tmp_path / f"{num_rounds}.log").read_text()
        assert proc.returncode == 0, output[-3000:]
        (run,) = [p.parent for p in runs[num_rounds].rglob("metrics.jsonl")]
        assert [r["round"] for r in read_metrics(run)] == list(range(1, num_rounds + 1))
        port = int(re.search(r"Using SuperLink: fedsim \(127\.0\.0\.1:(\d+)\)", output)[1])
        ports.add(port)
        assert not _listening(port)  # its SuperLink is gone with it
    assert len(ports) == 2  # one SuperLink each
