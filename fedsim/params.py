"""Model tensors on the wire: trainable state <-> ArrayRecord, and payload sizes in bytes.

Only trainable tensors travel: a frozen backbone never leaves the process that loaded it.
"""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, RecordDict

__all__ = ["trainable_state", "to_arrays", "load_arrays", "arrays_nbytes", "content_nbytes"]


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Detached copies of the parameters that require grad, keyed as in ``state_dict``."""
    return {
        name: param.detach().clone()
        for name, param in model.named_parameters()
        if param.requires_grad
    }


def to_arrays(model: torch.nn.Module) -> ArrayRecord:
    """The model's trainable tensors as an ArrayRecord (what clients upload and download)."""
    return ArrayRecord(trainable_state(model))


def load_arrays(model: torch.nn.Module, arrays: ArrayRecord) -> None:
    """Copy ``arrays`` into the model's matching tensors in place; every key must exist."""
    state = arrays.to_torch_state_dict()
    missing = set(state) - set(dict(model.named_parameters()))
    if missing:
        raise KeyError(f"arrays carry tensors the model lacks: {sorted(missing)[:5]}")
    with torch.no_grad():
        params = dict(model.named_parameters())
        for name, value in state.items():
            params[name].copy_(value)


def arrays_nbytes(arrays: ArrayRecord) -> int:
    """Bytes of tensor data in an ArrayRecord (what a device sends or receives for it)."""
    return sum(len(array.data) for array in arrays.values())


def content_nbytes(content: RecordDict) -> int:
    """Bytes of all tensor data in a message's content (config and metrics are negligible)."""
    return sum(arrays_nbytes(record) for record in content.array_records.values())
