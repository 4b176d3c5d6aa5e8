"""FedBuff and FedCompass on the simulated clock: their maths by hand, the Compass scheduler on a
small event driver, and real runs (Ray, digits) that equal FedAvg where they must and resume
bit for bit."""

import heapq
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import strip_wall_time

from fedsim.config import compose_config
from fedsim.engine.simulation import simulate
from fedsim.errors import ConfigError
from fedsim.keys import Outcome
from fedsim.records.results import read_metrics
from fedsim.rounds.asynchronous import Arrival, staleness_weight
from fedsim.strategies.fedbuff import FedBuff, fedbuff_step
from fedsim.strategies.fedcompass import FedCompass, compass_step

FEDSIM = [sys.executable, "-m", "fedsim"]


# --- maths by hand -------------------------------------------------------------------------------
def test_staleness_weights() -> None:
    assert staleness_weight(3, "constant", -0.5) == 1.0
    assert staleness_weight(0, "polynomial", -0.5) == 1.0
    assert staleness_weight(3, "polynomial", -0.5) == pytest.approx(0.5)  # 1/sqrt(4)
    assert staleness_weight(2, "hinge", 0.5, 2) == 1.0
    assert staleness_weight(6, "hinge", 0.5, 2) == pytest.approx(1 / 3)  # 1/(0.5*4 + 1)


def test_fedbuff_step_uniform_and_by_examples() -> None:
    d1, d2 = {"w": np.array([1.0, 2.0])}, {"w": np.array([3.0, -2.0])}
    uniform = fedbuff_step([(d1, 1.0, 10), (d2, 0.5, 30)], eta_g=2.0)
    np.testing.assert_allclose(uniform["w"], 2.0 * (0.5 * d1["w"] + 0.5 * 0.5 * d2["w"]))
    by_n = fedbuff_step([(d1, 1.0, 10), (d2, 0.5, 30)], eta_g=1.0, weighting="examples")
    np.testing.assert_allclose(by_n["w"], 0.25 * d1["w"] + 0.75 * 0.5 * d2["w"])
    assert uniform["w"].dtype == d1["w"].dtype


def test_compass_step_by_hand() -> None:
    w = {"w": np.array([1.0, 1.0], dtype=np.float32)}
    d1, d2 = {"w": np.array([1.0, 0.0])}, {"w": np.array([0.0, 2.0])}
    new = compass_step(w, [(d1, 1.0), (d2, 0.5)], alpha=0.9, num_clients=4)
    np.testing.assert_allclose(new["w"], [1 - 0.9 / 4, 1 - 0.9 * 0.5 / 4 * 2], rtol=1e-6)
    assert new["w"].dtype == np.float32


@pytest.mark.parametrize(
    ("cls", "kwargs", "key"),
    [
        (FedBuff, {"buffer_size": 30, "concurrency": 20}, "strategy.buffer_size"),
        (FedBuff, {"concurrency": 0}, "strategy.concurrency"),
        (FedBuff, {"staleness_fn": "linear"}, "strategy.staleness_fn"),
        (FedBuff, {"weighting": "by_loss"}, "strategy.weighting"),
        (FedBuff, {"max_staleness": -1}, "strategy.max_staleness"),
        (FedCompass, {"q_min": 10, "q_max": 5}, "strategy.q_max"),
        (FedCompass, {"speed_momentum": 1.5}, "strategy.speed_momentum"),
        (FedCompass, {"latest_time_factor": 0.5}, "strategy.latest_time_factor"),
        (FedCompass, {"num_participants": 0}, "strategy.num_participants"),
    ],
)
def test_bad_async_knobs_are_refused(cls, kwargs, key) -> None:
    with pytest.raises(ConfigError) as info:
        cls(**kwargs)
    assert info.value.key == key


# --- the Compass scheduler on a small event driver ---------------------------------------------
class Driver:
    """The part of AsyncLoop a strategy sees, with latency = steps x the client's true speed."""

    def __init__(self, speeds: list[float], model_size: int = 3) -> None:
        self.speeds, self.num_clients, self.seed = speeds, len(speeds), 0
        self.now, self.version = 0.0, 0
        self.infeasible: frozenset[int] = frozenset()
        self.w = {"w": np.zeros(model_size)}
        self.events: list = []
        self.order = 0
        self.merged: list[tuple[int, int]] = []  # (version merged into, staleness)
        self.sent: list[tuple[int, int]] = []  # (client, steps)

    def busy(self) -> set[int]:
        return {e[3].pid for e in self.events if e[2] == "arrival"}

    def global_tensors(self) -> dict:
        return self.w

    def dispatch(self, pid: int, steps: int | None = None) -> bool:
        self.sent.append((pid, steps))
        job = Arrival(
            pid=pid,
            base=self.version,
            steps=steps,
            sent_s=self.now,
            arrival_s=self.now + steps * self.speeds[pid],
            train_loss=None,
            delta={"w": np.full(3, 1.0)},
        )
        self._push(job.arrival_s, "arrival", job)
        return True

    def set_timer(self, at_s: float, tag: int) -> None:
        self._push(at_s, "timer", tag)

    def update(self, arrays, entries) -> None:
        for e in entries:
            self.merged.append((self.version + 1, self.version - e["base"]))
        self.w = {"w": np.asarray(arrays["w"].numpy())}
        self.version += 1

    def _push(self, at_s, kind, payload) -> None:
        self.order += 1
        heapq.heappush(self.events, [at_s, self.order, kind, payload])

    def run(self, strategy: FedCompass, updates: int) -> None:
        strategy.begin(self)
        while self.version < updates:
            at_s, _, kind, payload = heapq.heappop(self.events)
            self.now = at_s
            if kind == "arrival":
                payload.staleness = self.version - payload.base
                strategy.on_arrival(self, payload)
            else:
                strategy.on_timer(self, payload)


def test_compass_with_equal_speeds_becomes_synchronous() -> None:
    """methods.md 6.4's check: identical devices end up in one group with Q = q_max."""
    n = 6
    driver = Driver([0.5] * n)
    strategy = FedCompass(q_min=2, q_max=10)
    driver.run(strategy, updates=n + 4)
    # the first n updates are first contacts, merged alone; every later one merges all n
    later = [v for v, _ in driver.merged if v > n]
    assert {later.count(v) for v in set(later)} == {n}
    assert all(steps == 10 for _, steps in driver.sent)
    assert all(s == 0 for v, s in driver.merged if v > n + 1)


def test_compass_groups_a_five_fold_speed_spread_with_low_staleness() -> None:
    """Speeds 1x-5x: Q_i shrink for the slow, and merged updates are mostly 0-1 updates old."""
    speeds = [0.1, 0.2, 0.3, 0.4, 0.5] * 2
    driver = Driver(speeds)
    strategy = FedCompass(q_min=4, q_max=20)
    driver.run(strategy, updates=60)
    after_contact = [s for v, s in driver.merged if v > len(speeds)]
    assert np.mean([s <= 1 for s in after_contact]) >= 0.8
    later = driver.sent[len(speeds) :]
    slow = [q for pid, q in later if speeds[pid] == 0.5]
    fast = [q for pid, q in later if speeds[pid] == 0.1]
    assert np.mean(slow) < np.mean(fast)  # slow devices are given fewer steps
    assert all(4 <= q <= 20 for _, q in later)


def test_compass_default_steps_follow_the_clients_rounds() -> None:
    driver = Driver([1.0, 1.0, 1.0])
    driver.round_steps = lambda pid: [4, 6, 20][pid]
    strategy = FedCompass()
    strategy.begin(driver)
    assert (strategy.q_min, strategy.q_max) == (1, 6)  # the median round; q_max / 5
    assert [q for _, q in driver.sent] == [6, 6, 6]


def test_compass_late_arrival_goes_to_the_general_buffer() -> None:
    strategy = FedCompass(q_min=1, q_max=10)
    driver = Driver([1.0, 1.0])
    strategy.begin(driver)
    strategy.participants = [0, 1]
    strategy.speed = {0: 1.0, 1: 1.0}
    strategy.group_of = {0: 0, 1: 0}
    strategy.groups = {0: {"clients": [0, 1], "arrived": [], "expected": 5.0, "latest": 7.5}}
    driver.events.clear()
    driver.now = 8.0  # past the latest arrival time
    job = Arrival(
        pid=0, base=0, steps=8, sent_s=0.0, arrival_s=8.0, train_loss=None, delta={"w": np.ones(3)}
    )
    strategy.on_arrival(driver, job)
    assert job.outcome == Outcome.LATE
    assert [e["pid"] for e in strategy.general_buffer] == [0]
    assert driver.version == 0  # buffered, not merged
    assert driver.busy() == {0}  # reassigned at once


# --- real runs -----------------------------------------------------------------------------------
def test_fedbuff_first_update_with_everyone_in_flight_is_fedavg(tmp_path: Path) -> None:
    """K = concurrency = all clients, weights by examples, eta_g 1: the first update merges every
    client trained on the initial model (staleness 0), which is FedAvg's first round with every
    client. (Later ones differ: a freed slot is refilled at once, with the model of the moment.)
    Full-batch steps make batch order irrelevant (the two draw it by different names)."""
    common = [
        "num_clients=6",
        "num_rounds=2",
        "client.batch_size=1000",
        "client.local_epochs=2",
        "runtime.progress=false",
        "runtime.engine=inline",
        "eval.num_clients_final=0",
    ]
    buff = [
        *common,
        "strategy=fedbuff",
        "strategy.concurrency=6",
        "strategy.buffer_size=6",
        "strategy.weighting=examples",
    ]
    avg = [*common, "strategy.fraction_train=1.0"]
    simulate(compose_config(buff), tmp_path / "buff")
    simulate(compose_config(avg), tmp_path / "avg")
    b, a = read_metrics(tmp_path / "buff"), read_metrics(tmp_path / "avg")
    assert [r["num_clients"] for r in b] == [6, 6]
    assert [r["staleness_max"] for r in b] == [0, 1]  # round 2: refilled slots held version 0
    assert b[0]["loss"] == pytest.approx(a[0]["loss"], abs=1e-5)
    assert b[0]["accuracy"] == pytest.approx(a[0]["accuracy"], abs=1e-9)
    assert b[0]["bytes_up"] == a[0]["bytes_up"]
    assert b[1]["loss"] != pytest.approx(a[1]["loss"], abs=1e-5)


def test_fedbuff_run_on_the_simulated_clock(tmp_path: Path) -> None:
    args = [
        "num_clients=12",
        "num_rounds=8",
        "strategy=fedbuff",
        "strategy.concurrency=6",
        "strategy.buffer_size=3",
        "devices=phones_mixed",
        "runtime.progress=false",
        "runtime.engine=inline",
    ]
    summary = simulate(compose_config(args), tmp_path)
    assert summary["status"] == "completed"
    rows = read_metrics(tmp_path)
    assert [r["round"] for r in rows] == list(range(1, 9))
    assert all(r["num_clients"] == 3 for r in rows)
    times = [r["sim_time_s"] for r in rows]
    assert times == sorted(times) and times[0] > 0
    assert max(r["staleness_max"] for r in rows) >= 1  # fast phones lap slow ones
    clients = read_metrics(tmp_path, "clients.jsonl")
    arrived = [c for c in clients if c["outcome"] == "ok"]
    assert len(arrived) == 3 * 8
    for c in arrived:  # each arrival is its dispatch time plus the device model's latency
        assert c["arrival_s"] == pytest.approx(c["sent_s"] + c["latency_s"])
    assert summary["bytes_up_total"] == sum(r["bytes_up"] for r in rows)
    assert len({c["dispatch"] for c in clients}) == len(clients)  # one draw name per dispatch


def test_fedcompass_run_gives_steps_and_groups(tmp_path: Path) -> None:
    args = [
        "num_clients=8",
        "num_rounds=14",
        "strategy=fedcompass",
        "strategy.q_min=2",
        "strategy.q_max=8",
        "devices=phones_mixed",
        "runtime.progress=false",
        "runtime.engine=inline",
    ]
    assert simulate(compose_config(args), tmp_path)["status"] == "completed"
    rows = read_metrics(tmp_path)
    assert len(rows) == 14
    assert max(r["num_clients"] for r in rows) >= 2  # a group was merged together
    clients = read_metrics(tmp_path, "clients.jsonl")
    steps = [c["local_steps"] for c in clients]
    assert all(2 <= q <= 8 for q in steps) and steps[:8] == [8] * 8


def test_async_refuses_round_only_clock_knobs(tmp_path: Path) -> None:
    proc = subprocess.run(
        [*FEDSIM, "strategy=fedbuff", "clock.deadline_s=1", f"hydra.run.dir={tmp_path}"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "fedsim: error: clock.deadline_s=1: must be null with an asynchronous strategy"
    ]


def test_a_fleet_too_small_for_the_job_stops_instead_of_waiting_forever(tmp_path: Path) -> None:
    args = [
        "num_clients=4",
        "num_rounds=3",
        "strategy=fedbuff",
        "strategy.concurrency=2",
        "strategy.buffer_size=2",
        "devices.profiles.0.memory_gb=0.0001",
        "runtime.progress=false",
        "runtime.engine=inline",
        "eval.num_clients_final=0",
    ]
    summary = simulate(compose_config(args), tmp_path)
    assert summary["status"] == "failed" and summary["num_rounds"] == 0
    assert read_metrics(tmp_path) == []


def test_max_sim_time_stops_a_run(tmp_path: Path) -> None:
    args = [
        "num_clients=10",
        "num_rounds=6",
        "strategy=fedbuff",
        "strategy.concurrency=5",
        "strategy.buffer_size=2",
        "runtime.progress=false",
        "runtime.engine=inline",
    ]
    simulate(compose_config(args), tmp_path / "full")
    times = [r["sim_time_s"] for r in read_metrics(tmp_path / "full")]
    k = next(i for i in range(2, len(times)) if times[i] > times[i - 1])  # updates can tie
    budget = (times[k - 1] + times[k]) / 2
    summary = simulate(compose_config([*args, f"clock.max_sim_time_s={budget}"]), tmp_path / "cut")
    rows = read_metrics(tmp_path / "cut")
    assert summary["status"] == "completed"
    assert [r["sim_time_s"] for r in rows] == times[: k + 1]  # the first update past it ends it


@pytest.mark.slow
@pytest.mark.parametrize(
    "strategy",
    [
        ["strategy=fedbuff", "strategy.concurrency=5", "strategy.buffer_size=2"],
        ["strategy=fedcompass", "strategy.q_min=2", "strategy.q_max=6"],
    ],
)
def test_async_run_killed_and_resumed_is_bit_for_bit(
    tmp_path: Path, kill_and_resume, strategy
) -> None:
    """The event queue, the clients in flight and the strategy's buffers are in the checkpoint."""
    args = [
        "num_clients=8",
        "num_rounds=40",
        "devices=phones_mixed",
        "runtime.progress=false",
        "runtime.engine=inline",  # the event queue's state is the point, not the engine
        "client.local_epochs=3",
        *strategy,
    ]
    simulate(compose_config(args), tmp_path / "reference")
    run, killed_at = kill_and_resume(args, rows=10)
    assert 10 <= killed_at < 40
    for name in ("metrics.jsonl", "clients.jsonl"):
        assert strip_wall_time(read_metrics(run, name)) == strip_wall_time(
            read_metrics(tmp_path / "reference", name)
        )
