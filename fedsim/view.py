"""What a strategy may read about the federation: devices, their conditions, costs by width.

Strategies that adapt to the fleet (HeteroFL's capacity-based widths, WHALE-FL's per-round
utility) get a :class:`FederationView` injected at build time through an optional
``bind(view)`` method (``Federation.build`` calls it). The view is read-only and every number in
it is what the scheduler itself will use: the same profiles, the same per-(client, round)
conditions drawn from the seed, the same cost model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import nn

from fedsim.devices import DeviceProfile, DeviceState
from fedsim.errors import ConfigError
from fedsim.scheduler import DeviceCost
from fedsim.slicing import SlimLayout

__all__ = ["FederationView", "slim_layout_of"]


def slim_layout_of(model: nn.Module) -> SlimLayout:
    """The width axes of a model (``model.slim_layout()``); ConfigError if it has none."""
    layout = getattr(model, "slim_layout", None)
    if layout is None:
        raise ConfigError(
            "strategy",
            "width-sliced",
            "needs model=cnn or client=side_tuning (a model with width axes, fedsim/slicing.py)",
        )
    result: SlimLayout = layout()
    return result


@dataclass(frozen=True)
class FederationView:
    """Read-only access to the fleet and the cost model of a run.

    ``conditions(pid, round)`` is the device's state that round (dynamics: compute, bandwidth,
    channel, online); ``cost(pid, width)`` the cost model's FLOPs and peak memory of the
    client's job on the width-``width`` sub-model; ``payload_bytes(width)`` the bytes of that
    sub-model's trainable tensors on the wire; ``slim_layout()`` the global model's width axes
    (raises ConfigError for a model that cannot be sliced).
    """

    seed: int
    profiles: Sequence[DeviceProfile]
    server_gflops: float
    deadline_s: float | None
    conditions: Callable[[int, int], DeviceState]
    cost: Callable[[int, float], DeviceCost]
    payload_bytes: Callable[[float], int]
    slim_layout: Callable[[], SlimLayout]
