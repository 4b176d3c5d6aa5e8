"""The wire codec: Flower's exact .npy bytes, written and read without np.save/np.load."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord

from fedsim.learning.params import decode_arrays, encode_state, keep_dtypes, load_arrays, to_arrays

STATE = {
    "conv": torch.randn(16, 1, 3, 3, generator=torch.Generator().manual_seed(0)),
    "bias": torch.arange(128, dtype=torch.float32),
    "steps": torch.arange(6, dtype=torch.int64).reshape(2, 3),
    "half": torch.full((3, 4), 0.5, dtype=torch.float16),
    "scalar": torch.tensor(3.0),  # 0-d stays 0-d
}


def test_encode_state_writes_flowers_bytes() -> None:
    ours, flowers = encode_state(STATE), ArrayRecord(STATE)
    assert list(ours) == list(flowers)
    for name in STATE:
        assert ours[name].data == flowers[name].data, name
        assert (ours[name].dtype, tuple(ours[name].shape)) == (
            flowers[name].dtype,
            tuple(flowers[name].shape),
        )


@pytest.mark.parametrize("name", list(STATE))
def test_decode_arrays_reads_what_flower_wrote(name: str) -> None:
    decoded = decode_arrays(ArrayRecord({name: STATE[name]}))[name]
    assert decoded.dtype == STATE[name].dtype and decoded.shape == STATE[name].shape
    assert torch.equal(decoded, STATE[name])
    decoded.add_(1)  # own, writable memory: the record's bytes are untouched
    assert torch.equal(decode_arrays(ArrayRecord({name: STATE[name]}))[name], STATE[name])


def test_decode_arrays_falls_back_for_fortran_order() -> None:
    # Flower writes a transposed (F-contiguous) tensor with fortran_order True.
    transposed = torch.arange(12, dtype=torch.float32).reshape(4, 3).t()
    record = ArrayRecord({"t": transposed})
    assert b"'fortran_order': True" in record["t"].data
    assert torch.equal(decode_arrays(record)["t"], transposed)
    # ours writes it C-ordered: other bytes, same length and values
    ours = encode_state({"t": transposed})
    assert len(ours["t"].data) == len(record["t"].data)
    assert torch.equal(decode_arrays(ours)["t"], transposed)


def test_load_arrays_round_trips_a_model() -> None:
    source, target = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    load_arrays(target, to_arrays(source))
    assert torch.equal(target.weight, source.weight) and torch.equal(target.bias, source.bias)
    foreign = ArrayRecord({"other": Array(torch.zeros(1).numpy())})
    with pytest.raises(KeyError, match="other"):
        load_arrays(target, foreign)


def test_keep_dtypes_casts_promoted_arrays_back() -> None:
    like = ArrayRecord({"w": Array(np.ones(3, dtype=np.float32)), "n": Array(np.ones(1, np.int64))})
    new = ArrayRecord({"w": Array(np.full(3, 0.5)), "n": Array(np.ones(1, np.int64))})  # float64
    kept, changed = keep_dtypes(new, like)
    assert changed == ["w"]
    assert kept["w"].numpy().dtype == np.float32 and kept["n"].numpy().dtype == np.int64
    np.testing.assert_array_equal(kept["w"].numpy(), np.full(3, 0.5, dtype=np.float32))
    same, none = keep_dtypes(like, like)
    assert same is like and none == []


def test_flowers_fedadam_keeps_the_model_float32_on_the_wire(tmp_path) -> None:
    """Flower 1.41's FedAdam returns float64 arrays (NumPy 2 promotion); the round loop casts
    them back, so round 2 downloads as many bytes as round 1 (FedAvg's size)."""
    from fedsim.config import compose_config
    from fedsim.engine.simulation import simulate
    from fedsim.records.results import read_metrics

    args = [
        "strategy=fedadam",
        "num_clients=6",
        "num_rounds=2",
        "strategy.fraction_train=0.5",
        "runtime.progress=false",
        "runtime.engine=inline",
        "eval.num_clients_final=0",
    ]
    simulate(compose_config(args), tmp_path)
    first, second = read_metrics(tmp_path)
    assert second["bytes_down"] == first["bytes_down"]
