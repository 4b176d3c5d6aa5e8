"""What every peer runner shares: the exported workload, the model rebuilt from it, the timing.

Runs under the PEER's Python (its own virtual environment, torch but no fedsim), so it imports
nothing but the standard library, NumPy and torch. ``scripts/bench_peers.py`` writes a workload
folder (``workload.json``: the model's layers and the FedAvg settings; ``workload.npz``: each
client's rows, the test split and the initial weights) and starts a runner on it::

    PEER_PYTHON scripts/peers/pfl_fedavg.py --workload DIR --runs 2 --out result.json

The runner does ``--runs`` full runs one after the other in its one process (each from the same
initial weights) and writes, per run, its wall seconds, its final test accuracy and the Unix
time it finished (the driver subtracts its launch time: a cold run's cost, imports included),
and the last run's final global weights beside the figures (``result.npz``, by state_dict name).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = ["FedAvgWork", "accuracy", "build_model", "load_work", "main"]

#: layer kinds a workload may name: torch.nn classes built from their keyword arguments
LAYERS = ("Conv2d", "Linear", "ReLU", "MaxPool2d", "Flatten", "Sequential")


def build_model(spec: list[list[Any]]) -> nn.Module:
    """``[[name, kind, kwargs_or_children], ...]`` -> nested ``nn.Sequential`` with those names."""
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    for name, kind, arguments in spec:
        if kind not in LAYERS:
            raise ValueError(f"layer {name!r}: kind {kind!r} is not one of {', '.join(LAYERS)}")
        if kind == "Sequential":
            layers[name] = build_model(arguments)
        else:
            layers[name] = getattr(nn, kind)(**arguments)
    return nn.Sequential(layers)


@dataclass
class FedAvgWork:
    """One FedAvg job as fedsim exported it: the same for every framework."""

    root: Path  # the workload folder
    settings: dict[str, Any]  # workload.json: model, num_rounds, local_epochs, batch_size, lr, ...
    clients: list[tuple[torch.Tensor, torch.Tensor]]  # per client: x (N, C, H, W), y (N,) int64
    test: tuple[torch.Tensor, torch.Tensor]
    initial: dict[str, torch.Tensor]  # the global model before round 1, by state_dict name

    def fresh_model(self) -> nn.Module:
        """The model at its initial weights (the same tensors fedsim starts from)."""
        model = build_model(self.settings["model"])
        model.load_state_dict(self.initial)
        return model

    @property
    def client_rounds(self) -> int:
        """Client trainings in one run (every client every round)."""
        return len(self.clients) * int(self.settings["num_rounds"])


def load_work(folder: Path) -> FedAvgWork:
    """Read ``workload.json`` and ``workload.npz`` written by ``scripts/bench_peers.py``."""
    settings = json.loads((folder / "workload.json").read_text())
    arrays = np.load(folder / "workload.npz")
    x, y, bounds = arrays["client_x"], arrays["client_y"], arrays["client_bounds"]
    clients = [
        (torch.from_numpy(x[a:b]), torch.from_numpy(y[a:b]))
        for a, b in zip(bounds[:-1], bounds[1:], strict=True)
    ]
    initial = {
        key.removeprefix("init/"): torch.from_numpy(arrays[key])
        for key in arrays.files
        if key.startswith("init/")
    }
    test = (torch.from_numpy(arrays["test_x"]), torch.from_numpy(arrays["test_y"]))
    return FedAvgWork(folder.resolve(), settings, clients, test, initial)


@torch.no_grad()
def accuracy(model: nn.Module, test: tuple[torch.Tensor, torch.Tensor]) -> float:
    """Share of test rows whose arg-max logit is the label (fedsim's evaluate, in one batch)."""
    model.eval()
    x, y = test
    return float((model(x).argmax(dim=1) == y).float().mean())


def main(framework: str, run_fn: Callable[[FedAvgWork, int], nn.Module]) -> int:
    """Parse the runner's arguments, do ``--runs`` runs of ``run_fn``, write the JSON figures.

    ``run_fn(work, run_index)`` builds whatever the framework needs, trains for the workload's
    rounds and returns the final global model; its wall time includes that set-up.
    """
    parser = argparse.ArgumentParser(description=f"FedAvg on an exported workload in {framework}")
    parser.add_argument("--workload", type=Path, required=True)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)  # as fedsim's workers and the plain loop: one thread per client
    work = load_work(args.workload)
    runs, model = [], None
    for index in range(args.runs):
        started = time.perf_counter()
        model = run_fn(work, index)
        runs.append(
            {
                "wall_s": time.perf_counter() - started,
                "accuracy": accuracy(model, work.test),
                "done_unix": time.time(),
            }
        )
        print(
            f"{framework} run {index + 1}: {runs[-1]['wall_s']:.2f} s, "
            f"accuracy {runs[-1]['accuracy']:.4f}",
            flush=True,
        )
    figures = {
        "framework": framework,
        "version": metadata.version(framework),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "client_rounds": work.client_rounds,
        "runs": runs,
    }
    if model is not None:  # the last run's global model, for comparing weights with fedsim's
        weights = args.out.with_suffix(".npz")
        np.savez(weights, **{k: v.detach().cpu().numpy() for k, v in model.state_dict().items()})
        figures["weights"] = weights.name
    args.out.write_text(json.dumps(figures, indent=2))
    return 0
