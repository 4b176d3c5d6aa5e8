"""Small examples of ARCHITECTURE.md's recipes, written as a user would (tests/test_recipes.py).

They live outside fedsim's packages on purpose: a strategy, a client behaviour and a device
effect of one's own, importable by the Ray workers (the test folder is on their path), built
from the config.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import FedAvg

from fedsim.clients.local_sgd import LocalSGD
from fedsim.clock.devices import DeviceProfile
from fedsim.learning.models import ModelFactory
from fedsim.seeding import numpy_rng
from fedsim.strategies.common import client_models, to_record
from fedsim.training.contract import DeviceCost, TrainContext, TrainOutcome
from fedsim.training.loop import train_loop


class MeanOfClients(FedAvg):
    """The recipe "a strategy": FedAvg's sampling, the plain mean of the client models."""

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Every client weighs the same, whatever its number of examples."""
        models = client_models(replies)
        if not models:
            return None, None
        first = models[0]
        mean = {k: np.mean([m[k] for m in models], axis=0).astype(first[k].dtype) for k in first}
        return to_record(mean), None


class FrozenFirstLayer:
    """The recipe "a client behaviour": local SGD that never updates the first layer.

    Its constructor arguments are its YAML keys; it trains through the one loop, so strategies'
    client terms and the shared clip apply, and it charges the clock as local SGD does.
    """

    def __init__(self, *, lr: float = 0.2, batch_size: int = 16, local_epochs: int = 1) -> None:
        self.lr, self.batch_size, self.local_epochs = lr, batch_size, local_epochs
        self._cost = LocalSGD(local_epochs=local_epochs, batch_size=batch_size, lr=lr)

    def wrap_factory(self, factory: ModelFactory) -> ModelFactory:
        """The model as the factory builds it."""
        return factory

    def train(
        self, model: torch.nn.Module, data: dict[str, torch.Tensor], ctx: TrainContext
    ) -> TrainOutcome:
        """SGD on every parameter but the first one."""
        first, *rest = model.parameters()
        first.requires_grad_(False)
        try:
            optimizer = torch.optim.SGD(rest, lr=self.lr)
            return train_loop(
                model, data, ctx, optimizer,
                local_epochs=self.local_epochs, batch_size=self.batch_size,
            )  # fmt: skip
        finally:
            first.requires_grad_(True)

    def device_cost(
        self, model: torch.nn.Module, batch: dict[str, torch.Tensor], num_examples: int
    ) -> DeviceCost:
        """What local SGD of the same budget costs the device."""
        return self._cost.device_cost(model, batch, num_examples)


class OwnerBusy:
    """The device-effect recipe: a phone whose owner is using it does not take a round.

    In use with probability ``p`` in each round, drawn from the stream named by (seed,
    "owner-busy", client, round): reproducible, and no other draw of the run moves. ``tiers``
    limits the effect to some device tiers (all when empty).
    """

    def __init__(self, *, p: float, tiers: Iterable[str] = ()) -> None:
        self.p, self.tiers = float(p), frozenset(tiers)

    def check_in(
        self, seed: int, partition_id: int, server_round: int, now_s: float, profile: DeviceProfile
    ) -> str | None:
        """``"in_use"`` when the owner is on the phone this round, else None."""
        if self.tiers and profile.tier not in self.tiers:
            return None
        busy = numpy_rng(seed, "owner-busy", partition_id, server_round).random() < self.p
        return "in_use" if busy else None
