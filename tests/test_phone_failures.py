"""Failures phones have (fedsim/clock/phones.py): availability, battery, interruptions by phase."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from fleets import STILL
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

from fedsim import keys
from fedsim.clock.devices import Fleet
from fedsim.clock.phones import PHASES, Battery, PhoneModel, battery_after
from fedsim.clock.scheduler import DeviceCost, RoundScheduler
from fedsim.config import build, compose_config
from fedsim.errors import ConfigError
from fedsim.keys import Outcome, node_id_of
from fedsim.seeding import numpy_rng

MB = 1_000_000
# 8 Mbit/s both ways, 10 GFLOP/s; 1 W radio both ways, 2 W compute: hand-checkable energies
PHONE = {
    "name": "phone",
    "tier": "mid",
    "train_gflops": 10.0,
    "memory_gb": 1.0,
    "uplink_mbps": 8.0,
    "downlink_mbps": 8.0,
    "availability": 1.0,
    "compute_power_w": 2.0,
    "radio_tx_power_w": 1.0,
    "radio_rx_power_w": 1.0,
}
NEVER_PLUGGED = {"kind": "diurnal", "charging_h": 0.0, "require_charging": False}


@pytest.fixture(autouse=True)
def _identity(flower_identity) -> None:
    """Messages need a Flower task identity."""


def _fleet(**phones) -> Fleet:
    return Fleet(profiles=[PHONE], shares=[1.0], dynamics=STILL, server_gflops=100.0, **phones)


def _payload() -> RecordDict:
    # 1 MB of float32 (+128 B of .npy header): 1.000128 s on 8 Mbit/s
    return RecordDict({keys.ARRAYS: ArrayRecord([np.zeros(MB // 4, dtype=np.float32)])})


def _round(scheduler: RoundScheduler, pids, server_round: int = 1, flops: int = 10 * 10**9):
    """One round of ``pids`` (10 GFLOP each: 1 s of compute); every client sent work replies."""
    costs = {p: DeviceCost(train_flops=flops, peak_memory_bytes=1) for p in pids}
    messages = [Message(_payload(), dst_node_id=node_id_of(p), message_type="train") for p in pids]
    plan = scheduler.plan(server_round, messages, costs)
    replies = []
    for msg in plan.to_send:
        content = _payload()
        content[keys.METRICS] = MetricRecord({keys.NUM_EXAMPLES: 10})
        replies.append(Message(content, reply_to=msg))
    return plan, scheduler.settle(plan, replies, costs)


# --- draws: deterministic per seed, different across seeds -----------------------------------
def _draws(model: PhoneModel, seed: int) -> list:
    out = []
    for pid in range(20):
        level = model.level_at(seed, pid, None, 0.0)
        check_in = model.check_in(seed, pid, 3, 0.0, level)
        cut = model.interruption(
            seed, pid, 3, (1.0, 5.0, 1.0), (1.0, 2.0, 1.0), 0.0, check_in, level
        )
        out.append((level, check_in, cut))
    return out


def test_battery_and_interruption_draws_are_deterministic_per_seed_and_differ_across_seeds():
    phones = {
        "availability": {"kind": "diurnal", "spread_h": 3.0, "unmetered_p": 0.5},
        "battery": {"capacity_j": 1000.0},
        "interruptions": {"download_p": 0.3, "train_p": 0.3, "upload_p": 0.3},
    }
    model = _fleet(**phones).phones
    again = _fleet(**phones).phones  # another instance: nothing is cached between them
    assert model is not None and again is not None
    assert _draws(model, 0) == _draws(again, 0)
    assert _draws(model, 0) != _draws(model, 1)
    levels = [d[0] for d in _draws(model, 0)]
    assert len(set(levels)) == len(levels)  # each phone its own initial level
    cuts = [d[2] for d in _draws(model, 0) + _draws(model, 1)]
    assert {c.phase for c in cuts if c is not None} == set(PHASES)  # every phase occurs


# --- the battery ---------------------------------------------------------------------------
def test_battery_drains_by_exactly_the_computed_energy() -> None:
    scheduler = RoundScheduler(
        _fleet(availability=NEVER_PLUGGED, battery={"capacity_j": 1000.0, "min_level": 0.0}),
        seed=0,
        num_clients=1,
    )
    phones = scheduler.fleet.phones
    assert phones is not None
    start_j = phones.initial_level_j(0, 0)
    _, settled = _round(scheduler, [0])
    (row,) = settled.records
    # download 1.000128 s x 1 W + compute 1 s x 2 W + upload 1.000128 s x 1 W = 4.000256 J
    assert row["energy_j"] == pytest.approx(4.000256)
    assert scheduler.batteries[0] == [start_j - row["energy_j"], row["latency_s"]]
    assert row["battery_level_end"] == (start_j - row["energy_j"]) / 1000.0
    assert row["battery_level"] == start_j / 1000.0 and row["outcome"] == "ok"


def test_battery_recharges_on_the_cycle() -> None:
    # plugged in every day from 01:00 for 1 h (clock 0 = midnight): on [3600, 7200) + k x 86400
    model = _fleet(
        availability={"kind": "diurnal", "plug_in_h": 1.0, "charging_h": 1.0},
        battery={"capacity_j": 5000.0, "charge_w": 10.0, "idle_w": 0.5},
    ).phones
    assert model is not None
    assert model.segments(0, 0, 3500.0, 3700.0) == [(3500.0, 3600.0, False), (3600.0, 3700.0, True)]
    # 100 s unplugged (-0.5 W: -50 J), then 100 s plugged in (+10 W: +1,000 J)
    assert model.level_at(0, 0, [1000.0, 3500.0], 3700.0) == 1950.0
    # a whole day from 00:00: 1 h of charging (+36,000 J, capped at 5,000 J), then 17 h
    # unplugged (-0.5 W x 61,200 s = -30,600 J, floored at 0), then 1 h more plugged in
    assert model.level_at(0, 0, [1000.0, 0.0], 86400.0 + 7200.0) == 5000.0
    assert model.level_at(0, 0, [4000.0, 7200.0], 86400.0 + 3600.0) == 0.0
    assert (
        battery_after(100.0, [(0.0, 10.0, True)], Battery(capacity_j=150.0, charge_w=10.0)) == 150.0
    )


# --- who checks in ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("phones", "reason"),
    [
        ({"availability": NEVER_PLUGGED | {"require_charging": True}}, "unplugged"),
        ({"availability": {"kind": "always", "unmetered_p": 0.0}}, "metered"),
        (
            {
                "availability": {"kind": "always", "require_unmetered": False},
                "battery": {"capacity_j": 100.0, "min_level": 0.5, "initial_min": 0.0},
            },
            "battery_low",
        ),
    ],
)
def test_unplugged_metered_or_low_battery_phone_does_not_train(phones, reason) -> None:
    scheduler = RoundScheduler(_fleet(**phones), seed=0, num_clients=40)
    plan, settled = _round(scheduler, list(range(40)))
    offline = [r for r in settled.records if r["outcome"] == "offline"]
    assert offline and all(r["offline_reason"] == reason for r in offline)
    assert len(plan.to_send) == 40 - len(offline)  # the others were sent their work
    if reason == "battery_low":  # levels U(0, 1): below 0.5 stays home, at or above trains
        assert all(r["battery_level"] < 0.5 for r in offline)
        assert all(r["battery_level"] >= 0.5 for r in settled.records if r["outcome"] == "ok")
    else:  # nobody is plugged in / on Wi-Fi
        assert len(offline) == 40


# --- interruptions --------------------------------------------------------------------------
def test_interrupted_phone_is_charged_until_the_interruption_and_its_update_is_dropped() -> None:
    scheduler = RoundScheduler(_fleet(interruptions={"train_p": 1.0}), seed=0, num_clients=1)
    plan, settled = _round(scheduler, [0])
    (row,) = settled.records
    # the drop point: the train phase's second draw on the stream (seed, "interrupt", 0, 1)
    point = numpy_rng(0, "interrupt", 0, 1).random((3, 2))[1, 1]
    assert row["outcome"] == Outcome.INTERRUPTED and row["failed_phase"] == "train"
    assert row["failure_cause"] == "random"
    # 1.000128 s of download, then `point` of the 1 s of compute; no upload, no server time
    assert row["latency_s"] == pytest.approx(1.000128 + point)
    assert row["compute_s"] == pytest.approx(point) and row["upload_s"] == 0.0
    assert row["energy_j"] == pytest.approx(1.000128 * 1.0 + point * 2.0)
    assert row["bytes_up"] == 0 and row["bytes_down"] == MB + 128
    assert settled.kept == [] and settled.counts[Outcome.INTERRUPTED] == 1
    # the round lasted until the drop-out was seen
    assert settled.round_time_s == pytest.approx(row["latency_s"])


def test_no_phone_settings_no_new_columns_or_counts() -> None:
    scheduler = RoundScheduler(_fleet(), seed=0, num_clients=2)
    _, settled = _round(scheduler, [0, 1])
    assert Outcome.INTERRUPTED not in settled.counts
    assert not {"battery_level", "failed_phase", "plugged"} & set(settled.records[0])


# --- traces ----------------------------------------------------------------------------------
def test_trace_csv_is_read_and_respected(tmp_path: Path) -> None:
    trace = tmp_path / "trace.csv"
    trace.write_text("client,start_s,end_s\n0,0,100\n1,50,200\n0,300,400\n")
    scheduler = RoundScheduler(
        _fleet(availability={"kind": "trace", "path": str(trace)}), seed=0, num_clients=3
    )
    _, settled = _round(scheduler, [0, 1, 2])  # at 0 s: client 0 on, 1 off; client 2 = id 0
    outcome = {r["partition_id"]: r["outcome"] for r in settled.records}
    assert outcome == {0: "ok", 1: "offline", 2: "ok"}
    scheduler.clock.now_s = 60.0
    _, settled = _round(scheduler, [0, 1], server_round=2)
    assert {r["outcome"] for r in settled.records} == {"ok"}
    # at 97 s client 0's interval ends 3 s later, inside its 1 s download + 1,000 s compute:
    # it drops out in training, 3 s into its round; client 1 (on until 200 s) also drops
    scheduler.clock.now_s = 97.0
    _, settled = _round(scheduler, [0, 1], server_round=3, flops=10**13)
    rows = {r["partition_id"]: r for r in settled.records}
    assert rows[0]["outcome"] == Outcome.INTERRUPTED and rows[0]["failed_phase"] == "train"
    assert rows[0]["failure_cause"] == "unavailable"
    assert rows[0]["latency_s"] == pytest.approx(3.0)
    assert rows[1]["latency_s"] == pytest.approx(103.0)


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("client,begin,end\n0,0,1\n", "line 1"),
        ("client,start_s,end_s\n0,0,1\n1,5\n", "line 3"),
        ("client,start_s,end_s\nphone,0,1\n", "line 2"),
        ("client,start_s,end_s\n0,0,1\n0,10,5\n", "line 3"),
        ("client,start_s,end_s\n0,0,one\n", "line 2"),
        ("client,start_s,end_s\n-1,0,1\n", "line 2"),
    ],
    ids=["header", "columns", "client", "end-before-start", "number", "negative-client"],
)
def test_bad_trace_csv_is_a_one_line_error(tmp_path: Path, text: str, where: str) -> None:
    trace = tmp_path / "bad.csv"
    trace.write_text(text)
    with pytest.raises(ConfigError) as info:
        _fleet(availability={"kind": "trace", "path": str(trace)})
    message = str(info.value)
    assert info.value.key == "devices.availability.path"
    assert str(trace) in message and where in message and "\n" not in message


def test_shipped_diurnal_trace_is_read_and_says_it_is_synthetic() -> None:
    fleet = build(compose_config(["devices=phones_trace"]), "devices")
    assert fleet.phones is not None and len(fleet.phones.trace) == 100
    readme = (Path(__file__).parents[1] / "conf/devices/traces/README.md").read_text()
    assert "synthetic" in readme and "generated, not recorded" in readme


@pytest.mark.parametrize(
    ("key", "phones"),
    [
        ("devices.availability.kind", {"availability": {"kind": "sometimes"}}),
        ("devices.availability.path", {"availability": {"kind": "trace"}}),
        ("devices.battery.capacity_j", {"battery": {"min_level": 0.1}}),
        ("devices.battery.min_level", {"battery": {"capacity_j": 1.0, "min_level": 2.0}}),
        ("devices.interruptions.train_p", {"interruptions": {"train_p": -0.1}}),
        ("devices.interruptions", {"interruptions": {"typo_p": 0.1}}),
    ],
)
def test_bad_phone_settings_name_the_key(key: str, phones) -> None:
    with pytest.raises(ConfigError) as info:
        _fleet(**phones)
    assert info.value.key == key


# --- no foresight: round r's phone draws never reach the server's view of round r ----------
class _RedrawnPhones(PhoneModel):
    """Round ``redrawn``'s check-in and interruption draws come from another seed."""

    redrawn = 3

    def check_in(self, seed, pid, server_round, now_s, level_j):
        seed = seed + 1000 if server_round == self.redrawn else seed
        return super().check_in(seed, pid, server_round, now_s, level_j)

    def interruption(self, seed, pid, server_round, *args):
        seed = seed + 1000 if server_round == self.redrawn else seed
        return super().interruption(seed, pid, server_round, *args)


def test_server_view_of_round_r_is_blind_to_round_rs_phone_draws() -> None:
    from fedsim.rounds.synchronous import federation_view

    phones = {
        "availability": {"kind": "always", "unmetered_p": 0.7},
        "battery": {"capacity_j": 1000.0},
        "interruptions": {"download_p": 0.2, "train_p": 0.3, "upload_p": 0.2},
    }
    views, rows = {}, {}
    for world in ("as drawn", "redrawn"):
        fleet = _fleet(**phones)
        if world == "redrawn":
            assert fleet.phones is not None
            fleet.phones.__class__ = _RedrawnPhones
        scheduler = RoundScheduler(fleet, seed=0, num_clients=30)
        view = federation_view(scheduler, lambda width: None, lambda pid, width: DeviceCost(1, 1))
        answers = []
        for rnd in (1, 2, 3, 4):
            answers.append(
                [
                    (view.online(p, rnd), view.observed(p, rnd), view.failures(p, rnd))
                    for p in range(30)
                ]
            )
            _, settled = _round(scheduler, list(range(30)), server_round=rnd)
            rows[world, rnd] = [(r["outcome"], r.get("failed_phase")) for r in settled.records]
        views[world] = answers
    assert rows["as drawn", 2] == rows["redrawn", 2]
    assert rows["as drawn", 3] != rows["redrawn", 3]  # round 3 played out differently ...
    assert views["as drawn"][:3] == views["redrawn"][:3]  # ... yet rounds 1-3 were seen alike
    assert views["as drawn"][3] != views["redrawn"][3]  # round 4 sees round 3's drop-outs
    dropped = [i for i, (o, _) in enumerate(rows["as drawn", 3]) if o == Outcome.INTERRUPTED]
    assert dropped


# --- resume: the batteries travel in the checkpoint ------------------------------------------
class _NoStrategy:
    """A strategy without state: the checkpoint holds only the loop's."""


def test_batteries_resume_from_a_checkpoint_as_if_never_stopped(tmp_path: Path) -> None:
    from fedsim.records.checkpoint import RunState, load_checkpoint, save_checkpoint

    phones = {
        "availability": {"kind": "always", "require_unmetered": False},
        "battery": {"capacity_j": 30.0, "min_level": 0.3, "initial_min": 0.3},
    }

    def scheduler() -> RoundScheduler:
        made = RoundScheduler(_fleet(**phones), seed=0, num_clients=8)
        made.clock.now_s = 0.0
        return made

    def play(sched: RoundScheduler, rounds) -> list:
        out = []
        for rnd in rounds:  # 4 J a round against 30 J: the batteries cross 30% within 4 rounds
            out += [
                (r["outcome"], r.get("battery_level"), r.get("offline_reason"))
                for r in _round(sched, list(range(8)), server_round=rnd)[1].records
            ]
        return out

    straight = scheduler()
    straight.keep_state({})
    whole = play(straight, range(1, 7))
    first = scheduler()
    state = RunState(0, ArrayRecord(), {}, 0.0, {})
    first.keep_state(state.extra)
    head = play(first, range(1, 4))
    state.sim_time_s = first.clock.now_s
    save_checkpoint(tmp_path, state, _NoStrategy(), "hash")
    resumed_state = load_checkpoint(tmp_path, _NoStrategy(), "hash")
    resumed = scheduler()
    resumed.clock.now_s = resumed_state.sim_time_s
    resumed.keep_state(resumed_state.extra)
    assert head + play(resumed, range(4, 7)) == whole
    assert any(reason == "battery_low" for _, _, reason in whole)  # the batteries mattered
    fresh = scheduler()  # without the checkpointed levels, rounds 4-6 would differ
    fresh.clock.now_s = resumed_state.sim_time_s
    assert play(fresh, range(4, 7)) != whole[len(head) :]


# --- a run -----------------------------------------------------------------------------------
#: Ten phones with the failures, and a drop-out probability of 0.3 in every phase.
OFTEN_DROPPING = [
    "devices=phones_failures",
    "num_clients=10",
    "runtime.progress=false",
    *(f"devices.interruptions.{phase}_p=0.3" for phase in PHASES),
]


@pytest.mark.slow
def test_small_run_with_failures_completes_and_logs_each_failures_phase(tmp_path: Path) -> None:
    from fedsim.api import run

    summary = run(
        [
            *OFTEN_DROPPING,
            "num_rounds=2",
            "strategy.fraction_train=1.0",  # every phone is asked: some check in, some drop out
        ],
        run_dir=tmp_path / "run",
    )
    assert summary["status"] == "completed"
    rows = [json.loads(line) for line in (tmp_path / "run" / "clients.jsonl").open()]
    dropped = [r for r in rows if r["outcome"] == Outcome.INTERRUPTED]
    assert dropped and all(r["failed_phase"] in PHASES for r in dropped)
    assert all(r["failed_phase"] is None for r in rows if r["outcome"] == "ok")
    assert all(0 <= r["battery_level"] <= 1 for r in rows if "battery_level" in r)
    assert any(r.get("offline_reason") for r in rows)  # phones not plugged in stay home
    assert all(math.isfinite(r["latency_s"]) for r in dropped)


@pytest.mark.slow
def test_asynchronous_dropouts_are_busy_until_they_drop_and_their_cost_is_counted(
    tmp_path: Path,
) -> None:
    """FedBuff on phones that drop out: a dropped phone is not sent work again before the time
    it dropped, and the energy and upload it spent are in the metrics, as an arrival's are."""
    from fedsim.api import run

    summary = run(
        [*OFTEN_DROPPING, "strategy=fedbuff", "num_rounds=6"],
        run_dir=tmp_path / "run",
    )
    assert summary["status"] == "completed"
    rows = [json.loads(line) for line in (tmp_path / "run" / "clients.jsonl").open()]
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    dropped = [r for r in rows if r["outcome"] == Outcome.INTERRUPTED]
    assert dropped
    for r in dropped:  # its next dispatch, if any, comes after it dropped out
        later = [x["sent_s"] for x in rows if x["partition_id"] == r["partition_id"]]
        later = [t for t in later if t > r["sent_s"]]
        assert all(t >= r["sent_s"] + r["latency_s"] for t in later), r
    assert sum(m["energy_j"] for m in metrics) == pytest.approx(
        sum(r.get("energy_j", 0.0) for r in rows)
    )
    assert sum(m["bytes_up"] for m in metrics) == sum(r.get("bytes_up", 0) for r in rows)
    assert any(r.get("energy_j", 0.0) > 0 for r in dropped)  # they did spend something
