"""FedNova (Wang et al., NeurIPS 2020): normalized averaging by each client's local steps.

Clients that take more local steps (bigger partitions, more epochs) move further; plain FedAvg
then optimizes a mix of objectives weighted by steps, not the true one. FedNova divides each
update by the client's ||a_i||_1 (the sum of the weights its local solver put on its gradients)
and rescales the mean by the effective steps tau_eff (eq. 6-7)::

    d_i      = (w_t - w_i) / ||a_i||_1          (the client's average step)
    tau_eff  = sum_i p_i ||a_i||_1              p_i = n_i / sum_S n_j
    w_{t+1}  = w_t - eta_g * tau_eff * sum_i p_i d_i

For SGD, ||a_i||_1 = tau_i, the steps taken; with momentum rho (paper, sec. 4 / appendix)
||a_i||_1 = [tau - rho (1 - rho^tau) / (1 - rho)] / (1 - rho). The client reports it (it knows
its steps and momentum) as a metric. Equal ||a_i||_1 for all clients gives FedAvg exactly.
Weight decay is not part of a_i here (nor in Flower's niid_bench FedNova).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedsim import keys
from fedsim.learning.params import array_record
from fedsim.strategies.common import Tensors, check_number, to_numpy, to_record
from fedsim.training.contract import TrainContext
from fedsim.training.loop import ClientTerm, LocalRun, TermOutput, register_term

__all__ = ["FedNova", "FedNovaTerm", "fednova_aggregate", "fednova_norm"]

NAME = "fednova"


def fednova_norm(num_steps: int, momentum: float) -> float:
    """||a_i||_1 of ``num_steps`` SGD steps with heavy-ball ``momentum`` (= steps if 0)."""
    if momentum == 0.0:
        return float(num_steps)
    rho = momentum
    return (num_steps - rho * (1.0 - rho**num_steps) / (1.0 - rho)) / (1.0 - rho)


def fednova_aggregate(
    w_global: Tensors, updates: Sequence[tuple[Tensors, float, float]], eta_g: float
) -> Tensors:
    """FedNova's new global model from (client weights, num examples, ||a_i||_1) per client.

    A client that took no step (||a_i||_1 = 0) moved nowhere: it adds nothing to tau_eff or d.
    """
    total = sum(n for _, n, _ in updates)
    tau_eff = sum(n / total * a for _, n, a in updates)
    new: Tensors = {}
    for key, w in w_global.items():
        step = np.zeros_like(w)
        for weights, n, a in updates:
            if a > 0:
                step = step + (n / total) * (w - weights[key]) / a
        new[key] = w - eta_g * tau_eff * step
    return new


@register_term(NAME)
class FedNovaTerm(ClientTerm):
    """Client side: training is unchanged; the reply reports ||a_i||_1."""

    def after_train(self, model: torch.nn.Module, ctx: TrainContext, run: LocalRun) -> TermOutput:
        """The normalizing factor of the steps just taken."""
        return TermOutput(metrics={keys.FEDNOVA_NORM: fednova_norm(run.num_steps, run.momentum)})


class FedNova(FedAvg):
    """FedAvg with FedNova's normalized averaging.

    Parameters
    ----------
    eta_g
        Global (server) learning rate (1.0 = the paper's plain FedNova).
    **fedavg_kwargs
        Flower FedAvg's arguments (sampling fractions, minimum nodes, ...).

    """

    def __init__(self, *, eta_g: float = 1.0, **fedavg_kwargs: Any) -> None:
        super().__init__(**fedavg_kwargs)
        self.eta_g = check_number("eta_g", eta_g, 0.0, inclusive=False)
        self.current_arrays: ArrayRecord | None = None  # w_t of the round being trained

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """FedAvg's messages, asking clients to report ||a_i||_1."""
        self.current_arrays = arrays
        config[keys.CLIENT_TERMS] = [NAME]
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """FedAvg's checks and metrics; the model is FedNova's normalized average."""
        replies = list(replies)
        mean, metrics = super().aggregate_train(server_round, replies)
        if mean is None or self.current_arrays is None:
            return mean, metrics
        updates = []
        for reply in replies:
            if reply.has_error():
                continue
            client_metrics = reply.content[keys.METRICS]
            weights = to_numpy(array_record(reply.content, keys.ARRAYS))
            num_examples = keys.number(client_metrics, self.weighted_by_key)
            norm = keys.number(client_metrics, keys.FEDNOVA_NORM)
            updates.append((weights, float(num_examples), float(norm)))
        return to_record(fednova_aggregate(to_numpy(self.current_arrays), updates, self.eta_g)), (
            metrics
        )
