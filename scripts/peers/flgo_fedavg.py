"""FedAvg on fedsim's exported workload in FLGo (``flgo==0.4.4``), its own venv.

FLGo's own FedAvg (``flgo.algorithm.fedavg``) on a "direct" task: FLGo's way to bring clients'
data of one's own (``flgo.gen_direct_task_from_file`` with a ``config.py`` naming
``train_data``, one dataset per client, ``test_data`` and ``get_model``); the task is made once
per process, as a sweep of FLGo runs makes it once. Settings: every client every round
(``sample='full'``), the example-weighted mean of the local models (``aggregate='other'``:
sum of p_k / sum p * model_k, with p_k = n_k / n), the workload's epochs, batch size, learning
rate and clip, no learning-rate decay (FLGo's default decays it by 0.998 a round), no held-out
rows (FLGo's default holds out 10% of each client's rows), one thread. FLGo's default logger
also scores every client's training rows each round; ``CentralTestLogger`` scores the server's
test split only, as fedsim does. FLGo batches a client's rows in order, without shuffling.

Usage (the driver does this, in a work folder: FLGo writes the task under the current folder)::

    FLGO_VENV/bin/python scripts/peers/flgo_fedavg.py --workload DIR --runs 2 --out flgo.json
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import flgo
import flgo.algorithm.fedavg as fedavg
from flgo.experiment.logger import BasicLogger
from peer_common import FedAvgWork, main
from torch import nn

TASK = "flgo_task"  # a folder under the current one: FLGo imports it as a module by this name

# FLGo copies this file into the task as ``config.py`` and imports it.
CONFIG = """
import sys
sys.path.insert(0, {runners!r})
from pathlib import Path

import torch
from peer_common import accuracy, load_work

_work = load_work(Path({workload!r}))
train_data = [torch.utils.data.TensorDataset(x, y) for x, y in _work.clients]
test_data = torch.utils.data.TensorDataset(*_work.test)


def get_model():
    return _work.fresh_model()


def data_to_device(batch, device):
    return [t.to(device) for t in batch]


def compute_loss(model, batch, device):
    x, y = data_to_device(batch, device)
    return {{"loss": torch.nn.functional.cross_entropy(model(x), y)}}


@torch.no_grad()
def eval(model, loader, device):
    right = rows = 0
    for batch in loader:
        x, y = data_to_device(batch, device)
        right += int((model(x).argmax(dim=1) == y).sum())
        rows += len(y)
    return {{"accuracy": right / rows}}
"""


class CentralTestLogger(BasicLogger):
    """Scores the global model on the server's test split once a round, nothing else."""

    def log_once(self, *args: object, **kwargs: object) -> None:
        """Record the test metrics of this round."""
        for name, value in self.coordinator.test().items():
            self.output["test_" + name].append(value)


def run(work: FedAvgWork, index: int) -> nn.Module:
    """One FLGo FedAvg run of the workload; return the final global network."""
    s = work.settings
    task = Path.cwd() / TASK
    if index == 0:  # a sweep makes its task once
        config = Path.cwd() / "flgo_config.py"
        runners = str(Path(__file__).resolve().parent)
        config.write_text(CONFIG.format(runners=runners, workload=str(work.root)))
        sys.path.insert(0, os.getcwd())  # FLGo imports the task relative to the current folder
        flgo.gen_direct_task_from_file(TASK, str(config), target_path=".", overwrite=True)
    option = {
        "num_rounds": int(s["num_rounds"]),
        "num_epochs": int(s["local_epochs"]),
        "batch_size": int(s["batch_size"]),
        "learning_rate": float(s["lr"]),
        "learning_rate_decay": 1.0,
        "clip_grad": float(s["max_grad_norm"] or 0.0),  # 0 = no clip in FLGo
        "sample": "full",
        "proportion": 1.0,
        "aggregate": "other",
        "train_holdout": 0.0,
        "test_holdout": 0.0,
        "seed": int(s["seed"]) + index,
        "gpu": [],
        "torch_num_threads": 1,
        "num_parallels": 1,
        "log_file": False,
        "no_log_console": True,
    }
    runner = flgo.init(str(task), fedavg, option=option, Logger=CentralTestLogger)
    runner.run()
    net: nn.Module = runner.model.model  # FLGo wraps get_model()'s network in an FModule
    return net


if __name__ == "__main__":
    sys.exit(main("flgo", run))
