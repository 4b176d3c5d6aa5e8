"""Tests for fedsim.clock.devices: hand-checked latency, energy, FLOPs, memory and round timing."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from fedsim.clock.devices import (
    ClientWork,
    DeviceProfile,
    DeviceState,
    Fleet,
    SimClock,
    client_energy_j,
    client_latency,
    count_forward_flops,
    count_train_flops,
    estimate_train_memory_bytes,
    fits_in_memory,
    synchronous_round,
)
from fedsim.errors import ConfigError

CONF_DIR = Path(__file__).resolve().parents[1] / "conf" / "devices"


def profile_dict(**overrides: object) -> dict[str, object]:
    base: dict[str, object] = dict(
        name="phone",
        tier="mid",
        train_gflops=10.0,
        memory_gb=2.0,
        uplink_mbps=4.0,
        downlink_mbps=16.0,
        availability=1.0,
        compute_power_w=3.0,
        radio_tx_power_w=4.0,
        radio_rx_power_w=2.0,
    )
    base.update(overrides)
    return base


def dynamics_dict(**overrides: float) -> dict[str, float]:
    base = dict(
        compute_sigma=0.0,
        bandwidth_sigma=0.0,
        p_good_to_bad=0.0,
        p_bad_to_good=1.0,
        bad_bandwidth_factor=1.0,
    )
    base.update(overrides)
    return base


def make_fleet(profiles=None, shares=None, **dynamics: float) -> Fleet:
    return Fleet(
        profiles=profiles or [profile_dict()],
        shares=shares or [1.0],
        dynamics=dynamics_dict(**dynamics),
        server_gflops=1000.0,
    )


PROFILE = DeviceProfile(**profile_dict())  # type: ignore[arg-type]
STATE = DeviceState(
    online=True, compute_gflops=10.0, uplink_mbps=4.0, downlink_mbps=16.0, channel_good=True
)
WORK = ClientWork(
    train_flops=50 * 10**9,
    bytes_down=8_000_000,
    bytes_up=2_000_000,
    peak_memory_bytes=10**9,
    server_flops=2 * 10**12,
)


# ----------------------------------------------------------------------------- latency, energy
def test_client_latency_hand_computed() -> None:
    lat = client_latency(STATE, WORK, server_gflops=1000.0)
    assert lat.download_s == pytest.approx(4.0)  # 8e6 B * 8 / (16 Mbps * 1e6) = 4 s
    assert lat.compute_s == pytest.approx(5.0)  # 5e10 FLOP / (10 GFLOPS * 1e9) = 5 s
    assert lat.upload_s == pytest.approx(4.0)  # 2e6 B * 8 / (4 Mbps * 1e6) = 4 s
    assert lat.server_s == pytest.approx(2.0)  # 2e12 FLOP / (1000 GFLOPS * 1e9) = 2 s
    assert lat.total_s == pytest.approx(15.0)  # 4 + 5 + 4 + 2


def test_client_latency_server_flops_default_zero() -> None:
    work = ClientWork(train_flops=0, bytes_down=0, bytes_up=0, peak_memory_bytes=0)
    assert client_latency(STATE, work, server_gflops=1.0).total_s == 0.0


@pytest.mark.parametrize("ratio", [2.0, 4.0])
def test_client_latency_slower_tier_proportionally_longer_compute(ratio: float) -> None:
    slow = replace(STATE, compute_gflops=STATE.compute_gflops / ratio)
    fast_s = client_latency(STATE, WORK, 1000.0).compute_s
    assert client_latency(slow, WORK, 1000.0).compute_s == pytest.approx(ratio * fast_s)


def test_client_energy_hand_computed() -> None:
    lat = client_latency(STATE, WORK, server_gflops=1000.0)
    # compute 3 W * 5 s + rx 2 W * 4 s + tx 4 W * 4 s = 15 + 8 + 16 = 39 J; server time is free
    assert client_energy_j(PROFILE, lat) == pytest.approx(39.0)


def test_fits_in_memory_boundary() -> None:
    # memory_gb = 2.0 -> 2e9 bytes
    assert fits_in_memory(PROFILE, replace(WORK, peak_memory_bytes=2 * 10**9))
    assert not fits_in_memory(PROFILE, replace(WORK, peak_memory_bytes=2 * 10**9 + 1))


# ----------------------------------------------------------------------------------- FLOPs
def linear_batch() -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    return {"input": torch.randn(4, 10)}, torch.tensor([0, 1, 2, 3])


def test_count_train_flops_linear() -> None:
    inputs, labels = linear_batch()
    # forward addmm 2*4*10*5 = 400; backward grad_W mm 2*5*4*10 = 400; no grad_input (input
    # needs no grad), bias grad is a sum (not counted) -> 800
    assert count_train_flops(nn.Linear(10, 5), inputs, labels) == 800


def test_count_train_flops_mlp_backward_twice_forward_for_hidden_layer() -> None:
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(10, 5), nn.ReLU(), nn.Linear(5, 3))
    inputs, labels = linear_batch()
    labels = labels % 3
    # forward 400 + 2*4*5*3 = 520; backward: layer 2 grad_W 120 + grad_input 120, layer 1
    # grad_W 400 -> 640; total 1160
    assert count_train_flops(mlp, inputs, labels) == 1160
    mlp[0].requires_grad_(False)
    # frozen first layer: backward is only layer 2 grad_W (120) -> 520 + 120 = 640
    assert count_train_flops(mlp, inputs, labels) == 640
    assert all(p.grad is None for p in mlp.parameters())  # nothing written into .grad


def test_count_forward_flops_linear() -> None:
    inputs, _ = linear_batch()
    assert count_forward_flops(nn.Linear(10, 5), inputs) == 400  # 2*4*10*5


# ---------------------------------------------------------------------------------- memory
@pytest.mark.parametrize(
    ("optimizer", "momentum", "optimizer_bytes"),
    [("sgd", False, 0), ("sgd", True, 220), ("adam", False, 440)],
)
def test_estimate_train_memory_linear(optimizer: str, momentum: bool, optimizer_bytes: int) -> None:
    inputs, labels = linear_batch()
    est = estimate_train_memory_bytes(nn.Linear(10, 5), inputs, labels, optimizer, momentum)
    assert est.params == 220  # (10*5 + 5) fp32 params * 4 B
    assert est.grads == 220
    assert est.optimizer_state == optimizer_bytes  # 0, 1 or 2 states x 220 B
    # saved for backward: input 4x10 fp32 = 160, log-probs 4x5 fp32 = 80 (saved twice, counted
    # once), labels 4 int64 = 32, the loss's total_weight scalar = 4; the weight is excluded
    assert est.activations == 160 + 80 + 32 + 4
    assert est.total == est.params + est.grads + est.optimizer_state + est.activations


def test_estimate_train_memory_frozen_params_have_no_grads() -> None:
    mlp = nn.Sequential(nn.Linear(10, 5), nn.Linear(5, 3))
    mlp[0].requires_grad_(False)
    inputs, labels = linear_batch()
    est = estimate_train_memory_bytes(mlp, inputs, labels % 3, optimizer="adam")
    assert est.params == (55 + 18) * 4  # frozen weights still occupy memory
    assert est.grads == 18 * 4  # only Linear(5, 3) trains
    assert est.optimizer_state == 2 * 18 * 4


def test_estimate_train_memory_rejects_unknown_optimizer() -> None:
    inputs, labels = linear_batch()
    with pytest.raises(ValueError, match="optimizer"):
        estimate_train_memory_bytes(nn.Linear(10, 5), inputs, labels, optimizer="lion")


# ------------------------------------------------------------------------------ round timing
LATENCIES = {0: 3.0, 1: 1.0, 2: 2.0}


@pytest.mark.parametrize(
    ("deadline_s", "target_count", "round_time_s", "kept", "stragglers"),
    [
        (None, None, 3.0 + 0.5, (0, 1, 2), ()),  # wait for all: max 3 + server 0.5
        (2.5, None, 2.5 + 0.5, (1, 2), (0,)),  # 0 misses; server waits until the deadline
        (5.0, None, 3.0 + 0.5, (0, 1, 2), ()),  # all done before the deadline: max latency
        (None, 2, 2.0 + 0.5, (1, 2), (0,)),  # over-selection: 2nd fastest finishes at 2 s
        (0.5, None, 0.5 + 0.5, (), (0, 1, 2)),  # all miss: full deadline, nothing kept
        (2.5, 1, 1.0 + 0.5, (1,), (0, 2)),  # both: first finisher at 1 s
        (1.5, 2, 1.5 + 0.5, (1,), (0, 2)),  # only 1 of 2 in time: wait until the deadline
    ],
)
def test_synchronous_round_cases(deadline_s, target_count, round_time_s, kept, stragglers) -> None:
    timing = synchronous_round(
        LATENCIES, deadline_s=deadline_s, target_count=target_count, server_time_s=0.5
    )
    assert timing.round_time_s == pytest.approx(round_time_s)
    assert timing.kept == kept
    assert timing.stragglers == stragglers


def test_synchronous_round_ties_break_by_partition_id_and_empty_round() -> None:
    timing = synchronous_round({5: 1.0, 3: 1.0, 4: 2.0}, target_count=1)
    assert timing.kept == (3,) and timing.stragglers == (4, 5)
    assert synchronous_round({}, server_time_s=0.5).round_time_s == 0.5


@pytest.mark.parametrize(
    "kwargs", [{"deadline_s": 0.0}, {"target_count": 0}, {"server_time_s": -1.0}]
)
def test_synchronous_round_rejects_bad_arguments(kwargs) -> None:
    with pytest.raises(ValueError):
        synchronous_round(LATENCIES, **kwargs)


def test_sim_clock_advances_and_round_trips() -> None:
    clock = SimClock()
    clock.advance(3.5)
    assert clock.advance(1.5) == 5.0
    assert SimClock.from_dict(clock.to_dict()).now_s == 5.0
    with pytest.raises(ValueError):
        clock.advance(-1.0)


# -------------------------------------------------------------------------------- assignment
THREE_TIERS = [
    profile_dict(name=n, tier=n, train_gflops=g)
    for n, g in (("low", 5.0), ("mid", 15.0), ("high", 30.0))
]


def test_assign_seeded_and_stable_when_num_clients_changes() -> None:
    fleet = make_fleet(THREE_TIERS, [0.3, 0.5, 0.2])
    assert fleet.assign(10, seed=7) == fleet.assign(10, seed=7)
    assert fleet.assign(100, seed=7)[:10] == fleet.assign(10, seed=7)
    assert fleet.device_for(42, seed=7) == fleet.assign(50, seed=7)[42]
    assert fleet.assign(100, seed=7) != fleet.assign(100, seed=8)


def test_assign_respects_shares_for_10000_clients() -> None:
    fleet = make_fleet(THREE_TIERS, [0.3, 0.5, 0.2])
    counts = Counter(p.tier for p in fleet.assign(10_000, seed=0))
    # sd of a share estimate <= sqrt(0.25 / 10000) = 0.005; allow 4 sd
    for tier, share in zip(("low", "mid", "high"), (0.3, 0.5, 0.2), strict=True):
        assert counts[tier] / 10_000 == pytest.approx(share, abs=0.02)


# -------------------------------------------------------------------------------- conditions
def test_conditions_deterministic_and_order_independent() -> None:
    def fresh() -> Fleet:
        return make_fleet(
            compute_sigma=0.3,
            bandwidth_sigma=0.6,
            p_good_to_bad=0.3,
            p_bad_to_good=0.5,
            bad_bandwidth_factor=0.2,
        )

    forward, backward = fresh(), fresh()
    rounds = range(1, 21)
    a = [forward.conditions(PROFILE, 1, 3, r) for r in rounds]
    b = [backward.conditions(PROFILE, 1, 3, r) for r in reversed(rounds)][::-1]
    assert a == b  # same (seed, client, round) -> same state, whatever was asked before
    assert len({s.compute_gflops for s in a}) == len(a)  # sigma > 0: rounds differ
    assert forward.conditions(PROFILE, 1, 4, 1) != a[0]  # another client differs


def test_conditions_lognormal_is_median_preserving() -> None:
    fleet = make_fleet(compute_sigma=0.5, bandwidth_sigma=0.5)
    states = [fleet.conditions(PROFILE, 0, c, 1) for c in range(4000)]
    assert np.median([s.compute_gflops for s in states]) == pytest.approx(10.0, rel=0.05)
    assert np.median([s.uplink_mbps for s in states]) == pytest.approx(4.0, rel=0.05)


def test_markov_channel_bad_share_and_factor() -> None:
    fleet = make_fleet(p_good_to_bad=0.1, p_bad_to_good=0.5, bad_bandwidth_factor=0.2)
    states = [fleet.conditions(PROFILE, 0, c, r) for c in range(50) for r in range(1, 101)]
    bad = [s for s in states if not s.channel_good]
    # stationary P(bad) = 0.1 / (0.1 + 0.5) = 1/6
    assert len(bad) / len(states) == pytest.approx(1 / 6, abs=0.03)
    assert all(s.downlink_mbps == pytest.approx(16.0 * 0.2) for s in bad)  # 16 Mbps * 0.2
    assert all(s.downlink_mbps == 16.0 for s in states if s.channel_good)


def test_uniform_fleet_has_no_variation() -> None:
    fleet = instantiate(OmegaConf.load(CONF_DIR / "uniform.yaml"))
    profile = fleet.profiles[0]
    states = {fleet.conditions(profile, 0, c, r) for c in range(20) for r in range(1, 20)}
    assert states == {
        DeviceState(
            online=True,
            compute_gflops=profile.train_gflops,
            uplink_mbps=profile.uplink_mbps,
            downlink_mbps=profile.downlink_mbps,
            channel_good=True,
        )
    }


def test_offline_rate_matches_availability() -> None:
    fleet = make_fleet([profile_dict(availability=0.8)])
    profile = fleet.profiles[0]
    online = [fleet.conditions(profile, 0, c, r).online for c in range(200) for r in range(1, 51)]
    assert 1 - np.mean(online) == pytest.approx(0.2, abs=0.015)  # 10,000 draws, sd 0.004


# -------------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"shares": [0.5, 0.4]}, "devices.shares"),
        ({"shares": [1.0]}, "devices.shares"),  # wrong length for two profiles
        (
            {"profiles": [profile_dict(train_gflops=-1.0), profile_dict()]},
            "devices.profiles[0].train_gflops",
        ),
        (
            {"profiles": [profile_dict(), profile_dict(availability=1.5)]},
            "devices.profiles[1].availability",
        ),
        ({"profiles": [profile_dict(), {"name": "x"}]}, "devices.profiles[1]"),
        ({"dynamics": {"compute_sigma": 0.1}}, "devices.dynamics"),
        ({"dynamics": dynamics_dict(p_good_to_bad=2.0)}, "devices.dynamics.p_good_to_bad"),
        ({"server_gflops": 0}, "devices.server_gflops"),
    ],
)
def test_fleet_validation_errors_name_the_key(kwargs, key: str) -> None:
    args = dict(
        profiles=[profile_dict(), profile_dict()],
        shares=[0.5, 0.5],
        dynamics=dynamics_dict(),
        server_gflops=1000.0,
    )
    args.update(kwargs)
    with pytest.raises(ConfigError) as info:
        Fleet(**args)
    assert info.value.key == key
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("name", ["uniform", "phones_mixed"])
def test_yaml_fleets_instantiate(name: str) -> None:
    fleet = instantiate(OmegaConf.load(CONF_DIR / f"{name}.yaml"))
    assert isinstance(fleet, Fleet)
    assert sum(fleet.shares) == pytest.approx(1.0)
    assert all(isinstance(p, DeviceProfile) for p in fleet.assign(5, seed=0))


class TinyLM(nn.Module):
    """Hugging Face-like: keyword inputs, returns an object with (N, T, C) ``logits``."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(6, 8)
        self.head = nn.Linear(8, 6)

    def forward(self, input_ids: torch.Tensor) -> object:
        return type("Output", (), {"logits": self.head(self.embed(input_ids))})()


def test_count_train_flops_sequence_logits_object() -> None:
    model = TinyLM()
    model.embed.requires_grad_(False)
    ids = torch.randint(0, 6, (2, 3))
    # head on 2*3 tokens: forward 2*6*8*6 = 576; backward grad_W 576 (frozen embedding needs no
    # grad_input); embedding lookups count 0 -> 1152
    assert count_train_flops(model, {"input_ids": ids}, ids) == 1152


def test_measuring_leaves_batchnorm_statistics_untouched() -> None:
    model = nn.Sequential(nn.Linear(10, 5), nn.BatchNorm1d(5))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    inputs, labels = linear_batch()
    count_train_flops(model, inputs, labels)
    count_forward_flops(model, inputs)
    estimate_train_memory_bytes(model, inputs, labels)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# ------------------------------------------------------------------- measured tables (issue 20)
TABLE = [[1.0, 0.05], [0.5, 0.02], [0.25, 0.01]]  # seconds per example, by width


def test_measured_table_gives_exactly_the_table_time() -> None:
    from fedsim.clock.devices import measured_compute_s

    profile = make_fleet([profile_dict(train_s_per_example=TABLE)]).profiles[0]
    for width, seconds in TABLE:
        # at the nominal rate: 300 examples x the table's seconds, exactly (no FLOPs involved)
        assert measured_compute_s(profile, width, 300, profile.train_gflops) == seconds * 300
    # a compute draw at half the nominal rate doubles it: 300 x 0.05 x (10 / 5) = 30 s
    assert measured_compute_s(profile, 1.0, 300, 5.0) == pytest.approx(30.0)
    # no examples reported (e.g. a forward-only device) or no table: the FLOPs rule (None)
    assert measured_compute_s(profile, 1.0, 0, 10.0) is None
    assert measured_compute_s(PROFILE, 1.0, 300, 10.0) is None


def test_measured_table_time_is_what_the_clock_charges() -> None:
    state = replace(STATE, compute_gflops=10.0)
    work = replace(WORK, compute_s=12.5)  # the table's seconds replace 5e10 FLOP / 10 GFLOPS
    lat = client_latency(state, work, server_gflops=1000.0)
    assert lat.compute_s == 12.5
    assert lat.total_s == pytest.approx(4.0 + 12.5 + 4.0 + 2.0)


def test_measured_table_refuses_widths_it_did_not_measure() -> None:
    profile = make_fleet([profile_dict(train_s_per_example=TABLE)]).profiles[0]
    with pytest.raises(ConfigError, match="train_s_per_example") as info:
        profile.measured_s_per_example(0.125)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "table",
    [[], [[1.5, 0.1]], [[1.0, 0.0]], [[1.0, 0.1], [1.0, 0.2]], [[1.0]], "fast"],
    ids=["empty", "width>1", "zero-seconds", "repeated-width", "no-seconds", "text"],
)
def test_measured_table_validation_names_the_key(table) -> None:
    with pytest.raises(ConfigError) as info:
        make_fleet([profile_dict(train_s_per_example=table)])
    assert info.value.key == "devices.profiles[0].train_s_per_example"


def test_whale_testbed_yaml_has_its_sources_and_the_codes_table() -> None:
    text = (CONF_DIR / "whale_testbed.yaml").read_text()
    for source in ("BESTTOOLBOX/WHALE-FL", "cnn_device_model_time.csv", "cnn_device_list.csv"):
        assert source in text
    fleet = instantiate(OmegaConf.load(CONF_DIR / "whale_testbed.yaml"))
    # 5 kinds x the links 80, 40, 20, 15 Mbit/s, equal shares (the code's 20-device list)
    assert len(fleet.profiles) == 20 and set(fleet.shares) == {0.05}
    assert {p.uplink_mbps for p in fleet.profiles} == {80.0, 40.0, 20.0, 15.0}
    pi = next(p for p in fleet.profiles if p.tier == "raspberry_pi")
    # methods.md 3.5: "Raspberry Pi 0.0518 s at width 1 down to 0.0026 s at 1/16"
    assert pi.measured_s_per_example(1.0) == 0.051820623
    assert pi.measured_s_per_example(0.0625) == 0.002569063
    assert all(len(p.train_s_per_example) == 5 for p in fleet.profiles)


@pytest.mark.parametrize("name", ["whale_testbed", "phones_failures", "phones_trace"])
def test_new_yaml_fleets_compose_and_build(name: str) -> None:
    from fedsim.config import build, compose_config

    fleet = build(compose_config([f"devices={name}"]), "devices")
    assert isinstance(fleet, Fleet)
    assert (fleet.phones is None) == (name == "whale_testbed")


def test_existing_yaml_fleets_have_no_phone_failures() -> None:
    # Their behaviour is unchanged: no availability, battery or interruption model is built.
    for name in ("uniform", "phones_mixed"):
        assert instantiate(OmegaConf.load(CONF_DIR / f"{name}.yaml")).phones is None


def _bound_to_testbed(strategy):
    """``strategy`` bound to a view of one WHALE-FL testbed device (a Raspberry Pi on 15 Mbit/s)."""
    from fedsim.clock.scheduler import DeviceCost
    from fedsim.clock.server_view import FederationView, ObservationLog

    fleet = instantiate(OmegaConf.load(CONF_DIR / "whale_testbed.yaml"))
    pi = next(p for p in fleet.profiles if p.name == "raspberry_pi_15mbps")
    view = FederationView(
        seed=0,
        profiles=[pi],
        server_gflops=1000.0,
        deadline_s=None,
        online=lambda pid, rnd: True,
        observations=ObservationLog(),
        # 100 examples, and FLOPs that would give another time: 1e9 FLOP / 4.63 GFLOP/s = 0.216 s
        cost=lambda pid, width: DeviceCost(10**9, 1, train_examples=100),
        payload_bytes=lambda width: 1_875_000,  # 15 Mbit: 1 s at 15 Mbit/s each way
        slim_layout=lambda: None,
    )
    strategy.bind(view)
    return strategy, pi


def test_heterofl_and_whale_fl_latency_estimates_use_the_measured_table() -> None:
    from fedsim.strategies.heterofl import HeteroFL
    from fedsim.strategies.whale_fl import WhaleFL

    heterofl, pi = _bound_to_testbed(HeteroFL())
    nominal = DeviceState(True, pi.train_gflops, pi.uplink_mbps, pi.downlink_mbps, True)
    # width 1: 1 s down + 100 x 0.051820623 s + 1 s up; width 1/16: 100 x 0.002569063 s
    assert heterofl.expected_latency(0, 1.0, nominal) == pytest.approx(2.0 + 5.1820623)
    assert heterofl.expected_latency(0, 0.0625, nominal) == pytest.approx(2.0 + 0.2569063)
    assert heterofl.compute_s(0, 0.5, nominal) == 100 * 0.016849187  # exactly the table's
    whale, _ = _bound_to_testbed(WhaleFL())
    t_cmp, t_com, t_last = whale._paper_times(0, 1)
    assert t_cmp == 100 * 0.002569063  # the code's t_cmp: the table at width 1/16
    assert t_com == pytest.approx(1.0) and t_last == pytest.approx(t_cmp + 1.0)
