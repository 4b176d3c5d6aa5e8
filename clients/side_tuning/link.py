"""Simulation speed for side-tuning: each sample's uplink payload computed once, then reused.

With the frozen features cached (``cache_features``), what a device sends for a sample is a pure
function of the sample: its tapped hidden states never change and per-token quantization gives
every token its own scale. So the token codes, scales and mask row of a (client, row) are made
once, by the real :meth:`SideTuning.device_activations`, and later micro-batches are assembled
from them, bitwise equal to computing them afresh (tests/test_side_tuning.py). Nothing about the
method changes: the bytes are the assembled payload's, the clock charges the device's forward
pass as before, and the labels or deltas are made per micro-batch as the device makes them.

Not used where a payload depends on its micro-batch (``quant_scheme: per_tensor`` shares one
scale across the batch), without cached features (the bench baseline runs the backbone), or when
an ``uplink_observer`` inspects payloads (privacy tests see the device's own computation).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from fedsim.clients.side_tuning.network import TAPS_KEY, SideTunedModel
from fedsim.clients.side_tuning.quantize import QuantizedTensor

if TYPE_CHECKING:
    from fedsim.clients.side_tuning.tuning import DevicePayload, SideTuning

__all__ = ["LinkMemo"]

#: (codes (m, K, d'), scales (m, K, 1) or None, token-mask row (T,) or None) of one sample
_Entry = tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]


class LinkMemo:
    """Per (partition id, row of the client's data): the sample's quantized token vectors."""

    def __init__(self) -> None:
        self._entries: dict[tuple[int, int], _Entry] = {}

    @staticmethod
    def applies(client: SideTuning, data: dict[str, torch.Tensor]) -> bool:
        """Whether payloads of this client and data are per-sample functions (see module doc)."""
        per_sample = client.spec.quant_scheme == "per_token" or client.spec.bits >= 16
        return per_sample and TAPS_KEY in data and client.uplink_observer is None

    def payload(
        self,
        client: SideTuning,
        model: SideTunedModel,
        data: dict[str, torch.Tensor],
        rows: torch.Tensor,
        partition_id: int,
    ) -> DevicePayload:
        """The payload ``client.device_step(model, data, rows)`` would make, from the memo."""
        from fedsim.clients.side_tuning.tuning import DevicePayload

        keys = [(partition_id, int(r)) for r in rows]
        missing = [
            row for key, row in zip(keys, rows.tolist(), strict=True) if key not in self._entries
        ]
        if missing:
            self._remember(client, model, data, torch.tensor(missing), partition_id)
        entries = [self._entries[key] for key in keys]
        codes = torch.cat([e[0] for e in entries])
        scale = None if entries[0][1] is None else torch.cat([e[1] for e in entries])  # type: ignore[misc]
        mask = None if entries[0][2] is None else torch.stack([e[2] for e in entries])  # type: ignore[misc]
        last_dim = int(data[TAPS_KEY].shape[-1])
        activations = QuantizedTensor(codes, scale, client.spec.bits, last_dim)
        labels, delta = client.device_targets(model, data, rows, partition_id)
        return DevicePayload(rows.to(torch.int32), activations, mask, labels, delta)

    def _remember(
        self,
        client: SideTuning,
        model: SideTunedModel,
        data: dict[str, torch.Tensor],
        rows: torch.Tensor,
        partition_id: int,
    ) -> None:
        activations, mask = client.device_activations(model, data, rows)
        counts = [1] * len(rows) if mask is None else mask.sum(dim=1).tolist()
        codes = activations.data.split(counts)
        scales = (
            [None] * len(rows) if activations.scale is None else activations.scale.split(counts)
        )
        for i, row in enumerate(rows.tolist()):
            scale = scales[i]
            self._entries[(partition_id, row)] = (
                codes[i].clone(),
                None if scale is None else scale.clone(),
                None if mask is None else mask[i].clone(),
            )
