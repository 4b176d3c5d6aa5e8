"""FedSpeed (Sun et al., ICLR 2023, arXiv 2302.10429), as the official FL-Simulator code does it.

Per local step (``client/fedspeed.py``, ``optimizer/ESAM.py`` of woodenchild95/FL-Simulator)::

    g1 = grad f(w);  w~ = w + rho * g1 / (||g1|| + 1e-7);  g2 = grad f(w~);  back to w
    g  = clip(g2 + lambda * (h_i - w_t), max_norm = 10) + lambda * w
    w <- SGD step with g (plus the client's own weight decay and momentum)

The code writes the prox-correction as SGD ``weight_decay = wd + lambda`` plus the loss term
``lambda * <w, h_i - w_t>``; the clip sees the loss term's gradient but not the decay, as here.
The clip is not FedSpeed's: FL-Simulator clips every algorithm's clients at max norm 10, and
fedsim does the same for every strategy with ``client.max_grad_norm`` in the shared step
(fedsim/training/loop.py ``optimizer_step``): this term adds g2 and the correction in
``after_backward`` (before the clip) and the decay lambda * w in ``before_step`` (after it). The
former private knob ``strategy.grad_clip`` is refused with a pointer to ``client.max_grad_norm``.
After training ``h_i <- h_i + (w_i^K - w_t)`` (``server/FedSpeed.py``: the server keeps every
h_i, an N x d tensor), and ``w_{t+1} = mean_S(w_i^K) + mean_{all N}(h_j)``.

Our decisions: h_i lives in client i's persistent state (it only changes when client i trains,
and only its own client reads it), and the server keeps the running mean over all N clients,
``H <- H + (1 / N) sum_S (w_i^K - w_t)``: the same numbers without an N x d table or extra
traffic. mean_S is weighted by examples as fedsim's FedAvg (the code's uniform mean when
partitions are equal). Not implemented: the code's per-round lr decay (0.998) and the relaxed
initialization ``use_RI``. Note: ``lamb = 0`` does not give FedAvg, since the server still adds
H (the code's h is not scaled by lambda).
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
from fedsim.errors import ConfigError
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

__all__ = ["FedSpeed", "FedSpeedTerm", "fedspeed_server_update", "sam_perturbation"]

NAME = "fedspeed"
_NORM_EPS = 1e-7  # ESAM.first_step: rho / (||g|| + 1e-7)


def sam_perturbation(grads: Sequence[torch.Tensor], rho: float) -> list[torch.Tensor]:
    """ESAM's ascent step ``rho * g / (||g|| + 1e-7)``, ||g|| the norm over all tensors."""
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    scale = rho / (norm + _NORM_EPS)
    return [g * scale for g in grads]


def fedspeed_server_update(
    w_global: Tensors,
    client_weights: Sequence[Tensors],
    w_mean: Tensors,
    mean_dual: Tensors,
    num_clients: int,
) -> tuple[Tensors, Tensors]:
    """``H + sum_i (w_i - w) / N`` and the new model ``w_mean + H_new``."""
    new_dual = {
        k: mean_dual[k]
        + sum((w_i[k] - w_global[k] for w_i in client_weights), np.zeros_like(mean_dual[k]))
        / num_clients
        for k in mean_dual
    }
    return {k: w_mean[k] + new_dual[k] for k in w_mean}, new_dual


@register_term(NAME)
class FedSpeedTerm(ClientTerm):
    """Client side: ESAM gradient, prox-correction, (shared clip), decay; h_i updated after."""

    def __init__(self, config: ConfigRecord) -> None:
        super().__init__(config)
        self.rho = float(keys.number(config, keys.FEDSPEED_RHO))
        self.lamb = float(keys.number(config, keys.FEDSPEED_LAMBDA))

    def before_train(self, model: torch.nn.Module, ctx: TrainContext) -> None:
        """Keep w_t; read h_i (zero at first); precompute lambda * (h_i - w_t)."""
        self.w_global = snapshot(model)
        self.dual = state_tensors(ctx.state, keys.FEDSPEED_DUAL, self.w_global)
        self.correction = {k: self.lamb * (self.dual[k] - self.w_global[k]) for k in self.dual}

    def after_backward(self, model: torch.nn.Module, recompute: Callable[[], None]) -> None:
        """Replace ``.grad`` (g1, the task gradient) by ``g2 + lambda * (h_i - w_t)``."""
        params = trainable(model)
        if self.rho > 0:
            with_grad = {k: p for k, p in params.items() if p.grad is not None}
            grads = [p.grad for p in with_grad.values() if p.grad is not None]  # all: with_grad's
            steps = sam_perturbation(grads, self.rho)
            with torch.no_grad():
                for p, e in zip(with_grad.values(), steps, strict=True):
                    p.add_(e)
            recompute()  # g2 at w~
            with torch.no_grad():
                for p, e in zip(with_grad.values(), steps, strict=True):
                    p.sub_(e)
        with torch.no_grad():
            for name, p in params.items():
                corr = self.correction[name]
                p.grad = corr.clone() if p.grad is None else p.grad.add_(corr)

    def before_step(self, model: torch.nn.Module) -> None:
        """After the shared clip: ``+ lambda * w``, the code's extra SGD weight decay (no clip)."""
        with torch.no_grad():
            for p in trainable(model).values():
                assert p.grad is not None  # after_backward gave every one a .grad
                p.grad.add_(p, alpha=self.lamb)

    def after_train(self, model: torch.nn.Module, ctx: TrainContext, run: LocalRun) -> TermOutput:
        """``h_i <- h_i + (w_i^K - w_t)`` into the client's state."""
        w_local = snapshot(model)
        ctx.state[keys.FEDSPEED_DUAL] = ArrayRecord(
            {k: self.dual[k] + (w_local[k] - self.w_global[k]) for k in self.dual}
        )
        return TermOutput()


class FedSpeed(FedAvg):
    """FedAvg with FedSpeed's client step and server correction.

    Parameters
    ----------
    rho
        ESAM perturbation radius (FL-Simulator default 0.1); 0 turns the ascent step off.
    lamb
        Prox-correction weight lambda (FL-Simulator default 0.1).
    grad_clip
        Removed (issue 14), kept only to refuse a value: null, or a ConfigError pointing to
        ``client.max_grad_norm``, the one clip of every strategy.
    **fedavg_kwargs
        Flower FedAvg's arguments (sampling fractions, minimum nodes, ...).

    """

    def __init__(
        self, *, rho: float = 0.1, lamb: float = 0.1, grad_clip: None = None, **fedavg_kwargs: Any
    ) -> None:
        if grad_clip is not None:  # an old command line or run folder: say where the clip went
            raise ConfigError(
                "strategy.grad_clip",
                grad_clip,
                "removed: one gradient clip for every strategy, set client.max_grad_norm",
            )
        super().__init__(**fedavg_kwargs)
        self.rho = check_number("rho", rho, 0.0)
        self.lamb = check_number("lamb", lamb, 0.0)
        self.mean_dual: Tensors | None = None  # H = mean over all N clients of h_j
        self.current_arrays: ArrayRecord | None = None  # w_t
        self.num_clients = 0  # N, all clients

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """FedAvg's messages, asking for the FedSpeed term with its knobs."""
        if self.mean_dual is None:
            self.mean_dual = zeros_like(arrays)
        self.current_arrays = arrays
        self.num_clients = count_nodes(grid)
        config[keys.CLIENT_TERMS] = [NAME]
        config[keys.FEDSPEED_RHO] = self.rho
        config[keys.FEDSPEED_LAMBDA] = self.lamb
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """``w = mean_S(w_i) + H`` after adding this round's updates to H."""
        replies = list(replies)
        mean, metrics = super().aggregate_train(server_round, replies)
        if mean is None or self.current_arrays is None or self.mean_dual is None:
            return mean, metrics
        clients = client_models(replies)
        new_w, self.mean_dual = fedspeed_server_update(
            to_numpy(self.current_arrays), clients, to_numpy(mean), self.mean_dual, self.num_clients
        )
        return to_record(new_w), metrics
