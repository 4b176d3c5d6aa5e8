"""Model tensors on the wire: trainable state <-> ArrayRecord, and payload sizes in bytes.

Only trainable tensors travel: a frozen backbone never leaves the process that loaded it.

The bytes are exactly Flower's (``Array.from_numpy_ndarray``: a ``.npy`` file per tensor, so
``Array.numpy()`` and Flower's aggregation read them unchanged), but written and read without
``np.save``/``np.load``, whose header formatting and ``ast.literal_eval`` parsing cost more than
the copy for the small tensors of a client-round: the header of each (dtype, shape) is made once.
"""

from __future__ import annotations

import io
import math

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, RecordDict

__all__ = [
    "array_record",
    "trainable_state",
    "to_arrays",
    "encode_state",
    "decode_arrays",
    "load_arrays",
    "load_state",
    "arrays_nbytes",
    "content_nbytes",
    "keep_dtypes",
]

_NUMPY_STYPE = "numpy.ndarray"
_NPY_MAGIC = b"\x93NUMPY"
#: (dtype str, shape) -> the .npy header np.save writes for such an array.
_HEADERS: dict[tuple[str, tuple[int, ...]], bytes] = {}
#: .npy header bytes -> (dtype, shape) it describes, for C-order arrays only.
_PARSED: dict[bytes, tuple[np.dtype, tuple[int, ...]]] = {}


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Detached copies of the parameters that require grad, keyed as in ``state_dict``."""
    return {
        name: param.detach().clone()
        for name, param in model.named_parameters()
        if param.requires_grad
    }


def _npy_header(array: np.ndarray) -> bytes:
    key = (array.dtype.str, array.shape)
    header = _HEADERS.get(key)
    if header is None:
        buffer = io.BytesIO()
        np.save(buffer, np.empty(array.shape, array.dtype), allow_pickle=False)
        header = _HEADERS[key] = buffer.getvalue()[: buffer.tell() - array.nbytes]
    return header


def _to_array(tensor: torch.Tensor) -> Array:
    array = tensor.detach().cpu().numpy()
    if not array.flags.c_contiguous:  # (ascontiguousarray would also make a 0-d array 1-d)
        array = np.ascontiguousarray(array)
    return Array(
        dtype=str(array.dtype),
        shape=tuple(array.shape),
        stype=_NUMPY_STYPE,
        data=_npy_header(array) + array.tobytes(),
    )


def encode_state(state: dict[str, torch.Tensor]) -> ArrayRecord:
    """Tensors as an ArrayRecord, byte for byte what ``ArrayRecord(state)`` makes."""
    return ArrayRecord({name: _to_array(tensor) for name, tensor in state.items()})


def to_arrays(model: torch.nn.Module) -> ArrayRecord:
    """The model's trainable tensors as an ArrayRecord (what clients upload and download)."""
    return ArrayRecord(
        {name: _to_array(p) for name, p in model.named_parameters() if p.requires_grad}
    )


def _header_length(data: bytes) -> int | None:
    """Length of a .npy header (magic, version, length field, dict), or None if not .npy."""
    if data[:6] != _NPY_MAGIC:
        return None
    if data[6] == 1:  # version 1.0: 2-byte little-endian header length
        return 10 + int.from_bytes(data[8:10], "little")
    return 12 + int.from_bytes(data[8:12], "little")  # versions 2.0 and 3.0: 4 bytes


def _from_array(array: Array) -> torch.Tensor:
    size = _header_length(array.data) if array.stype == _NUMPY_STYPE else None
    parsed = _PARSED.get(array.data[:size]) if size else None
    if size and parsed is None:
        reader = io.BytesIO(array.data)
        if np.lib.format.read_magic(reader) == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(reader)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(reader)
        if not fortran and not dtype.hasobject:
            parsed = _PARSED[array.data[:size]] = (dtype, tuple(shape))
    if parsed is None:  # anything unusual: Flower's own reader
        return torch.from_numpy(array.numpy().copy())
    dtype, shape = parsed
    assert size is not None  # parsed is set only where the .npy header (size bytes) was read
    flat = np.frombuffer(array.data, dtype=dtype, count=math.prod(shape), offset=size)
    return torch.from_numpy(flat.reshape(shape).copy())  # own, writable memory


def array_record(content: RecordDict, name: str) -> ArrayRecord:
    """``content[name]``, a record that fedsim and Flower's strategies fill with tensors."""
    record = content[name]
    assert isinstance(record, ArrayRecord)  # (a RecordDict's item may be any kind of record)
    return record


def decode_arrays(arrays: ArrayRecord) -> dict[str, torch.Tensor]:
    """An ArrayRecord's tensors (copies), as ``arrays.to_torch_state_dict()`` returns them."""
    return {name: _from_array(array) for name, array in arrays.items()}


def load_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy ``state`` into the model's matching parameters in place; every key must exist."""
    params = dict(model.named_parameters())
    missing = set(state) - set(params)
    if missing:
        raise KeyError(f"arrays carry tensors the model lacks: {sorted(missing)[:5]}")
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)


def load_arrays(model: torch.nn.Module, arrays: ArrayRecord) -> None:
    """Copy ``arrays`` into the model's matching tensors in place; every key must exist."""
    load_state(model, decode_arrays(arrays))


def arrays_nbytes(arrays: ArrayRecord) -> int:
    """Bytes of tensor data in an ArrayRecord (what a device sends or receives for it)."""
    return sum(len(array.data) for array in arrays.values())


def content_nbytes(content: RecordDict) -> int:
    """Bytes of all tensor data in a message's content (config and metrics are negligible)."""
    return sum(arrays_nbytes(record) for record in content.array_records.values())


def keep_dtypes(new: ArrayRecord, like: ArrayRecord) -> tuple[ArrayRecord, list[str]]:
    """``new`` with every array cast to the dtype of the same-named array of ``like``.

    Returns the record and the names that needed it. A strategy's arithmetic may promote the
    model (Flower 1.41's FedAdam multiplies float32 arrays by a NumPy float64 scalar, which
    NumPy 2 keeps as float64): the global model would then travel at twice its size.
    """
    changed = [
        name for name, array in new.items() if name in like and array.dtype != like[name].dtype
    ]
    if not changed:
        return new, []
    cast = {
        name: Array(np.asarray(array.numpy(), dtype=like[name].numpy().dtype))
        if name in changed
        else array
        for name, array in new.items()
    }
    return ArrayRecord(cast), changed
