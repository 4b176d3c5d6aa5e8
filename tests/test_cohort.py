import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedsim import keys
from fedsim.rounds.virtual_grid import (
    assign_lanes,
    node_id_of,
    pack_lane,
    pack_replies,
    partition_id_of,
    unpack_lane,
    unpack_replies,
)


@pytest.fixture(autouse=True)
def _identity(flower_identity) -> None:
    """Messages need a Flower task identity."""


def _msg(content: RecordDict, pid: int) -> Message:
    return Message(content=content, message_type="train", dst_node_id=node_id_of(pid))


def test_node_ids_round_trip_and_skip_superlink_id() -> None:
    assert node_id_of(0) == 1  # Flower's SuperLink is node 0
    assert [partition_id_of(node_id_of(p)) for p in range(5)] == list(range(5))


def test_pack_lane_stores_shared_content_once() -> None:
    shared = RecordDict(
        {"arrays": ArrayRecord([np.ones(3, dtype=np.float32)]), "config": ConfigRecord({"a": 1})}
    )
    own = RecordDict({"arrays": ArrayRecord([np.zeros(2, dtype=np.float32)])})
    job = ConfigRecord({keys.JOB_HASH: "h"})
    state7 = RecordDict({"soft": ArrayRecord([np.full(4, 0.25, dtype=np.float32)])})
    packed = pack_lane([_msg(shared, 3), _msg(shared, 7), _msg(own, 9)], job, {7: state7})
    # two distinct contents -> c0/arrays, c0/config, c1/arrays (+ job + lane); one state
    assert sorted(k for k in packed if k.startswith("c")) == ["c0/arrays", "c0/config", "c1/arrays"]
    assert [k for k in packed if k.startswith("s")] == ["s7/soft"]
    job_back, clients = unpack_lane(packed)
    assert job_back[keys.JOB_HASH] == "h"
    assert [pid for pid, _, _ in clients] == [3, 7, 9]
    assert clients[0][1] is clients[1][1]  # shared content comes back shared
    np.testing.assert_array_equal(clients[2][1]["arrays"].to_numpy_ndarrays()[0], np.zeros(2))
    assert clients[0][1]["config"]["a"] == 1
    assert len(clients[0][2]) == 0  # no state for client 3
    np.testing.assert_array_equal(clients[1][2]["soft"].to_numpy_ndarrays()[0], [0.25] * 4)


def test_replies_round_trip_with_errors() -> None:
    ok = RecordDict(
        {
            "arrays": ArrayRecord([np.full(2, 5.0, dtype=np.float32)]),
            "metrics": MetricRecord({"num-examples": 4}),
        }
    )
    state = RecordDict({"c_i": ArrayRecord([np.ones(2, dtype=np.float32)])})
    out, states = unpack_replies(pack_replies([(2, ok), (5, "RuntimeError: boom")], {2: state}))
    assert out[5] == "RuntimeError: boom"
    assert isinstance(out[2], RecordDict)
    assert out[2]["metrics"]["num-examples"] == 4
    np.testing.assert_array_equal(out[2]["arrays"].to_numpy_ndarrays()[0], [5.0, 5.0])
    # the state is returned apart: the strategy must see exactly one ArrayRecord per reply
    assert list(out[2].array_records) == ["arrays"]
    assert list(states) == [2] and list(states[2]) == ["c_i"]


@pytest.mark.parametrize(
    ("costs", "num_lanes", "expected"),
    [
        # LPT: 10 -> lane0, 6 -> lane1, 5 -> lane1 (load 6 < 10), 4 -> lane0 (loads 10 < 11)
        ({0: 10, 1: 6, 2: 5, 3: 4}, 2, [[0, 3], [1, 2]]),
        ({0: 1, 1: 1, 2: 1}, 5, [[0], [1], [2]]),  # more lanes than clients: empty lanes dropped
        ({0: 3, 1: 3}, 1, [[0, 1]]),
    ],
)
def test_assign_lanes_balances_longest_first(costs, num_lanes, expected) -> None:
    assert assign_lanes(list(costs), costs.__getitem__, num_lanes) == expected
