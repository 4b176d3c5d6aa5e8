"""The physical limit fedsim is measured against: FedAvg as a plain, sequential PyTorch loop.

Same clients, batches, epochs and seeds as ``fedsim`` with ``client=local_sgd`` and every
client sampled each round (``strategy.fraction_train=1.0``): the data and the initial model come
from fedsim's workload (built before the clock starts), the timed part is nothing but torch:
load the global weights, run each client's mini-batch SGD, take the example-weighted mean. One
thread, one process, no Flower, no Ray. ``scripts/bench.py`` divides fedsim's wall time by this.

Usage::

    .venv/bin/python -m fedsim.scripts.plain_loop num_clients=100 num_rounds=5
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from omegaconf import DictConfig

from fedsim.config import compose_config
from fedsim.learning.evaluation import evaluate
from fedsim.learning.workload import get_workload
from fedsim.seeding import torch_generator
from fedsim.training.loop import clip_gradients

__all__ = ["PlainRun", "plain_fedavg"]


@dataclass(frozen=True)
class PlainRun:
    """What the plain loop did: accuracy after each round, the timed seconds, the final weights."""

    accuracies: list[float]
    rounds_wall_s: float  # training + aggregation + evaluation, all rounds
    client_rounds: int
    weights: dict[str, torch.Tensor]  # the final global model's state_dict


def plain_fedavg(cfg: DictConfig, num_threads: int = 1) -> PlainRun:
    """FedAvg over every client for ``cfg.num_rounds`` rounds; local SGD as ``cfg.client``."""
    torch.set_num_threads(num_threads)
    workload = get_workload(cfg)
    model = workload.build_model()
    test = workload.test_features()
    clients = [workload.client_data(pid) for pid in range(int(cfg.num_clients))]
    epochs, batch_size, lr = int(cfg.client.local_epochs), int(cfg.client.batch_size), cfg.client.lr
    max_grad_norm = cfg.client.get("max_grad_norm")
    params = [p for p in model.parameters() if p.requires_grad]
    global_params = [p.detach().clone() for p in params]
    seed, accuracies = int(cfg.seed), []
    started = time.perf_counter()
    for server_round in range(1, int(cfg.num_rounds) + 1):
        sums = [torch.zeros_like(p) for p in params]
        total = 0
        for pid, data in enumerate(clients):
            with torch.no_grad():
                for p, g in zip(params, global_params, strict=True):
                    p.copy_(g)
            optimizer = torch.optim.SGD(params, lr=lr)
            generator = torch_generator(seed, "train-batches", server_round, pid)
            labels, n = data["label"], len(data["label"])
            model.train()
            for _ in range(epochs):
                order = torch.randperm(n, generator=generator)
                for start in range(0, n, batch_size):
                    idx = order[start : start + batch_size]
                    inputs = {k: v[idx] for k, v in data.items() if k != "label"}
                    loss = torch.nn.functional.cross_entropy(model(**inputs), labels[idx])
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    clip_gradients(model, max_grad_norm)  # fedsim's clients' rule (issue 14)
                    optimizer.step()
            with torch.no_grad():
                for s, p in zip(sums, params, strict=True):
                    s.add_(p, alpha=n)
            total += n
        global_params = [s / total for s in sums]
        with torch.no_grad():
            for p, g in zip(params, global_params, strict=True):
                p.copy_(g)
        accuracies.append(evaluate(model, test)["accuracy"])
    wall = time.perf_counter() - started
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return PlainRun(accuracies, wall, int(cfg.num_rounds) * int(cfg.num_clients), weights)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the plain loop on a fedsim config (Hydra overrides as arguments); print its figures."""
    cfg = compose_config(list(sys.argv[1:] if argv is None else argv))
    run = plain_fedavg(cfg)
    print(
        f"{run.client_rounds} client-rounds in {run.rounds_wall_s:.2f} s "
        f"({run.client_rounds / run.rounds_wall_s:.1f}/s); final accuracy {run.accuracies[-1]:.4f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
