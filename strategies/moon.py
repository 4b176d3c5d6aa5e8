"""MOON (Li, He and Song, CVPR 2021): model-contrastive federated learning.

The server is FedAvg. Each client adds to its task loss ``mu * l_con`` (eq. 3), pulling the
representation z of its model towards that of the global model (z_glob, positive pair) and away
from that of its own previous local model (z_prev, negative pair)::

    l_con = -log( exp(sim(z, z_glob) / T) / (exp(sim(z, z_glob) / T) + exp(sim(z, z_prev) / T)) )

with sim the cosine similarity and T the temperature. The representation is the input of the
model's output layer (``fedsim.learning.models.forward_with_features``); the paper's ResNet adds a
projection head, the small CNN's penultimate layer plays that role here. z_glob and z_prev come
from the same model code run with the other weights (``torch.func.functional_call``), without
gradient. The client keeps its last local model's representation weights (all trainable tensors
but the output layer's) in its persistent state; before its first round the previous model is
the received global one, as in the official code (the previous-model pool starts as copies of
the initial nets). Defaults: T = 0.5 (paper); mu = 1.0 is the paper's value for CIFAR-100
(5 for CIFAR-10), our choice for digits.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812 - torch's own idiom
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedsim import keys
from fedsim.learning.models import forward_with_features
from fedsim.learning.params import array_record
from fedsim.strategies.common import check_number
from fedsim.training.contract import TrainContext
from fedsim.training.loop import Batch, ClientTerm, LocalRun, TermOutput, register_term, snapshot

__all__ = ["Moon", "MoonTerm", "moon_contrastive_loss"]

NAME = "moon"


def moon_contrastive_loss(
    z: torch.Tensor, z_glob: torch.Tensor, z_prev: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Mean over the batch of MOON's l_con (eq. 3); all inputs (B, D)."""
    sims = torch.stack(
        [F.cosine_similarity(z, z_glob, dim=-1), F.cosine_similarity(z, z_prev, dim=-1)], dim=1
    )  # (B, 2): positive pair first
    target = torch.zeros(len(z), dtype=torch.long, device=z.device)
    return F.cross_entropy(sims / temperature, target)


@register_term(NAME)
class MoonTerm(ClientTerm):
    """Client side: ``loss + mu * l_con``; the previous model's weights kept in the state."""

    needs_features = True

    def __init__(self, config: ConfigRecord) -> None:
        super().__init__(config)
        self.mu = float(keys.number(config, keys.MOON_MU))
        self.temperature = float(keys.number(config, keys.MOON_TEMPERATURE))

    def before_train(self, model: torch.nn.Module, ctx: TrainContext) -> None:
        """Keep the global weights; read the previous local model's (global ones at first)."""
        output_layer = getattr(model, "output_layer", None)
        if output_layer is None:
            raise TypeError(
                f"MOON needs the model's representation: {type(model).__name__} "
                "has no output_layer()"
            )
        head = {id(p) for p in output_layer().parameters()}
        self.representation = [
            name for name, p in model.named_parameters() if p.requires_grad and id(p) not in head
        ]
        self.w_global = snapshot(model)
        if keys.MOON_PREVIOUS in ctx.state:
            previous = array_record(ctx.state, keys.MOON_PREVIOUS)
            kept = previous.to_torch_state_dict()
            self.w_previous = {k: v.to(ctx.device) for k, v in kept.items()}  # the model's device
        else:
            self.w_previous = {k: self.w_global[k] for k in self.representation}

    def loss(self, model: torch.nn.Module, batch: Batch, loss: torch.Tensor) -> torch.Tensor:
        """Add ``mu * l_con`` on this batch's representation."""
        assert batch.features is not None  # needs_features: the loop computed them
        with torch.no_grad():
            _, z_glob = forward_with_features(model, batch.inputs, self.w_global)
            _, z_prev = forward_with_features(model, batch.inputs, self.w_previous)
        l_con = moon_contrastive_loss(batch.features, z_glob, z_prev, self.temperature)
        return loss + self.mu * l_con

    def after_train(self, model: torch.nn.Module, ctx: TrainContext, run: LocalRun) -> TermOutput:
        """Keep this round's local representation weights: next round's previous model."""
        weights = snapshot(model)
        ctx.state[keys.MOON_PREVIOUS] = ArrayRecord({k: weights[k] for k in self.representation})
        return TermOutput()


class Moon(FedAvg):
    """FedAvg whose clients add MOON's model-contrastive term.

    Parameters
    ----------
    mu
        Weight of the contrastive term (>= 0; 0 = FedAvg).
    temperature
        Temperature T of the contrastive softmax (> 0).
    **fedavg_kwargs
        Flower FedAvg's arguments (sampling fractions, minimum nodes, ...).

    """

    def __init__(self, *, mu: float = 1.0, temperature: float = 0.5, **fedavg_kwargs: Any) -> None:
        super().__init__(**fedavg_kwargs)
        self.mu = check_number("mu", mu, 0.0)
        self.temperature = check_number("temperature", temperature, 0.0, inclusive=False)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """FedAvg's messages, asking for the MOON term with ``mu`` and ``temperature``."""
        config[keys.CLIENT_TERMS] = [NAME]
        config[keys.MOON_MU] = self.mu
        config[keys.MOON_TEMPERATURE] = self.temperature
        return super().configure_train(server_round, arrays, config, grid)
