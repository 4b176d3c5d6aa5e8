"""FedDyn (Acar et al., ICLR 2021): federated learning with dynamic regularization.

Client i minimizes (Algorithm 1)::

    L_i(theta) - <grad L_i(theta_i^{t-1}), theta> + (alpha / 2) ||theta - theta^{t-1}||^2

keeping the linear term's vector g_i = grad L_i(theta_i^{t-1}) in its persistent state (zero at
first). After training it sets ``g_i <- g_i - alpha (theta_i^t - theta^{t-1})``. The server keeps
h (zero at first)::

    h       <- h - (alpha / N) sum_{i in P_t} (theta_i^t - theta^{t-1})     N = all clients
    theta^t  = mean_{P_t}(theta_i^t) - h / alpha

Nothing beyond the model travels. Our decisions: mean_{P_t} is weighted by examples as fedsim's
FedAvg (the paper's uniform mean when partitions are equal); the two client terms are added to
the gradient (before the optimizer's momentum and weight decay), which is their exact gradient.
The default alpha = 0.01 is ours (the paper tunes alpha over {0.1, 0.01, 0.001}).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedsim import keys
from fedsim.strategies.common import (
    Tensors,
    check_number,
    client_models,
    count_nodes,
    to_numpy,
    to_record,
    zeros_like,
)
from fedsim.training.contract import TrainContext
from fedsim.training.loop import (
    ClientTerm,
    LocalRun,
    TermOutput,
    register_term,
    snapshot,
    state_tensors,
    trainable,
)

__all__ = ["FedDyn", "FedDynTerm", "feddyn_client_grad", "feddyn_server_update"]

NAME = "feddyn"


def feddyn_client_grad(
    grad_prev: torch.Tensor, w_global: torch.Tensor, w_local: torch.Tensor, alpha: float
) -> torch.Tensor:
    """The client's new linear-term vector: ``g - alpha * (w_local - w_global)``."""
    return grad_prev - alpha * (w_local - w_global)


def feddyn_server_update(
    w_global: Tensors,
    client_weights: Sequence[Tensors],
    w_mean: Tensors,
    h: Tensors,
    alpha: float,
    num_clients: int,
) -> tuple[Tensors, Tensors]:
    """``h - alpha / N * sum_i (w_i - w)`` and the new model ``w_mean - h_new / alpha``."""
    new_h = {
        k: h[k]
        - alpha
        / num_clients
        * sum((w_i[k] - w_global[k] for w_i in client_weights), np.zeros_like(h[k]))
        for k in h
    }
    new_w = {k: w_mean[k] - new_h[k] / alpha for k in w_mean}
    return new_w, new_h


@register_term(NAME)
class FedDynTerm(ClientTerm):
    """Client side: gradient ``+ (-g_i + alpha (theta - theta^{t-1}))``; g_i updated after."""

    def __init__(self, config: ConfigRecord) -> None:
        super().__init__(config)
        self.alpha = float(keys.number(config, keys.FEDDYN_ALPHA))

    def before_train(self, model: torch.nn.Module, ctx: TrainContext) -> None:
        """Keep theta^{t-1}; read g_i from the client's state (zero at first)."""
        self.w_global = snapshot(model)
        self.grad_prev = state_tensors(ctx.state, keys.FEDDYN_GRAD, self.w_global)

    def after_backward(self, model: torch.nn.Module, recompute: Callable[[], None]) -> None:
        """Add the gradient of ``-<g_i, theta> + alpha/2 ||theta - theta^{t-1}||^2``."""
        with torch.no_grad():
            for name, p in trainable(model).items():
                extra = self.alpha * (p - self.w_global[name]) - self.grad_prev[name]
                p.grad = extra if p.grad is None else p.grad.add_(extra)

    def after_train(self, model: torch.nn.Module, ctx: TrainContext, run: LocalRun) -> TermOutput:
        """``g_i <- g_i - alpha (theta_i^t - theta^{t-1})`` into the client's state."""
        w_local = snapshot(model)
        ctx.state[keys.FEDDYN_GRAD] = ArrayRecord(
            {
                k: feddyn_client_grad(self.grad_prev[k], self.w_global[k], w_local[k], self.alpha)
                for k in self.w_global
            }
        )
        return TermOutput()


class FedDyn(FedAvg):
    """FedAvg with FedDyn's dynamic regularizer.

    Parameters
    ----------
    alpha
        Regularization strength alpha (> 0), on the client and in the server's h / alpha.
    **fedavg_kwargs
        Flower FedAvg's arguments (sampling fractions, minimum nodes, ...).

    """

    def __init__(self, *, alpha: float = 0.01, **fedavg_kwargs: Any) -> None:
        super().__init__(**fedavg_kwargs)
        self.alpha = check_number("alpha", alpha, 0.0, inclusive=False)
        self.h: Tensors | None = None  # the server state h, zero-initialised on the first round
        self.current_arrays: ArrayRecord | None = None  # theta^{t-1}
        self.num_clients = 0  # N, all clients

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """FedAvg's messages, asking for the FedDyn term with ``alpha``."""
        if self.h is None:
            self.h = zeros_like(arrays)
        self.current_arrays = arrays
        self.num_clients = count_nodes(grid)
        config[keys.CLIENT_TERMS] = [NAME]
        config[keys.FEDDYN_ALPHA] = self.alpha
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Update h from the clients' models, then ``theta = mean - h / alpha``."""
        replies = list(replies)
        mean, metrics = super().aggregate_train(server_round, replies)
        if mean is None or self.current_arrays is None or self.h is None:
            return mean, metrics
        clients = client_models(replies)
        new_w, self.h = feddyn_server_update(
            to_numpy(self.current_arrays),
            clients,
            to_numpy(mean),
            self.h,
            self.alpha,
            self.num_clients,
        )
        return to_record(new_w), metrics
