"""WHALE-FL (Su et al., arXiv 2405.00885): every device's sub-model width is chosen every round.

Sub-models are width slices (HeteroFL extraction, ``fedsim/learning/slicing.py``) merged
coordinate-wise (HeteroFL's ``combine``), as in the official code. The utility is a knob,
``utility``:

``paper`` (default): the official code's formula (BESTTOOLBOX/WHALE-FL ``On-Server/train_main.py``
@bf43bae, methods.md 3.5), per sampled device n of round t::

    t_cmp  = its compute seconds for the round's job at the smallest width (1/16)
    t_com  = its seconds to upload the full-width tensors plus the bytes it sends besides them
             (side-tuning's activations)
    T_n    = its compute seconds at the width it was sent last time (never: the smallest) + t_com
    T_min  = min of T over the round's devices;  L1, L2 = its last two reported training losses
    D1     = (1 + |L2 - L1|) ** (a + b) if L2 >= loss_threshold else (1 + |L2 - L1|) ** b
    D2     = c * T_min / T_n if |L2 - L1| <= loss_change_threshold else 0
    W_n    = (1 / t_cmp + 1 / t_com) * (1 + L2 / D1) ** D2          (times in time_unit_s)
    s_n    = sigmoid(W_n), min-max scaled over the round's devices
    width  = 1 if s >= 0.8, 1/2 if s >= 0.6, 1/4 if s >= 0.4, 1/8 if s >= 0.2, else 1/16

Defaults a = 1, b = 0, c = 1, thresholds 1.5 and 0.5, losses starting at 1: the code's values.
The device speeds come from ``FederationView.observed``: what the server measured in the
device's earlier rounds (the profile's nominal values before its first), never the draw of the
round being decided (the code uses a table measured once per device; neither sees the future).
What the code leaves to us, each a decision, each a knob or flagged here:

* **Units** (``time_unit_s``, default 1 s as in the code). W has units 1/time, and the sigmoid
  saturates near W = 37: in float64 sigmoid(W) is then exactly 1. The code's devices need
  0.1-0.3 s per round at width 1/16 (W ~ 5-15); a job that takes microseconds at 1/16 (the
  digits CNN: 6-35 us on our phones, W ~ 3e4) saturates for every device, and all tie.
* **Ties**: when every scaled score is equal (one device, identical devices, or a saturated
  sigmoid) the code divides 0 by 0; we give every device scaled score 1, i.e. the full width
  (no device is slower than another). On ``devices=uniform`` every device then trains width 1
  and WHALE-FL is FedAvg (tests/test_whale_fl.py).
* **Which devices are scaled together**: the round's sampled devices that checked in (online);
  the code scales over its whole (fully participating) population.
* **Losses**: a device's last two reported mean training losses (methods.md 3.5). Under partial
  participation the code copies L2 into L1 for every device every round, so a device that did
  not train last round has |L2 - L1| = 0; we keep its own last two. A dropped straggler's loss
  never reaches the strategy.
* **Fit**: a width whose job does not fit the device's memory (or ``latency_budget_s``, if set,
  under the observed rates) is replaced by the largest smaller one that fits (the code's devices
  all fit every width).
* **The width set**: any ``widths`` (largest first, k of them) split [0, 1] at (k-1)/k, ...,
  1/k: for the five default widths exactly the code's 0.8, 0.6, 0.4, 0.2.

``latency_fisher``: the methods file's candidate before the code was known (methods.md 3.4, all
decisions)::

    U_i^t(p)  = -T_i^t(p) / T_ref^t + tradeoff * phi_t * p,   p_i^t = argmax over fitting widths

with T_i^t(p) the expected download + compute + upload (+ server) seconds under the device's
last measured rates (including the bytes it sends besides its tensors), T_ref^t the
``reference_quantile`` of the round's full-width T, phi_t = FI_t / max FI over rounds, FI the
windowed (``fisher_window``) example-weighted mean squared pseudo-gradient per coordinate
(``initial_status`` before any). It peaks near p = phi T_ref / (2 T(1)): on a uniform fleet
every device gets width 1/2.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord

from fedsim import keys
from fedsim.checks import require_number
from fedsim.clock.devices import ClientWork, DeviceState, client_latency
from fedsim.errors import ConfigError
from fedsim.keys import partition_id_of
from fedsim.learning.slicing import Indices, slice_state
from fedsim.strategies.heterofl import DEFAULT_WIDTHS, HeteroFL

__all__ = [
    "UTILITIES",
    "WhaleFL",
    "choose_width",
    "loss_factors",
    "paper_score",
    "pseudo_gradient_fisher",
    "scaled_scores",
    "training_status",
    "utility",
    "width_of_scaled",
]

#: ``strategy.utility``: the official code's formula, or methods.md 3.4's candidate.
UTILITIES = ("paper", "latency_fisher")


# --- the official code's utility (module docstring, ``utility: paper``) -------------------------
def loss_factors(
    loss_prev: float,
    loss_last: float,
    t_min_s: float,
    t_last_s: float,
    *,
    a: float,
    b: float,
    c: float,
    loss_threshold: float,
    loss_change_threshold: float,
) -> tuple[float, float]:
    """``(D1, D2)``: how the training status bends a device's speed score."""
    change = abs(loss_last - loss_prev)
    d1 = (1.0 + change) ** (a + b if loss_last >= loss_threshold else b)
    d2 = c * t_min_s / t_last_s if change <= loss_change_threshold else 0.0
    return d1, d2


def paper_score(t_cmp: float, t_com: float, loss_last: float, d1: float, d2: float) -> float:
    """``W = (1 / t_cmp + 1 / t_com) * (1 + L2 / D1) ** D2`` (times in one unit; 0 s: W = inf)."""
    speed = sum(1.0 / t if t > 0 else math.inf for t in (t_cmp, t_com))
    return speed * (1.0 + loss_last / d1) ** d2


def scaled_scores(scores: Sequence[float], among: Sequence[int] | None = None) -> list[float]:
    """sigmoid(W), min-max scaled over ``among`` (indices; default all), clipped to [0, 1].

    All equal (including a sigmoid saturated to 1.0 in float64): every one scaled 1 (decision:
    the code divides 0 by 0 there).
    """
    sig = [1.0 / (1.0 + math.exp(-w)) if w > -700 else 0.0 for w in scores]
    ref = [sig[i] for i in (range(len(sig)) if among is None else among)] or sig
    low, high = min(ref), max(ref)
    if high == low:
        return [1.0] * len(sig)
    return [min(1.0, max(0.0, (x - low) / (high - low))) for x in sig]


def width_of_scaled(scaled: float, widths: Sequence[float]) -> float:
    """``widths`` (largest first, k of them): scaled >= (k-1-i)/k -> widths[i], else the last.

    For k = 5: >= 0.8 -> widths[0], >= 0.6 -> widths[1], ..., < 0.2 -> widths[4] (the code's).
    """
    k = len(widths)
    for i, width in enumerate(widths[:-1]):
        if scaled >= (k - 1 - i) / k:
            return width
    return widths[-1]


# --- methods.md 3.4's candidate (``utility: latency_fisher``) -----------------------------------
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


def training_status(history: Sequence[float] | np.ndarray, window: int, initial: float) -> float:
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


def _number(key: str, value: Any, *, allow_zero: bool = True) -> float:
    """``strategy.<key>`` as a float: a finite number >= 0 (> 0 without ``allow_zero``)."""
    return require_number(f"strategy.{key}", value, low=0.0, low_inclusive=allow_zero)


def _compute_upload_s(
    state: DeviceState, train_flops: int, upload_bytes: float
) -> tuple[float, float]:
    """Compute and upload seconds of a job under ``state`` (the clock's own formula)."""
    latency = client_latency(state, ClientWork(train_flops, 0, round(upload_bytes), 0), 1.0)
    return latency.compute_s, latency.upload_s


class WhaleFL(HeteroFL):
    """Per-round widths from the official code's utility or methods.md 3.4's (module docstring).

    Parameters
    ----------
    utility
        ``paper`` (the official code's formula) or ``latency_fisher`` (methods.md 3.4).
    loss_power_a, loss_power_b, speed_weight_c
        The code's a, b, c (1, 0, 1): D1's exponents and D2's weight (``paper``).
    loss_threshold, loss_change_threshold
        The code's L_th (1.5) and dL_th (0.5) (``paper``).
    initial_loss
        L1 and L2 of a device that has not reported yet (the code: 1) (``paper``).
    time_unit_s
        Seconds per unit of the times in W (decision: 1, the code's seconds) (``paper``).
    tradeoff, fisher_window, initial_status, reference_quantile
        ``latency_fisher`` only: lambda (1.0), W (5), phi before any measurement (1.0), which
        quantile of the round's full-width latencies is T_ref (0.5); all decisions.
    widths, latency_budget_s, **fedavg_kwargs
        As :class:`~fedsim.strategies.heterofl.HeteroFL` (the budget, if set, removes widths
        whose estimated round under the observed rates is longer).

    """

    def __init__(
        self,
        *,
        utility: str = "paper",
        loss_power_a: float = 1.0,
        loss_power_b: float = 0.0,
        speed_weight_c: float = 1.0,
        loss_threshold: float = 1.5,
        loss_change_threshold: float = 0.5,
        initial_loss: float = 1.0,
        time_unit_s: float = 1.0,
        tradeoff: float = 1.0,
        fisher_window: int = 5,
        initial_status: float = 1.0,
        reference_quantile: float = 0.5,
        widths: Sequence[float] = DEFAULT_WIDTHS,
        latency_budget_s: float | None = None,
        **fedavg_kwargs: Any,
    ) -> None:
        super().__init__(widths=widths, latency_budget_s=latency_budget_s, **fedavg_kwargs)
        if utility not in UTILITIES:
            raise ConfigError("strategy.utility", utility, f"must be one of {', '.join(UTILITIES)}")
        self.utility = utility
        self.loss_power_a = _number("loss_power_a", loss_power_a)
        self.loss_power_b = _number("loss_power_b", loss_power_b)
        self.speed_weight_c = _number("speed_weight_c", speed_weight_c)
        self.loss_threshold = _number("loss_threshold", loss_threshold)
        self.loss_change_threshold = _number("loss_change_threshold", loss_change_threshold)
        self.initial_loss = _number("initial_loss", initial_loss)
        self.time_unit_s = _number("time_unit_s", time_unit_s, allow_zero=False)
        self.tradeoff = _number("tradeoff", tradeoff)
        if (
            isinstance(fisher_window, bool)
            or not isinstance(fisher_window, int)
            or fisher_window < 1
        ):
            raise ConfigError("strategy.fisher_window", fisher_window, "must be an integer >= 1")
        self.fisher_window = fisher_window
        self.initial_status = _number("initial_status", initial_status)
        if (
            isinstance(reference_quantile, bool)
            or not isinstance(reference_quantile, int | float)
            or not 0 <= reference_quantile <= 1
        ):
            raise ConfigError(
                "strategy.reference_quantile", reference_quantile, "must be in [0, 1]"
            )
        self.reference_quantile = float(reference_quantile)
        # Checkpointed state: FI_t per aggregated round (latency_fisher); per device its last
        # two reported training losses [L1, L2] and the width it was sent last (paper).
        self.fisher_history = np.zeros(0)
        self.losses: dict[int, list[float]] = {}
        self.sent_width: dict[int, float] = {}

    def assign_widths(
        self, partition_ids: Sequence[int], server_round: int
    ) -> dict[int, tuple[float, dict[str, float]]]:
        """Each sampled client's width this round, from what the server knows before it."""
        if self.utility == "paper":
            return self._paper_widths(partition_ids, server_round)
        return self._latency_fisher_widths(partition_ids, server_round)

    def _fitting_width(self, pid: int, width: float, latency_s: Mapping[float, float]) -> float:
        """``width``, or the largest smaller one whose job fits memory (and the budget)."""
        for w in (w for w in self.widths if w <= width):
            budget_ok = self.latency_budget_s is None or latency_s[w] <= self.latency_budget_s
            if self.fits_memory(pid, w) and budget_ok:
                return w
        return self.widths[-1]

    def _expected_latencies(self, pid: int, server_round: int) -> dict[float, float]:
        """Width -> estimated round seconds under the last measured rates, all it sends."""
        state = self._view().observed(pid, server_round).state()
        return {
            w: self.expected_latency(
                pid, w, state, self.extra_upload_estimate(pid, server_round, w)
            )
            for w in self.widths
        }

    def _paper_times(self, pid: int, server_round: int) -> tuple[float, float, float]:
        """``(t_cmp, t_com, T_n)`` in seconds, under the device's last measured rates."""
        view = self._view()
        state = view.observed(pid, server_round).state()
        largest, smallest = self.widths[0], self.widths[-1]
        sent = view.payload_bytes(largest) + self.extra_upload_estimate(pid, server_round, largest)
        t_com = _compute_upload_s(state, 0, sent)[1]
        # compute seconds as the clock charges them: a measured table's if the device has one
        t_cmp = self.compute_s(pid, smallest, state)
        last = self.compute_s(pid, self.sent_width.get(pid, smallest), state)
        return t_cmp, t_com, last + t_com

    def _paper_score(self, pid: int, times: tuple[float, float, float], t_min: float) -> dict:
        """W of one device and its terms (the clients.jsonl fields)."""
        t_cmp, t_com, t_last = times
        loss_prev, loss_last = self.losses.get(pid, [self.initial_loss] * 2)
        d1, d2 = loss_factors(
            loss_prev,
            loss_last,
            t_min,
            t_last,
            a=self.loss_power_a,
            b=self.loss_power_b,
            c=self.speed_weight_c,
            loss_threshold=self.loss_threshold,
            loss_change_threshold=self.loss_change_threshold,
        )
        unit = self.time_unit_s
        return {
            "score": paper_score(t_cmp / unit, t_com / unit, loss_last, d1, d2),
            "t_cmp_s": t_cmp,
            "t_com_s": t_com,
            "t_last_s": t_last,
            "loss_change": abs(loss_last - loss_prev),
            "d1": d1,
            "d2": d2,
        }

    def _paper_widths(
        self, partition_ids: Sequence[int], server_round: int
    ) -> dict[int, tuple[float, dict[str, float]]]:
        view = self._view()
        times = {pid: self._paper_times(pid, server_round) for pid in partition_ids}
        online = [i for i, pid in enumerate(partition_ids) if view.online(pid, server_round)]
        t_min = min(times[partition_ids[i]][2] for i in online or range(len(partition_ids)))
        fields = [self._paper_score(pid, times[pid], t_min) for pid in partition_ids]
        scaled = scaled_scores([f["score"] for f in fields], online or None)
        out = {}
        for pid, terms, s in zip(partition_ids, fields, scaled, strict=True):
            latency = self._expected_latencies(pid, server_round)
            width = self._fitting_width(pid, width_of_scaled(s, self.widths), latency)
            self.sent_width[pid] = width
            row = {"width": width, "latency_est_s": latency[width], "scaled_score": s}
            out[pid] = (width, row | terms)
        return out

    def _latency_fisher_widths(
        self, partition_ids: Sequence[int], server_round: int
    ) -> dict[int, tuple[float, dict[str, float]]]:
        view = self._view()
        latencies = {
            pid: list(self._expected_latencies(pid, server_round).values()) for pid in partition_ids
        }
        online = [p for p in partition_ids if view.online(p, server_round)] or list(partition_ids)
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

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """HeteroFL's merge; first each device's reported training loss (the paper's L2)."""
        replies = list(replies)
        for reply in replies:
            if reply.has_error():
                continue
            loss = reply.content[keys.METRICS].get(keys.TRAIN_LOSS)
            assert loss is None or isinstance(loss, int | float)  # the worker's mean loss
            if loss is not None and math.isfinite(float(loss)):
                pid = partition_id_of(reply.metadata.src_node_id)
                prev = self.losses.get(pid, [self.initial_loss] * 2)
                self.losses[pid] = [prev[1], float(loss)]
        return super().aggregate_train(server_round, replies)

    def on_aggregate(
        self, updates: Sequence[tuple[Mapping[str, np.ndarray], Indices, float]]
    ) -> None:
        """``latency_fisher``: record this round's Fisher proxy for the next rounds' status."""
        if self.utility != "latency_fisher":
            return
        assert self.current is not None
        layout = self._layout()
        fisher = pseudo_gradient_fisher(
            self.current, updates, lambda state, idx: slice_state(state, layout, idx)
        )
        self.fisher_history = np.append(self.fisher_history, fisher)
