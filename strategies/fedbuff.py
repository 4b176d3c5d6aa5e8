"""FedBuff (Nguyen et al., AISTATS 2022): asynchronous training with a buffer of K updates.

``concurrency`` clients train at any time, each on the global model it downloaded. An arriving
client uploads ``Delta_i = w_sent - w_trained``; the server scales it by its staleness tau_i
(global updates since the client downloaded) and adds it to a buffer; every ``buffer_size`` = K
arrivals it steps::

    w <- w - eta_g * sum_buffer s(tau_i) Delta_i / K          s(tau) = 1 / sqrt(1 + tau)

and empties the buffer. Each arrival frees a slot that a new client, sampled among the idle ones,
takes at once with the current model: the server never waits for the slowest device. Runs on
fedsim's simulated clock (fedsim/rounds/asynchronous.py): who arrives when is the device model's
latency, not a wall-clock race.

Our decisions (methods.md has no FedBuff entry): the update is the uniform mean over the buffer
(the paper's); ``weighting: examples`` weights by examples instead, which makes the first update
with K = concurrency = all clients exactly FedAvg's first round with every client.
``staleness_fn`` defaults to polynomial with a = -0.5, the paper's 1/sqrt(1 + tau);
``max_staleness`` (off by default)
drops updates staler than it, as FedScale's async aggregator does (its default 5). The server
step is plain SGD with ``eta_g`` (the paper also tries server momentum; not here).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from fedsim.errors import ConfigError
from fedsim.keys import Outcome
from fedsim.rounds.asynchronous import (
    Arrival,
    AsyncLoop,
    AsyncStrategy,
    Tensors,
    apply_step,
    check_staleness_fn,
    staleness_weight,
)
from fedsim.strategies.common import check_number, to_record

__all__ = ["FedBuff", "fedbuff_step"]

WEIGHTINGS = ("uniform", "examples")


def fedbuff_step(
    deltas: Sequence[tuple[Tensors, float, float]], eta_g: float, weighting: str = "uniform"
) -> Tensors:
    """The server step from buffered (Delta_i, s(tau_i), n_i): ``eta_g * sum w_i s_i Delta_i``.

    ``uniform``: w_i = 1 / K; ``examples``: w_i = n_i / sum n. Subtract it from the model.
    """
    if weighting == "uniform":
        weights = [1.0 / len(deltas)] * len(deltas)
    else:
        total = sum(n for _, _, n in deltas)
        weights = [n / total for _, _, n in deltas]
    first = deltas[0][0]
    step = {k: np.zeros(v.shape, dtype=np.float64) for k, v in first.items()}
    for (delta, scale, _), weight in zip(deltas, weights, strict=True):
        for k in step:
            step[k] += weight * scale * delta[k]
    return {k: (eta_g * v).astype(first[k].dtype) for k, v in step.items()}


class FedBuff(AsyncStrategy):
    """``strategy=fedbuff``; YAML keys = these arguments (conf/strategy/fedbuff.yaml).

    Parameters
    ----------
    concurrency
        Clients training at any time (capped by the clients there are).
    buffer_size
        K: arrivals per global update.
    eta_g
        Server learning rate.
    staleness_fn, staleness_a, staleness_b
        s(tau): ``constant``, ``polynomial`` (tau + 1)^a, or ``hinge``
        (fedsim/rounds/asynchronous.py).
    max_staleness
        Drop updates with tau above it (their client's round does not count); null = keep all.
    weighting
        ``uniform`` (the paper) or ``examples``.

    """

    def __init__(
        self,
        concurrency: int = 20,
        buffer_size: int = 10,
        eta_g: float = 1.0,
        staleness_fn: str = "polynomial",
        staleness_a: float = -0.5,
        staleness_b: float = 0.0,
        max_staleness: int | None = None,
        weighting: str = "uniform",
    ) -> None:
        for name, value in (("concurrency", concurrency), ("buffer_size", buffer_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"strategy.{name}", value, "an integer >= 1")
        if buffer_size > concurrency:
            raise ConfigError(
                "strategy.buffer_size", buffer_size, f"at most concurrency ({concurrency})"
            )
        check_number("eta_g", eta_g, 0.0, inclusive=False)
        check_staleness_fn("strategy", staleness_fn, staleness_a, staleness_b)
        if max_staleness is not None and (
            isinstance(max_staleness, bool)
            or not isinstance(max_staleness, int)
            or max_staleness < 0
        ):
            raise ConfigError("strategy.max_staleness", max_staleness, "null or an integer >= 0")
        if weighting not in WEIGHTINGS:
            raise ConfigError("strategy.weighting", weighting, f"one of {list(WEIGHTINGS)}")
        self.concurrency, self.buffer_size, self.eta_g = concurrency, buffer_size, float(eta_g)
        self.staleness_fn, self.staleness_a = staleness_fn, float(staleness_a)
        self.staleness_b, self.max_staleness = float(staleness_b), max_staleness
        self.weighting = weighting
        self.buffer: list[dict[str, Any]] = []  # arrivals since the last update (checkpointed)

    def begin(self, loop: AsyncLoop) -> None:
        """Fill every slot."""
        self._fill(loop)

    def on_arrival(self, loop: AsyncLoop, job: Arrival) -> None:
        """Buffer the update (or drop it as too stale); step at K; refill the freed slot."""
        if self.max_staleness is not None and job.staleness > self.max_staleness:
            job.outcome = Outcome.STALE
        else:
            self.buffer.append(
                {k: getattr(job, k) for k in ("pid", "base", "delta", "num_examples", "train_loss")}
            )
        if len(self.buffer) >= self.buffer_size:
            deltas = [
                (
                    entry["delta"],
                    staleness_weight(
                        loop.version - entry["base"],
                        self.staleness_fn,
                        self.staleness_a,
                        self.staleness_b,
                    ),
                    float(entry["num_examples"]),
                )
                for entry in self.buffer
            ]
            step = fedbuff_step(deltas, self.eta_g, self.weighting)
            loop.update(to_record(apply_step(loop.global_tensors(), step)), self.buffer)
            self.buffer = []
        self._fill(loop)

    def on_idle(self, loop: AsyncLoop) -> None:
        """Devices were offline or failed: try to fill the slots again."""
        self._fill(loop)

    def _fill(self, loop: AsyncLoop) -> None:
        """Dispatch idle clients until ``concurrency`` are in flight (or none is left to try)."""
        tried: set[int] = set()
        while len(loop.busy()) < self.concurrency:
            candidates = [p for p in loop.sample_idle(self.concurrency) if p not in tried]
            if not candidates:
                return
            for pid in candidates:
                if len(loop.busy()) >= self.concurrency:
                    return
                tried.add(pid)
                loop.dispatch(pid)
