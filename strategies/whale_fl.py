"""WHALE-FL (Su et al., arXiv 2405.00885): every device picks its sub-model width every round.

Verified structure (methods.md 3.2): each round a device chooses its subnetwork size from a
utility of (a) its compute and communication capacity, (b) its *current* conditions and (c) the
FL training status, mapped to a discrete set of widths; sub-models are width slices (HeteroFL
extraction, ``fedsim/slicing.py``) merged coordinate-wise. The paper's formula is OPEN
(methods.md 8); everything below is the methods file's decision (3.4), not the paper's, and
every term is a constructor argument (conf/strategy/whale_fl.yaml)::

    T_i^t(p)  = expected download + compute + upload (+ server) seconds of client i's job at
                width p, under its conditions of round t (the device model's dynamics): FLOPs
                and memory counted on the width-p sub-model, bytes of its tensors
    T_ref^t   = the reference_quantile of T_i^t(max width) over the round's online clients
    phi_t     = FI_t / max_{tau <= t} FI_tau      FI_t = mean of the last fisher_window FIs
    U_i^t(p)  = -T_i^t(p) / T_ref^t + tradeoff * phi_t * p
    p_i^t     = argmax of U over the widths whose job fits the device's memory (and
                latency_budget_s, if set); ties go to the larger width

Decisions beyond methods.md 3.4, each flagged here:

* **Fisher information** (OPEN how the paper computes it). methods.md suggests the empirical
  Fisher trace of the global model on a probe batch per client; a side-tuning client trains on
  the server without the shared loop, so no client-side probe runs everywhere. We use the
  empirical Fisher of the clients' *pseudo-gradients*: per client the mean over its sub-model's
  coordinates of (w_local - w_global)^2, example-weighted over the round's clients. Per
  coordinate, so sub-models of different widths are comparable. It is measured after round t,
  so phi for round t uses rounds < t; before any measurement phi = ``initial_status``.
* **T_ref** (OPEN normalisation): a per-round quantile over clients, so a device slower than
  the reference pays more per unit width. With T roughly proportional to p^2 the optimum is
  near ``p = tradeoff * phi * T_ref / (2 T_i(1))``.
* Bytes a method uploads besides the model (side-tuning's activations) are known only after
  the round: T leaves them out.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fedsim.errors import ConfigError
from fedsim.slicing import Indices, slice_state
from fedsim.strategies.heterofl import DEFAULT_WIDTHS, HeteroFL

__all__ = ["WhaleFL", "choose_width", "pseudo_gradient_fisher", "training_status", "utility"]


def utility(
    latency_s: float, reference_s: float, status: float, width: float, tradeoff: float
) -> tuple[float, float, float]:
    """``(U, system term, training term)``: ``-T / T_ref`` and ``tradeoff * phi * p``."""
    system = -latency_s / reference_s
    training = tradeoff * status * width
    return system + training, system, training


def choose_width(
    widths: Sequence[float],
    latencies_s: Sequence[float],
    feasible: Sequence[bool],
    reference_s: float,
    status: float,
    tradeoff: float,
) -> int:
    """Index of the feasible width of highest utility (ties: larger width); smallest if none."""
    best, best_u = None, -np.inf
    for i, (width, latency, ok) in enumerate(zip(widths, latencies_s, feasible, strict=True)):
        u = utility(latency, reference_s, status, width, tradeoff)[0]
        if ok and (u > best_u or (u == best_u and best is not None and width > widths[best])):
            best, best_u = i, u
    return best if best is not None else int(np.argmin(widths))


def training_status(history: Sequence[float], window: int, initial: float) -> float:
    """``phi``: the windowed mean of the last ``window`` values over the largest such mean."""
    if len(history) == 0:
        return initial
    values = np.asarray(history, dtype=np.float64)
    means = [values[max(0, t - window + 1) : t + 1].mean() for t in range(len(values))]
    peak = max(means)
    return float(means[-1] / peak) if peak > 0 else initial


def pseudo_gradient_fisher(
    global_state: Mapping[str, np.ndarray],
    updates: Sequence[tuple[Mapping[str, np.ndarray], Mapping[str, np.ndarray], float]],
    slice_fn: Any,
) -> float:
    """Example-weighted mean over clients of the mean squared update per coordinate.

    ``slice_fn(global_state, indices)`` is the global sub-model a client started from.
    """
    total, weight = 0.0, 0.0
    for sub, indices, num_examples in updates:
        start = slice_fn(global_state, indices)
        sq = sum(float(np.sum((np.asarray(sub[k], np.float64) - start[k]) ** 2)) for k in sub)
        total += num_examples * sq / sum(v.size for v in sub.values())
        weight += num_examples
    return total / weight if weight else 0.0


def _positive(key: str, value: Any, *, allow_zero: bool = False) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    ok = ok and (value >= 0 if allow_zero else value > 0)
    if not ok:
        raise ConfigError(
            f"strategy.{key}", value, f"must be a number {'>=' if allow_zero else '>'} 0"
        )
    return float(value)


class WhaleFL(HeteroFL):
    """Per-round width choice by a latency / training-status utility (module docstring).

    Parameters
    ----------
    tradeoff
        lambda: weight of the training term against the system term (decision: 1.0).
    fisher_window
        W: rounds in the Fisher window (decision: 5).
    initial_status
        phi before any Fisher measurement (decision: 1.0, the status at its peak).
    reference_quantile
        Which quantile of the round's full-width latencies is T_ref (decision: 0.5, median).
    widths, latency_budget_s, **fedavg_kwargs
        As :class:`~fedsim.strategies.heterofl.HeteroFL` (the budget, if set, removes widths).

    """

    def __init__(
        self,
        *,
        tradeoff: float = 1.0,
        fisher_window: int = 5,
        initial_status: float = 1.0,
        reference_quantile: float = 0.5,
        widths: Sequence[float] = DEFAULT_WIDTHS,
        latency_budget_s: float | None = None,
        **fedavg_kwargs: Any,
    ) -> None:
        super().__init__(widths=widths, latency_budget_s=latency_budget_s, **fedavg_kwargs)
        self.tradeoff = _positive("tradeoff", tradeoff, allow_zero=True)
        if (
            isinstance(fisher_window, bool)
            or not isinstance(fisher_window, int)
            or fisher_window < 1
        ):
            raise ConfigError("strategy.fisher_window", fisher_window, "must be an integer >= 1")
        self.fisher_window = fisher_window
        self.initial_status = _positive("initial_status", initial_status, allow_zero=True)
        if (
            isinstance(reference_quantile, bool)
            or not isinstance(reference_quantile, int | float)
            or not 0 <= reference_quantile <= 1
        ):
            raise ConfigError(
                "strategy.reference_quantile", reference_quantile, "must be in [0, 1]"
            )
        self.reference_quantile = float(reference_quantile)
        self.fisher_history = np.zeros(0)  # FI_t per aggregated round (checkpointed)

    def assign_widths(
        self, partition_ids: Sequence[int], server_round: int
    ) -> dict[int, tuple[float, dict[str, float]]]:
        """Each client's utility-maximising width under its conditions of this round."""
        view = self._view()
        states = {pid: view.conditions(pid, server_round) for pid in partition_ids}
        latencies = {
            pid: [self.expected_latency(pid, w, states[pid]) for w in self.widths]
            for pid in partition_ids
        }
        online = [pid for pid in partition_ids if states[pid].online] or list(partition_ids)
        reference = float(np.quantile([latencies[p][0] for p in online], self.reference_quantile))
        status = training_status(self.fisher_history, self.fisher_window, self.initial_status)
        out = {}
        for pid in partition_ids:
            feasible = [
                self.fits_memory(pid, w)
                and (self.latency_budget_s is None or lat <= self.latency_budget_s)
                for w, lat in zip(self.widths, latencies[pid], strict=True)
            ]
            i = choose_width(
                self.widths, latencies[pid], feasible, reference, status, self.tradeoff
            )
            u, system, training = utility(
                latencies[pid][i], reference, status, self.widths[i], self.tradeoff
            )
            out[pid] = (
                self.widths[i],
                {
                    "width": self.widths[i],
                    "latency_est_s": latencies[pid][i],
                    "latency_ref_s": reference,
                    "training_status": status,
                    "system_term": system,
                    "training_term": training,
                    "utility": u,
                },
            )
        return out

    def on_aggregate(
        self, updates: Sequence[tuple[Mapping[str, np.ndarray], Indices, float]]
    ) -> None:
        """Record this round's Fisher proxy for the next rounds' training status."""
        assert self.current is not None
        layout = self._layout()
        fisher = pseudo_gradient_fisher(
            self.current, updates, lambda state, idx: slice_state(state, layout, idx)
        )
        self.fisher_history = np.append(self.fisher_history, fisher)
