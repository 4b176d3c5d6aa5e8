"""Small helpers the strategies share: records <-> NumPy, extra reply records, knob checks."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sized

import numpy as np
from flwr.app import Array, ArrayRecord, Message, RecordDict
from flwr.serverapp import Grid

from fedsim import keys
from fedsim.checks import require_number

__all__ = [
    "check_number",
    "client_models",
    "count_nodes",
    "take_records",
    "to_numpy",
    "to_record",
    "zeros_like",
]

Tensors = dict[str, np.ndarray]


def to_numpy(arrays: ArrayRecord) -> Tensors:
    """An ArrayRecord as name -> NumPy array (copies: safe to modify)."""
    return {name: np.array(array.numpy()) for name, array in arrays.items()}


def _array_record(content: RecordDict, name: str) -> ArrayRecord:
    """``content[name]``, a reply's tensors (as ``fedsim.learning.params.array_record``).

    Not imported from there: that module loads torch, which this one does not need.
    """
    record = content[name]
    assert isinstance(record, ArrayRecord)  # (a RecordDict's item may be any kind of record)
    return record


def zeros_like(arrays: ArrayRecord) -> Tensors:
    """Zeros shaped like every tensor of ``arrays``: a server state's initial value."""
    return {k: np.zeros_like(v) for k, v in to_numpy(arrays).items()}


def count_nodes(grid: Grid) -> int:
    """How many (virtual) clients the grid has, without copying its ids when it can say.

    fedsim's VirtualGrid answers with the tuple it keeps (``len`` is O(1); ``len(list(...))``
    would copy a million pointers for a million clients); any other Grid's answer is counted.
    """
    node_ids = grid.get_node_ids()
    return len(node_ids) if isinstance(node_ids, Sized) else sum(1 for _ in node_ids)


def client_models(replies: Iterable[Message]) -> list[Tensors]:
    """The trained models of the replies that carry one (failed clients' replies do not)."""
    return [to_numpy(_array_record(r.content, keys.ARRAYS)) for r in replies if not r.has_error()]


def to_record(tensors: Mapping[str, np.ndarray]) -> ArrayRecord:
    """Name -> NumPy array as an ArrayRecord (what travels and what the strategy returns)."""
    return ArrayRecord({name: Array(np.ascontiguousarray(v)) for name, v in tensors.items()})


def take_records(replies: Iterable[Message], name: str) -> list[Tensors]:
    """Remove the record ``name`` from every reply without error; return them in reply order.

    Flower's FedAvg accepts exactly one ArrayRecord per reply, so a strategy whose clients
    upload more (SCAFFOLD's control variate update) takes its extra record out before
    ``FedAvg.aggregate_train``. The bytes were counted when the reply arrived.
    """
    taken = []
    for reply in replies:
        if reply.has_error():
            continue
        if name not in reply.content:
            raise KeyError(f"a reply lacks the record {name!r}: did its client add the term?")
        taken.append(to_numpy(_array_record(reply.content, name)))
        del reply.content[name]
    return taken


def check_number(key: str, value: object, minimum: float, *, inclusive: bool = True) -> float:
    """``value`` as a float if it is a finite number >= (or >) ``minimum``, else a ConfigError."""
    return require_number(f"strategy.{key}", value, low=minimum, low_inclusive=inclusive)
