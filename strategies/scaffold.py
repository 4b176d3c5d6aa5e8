"""SCAFFOLD (Karimireddy et al., ICML 2020), option II control variates.

Client i keeps a control variate c_i (zero at first, in its persistent state); the server keeps
c and sends it with the model. Every local step follows ``g_i(w) - c_i + c`` (eq. 3); after K
steps at learning rate eta_l the client sets (option II, eq. 4)::

    c_i+ = c_i - c + (w_t - w_i^K) / (K * eta_l)

and uploads the model and dc_i = c_i+ - c_i (twice the uplink of FedAvg, and the download
carries c: twice the downlink). The server (eq. 5)::

    w_{t+1} = w_t + eta_g * mean_S(w_i^K - w_t)      c <- c + (1 / N) * sum_S dc_i

with N all clients. Our decisions: mean_S is weighted by examples as fedsim's FedAvg (as Flower's
niid_bench; the paper's uniform mean when partitions are equal), so with c = c_i = 0 one round
equals FedAvg; K is the number of steps the client really took; the correction is added to the
gradient before momentum and weight decay (FL-Simulator adds it as the loss term <w, c - c_i>,
which has the same gradient).
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
from fedsim.learning.params import array_record
from fedsim.strategies.common import (
    Tensors,
    check_number,
    count_nodes,
    take_records,
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

__all__ = ["Scaffold", "ScaffoldTerm", "scaffold_client_control", "scaffold_server_update"]

NAME = "scaffold"


def scaffold_client_control(
    c_i: torch.Tensor,
    c: torch.Tensor,
    w_global: torch.Tensor,
    w_local: torch.Tensor,
    num_steps: int,
    lr: float,
) -> torch.Tensor:
    """Option II: ``c_i - c + (w_global - w_local) / (num_steps * lr)``; ``c_i`` if no step ran."""
    if num_steps == 0:
        return c_i.clone()
    return c_i - c + (w_global - w_local) / (num_steps * lr)


def scaffold_server_update(
    w_global: Tensors,
    w_mean: Tensors,
    control: Tensors,
    control_deltas: Sequence[Tensors],
    num_clients: int,
    eta_g: float,
) -> tuple[Tensors, Tensors]:
    """``w + eta_g * (w_mean - w)`` and ``c + sum(dc_i) / num_clients`` per tensor."""
    new_w = {k: w_global[k] + eta_g * (w_mean[k] - w_global[k]) for k in w_global}
    new_c = {
        k: control[k] + sum((d[k] for d in control_deltas), np.zeros_like(control[k])) / num_clients
        for k in control
    }
    return new_w, new_c


@register_term(NAME)
class ScaffoldTerm(ClientTerm):
    """Client side: every gradient gets ``c - c_i``; afterwards c_i is updated and dc_i sent."""

    def before_train(self, model: torch.nn.Module, ctx: TrainContext) -> None:
        """Read c (message) and c_i (state, zero at first); keep w_t."""
        self.w_global = snapshot(model)
        received = array_record(ctx.received, keys.SCAFFOLD_CONTROL).to_torch_state_dict()
        self.c = {k: v.to(ctx.device) for k, v in received.items()}  # the model's device
        self.c_i = state_tensors(ctx.state, keys.SCAFFOLD_CLIENT_CONTROL, self.w_global)
        self.correction = {k: self.c[k] - self.c_i[k] for k in self.w_global}

    def after_backward(self, model: torch.nn.Module, recompute: Callable[[], None]) -> None:
        """``grad <- grad - c_i + c`` (eq. 3)."""
        with torch.no_grad():
            for name, p in trainable(model).items():
                if p.grad is None:
                    p.grad = self.correction[name].clone()
                else:
                    p.grad.add_(self.correction[name])

    def after_train(self, model: torch.nn.Module, ctx: TrainContext, run: LocalRun) -> TermOutput:
        """Keep c_i+ in the client's state; send dc_i = c_i+ - c_i."""
        w_local = snapshot(model)
        new_c_i = {
            k: scaffold_client_control(
                self.c_i[k], self.c[k], self.w_global[k], w_local[k], run.num_steps, run.lr
            )
            for k in self.w_global
        }
        ctx.state[keys.SCAFFOLD_CLIENT_CONTROL] = ArrayRecord(new_c_i)
        delta = {k: new_c_i[k] - self.c_i[k] for k in new_c_i}
        return TermOutput(records={keys.SCAFFOLD_CONTROL_DELTA: ArrayRecord(delta)})


class Scaffold(FedAvg):
    """FedAvg plus SCAFFOLD's control variates (option II).

    Parameters
    ----------
    eta_g
        Global (server) learning rate on the averaged update (1.0 in FL-Simulator).
    **fedavg_kwargs
        Flower FedAvg's arguments (sampling fractions, minimum nodes, ...).

    """

    def __init__(self, *, eta_g: float = 1.0, **fedavg_kwargs: Any) -> None:
        super().__init__(**fedavg_kwargs)
        self.eta_g = check_number("eta_g", eta_g, 0.0, inclusive=False)
        self.control: Tensors | None = None  # c, zero-initialised on the first round
        self.current_arrays: ArrayRecord | None = None  # w_t of the round being trained
        self.num_clients = 0  # N, all clients (c's 1/N)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """FedAvg's messages, asking for the SCAFFOLD term and carrying c."""
        if self.control is None:
            self.control = zeros_like(arrays)
        self.current_arrays = arrays
        self.num_clients = count_nodes(grid)
        config[keys.CLIENT_TERMS] = [NAME]
        messages = list(super().configure_train(server_round, arrays, config, grid))
        control = to_record(self.control)
        for message in messages:  # FedAvg shares one content: c is stored (and sent) once
            message.content[keys.SCAFFOLD_CONTROL] = control
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """FedAvg's mean of the models, then eq. 5 for w and c."""
        replies = list(replies)
        deltas = take_records(replies, keys.SCAFFOLD_CONTROL_DELTA)
        mean, metrics = super().aggregate_train(server_round, replies)
        if mean is None or self.current_arrays is None or self.control is None:
            return mean, metrics
        new_w, self.control = scaffold_server_update(
            to_numpy(self.current_arrays),
            to_numpy(mean),
            self.control,
            deltas,
            self.num_clients,
            self.eta_g,
        )
        return to_record(new_w), metrics
