"""Width-sliced subnetworks (HeteroFL, FedRolex, WHALE-FL): which coordinates a client trains.

A *slimmable* model names its hidden widths as axes (``conv0``, ``hidden``, an adapter's
bottleneck, ...) and says, for every trainable tensor, which of its dims run along which axis
(:class:`SlimLayout`). A client of width ``p`` trains, on every axis of size ``K``, the
``ceil(p * K)`` channels its index list picks (HeteroFL, Diao et al. ICLR 2021, official code
``torch.arange(K)[:ceil(K * r)]``; methods.md 6.5)::

    static (HeteroFL):   idx = arange(K)[:ceil(p K)]
    roll (FedRolex):     idx = roll(arange(K), j mod K)[:ceil(p K)]   j = the server round

Dims that are not on an axis (the first layer's input channels, the classes of the output layer,
a kernel's spatial dims) are never sliced. A dim may run along an axis in *blocks*: a flattened
conv map feeds a linear layer channel-major, so channel ``c`` owns inputs
``c * block .. c * block + block - 1``.

The server merges sub-models coordinate-wise (HeteroFL's ``count``-based averaging): each
coordinate becomes the example-weighted mean over the clients whose sub-model contains it, and a
coordinate nobody trained keeps its global value. With every client at width 1 this is FedAvg.
Everything here is a pure function of arrays.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "AxisDim",
    "SlimLayout",
    "Indices",
    "scaled_size",
    "axis_indices",
    "layout_indices",
    "tensor_index",
    "slice_state",
    "aggregate_sliced",
]

# ceil(p * K) in floating point: 0.1 * 30 = 3.0000000000000004 must give 3, not 4.
_ROUND_DIGITS = 9

Indices = dict[str, np.ndarray]  # axis name -> the channel indices (int64) a client trains


@dataclass(frozen=True)
class AxisDim:
    """A tensor dim that runs along ``axis``, ``block`` consecutive entries per channel."""

    axis: str
    block: int = 1


@dataclass(frozen=True)
class SlimLayout:
    """Full axis sizes, and per trainable tensor one entry per dim (None: never sliced)."""

    axes: Mapping[str, int]  # axis name -> full size K
    dims: Mapping[str, tuple[AxisDim | None, ...]]  # tensor name -> per-dim axis


def scaled_size(size: int, width: float) -> int:
    """``ceil(width * size)``, at least 1: the channels a width-``width`` sub-model keeps."""
    return max(1, math.ceil(round(width * size, _ROUND_DIGITS)))


def axis_indices(size: int, width: float, offset: int = 0) -> np.ndarray:
    """Channels of an axis of ``size`` a width-``width`` client trains, rolled by ``offset``.

    ``offset = 0`` is HeteroFL's prefix; FedRolex rolls by the server round (``torch.roll``
    semantics: ``roll(arange(4), 1) = [3, 0, 1, 2]``).
    """
    return np.roll(np.arange(size, dtype=np.int64), offset % size)[: scaled_size(size, width)]


def layout_indices(layout: SlimLayout, width: float, offset: int = 0) -> Indices:
    """:func:`axis_indices` for every axis of ``layout`` (one offset for all, as FedRolex)."""
    return {axis: axis_indices(size, width, offset) for axis, size in layout.axes.items()}


def tensor_index(
    shape: Sequence[int], dims: Sequence[AxisDim | None], indices: Mapping[str, np.ndarray]
) -> tuple[np.ndarray, ...]:
    """Open-mesh index (``np.ix_``) of the coordinates of a full tensor a sub-model holds."""
    if len(shape) != len(dims):
        raise ValueError(f"layout has {len(dims)} dims for a tensor of shape {tuple(shape)}")
    per_dim = []
    for size, dim in zip(shape, dims, strict=True):
        if dim is None:
            per_dim.append(np.arange(size, dtype=np.int64))
            continue
        channels = indices[dim.axis]
        # channel c -> entries c * block .. c * block + block - 1, in the channels' order
        per_dim.append((channels[:, None] * dim.block + np.arange(dim.block)).reshape(-1))
    return np.ix_(*per_dim)


def slice_state(
    full: Mapping[str, np.ndarray], layout: SlimLayout, indices: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """The sub-model's tensors: each full tensor at the coordinates ``indices`` select."""
    out = {}
    for name, tensor in full.items():
        dims = layout.dims.get(name)
        if dims is None or all(d is None for d in dims):
            out[name] = tensor.copy()
        else:
            out[name] = tensor[tensor_index(tensor.shape, dims, indices)]
    return out


def aggregate_sliced(
    global_state: Mapping[str, np.ndarray],
    updates: Sequence[tuple[Mapping[str, np.ndarray], Mapping[str, np.ndarray], float]],
    layout: SlimLayout,
) -> dict[str, np.ndarray]:
    """Example-weighted mean of every coordinate over the clients that trained it.

    ``updates`` holds (sub-model tensors, the indices they were sliced with, num examples).
    Coordinates no client covered keep ``global_state``'s value. Sums run in float64 and the
    result takes the global tensor's dtype.
    """
    merged = {}
    for name, tensor in global_state.items():
        dims = layout.dims.get(name, (None,) * tensor.ndim)
        sums = np.zeros(tensor.shape, dtype=np.float64)
        weights = np.zeros(tensor.shape, dtype=np.float64)
        for sub, indices, num_examples in updates:
            index = tensor_index(tensor.shape, dims, indices)
            sums[index] += num_examples * np.asarray(sub[name], dtype=np.float64)
            weights[index] += num_examples
        covered = weights > 0
        mean = np.divide(sums, weights, out=np.zeros_like(sums), where=covered)
        merged[name] = np.where(covered, mean, tensor).astype(tensor.dtype)
    return merged
