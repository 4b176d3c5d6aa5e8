"""The ``peers`` benchmark case: exported workloads, peer venvs without GPU stacks, peer runners.

The runner tests use the peers' real virtual environments, built by the case itself
(``ensure_env``: once per machine, a few minutes; reused after, from the bench's default
folder), and check that pfl's and FLGo's FedAvg train what fedsim's plain loop trains.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedsim.config import compose_config
from fedsim.learning.workload import get_workload
from fedsim.scripts.bench_peers import (
    PEERS,
    PEERS_DIR,
    _peer_common,
    ensure_env,
    export_workload,
    gpu_packages,
    run_peer,
)
from fedsim.scripts.plain_loop import plain_fedavg

# 100 clients of ~14 digits rows each: one batch of 16 per epoch, so every framework's local
# step is the same full-batch step whatever order it takes a client's rows in. 10 epochs x 3
# rounds take the test accuracy from 0.10 (initial) to 0.28 (the plain loop, measured).
TINY = ["num_clients=100", "strategy.fraction_train=1.0", "seed=3", "client.local_epochs=10"]


@pytest.mark.parametrize(
    ("planned", "bad"),
    [
        (["torch==2.13.0+cpu", "numpy==2.4.6"], []),
        (["torch==2.13.0", "numpy==2.4.6"], ["torch==2.13.0"]),  # PyPI's Linux torch: CUDA
        (["torchvision==0.28.0"], ["torchvision==0.28.0"]),  # bundles libcudart, undeclared
        (
            ["nvidia-ml-py==13.615.71", "triton==3.5.0"],
            ["nvidia-ml-py==13.615.71", "triton==3.5.0"],
        ),
        (["cuda-bindings==13.0.0", "pfl==0.6.0"], ["cuda-bindings==13.0.0"]),
    ],
)
def test_gpu_packages_names_what_a_cpu_venv_refuses(planned: list[str], bad: list[str]) -> None:
    assert gpu_packages(planned) == bad


@pytest.mark.slow
def test_export_workload_is_fedsims_work(tmp_path: Path) -> None:
    settings = export_workload([*TINY, "num_rounds=1"], tmp_path)
    peer_common = _peer_common()
    work = peer_common.load_work(tmp_path)
    workload = get_workload(compose_config([*TINY, "num_rounds=1"]))
    assert len(work.clients) == 100 and work.client_rounds == 100  # 100 clients x 1 round
    for pid in (0, 57, 99):  # the same rows, in fedsim's order, for every client
        data = workload.client_data(pid)
        assert torch.equal(work.clients[pid][0], data["x"])
        assert torch.equal(work.clients[pid][1], data["label"])
    assert settings["local_epochs"] == 10 and settings["batch_size"] == 16
    assert settings["lr"] == 0.2 and settings["max_grad_norm"] == 10.0
    x = workload.test_features()["x"]
    with torch.no_grad():  # rebuilt from the layer list, at fedsim's initial weights
        assert torch.equal(work.fresh_model()(x), workload.build_model()(x))


@pytest.mark.slow
@pytest.mark.parametrize("peer", sorted(PEERS))
def test_peer_runner_trains_what_fedsim_trains(peer: str, tmp_path: Path) -> None:
    python = ensure_env(PEERS[peer], PEERS_DIR)
    installed = json.loads((python.parent.parent / "fedsim-peer.json").read_text())["installed"]
    assert gpu_packages(installed) == [] and "torch==2.13.0+cpu" in installed
    export_workload([*TINY, "num_rounds=3"], tmp_path / "workload")
    figures = run_peer(python, peer, tmp_path / "workload", tmp_path / f"{peer}.json")
    assert figures["framework"] == peer and figures["version"] == PEERS[peer].version
    assert figures["torch"] == "2.13.0+cpu" and figures["client_rounds"] == 300
    first, second = figures["runs"]
    assert first["accuracy"] == second["accuracy"]  # a second run in the process: same work
    assert figures["cold_s"] >= first["wall_s"] > 0  # cold = imports + start-up + run 1
    plain = plain_fedavg(compose_config([*TINY, "num_rounds=3"])).accuracies[-1]
    assert plain > 0.2  # it learned (initial model: 0.10)
    # Same rows, initial weights and full-batch steps; float32 sums in another order may flip
    # a test row or two of 359.
    assert abs(second["accuracy"] - plain) <= 2 / 359


def test_bench_rejects_bad_peer_examples() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "fedsim.scripts.bench", "--cases", "peers", "--peer-examples", "0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "argument --peer-examples: '0': must be an integer >= 1" in done.stderr.splitlines()[-1]
