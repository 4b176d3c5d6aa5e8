"""fedsim's FedAvg is Flower's FedAvg: the same global model as a plain Flower app.

The plain app (scripts/flower_baseline.py) is Flower's quickstart pattern: one SuperNode per
client, ``Strategy.start`` driving the rounds, Flower's own Ray backend, no fedsim in the loop.
Same seed, data, partitions, initial model, batches, clip and learning rate, and the same
summation order: the baseline's server sums the replies in partition order as fedsim does (in
arrival order the float32 sums differed in the last bits, by up to ~1e-6 on a loaded CI machine,
depending on which worker finished first). So the two global models must be equal to the bit.
fedsim runs inline here, without Ray's start: its rows and models are its Ray engine's.
"""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedsim.config import compose_config
from fedsim.learning.workload import get_workload
from fedsim.records.checkpoint import read_checkpoint

pytestmark = pytest.mark.slow

WORK = ["num_clients=6", "strategy.fraction_train=1.0", "num_rounds=2", "seed=3"]


def test_fedsim_fedavg_gives_flowers_global_model(tmp_path: Path) -> None:
    flower_out = tmp_path / "flower.safetensors"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedsim.scripts.flower_baseline",
            "--out",
            str(flower_out),
            "--json",
            str(tmp_path / "flower.json"),
            *WORK,
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    run_dir = tmp_path / "fedsim"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedsim",
            *WORK,
            f"hydra.run.dir={run_dir}",
            "runtime.progress=false",
            "runtime.engine=inline",  # Ray's rows are inline's (test_inline_engine.py)
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    meta, tensors = read_checkpoint(run_dir)
    ours = {
        n: torch.from_numpy(tensors[f"global/{i}"]) for i, n in enumerate(meta["arrays"]["keys"])
    }
    flowers = load_file(str(flower_out))
    assert set(ours) == set(flowers) and len(ours) == 8  # the CNN's 4 weights + 4 biases
    for name, value in flowers.items():
        assert torch.equal(ours[name], value), (name, float((ours[name] - value).abs().max()))
    # ...and both moved away from the initial model (two runs that trained nothing would agree)
    initial = get_workload(compose_config(WORK)).build_model().state_dict()
    assert max(float((ours[n] - initial[n]).abs().max()) for n in ours) > 1e-3
