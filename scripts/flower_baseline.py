r"""Plain Flower, no fedsim: FedAvg in the pattern of Flower's quickstart-pytorch app.

One SuperNode per client, one ``ClientApp`` call per client-round, ``Strategy.start`` driving
the rounds, Flower's own Ray backend. The work is the same as fedsim's ``client=local_sgd`` with
every client sampled: the same data and partitions (read through fedsim's workload once per
process, as the quickstart caches its ``FederatedDataset``), the same initial model, batches,
epochs and learning rate. ``scripts/bench.py`` times it against fedsim (``speedup_vs_flower``)
and compares the final global models (fedsim's FedAvg is Flower's FedAvg).

One deliberate departure from the quickstart: the server aggregates the replies in partition
order (``PartitionOrderFedAvg``), as fedsim does, instead of in arrival order. float32 addition
is not associative, so with arrival order the two global models differed in the last bits by
an amount that depended on which worker happened to finish first (seen up to ~1e-6 after two
rounds on a loaded machine); in the same order they are comparable to the bit.

Usage (the same Hydra overrides as ``fedsim``)::

    .venv/bin/python -m fedsim.scripts.flower_baseline --out final.safetensors \\
        num_clients=100 strategy.fraction_train=1.0 num_rounds=5
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from collections.abc import Sequence

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import torch  # noqa: E402
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402
from flwr.serverapp.strategy import FedAvg  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from fedsim.config import compose_config  # noqa: E402
from fedsim.learning.evaluation import evaluate  # noqa: E402
from fedsim.learning.workload import get_workload  # noqa: E402
from fedsim.seeding import torch_generator  # noqa: E402
from fedsim.training.loop import clip_gradients  # noqa: E402

OVERRIDES_ENV = "FEDSIM_BASELINE_OVERRIDES"  # JSON list; Ray workers inherit the environment


@functools.cache
def _composed(overrides: str) -> DictConfig:
    return compose_config(json.loads(overrides))


def _config() -> DictConfig:
    """The run's config, composed once per process (as the quickstart reads its run config)."""
    return _composed(os.environ.get(OVERRIDES_ENV, "[]"))


client_app = ClientApp()


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    """Local SGD on this SuperNode's partition, as in the quickstart's ``train``."""
    cfg = _config()
    workload = get_workload(cfg)  # cached per process, like the quickstart's dataset
    pid = int(context.node_config["partition-id"])
    model = workload.build_model()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    data = workload.client_data(pid)
    server_round = int(msg.content["config"]["server-round"])
    torch.set_num_threads(1)
    generator = torch_generator(int(cfg.seed), "train-batches", server_round, pid)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.client.lr)
    labels, n, batch_size = data["label"], len(data["label"]), int(cfg.client.batch_size)
    model.train()
    for _ in range(int(cfg.client.local_epochs)):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            inputs = {k: v[idx] for k, v in data.items() if k != "label"}
            loss = torch.nn.functional.cross_entropy(model(**inputs), labels[idx])
            optimizer.zero_grad()
            loss.backward()
            clip_gradients(model, cfg.client.max_grad_norm)  # every fedsim client clips so
            optimizer.step()
    metrics = MetricRecord({"num-examples": n, "partition-id": pid})
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics})
    return Message(content=content, reply_to=msg)


class PartitionOrderFedAvg(FedAvg):
    """Flower's FedAvg, summing the replies in partition order rather than arrival order."""

    def aggregate_train(self, server_round, replies):  # type: ignore[no-untyped-def]
        """FedAvg's aggregation of the replies sorted by the partition id each one reports."""
        ordered = sorted(replies, key=lambda m: int(m.content["metrics"]["partition-id"]))
        return super().aggregate_train(server_round, ordered)


server_app = ServerApp()
RESULT: dict = {}


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    """FedAvg over every SuperNode for ``num_rounds``, central evaluation each round."""
    cfg = _config()
    workload = get_workload(cfg)
    model, test = workload.build_model(), workload.test_features()

    def central(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model.load_state_dict(arrays.to_torch_state_dict())
        return MetricRecord({"accuracy": evaluate(model, test)["accuracy"]})

    strategy = PartitionOrderFedAvg(
        fraction_train=1.0,
        fraction_evaluate=0.0,
        min_train_nodes=int(cfg.num_clients),
        min_available_nodes=int(cfg.num_clients),
    )
    started = time.perf_counter()
    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(model.state_dict()),
        train_config=ConfigRecord(),
        num_rounds=int(cfg.num_rounds),
        evaluate_fn=central,
    )
    RESULT["rounds_wall_s"] = time.perf_counter() - started
    RESULT["accuracies"] = [
        result.evaluate_metrics_serverapp[r]["accuracy"] for r in range(1, int(cfg.num_rounds) + 1)
    ]
    RESULT["arrays"] = result.arrays


def run(overrides: Sequence[str]) -> dict:
    """Run the baseline in this process on Flower's simulation engine; return its figures."""
    from flwr.simulation import run_simulation

    os.environ[OVERRIDES_ENV] = json.dumps(list(overrides))
    cfg = _config()
    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=int(cfg.num_clients),
        backend_name="ray",
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            # A Ray of its own, never the last cluster started on the machine (issue 15.9).
            "init_args": {"address": "local", "logging_level": "ERROR", "log_to_driver": False},
        },
    )
    return dict(RESULT)


def cli(argv: Sequence[str] | None = None) -> int:
    """Run, print the figures, optionally save the final global model (safetensors)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the final global tensors here (safetensors)")
    parser.add_argument("--json", help="write the figures here (JSON)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    result = run(args.overrides)
    figures = {
        "process_wall_s": time.perf_counter() - started,
        "rounds_wall_s": result["rounds_wall_s"],
        "accuracies": result["accuracies"],
    }
    if args.out:
        from safetensors.torch import save_file

        save_file(result["arrays"].to_torch_state_dict(), args.out)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(figures, handle)
    print(
        f"rounds {figures['rounds_wall_s']:.2f} s, run {figures['process_wall_s']:.2f} s, "
        f"final accuracy {figures['accuracies'][-1]:.4f}"
    )
    return 0


if __name__ == "__main__":
    # The apps must live in the importable module, not in ``__main__``: Ray workers would get
    # by-value copies of ``__main__``'s functions and globals, and the ServerApp's results
    # would land in a copy.
    from fedsim.scripts import flower_baseline

    sys.exit(flower_baseline.cli())
