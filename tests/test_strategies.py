"""Strategies beyond Flower's built-ins: their maths by hand, their client terms on real steps.

The client-side tests train a one-weight linear model ``y = w * x`` on examples (x=1, y=0) with
loss ``f(w) = 0.5 * (w * x - y)^2``, so ``grad f(w) = w`` and every step can be done by hand.
"""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import cnn_and_data as _cnn_and_data
from conftest import strip_wall_time
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from fedsim import keys
from fedsim.config import compose_config
from fedsim.engine.simulation import simulate
from fedsim.errors import ConfigError
from fedsim.learning.models import SmallCNN, forward_with_features
from fedsim.learning.params import arrays_nbytes, to_arrays
from fedsim.records.checkpoint import RunState, load_checkpoint, save_checkpoint
from fedsim.records.results import read_metrics
from fedsim.strategies.feddyn import FedDyn, feddyn_client_grad, feddyn_server_update
from fedsim.strategies.fednova import FedNova, fednova_aggregate, fednova_norm
from fedsim.strategies.fedspeed import FedSpeed, fedspeed_server_update, sam_perturbation
from fedsim.strategies.moon import Moon, moon_contrastive_loss
from fedsim.strategies.scaffold import Scaffold, scaffold_client_control, scaffold_server_update
from fedsim.training.contract import TrainContext
from fedsim.training.loop import Batch, build_terms, train_loop


def _a(*values: float) -> np.ndarray:
    return np.array(values, dtype=np.float64)


# --- server maths -------------------------------------------------------------------------------
def test_scaffold_client_control_option_two() -> None:
    c_i, c = torch.tensor([1.0, 0.0]), torch.tensor([0.5, 0.0])
    w_global, w_local = torch.tensor([1.0, 2.0]), torch.tensor([0.0, 1.0])
    new = scaffold_client_control(c_i, c, w_global, w_local, num_steps=4, lr=0.5)
    # (w_global - w_local) / (K * lr) = 1 / 2 = 0.5 per entry: [1 - 0.5 + 0.5, 0 - 0 + 0.5]
    torch.testing.assert_close(new, torch.tensor([1.0, 0.5]))
    no_steps = scaffold_client_control(c_i, c, w_global, w_local, num_steps=0, lr=0.5)
    torch.testing.assert_close(no_steps, c_i)  # nothing trained: c_i unchanged


def test_scaffold_server_update() -> None:
    new_w, new_c = scaffold_server_update(
        {"w": _a(1.0)},
        {"w": _a(3.0)},
        {"w": _a(0.0)},
        [{"w": _a(2.0)}, {"w": _a(4.0)}],
        num_clients=10,
        eta_g=0.5,
    )
    assert new_w["w"] == pytest.approx([2.0])  # 1 + 0.5 * (3 - 1)
    assert new_c["w"] == pytest.approx([0.6])  # 0 + (2 + 4) / 10: 1/N over ALL clients


def test_fednova_norm_plain_and_momentum() -> None:
    assert fednova_norm(3, 0.0) == 3.0
    assert fednova_norm(1, 0.5) == pytest.approx(1.0)  # a = [1]
    assert fednova_norm(2, 0.5) == pytest.approx(2.5)  # a = [1 + rho, 1] -> 2 + rho


def test_fednova_aggregate_normalizes_by_steps() -> None:
    # A: 1 step of -2 from 0; B: 6 steps of -1. p = [1/2, 1/2].
    # d = 0.5 * 2 / 1 + 0.5 * 6 / 6 = 1.5;  tau_eff = 0.5 * 1 + 0.5 * 6 = 3.5
    # w = 0 - 3.5 * 1.5 = -5.25 (FedAvg: mean(-2, -6) = -4)
    new = fednova_aggregate(
        {"w": _a(0.0)}, [({"w": _a(-2.0)}, 1, 1.0), ({"w": _a(-6.0)}, 1, 6.0)], eta_g=1.0
    )
    assert new["w"] == pytest.approx([-5.25])


def test_fednova_equal_steps_is_fedavg() -> None:
    # tau = 4 for both, p = [1/4, 3/4]: w = sum p_i w_i = 0.25 * 4 + 0.75 * 8 = 7
    new = fednova_aggregate(
        {"w": _a(0.0)}, [({"w": _a(4.0)}, 1, 4.0), ({"w": _a(8.0)}, 3, 4.0)], eta_g=1.0
    )
    assert new["w"] == pytest.approx([7.0])


def test_feddyn_client_and_server_update() -> None:
    g = feddyn_client_grad(torch.tensor([1.0]), torch.tensor([2.0]), torch.tensor([1.0]), 0.5)
    torch.testing.assert_close(g, torch.tensor([1.5]))  # 1 - 0.5 * (1 - 2)
    new_w, new_h = feddyn_server_update(
        {"w": _a(0.0)},
        [{"w": _a(2.0)}, {"w": _a(4.0)}],
        {"w": _a(3.0)},
        {"w": _a(0.0)},
        alpha=0.5,
        num_clients=4,
    )
    assert new_h["w"] == pytest.approx([-0.75])  # 0 - 0.5 / 4 * (2 + 4)
    assert new_w["w"] == pytest.approx([4.5])  # 3 - (-0.75) / 0.5


def test_fedspeed_server_update_adds_mean_dual() -> None:
    new_w, new_dual = fedspeed_server_update(
        {"w": _a(0.0)},
        [{"w": _a(2.0)}, {"w": _a(4.0)}],
        {"w": _a(3.0)},
        {"w": _a(1.0)},
        num_clients=4,
    )
    assert new_dual["w"] == pytest.approx([2.5])  # 1 + (2 + 4) / 4
    assert new_w["w"] == pytest.approx([5.5])  # 3 + 2.5


def test_sam_perturbation_is_rho_times_unit_gradient() -> None:
    e = sam_perturbation([torch.tensor([3.0]), torch.tensor([4.0])], rho=0.1)  # ||g|| = 5
    torch.testing.assert_close(torch.cat(e), torch.tensor([0.06, 0.08]))


def test_moon_contrastive_loss_by_hand() -> None:
    z = torch.tensor([[1.0, 0.0]])
    # sim(z, z_glob) = 1, sim(z, z_prev) = 0; / T = 0.5 -> logits [2, 0]
    # -log(e^2 / (e^2 + 1)) = log(1 + e^-2)
    loss = moon_contrastive_loss(z, torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 3.0]]), 0.5)
    assert float(loss) == pytest.approx(math.log1p(math.exp(-2.0)))


@pytest.mark.parametrize(
    ("cls", "kwargs", "key"),
    [
        (Scaffold, {"eta_g": 0.0}, "strategy.eta_g"),
        (FedNova, {"eta_g": -1.0}, "strategy.eta_g"),
        (FedDyn, {"alpha": 0.0}, "strategy.alpha"),
        (FedSpeed, {"rho": -0.1}, "strategy.rho"),
        (FedSpeed, {"grad_clip": 10.0}, "strategy.grad_clip"),  # removed: client.max_grad_norm
        (Moon, {"temperature": 0.0}, "strategy.temperature"),
        (Moon, {"mu": "big"}, "strategy.mu"),
    ],
)
def test_bad_strategy_knobs_raise_config_error(cls, kwargs, key) -> None:
    with pytest.raises(ConfigError) as info:
        cls(**kwargs)
    assert info.value.key == key


# --- client terms on real steps -----------------------------------------------------------------
def _linear(w: float) -> torch.nn.Linear:
    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(w)
    return model


def _half_square(outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((outputs.squeeze(-1) - labels) ** 2).mean()


def _train(
    model, config, state=None, received=None, steps: int = 2, lr: float = 0.1, max_grad_norm=None
):
    data = {"input": torch.ones(steps, 1), "label": torch.zeros(steps)}  # two identical examples
    ctx = TrainContext(
        0,
        1,
        ConfigRecord(config),
        torch.Generator().manual_seed(0),
        state if state is not None else RecordDict(),
        received if received is not None else RecordDict(),
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    outcome = train_loop(
        model,
        data,
        ctx,
        optimizer,
        local_epochs=1,
        batch_size=1,
        loss_fn=_half_square,
        max_grad_norm=max_grad_norm,
    )
    return outcome, ctx


def _w(model: torch.nn.Module) -> float:
    return float(model.weight.detach())


def test_no_term_is_plain_sgd() -> None:
    model = _linear(1.0)
    _train(model, {})
    assert _w(model) == pytest.approx(0.81)  # 1 * (1 - 0.1) * (1 - 0.1)


def test_fedprox_term_from_flowers_key() -> None:
    model = _linear(1.0)
    _train(model, {keys.PROXIMAL_MU: 1.0})
    # step 1: grad 1 + (1 - 1) = 1 -> 0.9; step 2: grad 0.9 + (0.9 - 1) = 0.8 -> 0.82
    assert _w(model) == pytest.approx(0.82)


def test_scaffold_term_two_steps_by_hand() -> None:
    model = _linear(1.0)
    state = RecordDict(
        {keys.SCAFFOLD_CLIENT_CONTROL: ArrayRecord({"weight": torch.tensor([[0.1]])})}
    )
    received = RecordDict({keys.SCAFFOLD_CONTROL: ArrayRecord({"weight": torch.tensor([[0.3]])})})
    outcome, ctx = _train(model, {keys.CLIENT_TERMS: ["scaffold"]}, state, received)
    # grad + c - c_i = w + 0.2: 1 - 0.1 * 1.2 = 0.88; 0.88 - 0.1 * 1.08 = 0.772
    assert _w(model) == pytest.approx(0.772)
    # c_i+ = 0.1 - 0.3 + (1 - 0.772) / (2 * 0.1) = 0.94; dc = 0.94 - 0.1 = 0.84
    c_i = ctx.state[keys.SCAFFOLD_CLIENT_CONTROL].to_torch_state_dict()["weight"]
    delta = outcome.records[keys.SCAFFOLD_CONTROL_DELTA].to_torch_state_dict()["weight"]
    assert float(c_i) == pytest.approx(0.94, abs=1e-6)
    assert float(delta) == pytest.approx(0.84, abs=1e-6)


def test_feddyn_term_two_steps_by_hand() -> None:
    model = _linear(1.0)
    state = RecordDict({keys.FEDDYN_GRAD: ArrayRecord({"weight": torch.tensor([[0.2]])})})
    _, ctx = _train(model, {keys.CLIENT_TERMS: ["feddyn"], keys.FEDDYN_ALPHA: 0.5}, state)
    # grad w - g_prev + alpha (w - 1): step 1: 1 - 0.2 + 0 = 0.8 -> 0.92
    # step 2: 0.92 - 0.2 + 0.5 * (-0.08) = 0.68 -> 0.852
    assert _w(model) == pytest.approx(0.852)
    grad = ctx.state[keys.FEDDYN_GRAD].to_torch_state_dict()["weight"]
    assert float(grad) == pytest.approx(0.274, abs=1e-6)  # 0.2 - 0.5 * (0.852 - 1)


def test_fedspeed_term_one_step_by_hand() -> None:
    model = _linear(1.0)
    state = RecordDict({keys.FEDSPEED_DUAL: ArrayRecord({"weight": torch.tensor([[0.5]])})})
    config = {
        keys.CLIENT_TERMS: ["fedspeed"],
        keys.FEDSPEED_RHO: 0.1,
        keys.FEDSPEED_LAMBDA: 0.1,
    }
    _, ctx = _train(model, config, state, steps=1, max_grad_norm=10.0)
    # g1 = 1; w~ = 1 + 0.1 * 1 / 1 = 1.1; g2 = 1.1; + lambda (h - w_t) = 0.1 * (0.5 - 1)
    # -> 1.05 (below the clip); + lambda * w = 0.1 -> 1.15; w = 1 - 0.1 * 1.15 = 0.885
    assert _w(model) == pytest.approx(0.885, abs=1e-6)
    dual = ctx.state[keys.FEDSPEED_DUAL].to_torch_state_dict()["weight"]
    assert float(dual) == pytest.approx(0.385, abs=1e-6)  # 0.5 + (0.885 - 1)


def test_fedspeed_term_clips_before_the_decay() -> None:
    model = _linear(1.0)
    config = {
        keys.CLIENT_TERMS: ["fedspeed"],
        keys.FEDSPEED_RHO: 0.0,
        keys.FEDSPEED_LAMBDA: 0.1,
    }
    _train(model, config, steps=1, max_grad_norm=0.5)  # the shared clip, before FedSpeed's decay
    # g = 1 + 0.1 * (0 - 1) = 0.9 -> clipped to 0.5; + 0.1 * 1 = 0.6; w = 1 - 0.06 = 0.94
    assert _w(model) == pytest.approx(0.94, abs=1e-6)


def test_fednova_term_reports_steps() -> None:
    outcome, _ = _train(_linear(1.0), {keys.CLIENT_TERMS: ["fednova"]}, steps=3)
    assert outcome.metrics == {keys.FEDNOVA_NORM: 3.0}


def test_unknown_client_term_is_refused() -> None:
    with pytest.raises(KeyError, match="unknown client term 'nope'"):
        build_terms(ConfigRecord({keys.CLIENT_TERMS: ["nope"]}))


def _train_cnn(model, data, config, state=None, received=None):
    ctx = TrainContext(
        3,
        1,
        ConfigRecord(config),
        torch.Generator().manual_seed(1),
        state if state is not None else RecordDict(),
        received if received is not None else RecordDict(),
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    return train_loop(model, data, ctx, optimizer, local_epochs=2, batch_size=4), ctx


def test_scaffold_with_zero_controls_equals_plain_sgd_on_the_cnn() -> None:
    plain, data = _cnn_and_data()
    scaffold, _ = _cnn_and_data()
    _train_cnn(plain, data, {})
    zeros = ArrayRecord({n: torch.zeros_like(p) for n, p in scaffold.named_parameters()})
    outcome, ctx = _train_cnn(
        scaffold,
        data,
        {keys.CLIENT_TERMS: ["scaffold"]},
        received=RecordDict({keys.SCAFFOLD_CONTROL: zeros}),
    )
    for (_, a), (_, b) in zip(plain.named_parameters(), scaffold.named_parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # c = c_i = 0: FedAvg's client
    assert keys.SCAFFOLD_CLIENT_CONTROL in ctx.state
    assert set(outcome.records) == {keys.SCAFFOLD_CONTROL_DELTA}


def test_forward_with_features_is_the_output_layers_input() -> None:
    model, data = _cnn_and_data()
    logits, z = forward_with_features(model, {"x": data["x"]})
    assert z.shape == (12, 128)  # hidden_size
    torch.testing.assert_close(model.output_layer()(z), logits)
    other = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    _, z0 = forward_with_features(model, {"x": data["x"]}, other)
    assert float(z0.abs().sum()) == 0.0  # zero weights and biases: ReLU(0) = 0


def test_moon_term_first_step_adds_mu_log_two_and_keeps_the_representation() -> None:
    model, data = _cnn_and_data()
    config = {keys.CLIENT_TERMS: ["moon"], keys.MOON_MU: 2.0, keys.MOON_TEMPERATURE: 0.5}
    (term,) = build_terms(ConfigRecord(config))
    ctx = TrainContext(0, 1, ConfigRecord(config), torch.Generator().manual_seed(0))
    term.before_train(model, ctx)
    logits, z = forward_with_features(model, {"x": data["x"]})
    base = torch.nn.functional.cross_entropy(logits, data["label"])
    loss = term.loss(model, Batch({"x": data["x"]}, data["label"], logits, z), base)
    # first round: z = z_glob = z_prev, both similarities 1 -> l_con = log 2
    assert float(loss - base) == pytest.approx(2.0 * math.log(2.0), rel=1e-5)
    _, ctx = _train_cnn(model, data, config)
    kept = set(ctx.state[keys.MOON_PREVIOUS].keys())
    assert kept == {
        "features.0.weight",
        "features.0.bias",
        "features.3.weight",
        "features.3.bias",
        "classifier.1.weight",
        "classifier.1.bias",
    }  # no head


# --- checkpoint and the real engine -------------------------------------------------------------
def test_scaffold_state_survives_a_checkpoint(tmp_path: Path) -> None:
    strategy = Scaffold(eta_g=0.5)
    strategy.control = {"w": np.full((2, 3), 0.25, dtype=np.float32)}
    strategy.num_clients = 7
    c_i = ArrayRecord({"w": torch.full((2, 3), -1.0)})
    state = RunState(
        3,
        ArrayRecord({"w": torch.zeros(2, 3)}),
        {5: RecordDict({keys.SCAFFOLD_CLIENT_CONTROL: c_i})},
        1.0,
        {},
    )
    save_checkpoint(tmp_path, state, strategy, "h")
    fresh = Scaffold(eta_g=0.5)
    restored = load_checkpoint(tmp_path, fresh, "h")
    np.testing.assert_array_equal(fresh.control["w"], strategy.control["w"])
    assert fresh.num_clients == 7
    kept = restored.client_states[5][keys.SCAFFOLD_CLIENT_CONTROL]["w"].numpy()
    np.testing.assert_array_equal(kept, np.full((2, 3), -1.0, dtype=np.float32))


ARGS = [
    "strategy=scaffold",
    "num_clients=4",
    "num_rounds=4",
    "strategy.fraction_train=0.5",
    "runtime.progress=false",
    "runtime.engine=inline",  # the strategy's state is the point; test_resume.py kills Ray runs
]


@pytest.mark.slow
def test_scaffold_doubles_the_traffic_and_resumes_bit_for_bit(
    tmp_path: Path, kill_and_resume
) -> None:
    reference = tmp_path / "reference"
    assert simulate(compose_config(ARGS), reference)["status"] == "completed"
    rows = read_metrics(reference)
    model_bytes = arrays_nbytes(to_arrays(SmallCNN().build(10)))  # FedAvg's copy per client
    for row in rows:  # each client downloads model + c and uploads model + dc: 2x FedAvg
        assert row["bytes_down"] == row["num_sampled"] * 2 * model_bytes
        assert row["bytes_up"] == row["num_clients"] * 2 * model_bytes
    # SIGKILL after round 2, resume: c (strategy) and every c_i (client state) must survive.
    run, killed_at = kill_and_resume(ARGS, rows=2)
    assert 2 <= killed_at < 4
    assert strip_wall_time(read_metrics(run)) == strip_wall_time(rows)
