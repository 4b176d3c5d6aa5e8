"""FedRolex (Alam, Liu, Yan, Zhang, NeurIPS 2022): HeteroFL with a rolling sub-model window.

Official code AIoT-MLSys-Lab/FedRolex @8135109 (methods.md 6.6): only the channel selection
changes. In server round j, on every hidden axis of K channels, a width-p client trains::

    roll (default):  idx = roll(arange(K), j mod K)[:ceil(p K)]   a cyclic window moving 1/round
    random:          idx = permutation(K)[:ceil(p K)]             drawn per (seed, round, axis)
    static:          idx = arange(K)[:ceil(p K)]                  = HeteroFL

All clients of a round share the offset; widths are assigned as in HeteroFL
(strategies/heterofl.py).
After K rounds of ``roll`` every channel has been trained by the smallest width. FedRolex's
optional ``overlap`` is not implemented (its default is off).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fedsim.errors import ConfigError
from fedsim.learning.slicing import Indices, layout_indices, scaled_size
from fedsim.seeding import numpy_rng
from fedsim.strategies.heterofl import DEFAULT_WIDTHS, HeteroFL

__all__ = ["FedRolex"]

INDEX_POLICIES = ("roll", "random", "static")


class FedRolex(HeteroFL):
    """HeteroFL whose sub-models roll over the global model's channels round by round.

    Parameters
    ----------
    index_policy
        ``roll`` (FedRolex's default), ``random`` or ``static`` (HeteroFL's prefix).
    widths, latency_budget_s, **fedavg_kwargs
        As :class:`~fedsim.strategies.heterofl.HeteroFL`.

    """

    def __init__(
        self,
        *,
        index_policy: str = "roll",
        widths: Sequence[float] = DEFAULT_WIDTHS,
        latency_budget_s: float | None = None,
        **fedavg_kwargs: Any,
    ) -> None:
        if index_policy not in INDEX_POLICIES:
            raise ConfigError("strategy.index_policy", index_policy, f"one of {INDEX_POLICIES}")
        super().__init__(widths=widths, latency_budget_s=latency_budget_s, **fedavg_kwargs)
        self.index_policy = index_policy

    def indices_for(self, width: float, server_round: int) -> Indices:
        """The round's window (or random draw) of channels on every axis."""
        layout = self._layout()
        if self.index_policy == "static":
            return layout_indices(layout, width)
        if self.index_policy == "roll":
            return layout_indices(layout, width, offset=server_round)
        seed = self._view().seed
        return {
            axis: numpy_rng(seed, "fedrolex", server_round, axis).permutation(size)[
                : scaled_size(size, width)
            ]
            for axis, size in layout.axes.items()
        }
