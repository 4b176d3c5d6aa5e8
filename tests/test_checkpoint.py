import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from flwr.serverapp.strategy import FedAdam, FedAvgM

from fedsim.errors import ConfigError
from fedsim.records.checkpoint import CHECKPOINT_FILE, RunState, load_checkpoint, save_checkpoint


def _state() -> RunState:
    arrays = ArrayRecord(
        {
            "w": Array(np.arange(6, dtype=np.float32).reshape(2, 3)),
            "b": Array(np.ones(2, dtype=np.float64)),
        }
    )
    soft = ArrayRecord({"p": Array(np.full(4, 0.25, dtype=np.float16))})
    meta = ConfigRecord({"seen": [1, 2], "tag": "x", "raw": b"\x00\xff"})
    clients = {3: RecordDict({"soft": soft, "meta": meta})}
    return RunState(4, arrays, clients, 12.5, {"best_accuracy": 0.5, "best_round": 3})


def test_round_trip_is_exact_including_strategy_state(tmp_path) -> None:
    strategy = FedAdam()
    strategy.m_t = {"w": np.full((2, 3), 0.1, dtype=np.float32)}
    strategy.v_t = {"w": np.full((2, 3), 0.2, dtype=np.float32)}
    strategy.current_arrays = {"w": np.zeros((2, 3), dtype=np.float32)}
    save_checkpoint(tmp_path, _state(), strategy, "h1")
    fresh = FedAdam()
    state = load_checkpoint(tmp_path, fresh, "h1")
    assert state.server_round == 4 and state.sim_time_s == 12.5
    assert state.totals == {"best_accuracy": 0.5, "best_round": 3}
    assert list(state.arrays.keys()) == ["w", "b"]
    np.testing.assert_array_equal(state.arrays["w"].numpy(), np.arange(6).reshape(2, 3))
    assert state.arrays["b"].numpy().dtype == np.float64
    np.testing.assert_array_equal(fresh.m_t["w"], strategy.m_t["w"])
    np.testing.assert_array_equal(fresh.v_t["w"], strategy.v_t["w"])
    client = state.client_states[3]
    assert client["soft"]["p"].numpy().dtype == np.float16
    assert client["meta"]["seen"] == [1, 2] and client["meta"]["raw"] == b"\x00\xff"
    assert not list(tmp_path.glob(".*.tmp"))  # written via a temporary file and a rename


def test_fedavgm_momentum_list_survives(tmp_path) -> None:
    strategy = FedAvgM(server_momentum=0.9)
    strategy.momentum_vector = [np.ones(3, dtype=np.float32), np.zeros((2, 2), dtype=np.float32)]
    strategy.current_arrays = ArrayRecord({"w": Array(np.ones(3, dtype=np.float32))})
    save_checkpoint(tmp_path, _state(), strategy, "h")
    fresh = FedAvgM(server_momentum=0.9)
    load_checkpoint(tmp_path, fresh, "h")
    assert [v.shape for v in fresh.momentum_vector] == [(3,), (2, 2)]
    np.testing.assert_array_equal(fresh.current_arrays["w"].numpy(), np.ones(3))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda p: p.unlink(), "nothing to resume"),
        (lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]), "corrupt"),
        (lambda p: p.write_bytes(b"\x00" * 64), "corrupt"),
    ],
)
def test_missing_or_corrupt_checkpoint_is_refused_in_one_line(tmp_path, damage, message) -> None:
    save_checkpoint(tmp_path, _state(), FedAdam(), "h")
    damage(tmp_path / CHECKPOINT_FILE)
    with pytest.raises(ConfigError, match=message) as info:
        load_checkpoint(tmp_path, FedAdam(), "h")
    assert "\n" not in str(info.value) and str(info.value).startswith("resume=")


def test_checkpoint_of_another_config_is_refused(tmp_path) -> None:
    save_checkpoint(tmp_path, _state(), FedAdam(), "config-a")
    with pytest.raises(ConfigError, match="another config"):
        load_checkpoint(tmp_path, FedAdam(), "config-b")


class _Keeps(FedAvgM):
    REBUILT_ON_RESUME = ("helper",)


def test_state_the_checkpoint_cannot_keep_is_refused_not_dropped(tmp_path) -> None:
    import random

    from fedsim.records.checkpoint import UnsavableState

    strategy = _Keeps(server_momentum=0.9)
    strategy.helper = object()  # named as rebuilt on resume: left out
    strategy.rng = random.Random(0)  # state: a resumed run would draw other numbers
    with pytest.raises(UnsavableState, match=r"_Keeps\.rng is a Random.*REBUILT_ON_RESUME"):
        save_checkpoint(tmp_path, _state(), strategy, "h")
    assert not (tmp_path / CHECKPOINT_FILE).exists()
    del strategy.rng
    save_checkpoint(tmp_path, _state(), strategy, "h")  # callables and rebuilt ones: left out
    fresh = _Keeps(server_momentum=0.9)
    load_checkpoint(tmp_path, fresh, "h")
    assert not hasattr(fresh, "helper") and callable(fresh.train_metrics_aggr_fn)
    state = _state()
    state.extra = {"queue": [object()]}  # an asynchronous loop's extra: the same rule
    with pytest.raises(UnsavableState, match="extra holds state"):
        save_checkpoint(tmp_path, state, strategy, "h")


def _write_in_turn(run_dir, states, stop) -> None:
    i = 0
    while not stop.is_set():
        i += 1
        save_checkpoint(run_dir, states[i % 2], FedAvgM(), "h")


def test_a_reader_never_sees_half_of_two_checkpoints(tmp_path) -> None:
    """A run replaces its checkpoint each round (atomically); a reader beside it (a resume asked
    too early, fedsim-compare on a live folder) must get one whole file, never the header of one
    and the tensors of the next (its checksum then calls the file corrupt)."""
    import multiprocessing

    from fedsim.records.checkpoint import read_checkpoint

    states = []
    for server_round in (1, 2):
        state = _state()
        state.server_round = server_round
        state.arrays = ArrayRecord({"w": Array(np.full(50_000, server_round, np.float32))})
        states.append(state)
    save_checkpoint(tmp_path, states[0], FedAvgM(), "h")
    context = multiprocessing.get_context("fork")
    stop = context.Event()
    writer = context.Process(target=_write_in_turn, args=(tmp_path, states, stop))
    writer.start()
    try:
        seen = set()
        for _ in range(300):
            meta, tensors = read_checkpoint(tmp_path)  # raises if it mixed two files
            seen.add((meta["server_round"], float(tensors["global/0"][0])))
    finally:
        stop.set()
        writer.join()
    assert seen == {(1, 1.0), (2, 2.0)}  # both versions read, each whole
