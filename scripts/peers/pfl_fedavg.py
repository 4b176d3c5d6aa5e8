"""FedAvg on fedsim's exported workload in Apple's pfl (``pfl[pytorch]==0.6.0``), its own venv.

pfl's own FedAvg as its tutorials set it up: ``FederatedAveraging`` on a ``SimulatedBackend``
(one process, users trained one after the other), local SGD through ``PyTorchModel`` with the
workload's epochs, batch size, learning rate and clip (``local_max_grad_norm``), updates
weighted by each user's rows (``WeightByDatapoints``, fedsim's and Flower's example-weighted
mean), and the central step SGD at learning rate 1 (new global = old + mean update). Every
round trains every user: the cohort is the whole population, drawn by pfl's
``minimize_reuse`` sampler (each user once per pass). pfl batches a user's rows in order, with
no shuffle; fedsim shuffles per epoch: the steps are the same in number and size.

Usage (the driver does this)::

    PFL_VENV/bin/python scripts/peers/pfl_fedavg.py --workload DIR --runs 2 --out pfl.json
"""

from __future__ import annotations

import sys

import torch
from peer_common import FedAvgWork, main
from pfl.aggregate.simulate import SimulatedBackend
from pfl.aggregate.weighting import WeightByDatapoints
from pfl.algorithm import FederatedAveraging, NNAlgorithmParams
from pfl.data.dataset import Dataset
from pfl.data.federated_dataset import FederatedDataset
from pfl.data.sampling import get_user_sampler
from pfl.hyperparam import NNEvalHyperParams, NNTrainHyperParams
from pfl.metrics import Weighted
from pfl.model.pytorch import PyTorchModel
from torch import nn


class LossAndMetrics(nn.Module):
    """The workload's network plus the ``loss`` and ``metrics`` methods pfl's model requires."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, classes) of images x (B, C, H, W)."""
        logits: torch.Tensor = self.net(x)
        return logits

    def loss(self, x: torch.Tensor, y: torch.Tensor, eval: bool = False) -> torch.Tensor:  # noqa: A002
        """Mean cross-entropy of a batch (pfl calls it for each local step)."""
        self.eval() if eval else self.train()
        return nn.functional.cross_entropy(self(x), y)

    @torch.no_grad()
    def metrics(self, x: torch.Tensor, y: torch.Tensor, eval: bool = False) -> dict:  # noqa: A002
        """Summed loss over the rows (pfl's evaluation; the bench scores the model itself)."""
        self.eval() if eval else self.train()
        loss = nn.functional.cross_entropy(self(x), y, reduction="sum").item()
        return {"loss": Weighted(loss, len(y))}


def run(work: FedAvgWork, index: int) -> nn.Module:
    """One pfl FedAvg run of the workload; return the final global network."""
    s = work.settings
    torch.manual_seed(int(s["seed"]) + index)
    users = list(range(len(work.clients)))

    def make_dataset(user: int) -> Dataset:
        x, y = work.clients[user]
        return Dataset(raw_data=[x, y], user_id=user)

    federated = FederatedDataset(make_dataset, get_user_sampler("minimize_reuse", users))
    wrapped = LossAndMetrics(work.fresh_model())
    model = PyTorchModel(
        model=wrapped,
        local_optimizer_create=torch.optim.SGD,
        central_optimizer=torch.optim.SGD(wrapped.parameters(), lr=1.0),
    )
    backend = SimulatedBackend(
        training_data=federated, val_data=federated, postprocessors=[WeightByDatapoints()]
    )
    FederatedAveraging().run(
        algorithm_params=NNAlgorithmParams(
            central_num_iterations=int(s["num_rounds"]),
            evaluation_frequency=int(s["num_rounds"]) + 1,  # the bench evaluates at the end
            train_cohort_size=len(users),
            val_cohort_size=0,
        ),
        backend=backend,
        model=model,
        model_train_params=NNTrainHyperParams(
            local_num_epochs=int(s["local_epochs"]),
            local_learning_rate=float(s["lr"]),
            local_batch_size=int(s["batch_size"]),
            local_max_grad_norm=s["max_grad_norm"],
        ),
        model_eval_params=NNEvalHyperParams(local_batch_size=int(s["batch_size"])),
    )
    return wrapped.net


if __name__ == "__main__":
    sys.exit(main("pfl", run))
