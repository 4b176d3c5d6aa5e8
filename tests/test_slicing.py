"""Width-sliced sub-models: index maths by hand, real models' shapes, HeteroFL/FedRolex/WHALE-FL."""

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from fedsim import keys
from fedsim.clients.local_sgd import LocalSGD
from fedsim.clock.scheduler import RoundScheduler
from fedsim.config import build, compose_config
from fedsim.errors import ConfigError
from fedsim.learning.models import SmallCNN
from fedsim.learning.params import arrays_nbytes, to_arrays
from fedsim.learning.slicing import (
    AxisDim,
    SlimLayout,
    aggregate_sliced,
    axis_indices,
    layout_indices,
    scaled_size,
    slice_state,
    tensor_index,
)
from fedsim.rounds.synchronous import federation_view
from fedsim.rounds.virtual_grid import VirtualGrid, partition_id_of
from fedsim.seeding import python_random_seeded
from fedsim.strategies.common import to_numpy, to_record
from fedsim.strategies.fedrolex import FedRolex
from fedsim.strategies.heterofl import HeteroFL, check_widths, largest_fitting_width
from fedsim.strategies.whale_fl import (
    WhaleFL,
    choose_width,
    pseudo_gradient_fisher,
    training_status,
    utility,
)


# --- pure index maths ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("size", "width", "expected"),
    [(16, 1.0, 16), (16, 0.5, 8), (16, 0.0625, 1), (30, 0.1, 3), (3, 0.01, 1), (5, 0.5, 3)],
)
def test_scaled_size_is_ceil_of_width_times_size(size, width, expected) -> None:
    # 30 * 0.1 = 3.0000000000000004 in floating point: still 3 channels; ceil(2.5) = 3
    assert scaled_size(size, width) == expected


@pytest.mark.parametrize(
    ("offset", "expected"),
    [(0, [0, 1]), (1, [3, 0]), (2, [2, 3]), (5, [3, 0])],  # torch.roll semantics, 5 mod 4 = 1
)
def test_axis_indices_prefix_and_roll(offset, expected) -> None:
    assert axis_indices(4, 0.5, offset).tolist() == expected


def test_tensor_index_expands_blocks_channel_major() -> None:
    # channel c of a block-2 dim owns entries 2c, 2c+1: channels [2, 0] -> [4, 5, 0, 1]
    index = tensor_index((3, 6), (None, AxisDim("c", 2)), {"c": np.array([2, 0])})
    assert index[0].ravel().tolist() == [0, 1, 2]
    assert index[1].ravel().tolist() == [4, 5, 0, 1]


def test_slice_state_keeps_unsliced_dims_and_tensors() -> None:
    layout = SlimLayout(axes={"a": 3}, dims={"w": (AxisDim("a"), None)})
    full = {"w": np.arange(6.0).reshape(3, 2), "b": np.array([7.0, 8.0])}
    sub = slice_state(full, layout, {"a": np.array([1, 2])})
    np.testing.assert_array_equal(sub["w"], [[2.0, 3.0], [4.0, 5.0]])  # rows 1, 2; both columns
    np.testing.assert_array_equal(sub["b"], [7.0, 8.0])  # not on an axis: whole


def test_aggregate_sliced_averages_each_coordinate_over_its_clients() -> None:
    layout = SlimLayout(axes={"a": 4}, dims={"w": (AxisDim("a"),)})
    global_state = {"w": np.array([10.0, 20.0, 30.0, 40.0], dtype=np.float32)}
    updates = [
        ({"w": np.array([1.0, 2.0])}, {"a": np.array([0, 1])}, 1.0),  # client A, 1 example
        ({"w": np.array([4.0, 6.0])}, {"a": np.array([1, 2])}, 3.0),  # client B, 3 examples
    ]
    merged = aggregate_sliced(global_state, updates, layout)
    # w0: A only = 1; w1: (1*2 + 3*4) / 4 = 3.5; w2: B only = 6; w3: nobody -> global 40
    np.testing.assert_allclose(merged["w"], [1.0, 3.5, 6.0, 40.0])
    assert merged["w"].dtype == np.float32


def test_aggregate_sliced_at_full_width_is_fedavg() -> None:
    layout = SlimLayout(axes={"a": 2}, dims={"w": (AxisDim("a"), None)})
    full = {"a": np.array([0, 1])}
    g = {"w": np.zeros((2, 2))}
    u1, u2 = {"w": np.ones((2, 2))}, {"w": np.full((2, 2), 4.0)}
    merged = aggregate_sliced(g, [(u1, full, 2.0), (u2, full, 1.0)], layout)
    np.testing.assert_allclose(merged["w"], np.full((2, 2), 2.0))  # (2*1 + 1*4) / 3


# --- real models ---------------------------------------------------------------------------------
@pytest.mark.parametrize("width", [1.0, 0.5, 0.25, 0.125, 0.0625])
@pytest.mark.parametrize("offset", [0, 7])
def test_cnn_slice_matches_the_sub_model_built_at_that_width(width, offset) -> None:
    factory = SmallCNN()
    full = factory.build(10)
    layout = full.slim_layout()
    sub = slice_state(to_numpy(to_arrays(full)), layout, layout_indices(layout, width, offset))
    model = factory.build(10, width=width)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert {k: v.shape for k, v in sub.items()} == shapes  # same names, sub-model shapes
    model.load_state_dict({k: torch.from_numpy(v) for k, v in sub.items()})
    # classes and image channels are never sliced
    assert shapes["classifier.3.bias"] == (10,) and shapes["features.0.weight"][1] == 1


def test_cnn_prefix_sub_model_computes_the_full_model_with_pruned_channels_zeroed() -> None:
    torch.manual_seed(0)
    factory = SmallCNN()
    full = factory.build(10)
    layout = full.slim_layout()
    indices = layout_indices(layout, 0.5)
    state = to_numpy(to_arrays(full))
    # zero every weight that reads a pruned channel: the full model then equals the sub-model
    for name, tensor in state.items():
        dims = layout.dims[name]
        keep = np.zeros(tensor.shape, dtype=bool)
        keep[tensor_index(tensor.shape, dims, indices)] = True
        reads = [d for d in dims[1:] if d is not None]  # input dims
        if reads:
            state[name] = np.where(keep, tensor, 0.0).astype(tensor.dtype)
    full.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
    sub = factory.build(10, width=0.5)
    sub.load_state_dict(
        {k: torch.from_numpy(v) for k, v in slice_state(state, layout, indices).items()}
    )
    x = torch.randn(5, 1, 8, 8)
    torch.testing.assert_close(sub(x), full(x))


def test_default_width_builds_the_same_model_as_before() -> None:
    torch.manual_seed(3)
    a = SmallCNN().build(10)
    torch.manual_seed(3)
    b = SmallCNN().build(10, width=1.0)
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert na == nb and torch.equal(pa, pb)


def test_fedrolex_roll_covers_every_channel_of_the_smallest_width() -> None:
    # width 1/16 of 16 channels = 1 channel; 16 rolled rounds visit all 16 (static: only 0)
    seen = {int(axis_indices(16, 0.0625, r)[0]) for r in range(1, 17)}
    assert seen == set(range(16))
    assert {int(axis_indices(16, 0.0625, 0)[0])} == {0}


# --- WHALE-FL and HeteroFL maths -----------------------------------------------------------------
def test_utility_terms() -> None:
    u, system, training = utility(2.0, 4.0, 0.5, 0.25, 2.0)
    assert system == pytest.approx(-0.5)  # -2 / 4
    assert training == pytest.approx(0.25)  # 2 * 0.5 * 0.25
    assert u == pytest.approx(-0.25)


def test_choose_width_trades_latency_for_width() -> None:
    widths = (1.0, 0.5, 0.25)
    latencies = (4.0, 1.0, 0.25)  # ~p^2
    # T_ref = 4, phi = 1, lambda = 1: U = -1 + 1 = 0, -0.25 + 0.5 = 0.25, -0.0625 + 0.25 = 0.1875
    assert choose_width(widths, latencies, [True] * 3, 4.0, 1.0, 1.0) == 1
    # lambda = 4: U = 3, 1.75, 0.9375 -> full width
    assert choose_width(widths, latencies, [True] * 3, 4.0, 1.0, 4.0) == 0
    # full width infeasible (memory): the best of the rest
    assert choose_width(widths, latencies, [False, True, True], 4.0, 1.0, 4.0) == 1
    # nothing feasible: the smallest width
    assert choose_width(widths, latencies, [False] * 3, 4.0, 1.0, 1.0) == 2
    # a tie (both U = 0 at phi = 0 and equal latency) goes to the larger width
    assert choose_width((0.5, 1.0), (1.0, 1.0), [True, True], 1.0, 0.0, 1.0) == 1


def test_training_status_is_windowed_mean_over_its_peak() -> None:
    assert training_status([], 2, 0.7) == 0.7  # nothing measured yet
    # window 2: means 4, (4+8)/2 = 6, (8+2)/2 = 5 -> phi = 5 / 6
    assert training_status([4.0, 8.0, 2.0], 2, 1.0) == pytest.approx(5 / 6)
    assert training_status([1.0, 2.0], 5, 1.0) == pytest.approx(1.0)  # rising: at its peak


def test_pseudo_gradient_fisher_per_coordinate_weighted() -> None:
    layout = SlimLayout(axes={"a": 4}, dims={"w": (AxisDim("a"),)})
    g = {"w": np.zeros(4)}
    updates = [
        ({"w": np.array([1.0, 1.0])}, {"a": np.array([0, 1])}, 1.0),  # mean sq = 1
        ({"w": np.array([2.0, 2.0, 2.0, 2.0])}, {"a": np.arange(4)}, 3.0),  # mean sq = 4
    ]
    fisher = pseudo_gradient_fisher(g, updates, lambda s, i: slice_state(s, layout, i))
    assert fisher == pytest.approx((1 * 1 + 3 * 4) / 4)  # 3.25


def test_largest_fitting_width() -> None:
    widths = (1.0, 0.5, 0.25)
    assert largest_fitting_width(widths, [True] * 3, [3.0, 1.0, 0.3], None) == 1.0
    assert largest_fitting_width(widths, [True] * 3, [3.0, 1.0, 0.3], 1.5) == 0.5
    assert largest_fitting_width(widths, [False, False, True], [3.0, 1.0, 0.3], None) == 0.25
    assert largest_fitting_width(widths, [True] * 3, [3.0, 1.0, 0.3], 0.1) == 0.25  # none fits


@pytest.mark.parametrize(
    ("make", "key"),
    [
        (lambda: check_widths([]), "strategy.widths"),
        (lambda: check_widths([0.0, 0.5]), "strategy.widths"),
        (lambda: check_widths([1.0, 1.0]), "strategy.widths"),
        (lambda: HeteroFL(latency_budget_s=0), "strategy.latency_budget_s"),
        (lambda: FedRolex(index_policy="spiral"), "strategy.index_policy"),
        (lambda: WhaleFL(tradeoff=-1), "strategy.tradeoff"),
        (lambda: WhaleFL(fisher_window=0), "strategy.fisher_window"),
        (lambda: WhaleFL(reference_quantile=1.5), "strategy.reference_quantile"),
        (lambda: WhaleFL(initial_status=-0.1), "strategy.initial_status"),
    ],
)
def test_bad_knobs_raise_config_error(make, key) -> None:
    with pytest.raises(ConfigError) as error:
        make()
    assert error.value.key == key


# --- one round of the strategies on real devices and a real model --------------------------------
def _bound(strategy, overrides=()):
    cfg = compose_config(["devices=phones_mixed", "num_clients=8", *overrides])
    torch.manual_seed(0)
    model = SmallCNN().build(10)
    behaviour = LocalSGD()
    scheduler = RoundScheduler(build(cfg, "devices"), 0, 8)
    batch = {"x": torch.zeros(32, 1, 8, 8), "label": torch.zeros(32, dtype=torch.long)}
    models = {1.0: model}

    def model_at(width):
        return models.setdefault(width, SmallCNN().build(10, width=width))

    def cost_fn(pid, width=1.0):
        return behaviour.device_cost(model_at(width), batch, 40)

    strategy.bind(federation_view(scheduler, model_at, cost_fn))
    return strategy, model


@pytest.fixture(autouse=True)
def _identity(flower_identity):
    """Messages need a Flower task identity outside a simulation."""


def _round(strategy, model, server_round=1):
    grid = VirtualGrid(None, num_clients=8, job=ConfigRecord())  # type: ignore[arg-type]
    arrays = to_arrays(model)
    with python_random_seeded(server_round):
        messages = list(strategy.configure_train(server_round, arrays, ConfigRecord(), grid))
    replies = []
    for m in messages:  # every client "trains" by adding 1 to each coordinate it holds
        sub = {k: v + 1.0 for k, v in to_numpy(m.content[keys.ARRAYS]).items()}
        metrics = MetricRecord({keys.NUM_EXAMPLES: 10})
        replies.append(
            Message(RecordDict({keys.ARRAYS: to_record(sub), keys.METRICS: metrics}), reply_to=m)
        )
    new, _ = strategy.aggregate_train(server_round, replies)
    return messages, to_numpy(arrays), to_numpy(new)


def test_heterofl_round_sends_slices_and_updates_only_covered_coordinates() -> None:
    strategy, model = _bound(HeteroFL(fraction_train=1.0, latency_budget_s=0.01))
    messages, before, after = _round(strategy, model)
    widths = {
        partition_id_of(m.metadata.dst_node_id): m.content[keys.CONFIG][keys.WIDTH]
        for m in messages
    }
    assert len(set(widths.values())) > 1  # the budget gives slow phones smaller widths
    smallest = min(widths.values())
    for m in messages:
        width = m.content[keys.CONFIG][keys.WIDTH]
        # downlink shrinks with the width: the bytes are those of the sliced tensors
        assert arrays_nbytes(m.content[keys.ARRAYS]) == arrays_nbytes(
            to_arrays(SmallCNN().build(10, width=width))
        )
        assert m.content[keys.CONFIG][f"{keys.LOG_PREFIX}width"] == width
    delta = after["features.0.bias"] - before["features.0.bias"]
    covered = scaled_size(16, max(widths.values()))
    np.testing.assert_allclose(delta[:covered], 1.0, rtol=1e-6)  # every client added 1
    np.testing.assert_array_equal(delta[covered:], 0.0)  # nobody trained these
    assert smallest < 1.0


def test_heterofl_at_full_width_equals_fedavg() -> None:
    strategy, model = _bound(HeteroFL(fraction_train=1.0, widths=[1.0]))
    _, before, after = _round(strategy, model)
    for k in before:
        np.testing.assert_allclose(after[k], before[k] + 1.0, rtol=1e-6)


def test_whale_fl_logs_its_utility_and_picks_smaller_widths_for_slow_devices() -> None:
    strategy, model = _bound(WhaleFL(fraction_train=1.0, utility="latency_fisher"))
    messages, _, _ = _round(strategy, model)
    rows = [dict(m.content[keys.CONFIG]) for m in messages]
    for row in rows:
        u = row["log.system_term"] + row["log.training_term"]
        assert row["log.utility"] == pytest.approx(u)
        assert row["log.training_status"] == 1.0  # initial_status: no Fisher yet
    assert len(strategy.fisher_history) == 1 and strategy.fisher_history[0] > 0
    est = sorted((r["log.latency_est_s"] / r["log.width"] ** 2, r["log.width"]) for r in rows)
    assert est[0][1] >= est[-1][1]  # the fastest device per unit work gets the widest model


def test_fedrolex_round_rolls_the_window() -> None:
    strategy, model = _bound(FedRolex(fraction_train=1.0, widths=[0.5]))
    _, before, after = _round(strategy, model, server_round=3)
    delta = after["features.0.bias"] - before["features.0.bias"]
    # roll(arange(16), 3)[:8] = [13, 14, 15, 0, 1, 2, 3, 4]
    expected = np.isin(np.arange(16), [13, 14, 15, 0, 1, 2, 3, 4])
    np.testing.assert_allclose(delta[expected], 1.0, rtol=1e-6)
    np.testing.assert_array_equal(delta[~expected], 0.0)


def test_text_classifier_cannot_be_sliced() -> None:
    from fedsim.learning.models import check_full_width

    with pytest.raises(ConfigError):
        check_full_width(0.5, "model=text_classifier")
    check_full_width(1.0, "model=text_classifier")  # the full model is always fine
