"""The ``peers`` benchmark case: exported workloads, peer venvs without GPU stacks, peer runners.

The runner tests use the peers' real virtual environments, built by the case itself
(``ensure_env``: once per machine, a few minutes; reused after, from the bench's default
folder), and check that pfl's and FLGo's FedAvg train what fedsim's plain loop trains: the same
weights, up to the order of float32 sums.
"""

import fcntl
import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from fedsim.config import compose_config
from fedsim.learning.workload import get_workload
from fedsim.scripts.bench_peers import (
    MARKER,
    PEERS,
    PEERS_DIR,
    PeerSpec,
    _peer_common,
    ensure_env,
    export_workload,
    gpu_packages,
    run_peer,
)
from fedsim.scripts.plain_loop import plain_fedavg

# 100 clients of ~14 digits rows each: one batch of 16 per epoch, so every framework's local
# step is the same full-batch step whatever order it takes a client's rows in (up to the order
# of float32 sums).
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


def test_a_venv_being_built_is_waited_for_not_built_again(tmp_path: Path) -> None:
    """Two benchmarks (or two test workers) asking for one peer's venv take turns on its lock."""
    spec = PeerSpec("tinypeer", "1.0", ("tinypeer==1.0",))
    env = tmp_path / "tinypeer-1.0"
    (env / "bin").mkdir(parents=True)
    wanted = {
        "requirements": ["tinypeer==1.0"],
        "no_deps": [],
        "pin": f"torch=={torch.__version__.split('+')[0]}",
    }
    got: list[Path] = []
    with open(tmp_path / "tinypeer-1.0.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process is building it
        asking = threading.Thread(target=lambda: got.append(ensure_env(spec, tmp_path)))
        asking.start()
        asking.join(timeout=1.0)
        assert asking.is_alive() and got == []  # it waits, and does not touch the folder
        assert sorted(p.name for p in env.iterdir()) == ["bin"]
        (env / MARKER).write_text(json.dumps({"wanted": wanted, "installed": []}))  # built
    asking.join(timeout=30)
    assert got == [env / "bin" / "python"]  # found built: nothing removed, nothing installed
    assert (env / MARKER).is_file()


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
    export_workload([*TINY, "num_rounds=1"], tmp_path / "workload")
    figures = run_peer(python, peer, tmp_path / "workload", tmp_path / f"{peer}.json")
    assert figures["framework"] == peer and figures["version"] == PEERS[peer].version
    assert figures["torch"] == "2.13.0+cpu" and figures["client_rounds"] == 100
    first, second = figures["runs"]
    assert first["accuracy"] == second["accuracy"]  # a second run in the process: same work
    assert figures["cold_s"] >= first["wall_s"] > 0  # cold = imports + start-up + run 1
    # The peer's global model after the round against the plain loop's: the same rows, initial
    # weights and full-batch steps, but float32 sums in another order. That order alone moves a
    # weight by up to 1.8e-5 (the plain loop with each client's rows permuted, measured), a
    # learning rate 0.1% off by 1.5e-4, 1% off by 6e-4, one epoch fewer by 7e-3. (Test accuracy
    # is no yardstick here: after 3 rounds, weights 5e-4 apart differ by 10 rows of 359.)
    cfg = compose_config([*TINY, "num_rounds=1"])
    plain = plain_fedavg(cfg)
    weights = np.load(tmp_path / figures["weights"])
    assert sorted(weights.files) == sorted(plain.weights)
    for name, tensor in plain.weights.items():
        torch.testing.assert_close(torch.from_numpy(weights[name]), tensor, rtol=0, atol=1e-4)
    initial = get_workload(cfg).build_model().state_dict()
    moved = max(float((plain.weights[k] - initial[k]).abs().max()) for k in initial)
    assert moved > 100 * 1e-4  # it trained: far beyond the tolerance


def test_bench_rejects_bad_peer_examples() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "fedsim.scripts.bench", "--cases", "peers", "--peer-examples", "0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "argument --peer-examples: '0': must be an integer >= 1" in done.stderr.splitlines()[-1]
