"""WHALE-FL as published (official code's utility) and a federation view without foresight.

Issue 14, items 2 and 3: the view of round r holds only what a server knows before round r;
the paper utility by hand; uniform fleets; short real runs.
"""

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import strip_wall_time
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from omegaconf import OmegaConf

from fedsim import keys
from fedsim.clients.local_sgd import LocalSGD
from fedsim.clock.devices import DeviceState, Fleet
from fedsim.clock.scheduler import RoundScheduler
from fedsim.clock.server_view import ObservationLog
from fedsim.config import build, compose_config
from fedsim.engine.simulation import simulate
from fedsim.errors import ConfigError
from fedsim.learning.models import SmallCNN
from fedsim.learning.params import to_arrays
from fedsim.records.checkpoint import capture_object_state, restore_object_state
from fedsim.records.results import CLIENTS_FILE, read_metrics
from fedsim.rounds.synchronous import federation_view
from fedsim.rounds.virtual_grid import VirtualGrid, partition_id_of
from fedsim.seeding import python_random_seeded
from fedsim.strategies.common import to_numpy, to_record
from fedsim.strategies.heterofl import expected_latency_s
from fedsim.strategies.whale_fl import (
    WhaleFL,
    loss_factors,
    paper_score,
    scaled_scores,
    width_of_scaled,
)

NUM_CLIENTS = 8
PAPER = {"a": 1.0, "b": 0.0, "c": 1.0, "loss_threshold": 1.5, "loss_change_threshold": 0.5}


@pytest.fixture(autouse=True)
def _identity(flower_identity):
    """Messages need a Flower task identity outside a simulation."""


# --- the official code's utility, by hand ---------------------------------------------------------
def test_loss_factors_and_score_by_hand() -> None:
    # L1 = 2.0, L2 = 1.8: |dL| = 0.2 <= 0.5 and L2 >= 1.5 -> D1 = 1.2 ** (1 + 0) = 1.2,
    # D2 = c * T_min / T_n = 1 * 2 / 4 = 0.5
    d1, d2 = loss_factors(2.0, 1.8, 2.0, 4.0, **PAPER)
    assert (d1, d2) == pytest.approx((1.2, 0.5))
    # W = (1/0.5 + 1/0.25) * (1 + 1.8 / 1.2) ** 0.5 = 6 * sqrt(2.5) = 9.486833
    assert paper_score(0.5, 0.25, 1.8, d1, d2) == pytest.approx(6 * math.sqrt(2.5))
    # never reported (L1 = L2 = 1): |dL| = 0, L2 < 1.5 -> D1 = 1 ** 0 = 1, D2 = T_min / T_n = 1
    # -> W = (1/0.5 + 1/0.25) * (1 + 1/1) ** 1 = 12
    assert loss_factors(1.0, 1.0, 3.0, 3.0, **PAPER) == (1.0, 1.0)
    assert paper_score(0.5, 0.25, 1.0, 1.0, 1.0) == pytest.approx(12.0)
    # L1 = 2.3 -> L2 = 1.2: |dL| = 1.1 > 0.5 -> D2 = 0: the loss term is 1, W = 1/t_cmp + 1/t_com
    d1, d2 = loss_factors(2.3, 1.2, 1.0, 2.0, **PAPER)
    assert d2 == 0.0 and paper_score(0.5, 0.25, 1.2, d1, d2) == pytest.approx(6.0)


def test_scaled_scores_and_width_thresholds_by_hand() -> None:
    # sigmoid(0) = 0.5, sigmoid(ln 3) = 3/4, sigmoid(40) = 1 - 4e-18 -> 1.0 in float64;
    # min-max: (0.5 - 0.5) / 0.5 = 0, (0.75 - 0.5) / 0.5 = 0.5, 1
    scaled = scaled_scores([0.0, math.log(3.0), 40.0])
    assert scaled == pytest.approx([0.0, 0.5, 1.0])
    widths = (1.0, 0.5, 0.25, 0.125, 0.0625)
    assert [width_of_scaled(s, widths) for s in scaled] == [0.0625, 0.25, 1.0]
    # the code's edges: >= 0.8 -> 1, [0.6, 0.8) -> 1/2, ..., < 0.2 -> 1/16
    edges = [0.8, 0.7999, 0.6, 0.4, 0.2, 0.1999]
    assert [width_of_scaled(s, widths) for s in edges] == [1.0, 0.5, 0.5, 0.25, 0.125, 0.0625]
    # ties (decision; the code divides 0 by 0): equal scores, or scores whose sigmoid is 1.0
    assert scaled_scores([5.0, 5.0]) == [1.0, 1.0]
    assert scaled_scores([1e4, 2e4, 3e4]) == [1.0, 1.0, 1.0]
    # scaled over the online devices only; an offline one outside their range is clipped
    assert scaled_scores([0.0, math.log(3.0), 40.0], among=[1, 2]) == pytest.approx([0, 0, 1])


def test_expected_latency_counts_the_extra_upload() -> None:
    state = DeviceState(True, 10.0, 8.0, 16.0, True)
    # 1e9 FLOP / 10 GFLOP/s = 0.1 s; down 1 MB * 8 / 16 Mbit/s = 0.5 s;
    # up (1 MB + 3 MB activations) * 8 / 8 Mbit/s = 4 s
    assert expected_latency_s(state, 10**9, 10**6, 0, 1.0, 3e6) == pytest.approx(4.6)


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"utility": "fisher"}, "strategy.utility"),
        ({"time_unit_s": 0}, "strategy.time_unit_s"),
        ({"loss_threshold": -1}, "strategy.loss_threshold"),
        ({"speed_weight_c": "x"}, "strategy.speed_weight_c"),
    ],
)
def test_bad_paper_knobs_raise_config_error(kwargs, key) -> None:
    with pytest.raises(ConfigError) as error:
        WhaleFL(**kwargs)
    assert error.value.key == key


# --- the observation log ----------------------------------------------------------------------
def _row(rnd, pid, outcome="ok", compute=10.0, up=4.0, extra=0, flops=100):
    return {
        keys.ROUND: rnd,
        "partition_id": pid,
        "outcome": outcome,
        "compute_gflops": compute,
        "uplink_mbps": up,
        "downlink_mbps": 2 * up,
        "channel_good": True,
        "latency_s": 1.0,
        "extra_upload_bytes": extra,
        "train_flops": flops,
    }


def test_observation_log_answers_from_earlier_rounds_only() -> None:
    profile = build(compose_config(["devices=uniform"]), "devices").profiles[0]
    log = ObservationLog()
    log.record([_row(1, 0, compute=10.0, extra=50, flops=100), _row(1, 1, "offline")])
    log.record([_row(3, 0, "straggler", compute=20.0, extra=30, flops=200)])
    assert log.observed(0, 1, profile).round == 0  # nothing before round 1: nominal
    assert log.observed(0, 1, profile).compute_gflops == profile.train_gflops
    assert log.observed(0, 3, profile).compute_gflops == 10.0  # round 3 is not "before 3"
    late = log.observed(0, 4, profile)  # a straggler's reply still carries its measured times
    assert (late.round, late.compute_gflops, late.num_rounds) == (3, 20.0, 2)
    assert late.mean_compute_gflops == pytest.approx(15.0)  # (10 + 20) / 2
    assert log.observed(1, 4, profile).round == 0  # offline: nothing measured
    # fleet-wide bytes besides tensors per FLOP: before round 3 50/100; before 4 (50+30)/300
    assert log.extra_upload_bytes_per_flop(3) == pytest.approx(0.5)
    assert log.extra_upload_bytes_per_flop(4) == pytest.approx(80 / 300)
    log.record([_row(5, 0), _row(6, 0)])  # keeps 2: rounds 5 and 6; round 3's dropped
    with pytest.raises(ValueError, match="before round 4"):
        log.observed(0, 4, profile)


def test_strategy_checkpoint_carries_the_observation_log() -> None:
    strategy, _, scheduler, _ = _bound(WhaleFL(fraction_train=0.5))
    strategy.view.observations.record([_row(1, 2, compute=3.0)])
    strategy.losses[2] = [2.0, 1.5]
    tensors: dict[str, np.ndarray] = {}
    saved = capture_object_state(strategy, "strategy", tensors)
    resumed, *_ = _bound(WhaleFL(fraction_train=0.5), restore=(saved, tensors))
    assert resumed.view.observed(2, 2).compute_gflops == 3.0
    assert resumed.losses[2] == [2.0, 1.5]


# --- no foresight: re-drawing round r leaves the view of round r unchanged -----------------------
class RedrawnRound(Fleet):
    """A fleet whose round ``redrawn`` draws compute, bandwidth and channel from another seed.

    The check-in (online flag) of that round stays: the view may know it (availability is
    announced when a device checks in).
    """

    def __init__(self, redrawn: int, **fleet) -> None:
        super().__init__(**fleet)
        self.redrawn = redrawn

    def conditions(self, profile, seed, partition_id, server_round):
        state = super().conditions(profile, seed, partition_id, server_round)
        if server_round != self.redrawn:
            return state
        other = super().conditions(profile, seed + 1_000, partition_id, server_round)
        return dataclasses.replace(other, online=state.online)


def _bound(strategy, fleet=None, devices="phones_mixed", restore=None):
    cfg = compose_config([f"devices={devices}", f"num_clients={NUM_CLIENTS}"])
    fleet = fleet if fleet is not None else build(cfg, "devices")
    torch.manual_seed(0)
    model = SmallCNN().build(10)
    behaviour = LocalSGD()
    scheduler = RoundScheduler(fleet, 0, NUM_CLIENTS)
    batch = {"x": torch.zeros(32, 1, 8, 8), "label": torch.zeros(32, dtype=torch.long)}
    models = {1.0: model}

    def model_at(width):
        return models.setdefault(width, SmallCNN().build(10, width=width))

    def cost_fn(pid, width=1.0):  # data sizes 36 and 37, as an IID split of digits
        return behaviour.device_cost(model_at(width), batch, 36 + pid % 2)

    if restore is not None:  # as a resumed run: the checkpoint first, then bind
        restore_object_state(strategy, restore[0], "strategy", restore[1])
    strategy.bind(federation_view(scheduler, model_at, cost_fn))
    return strategy, model, scheduler, cost_fn


def _play(strategy, model, scheduler, cost_fn, server_round):
    """One round as server.train_round plays it; every client adds 1 and reports a loss."""
    grid = VirtualGrid(None, num_clients=NUM_CLIENTS, job=ConfigRecord())  # type: ignore[arg-type]
    with python_random_seeded(server_round):
        messages = list(
            strategy.configure_train(server_round, to_arrays(model), ConfigRecord(), grid)
        )
    costs = {
        partition_id_of(m.metadata.dst_node_id): cost_fn(
            partition_id_of(m.metadata.dst_node_id), m.content[keys.CONFIG][keys.WIDTH]
        )
        for m in messages
    }
    plan = scheduler.plan(server_round, messages, costs)
    replies = []
    for m in plan.to_send:
        pid = partition_id_of(m.metadata.dst_node_id)
        sub = {k: v + 1.0 for k, v in to_numpy(m.content[keys.ARRAYS]).items()}
        loss = 2.3 / server_round + 0.05 * pid
        metrics = MetricRecord({keys.NUM_EXAMPLES: 10, keys.TRAIN_LOSS: loss})
        replies.append(
            Message(RecordDict({keys.ARRAYS: to_record(sub), keys.METRICS: metrics}), reply_to=m)
        )
    settled = scheduler.settle(plan, replies, costs)
    strategy.aggregate_train(server_round, settled.kept)
    return {
        partition_id_of(m.metadata.dst_node_id): dict(m.content[keys.CONFIG]) for m in messages
    }, settled


def _answers(view, server_round):
    """Every answer the view gives about ``server_round``, for every client."""
    return [
        (
            view.online(pid, server_round),
            view.observed(pid, server_round),
            view.extra_upload_bytes_per_flop(server_round),
            view.profiles[pid],
        )
        for pid in range(NUM_CLIENTS)
    ]


@pytest.mark.parametrize(
    "strategy_kwargs",
    [{"utility": "paper", "time_unit_s": 1e-5}, {"utility": "latency_fisher"}],
    ids=["paper", "latency_fisher"],
)
def test_view_of_round_r_is_blind_to_round_rs_draw(strategy_kwargs) -> None:
    r = 3
    raw = OmegaConf.to_container(compose_config(["devices=phones_mixed"]).devices)
    raw.pop("_target_")
    worlds = {"as drawn": None, "redrawn": RedrawnRound(r, **raw)}
    views, configs, rows = {}, {}, {}
    for name, fleet in worlds.items():
        strategy, model, scheduler, cost_fn = _bound(
            WhaleFL(fraction_train=0.5, **strategy_kwargs), fleet
        )
        for rnd in range(1, r):
            _play(strategy, model, scheduler, cost_fn, rnd)
        views[name] = strategy.view
        before = _answers(strategy.view, r)
        configs[name], settled = _play(strategy, model, scheduler, cost_fn, r)
        assert _answers(strategy.view, r) == before  # round r settled: still not "before r"
        rows[name] = {row["partition_id"]: row for row in settled.records}
    drawn, redrawn = views["as drawn"], views["redrawn"]
    # the two worlds differ in round r: the clock charged other rates ...
    trained = [p for p, row in rows["as drawn"].items() if row["outcome"] == "ok"]
    assert trained and all(
        rows["as drawn"][p]["uplink_mbps"] != rows["redrawn"][p]["uplink_mbps"] for p in trained
    )
    # ... yet the strategy decided round r identically, from identical answers
    assert configs["as drawn"] == configs["redrawn"]
    assert _answers(drawn, r) == _answers(redrawn, r)
    # and round r + 1 sees what round r measured, in each world
    for pid in trained:
        for view, world in ((drawn, "as drawn"), (redrawn, "redrawn")):
            seen = view.observed(pid, r + 1)
            assert seen.round == r
            assert seen.uplink_mbps == rows[world][pid]["uplink_mbps"]
            assert seen.compute_gflops == rows[world][pid]["compute_gflops"]
        assert drawn.observed(pid, r + 1) != redrawn.observed(pid, r + 1)


# --- what the paper utility does on a fleet -------------------------------------------------------
def test_paper_utility_gives_a_uniform_fleet_the_full_width() -> None:
    strategy, *_ = _bound(WhaleFL(), devices="uniform")
    strategy.losses = {0: [2.3, 1.2], 1: [1.0, 0.9], 2: [2.3, 2.2]}  # training status differs
    out = strategy.assign_widths(list(range(NUM_CLIENTS)), 2)
    # t_cmp(1/16) = 176,256 FLOP / 15 GFLOP/s = 12 us: W = 1/t_cmp + ... ~ 8e4 per second, and
    # sigmoid(W) == 1.0 in float64 for W > 37: every device ties -> scaled 1 -> width 1
    assert {width for width, _ in out.values()} == {1.0}
    assert all(fields["score"] > 1e4 for _, fields in out.values())


def test_paper_utility_unsaturated_spreads_even_identical_devices() -> None:
    # time_unit_s = 1e-5 puts W near the sigmoid's slope (W ~ 1-3). The uniform fleet's devices
    # are identical, but their data sizes (36, 37) and training status differ, and the min-max
    # scaling is relative: the lowest score always gets 1/16 and the highest 1 (methods.md 3.5).
    strategy, *_ = _bound(WhaleFL(time_unit_s=1e-5), devices="uniform")
    strategy.losses = {0: [2.3, 1.2], 1: [1.0, 0.9], 2: [2.3, 2.2]}
    widths = {w for w, _ in strategy.assign_widths(list(range(NUM_CLIENTS)), 2).values()}
    assert min(widths) == 0.0625 and max(widths) == 1.0


def test_paper_latency_counts_what_the_device_sends() -> None:
    strategy, _, _, cost_fn = _bound(WhaleFL(time_unit_s=1e-5), devices="uniform")
    view = strategy.view
    # client 0 reported 1 MB of activations in round 1; its uplink is 8.63 Mbit/s
    view.observations.record([_row(1, 0, compute=15.0, up=8.63, extra=10**6, flops=10**6)])
    out = strategy.assign_widths([0, 1], 2)
    full = view.payload_bytes(1.0)
    assert out[0][1]["t_com_s"] == pytest.approx((full + 10**6) * 8 / 8.63e6)
    # client 1 never reported: the fleet's 1 byte per FLOP so far times its full-width FLOPs
    flops = cost_fn(1, 1.0).train_flops
    assert out[1][1]["t_com_s"] == pytest.approx((full + flops) * 8 / 8.63e6)


# --- short real runs ---------------------------------------------------------------------------
RUN = [
    "num_clients=6",
    "num_rounds=3",
    "strategy.fraction_train=0.5",
    "runtime.progress=false",
    "runtime.engine=inline",
]


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides",
    [
        ["strategy=whale_fl", "devices=phones_mixed"],
        ["strategy=whale_fl", "devices=uniform"],
        ["strategy=whale_fl", "devices=phones_mixed", "strategy.time_unit_s=1e-5"],
        [
            "strategy=heterofl",
            "devices=phones_mixed",
            "strategy.latency_budget_s=0.12",
            "clock.deadline_s=0.12",
        ],
    ],
    ids=lambda o: " ".join(o),
)
def test_short_run_completes(overrides, tmp_path: Path) -> None:
    summary = simulate(compose_config([*RUN, *overrides]), tmp_path / "run")
    assert summary["status"] == "completed" and summary["num_rounds"] == 3
    rows = [r for r in read_metrics(tmp_path / "run", CLIENTS_FILE) if r["outcome"] == "ok"]
    assert rows and all("width" in r for r in rows)
    if "devices=uniform" in overrides:  # the paper utility at its defaults: width 1 (above)
        assert {r["width"] for r in rows} == {1.0}


@pytest.mark.slow
def test_killed_whale_fl_run_resumes_bit_for_bit(tmp_path: Path, kill_and_resume) -> None:
    # time_unit_s = 1e-5: every width depends on what the server measured and the losses it was
    # told, so a resume that forgot them (the view's log, the strategy's losses) would differ
    args = [
        "num_clients=8",
        "num_rounds=6",
        "strategy=whale_fl",
        "strategy.time_unit_s=1e-5",
        "strategy.fraction_train=0.5",
        "devices=phones_mixed",
        "runtime.progress=false",
        "runtime.engine=inline",  # the strategy's state is the point, not the engine
    ]
    simulate(compose_config(args), tmp_path / "reference")
    run, killed_at = kill_and_resume(args, rows=3)
    assert 3 <= killed_at < 6
    for name in ("metrics.jsonl", CLIENTS_FILE):
        assert strip_wall_time(read_metrics(run, name)) == strip_wall_time(
            read_metrics(tmp_path / "reference", name)
        )
