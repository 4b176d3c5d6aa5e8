"""A synchronous round on a device fleet, with numbers checked by hand."""

import numpy as np
import pytest
from fleets import STILL
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.app.error import Error

from fedsim import keys
from fedsim.clock.devices import DeviceProfile, Fleet
from fedsim.clock.scheduler import DeviceCost, RoundScheduler
from fedsim.errors import ConfigError
from fedsim.keys import node_id_of
from fedsim.learning.params import content_nbytes

MB = 1_000_000  # bytes
NPY_HEADER = 128  # bytes Flower's Array adds per tensor (numpy .npy format header)
PHONE = {
    "name": "fast",
    "tier": "high",
    "train_gflops": 10.0,
    "memory_gb": 1.0,
    "uplink_mbps": 4.0,
    "downlink_mbps": 8.0,
    "availability": 1.0,
    "compute_power_w": 2.0,
    "radio_tx_power_w": 3.0,
    "radio_rx_power_w": 1.0,
}


@pytest.fixture(autouse=True)
def _identity(flower_identity) -> None:
    """Messages need a Flower task identity."""


def _fleet(**changes) -> Fleet:
    return Fleet(profiles=[PHONE | changes], shares=[1.0], dynamics=STILL, server_gflops=100.0)


def _payload() -> RecordDict:
    return RecordDict({keys.ARRAYS: ArrayRecord([np.zeros(MB // 4, dtype=np.float32)])})  # 1 MB


def _round(scheduler: RoundScheduler, pids, costs, extra_up: int = 0, fail=()):
    messages = [Message(_payload(), dst_node_id=node_id_of(p), message_type="train") for p in pids]
    plan = scheduler.plan(1, messages, costs)
    replies = []
    for msg in plan.to_send:
        pid = msg.metadata.dst_node_id - 1
        if pid in fail:
            replies.append(Message(Error(code=1, reason="boom"), reply_to=msg))
            continue
        content = _payload()
        content[keys.METRICS] = MetricRecord({keys.EXTRA_UPLOAD_BYTES: extra_up})
        replies.append(Message(content, reply_to=msg))
    return plan, scheduler.settle(plan, replies, costs)


def test_wire_bytes_are_the_tensor_bytes_plus_flowers_npy_header() -> None:
    # Flower serialises each array as a .npy blob: 1 MB of float32 + a 128-byte header travel.
    assert content_nbytes(_payload()) == MB + NPY_HEADER


def test_latency_is_download_compute_upload_server() -> None:
    scheduler = RoundScheduler(_fleet(), seed=0, num_clients=2)
    costs = {0: DeviceCost(train_flops=10 * 10**9, peak_memory_bytes=1000, server_flops=50 * 10**9)}
    _, settled = _round(scheduler, [0], costs, extra_up=MB - NPY_HEADER)
    (row,) = settled.records
    # download 1 MB (+128 B header) at 8 Mbps = 8.001024e6 bit / 8e6 bit/s = 1.000128 s;
    # compute 10 GFLOP / 10 GFLOPS = 1 s; upload (1 MB + 128 B tensors + 1 MB - 128 B extra)
    # = 2 MB at 4 Mbps = 16e6 / 4e6 = 4 s; server 50 GFLOP / 100 GFLOPS = 0.5 s
    assert (row["download_s"], row["compute_s"], row["upload_s"], row["server_s"]) == (
        pytest.approx(1.000128),
        pytest.approx(1.0),
        pytest.approx(4.0),
        pytest.approx(0.5),
    )
    assert row["latency_s"] == pytest.approx(6.500128) and row["bytes_up"] == 2 * MB
    # energy: 2 W x 1 s compute + 1 W x 1.000128 s receive + 3 W x 4 s transmit = 15.000128 J
    assert row["energy_j"] == pytest.approx(15.000128)
    assert settled.energy_j == row["energy_j"]
    assert settled.round_time_s == pytest.approx(6.500128)
    assert scheduler.clock.now_s == settled.round_time_s


def test_slower_device_is_proportionally_slower_and_dropped_by_deadline() -> None:
    scheduler = RoundScheduler(_fleet(), seed=0, num_clients=2, deadline_s=5.0)
    slow = DeviceProfile(**(PHONE | {"name": "slow", "tier": "low", "train_gflops": 2.5}))
    scheduler.profiles[1] = slow  # client 1 computes 4x slower
    costs = {p: DeviceCost(train_flops=10 * 10**9, peak_memory_bytes=1000) for p in (0, 1)}
    _, settled = _round(scheduler, [0, 1], costs)
    rows = {r["partition_id"]: r for r in settled.records}
    assert rows[1]["compute_s"] == pytest.approx(4 * rows[0]["compute_s"])  # 4 s vs 1 s
    # fast: 1 + 1 + 2 = 4 s <= 5 s deadline; slow: 1 + 4 + 2 = 7 s > 5 s: straggler
    # (each transfer also carries the 128-byte header: +0.000128 s down, +0.000256 s up)
    assert rows[0]["outcome"] == "ok" and rows[1]["outcome"] == "straggler"
    assert [m.metadata.src_node_id for m in settled.kept] == [node_id_of(0)]
    assert settled.round_time_s == pytest.approx(5.0)  # the server waits until the deadline
    assert settled.counts["straggler"] == 1


def test_over_selection_keeps_the_first_finishers() -> None:
    scheduler = RoundScheduler(_fleet(), seed=0, num_clients=3, over_selection=1.5)
    costs = {p: DeviceCost(train_flops=(p + 1) * 10 * 10**9, peak_memory_bytes=1) for p in range(3)}
    _, settled = _round(scheduler, [0, 1, 2], costs)
    # latencies 1+1+2 = 4, 1+2+2 = 5, 1+3+2 = 6 s (+0.000384 s of headers); keep
    # ceil(3 / 1.5) = 2 -> the round ends when the second finishes, at 5.000384 s
    assert sorted(r["outcome"] for r in settled.records) == ["ok", "ok", "straggler"]
    assert settled.round_time_s == pytest.approx(5.000384)


def test_offline_infeasible_and_failed_clients_are_set_aside() -> None:
    scheduler = RoundScheduler(_fleet(), seed=0, num_clients=1)
    scheduler.profiles[0] = DeviceProfile(**(PHONE | {"availability": 0.0}))  # never online
    plan, settled = _round(scheduler, [0], {0: DeviceCost(1, 1)})
    assert plan.to_send == [] and settled.records[0]["outcome"] == "offline"
    assert settled.round_time_s == 0.0 and settled.kept == []

    scheduler = RoundScheduler(_fleet(memory_gb=1.0), seed=0, num_clients=1)
    plan, settled = _round(scheduler, [0], {0: DeviceCost(1, peak_memory_bytes=2 * 10**9)})
    assert plan.to_send == [] and settled.counts["infeasible"] == 1  # 2 GB job on a 1 GB device

    scheduler = RoundScheduler(_fleet(), seed=0, num_clients=2)
    _, settled = _round(scheduler, [0, 1], {p: DeviceCost(1, 1) for p in (0, 1)}, fail={1})
    assert settled.counts == {"ok": 1, "straggler": 0, "offline": 0, "infeasible": 0, "failed": 1}


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [({"deadline_s": 0}, "clock.deadline_s"), ({"over_selection": 0.5}, "clock.over_selection")],
)
def test_bad_clock_settings_are_refused(kwargs, key) -> None:
    with pytest.raises(ConfigError, match=key):
        RoundScheduler(_fleet(), seed=0, num_clients=1, **kwargs)
