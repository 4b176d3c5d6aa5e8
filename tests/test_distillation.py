"""DFL (clients/distillation.py): maths by hand, its term on real steps, its state on the engine."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from fedsim import keys
from fedsim.checkpoint import RunState, load_checkpoint, save_checkpoint
from fedsim.clients.base import TrainContext
from fedsim.clients.distillation import (
    DFL,
    average_class_targets,
    class_target_sums,
    dfl_beta,
    kd_loss,
    soft_targets,
)
from fedsim.clients.local_sgd import LocalSGD
from fedsim.clients.loop import train_loop
from fedsim.config import compose_config
from fedsim.errors import ConfigError
from fedsim.simulation import simulate
from fedsim.strategies.scaffold import Scaffold


# --- maths ---------------------------------------------------------------------------------------
def test_kd_loss_at_temperature_by_hand() -> None:
    # z / T = [0, ln 3] -> p = [1/4, 3/4]; KL([1/2, 1/2] || p) = 1/2 ln 2 + 1/2 ln(2/3)
    #       = 1/2 ln(4/3)
    logits = torch.tensor([[0.0, 2 * math.log(3.0)]])
    loss = kd_loss(logits, torch.tensor([[0.5, 0.5]]), temperature=2.0)
    assert float(loss) == pytest.approx(4 * 0.5 * math.log(4 / 3))  # times T^2 = 4


def test_kd_loss_zero_target_entries_and_mask() -> None:
    logits = torch.tensor([[0.0, math.log(3.0)], [5.0, -5.0]])
    targets = torch.tensor([[1.0, 0.0], [0.3, 0.7]])
    # row 0 only: KL([1, 0] || [1/4, 3/4]) = ln 4 (0 ln 0 = 0); row 1 is masked out
    loss = kd_loss(logits, targets, 1.0, mask=torch.tensor([True, False]))
    assert float(loss) == pytest.approx(math.log(4.0))
    assert float(kd_loss(logits, targets, 1.0, mask=torch.tensor([False, False]))) == 0.0


def test_soft_targets_are_softmax_at_temperature() -> None:
    probs = soft_targets(torch.tensor([[0.0, 2 * math.log(3.0)]]), 2.0)
    torch.testing.assert_close(probs, torch.tensor([[0.25, 0.75]]))


@pytest.mark.parametrize(
    ("schedule", "generations", "acc_soft", "acc_model", "beta"),
    [
        ("acc_based", 0, 0.9, 0.6, 0.0),  # no soft targets yet: plain cross-entropy
        ("acc_based", 3, 0.9, 0.6, 0.6),  # 0.9 / (0.9 + 0.6)
        ("acc_based", 3, 0.0, 0.0, 0.5),  # no evidence: beta0
        ("constant", 3, 0.9, 0.1, 0.5),
        ("linear_up", 2, 0.9, 0.1, 0.2),  # 0.5 * 2 / 5
        ("linear_up", 9, 0.9, 0.1, 0.5),  # ramp done
    ],
)
def test_dfl_beta_rules(schedule, generations, acc_soft, acc_model, beta) -> None:
    got = dfl_beta(schedule, 0.5, generations, 5, acc_soft, acc_model)
    assert got == pytest.approx(beta)


def test_per_class_sums_and_server_average_by_hand() -> None:
    probs_a = torch.tensor([[0.8, 0.2, 0.0], [0.6, 0.4, 0.0], [0.1, 0.9, 0.0]])
    sums_a, counts_a = class_target_sums(probs_a, torch.tensor([0, 0, 1]), 3)
    np.testing.assert_allclose(sums_a, [[1.4, 0.6, 0.0], [0.1, 0.9, 0.0], [0, 0, 0]])
    np.testing.assert_array_equal(counts_a, [2, 1, 0])
    sums_b, counts_b = class_target_sums(torch.tensor([[0.2, 0.8, 0.0]]), torch.tensor([0]), 3)
    q, counts = average_class_targets([(sums_a, counts_a), (sums_b, counts_b)])
    np.testing.assert_allclose(q[0], [1.6 / 3, 1.4 / 3, 0.0])  # (0.8 + 0.6 + 0.2) / 3, ...
    np.testing.assert_allclose(q[1], [0.1, 0.9, 0.0])  # one sample of class 1
    np.testing.assert_array_equal(q[2], [0.0, 0.0, 0.0])  # nobody holds class 2
    np.testing.assert_array_equal(counts, [3, 1, 0])


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"temperature": 0}, "distillation.temperature"),
        ({"beta0": 1.5}, "distillation.beta0"),
        ({"beta_schedule": "cosine"}, "distillation.beta_schedule"),
        ({"ramp_rounds": 0}, "distillation.ramp_rounds"),
        ({"soft_target_mode": "both"}, "distillation.soft_target_mode"),
    ],
)
def test_bad_dfl_knobs_raise_config_error(kwargs, key) -> None:
    with pytest.raises(ConfigError) as err:
        DFL(**kwargs)
    assert err.value.key == key


# --- the term on real steps ----------------------------------------------------------------------
class _Bias(torch.nn.Module):
    """Logits = a trainable bias b (C,), whatever the input: d loss / d b is done by hand."""

    def __init__(self, num_classes: int = 2) -> None:
        super().__init__()
        self.bias = torch.nn.Parameter(torch.zeros(num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bias.expand(len(x), -1)


def _ctx(config: dict, state: RecordDict | None = None) -> TrainContext:
    return TrainContext(
        0, 2, ConfigRecord(config), torch.Generator().manual_seed(0), state or RecordDict()
    )


def _dfl_config(**kwargs) -> dict:
    return {keys.CLIENT_TERMS: ["dfl"], **DFL(**kwargs).train_config()}


def test_dfl_term_one_step_by_hand() -> None:
    model = _Bias()
    state = RecordDict(
        {
            keys.DFL_SOFT_TARGETS: ArrayRecord({"soft": torch.tensor([[0.2, 0.8]])}),
            keys.DFL_GENERATIONS: ConfigRecord({"count": 1}),
        }
    )
    ctx = _ctx(_dfl_config(temperature=2.0, beta0=0.5, beta_schedule="constant"), state)
    data = {"x": torch.zeros(1, 1), "label": torch.tensor([0])}
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    train_loop(model, data, ctx, optimizer, local_epochs=1, batch_size=1)
    # grad = (1 - b) (softmax(z) - onehot(y)) + b T (softmax(z / T) - q), z = 0, T = 2, b = 0.5
    #      = 0.5 [-0.5, 0.5] + 0.5 * 2 [0.3, -0.3] = [0.05, -0.05]; lr 1 -> bias = [-0.05, 0.05]
    torch.testing.assert_close(model.bias.detach(), torch.tensor([-0.05, 0.05]))


class _Linear(torch.nn.Module):
    """``model(x=...)`` as the loop calls it."""

    def __init__(self, num_in: int, num_classes: int) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(num_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


def test_dfl_term_with_beta_zero_is_plain_sgd_bit_for_bit() -> None:
    torch.manual_seed(0)
    data = {"x": torch.randn(12, 3), "label": torch.randint(0, 3, (12,))}
    plain, kd = _Linear(3, 3), _Linear(3, 3)
    kd.load_state_dict(plain.state_dict())
    state = RecordDict(
        {
            keys.DFL_SOFT_TARGETS: ArrayRecord({"soft": torch.full((12, 3), 1 / 3)}),
            keys.DFL_GENERATIONS: ConfigRecord({"count": 4}),
        }
    )
    zero = _dfl_config(beta0=0.0, beta_schedule="constant")
    for model, ctx in ((plain, _ctx({})), (kd, _ctx(zero, state))):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.3)
        train_loop(model, data, ctx, optimizer, local_epochs=2, batch_size=5)
    for a, b in zip(plain.parameters(), kd.parameters(), strict=True):
        assert torch.equal(a, b)


def test_distilled_behaviour_stores_soft_targets_in_client_state() -> None:
    torch.manual_seed(1)
    model = _Linear(2, 2)
    data = {"x": torch.randn(5, 2), "label": torch.tensor([0, 1, 0, 1, 1])}
    behaviour = DFL(temperature=2.0).wrap(LocalSGD(local_epochs=1, batch_size=2, lr=0.1))
    ctx = _ctx({keys.CLIENT_TERMS: ["fedprox"], keys.PROXIMAL_MU: 0.1})
    outcome = behaviour.train(model, data, ctx)
    assert list(ctx.config[keys.CLIENT_TERMS]) == ["dfl", "fedprox"]  # dfl first: sees task loss
    soft = ctx.state[keys.DFL_SOFT_TARGETS]["soft"].numpy()
    with torch.no_grad():
        expected = torch.softmax(model(data["x"]) / 2.0, dim=1).numpy()
    np.testing.assert_allclose(soft, expected, rtol=1e-6)  # the trained model's predictions
    assert int(ctx.state[keys.DFL_GENERATIONS]["count"]) == 1
    assert outcome.extra_upload_bytes == 0  # sample_local: nothing leaves the device

    per_class = DFL(soft_target_mode="class_global").wrap(LocalSGD(local_epochs=1, batch_size=2))
    ctx = _ctx({})
    outcome = per_class.train(model, data, ctx)
    assert outcome.extra_upload_bytes == (2 * 2 + 2) * 4  # C x C sums + C counts, float32
    np.testing.assert_array_equal(ctx.state[keys.DFL_CLASS_STATS]["counts"].numpy(), [2, 3])


def test_class_global_attach_averages_client_states(flower_identity) -> None:
    from flwr.app import Message

    stats = ArrayRecord(
        {
            "sums": torch.tensor([[3.0, 1.0], [0.0, 2.0]], dtype=torch.float64),
            "counts": torch.tensor([4.0, 2.0], dtype=torch.float64),
        }
    )
    states = {
        0: RecordDict({keys.DFL_CLASS_STATS: stats}),
        1: RecordDict({keys.DFL_CLASS_STATS: stats}),
        2: RecordDict(),  # never trained: contributes nothing
    }
    content = RecordDict({keys.CONFIG: ConfigRecord({})})
    messages = [Message(content, 1, "train"), Message(content, 2, "train")]  # shared content
    DFL(soft_target_mode="class_global").attach(messages, states)
    q = messages[1].content[keys.DFL_CLASS_TARGETS]["q"].numpy()
    np.testing.assert_allclose(q, [[0.75, 0.25], [0.0, 1.0]])  # (3 + 3) / 8, (2 + 2) / 4
    DFL().attach([Message(RecordDict(), 1, "train")], states)  # sample_local: sends nothing


def test_soft_targets_survive_a_checkpoint(tmp_path: Path) -> None:
    soft = torch.rand(7, 10)
    client = RecordDict(
        {
            keys.DFL_SOFT_TARGETS: ArrayRecord({"soft": soft}),
            keys.DFL_CLASS_STATS: ArrayRecord(
                {
                    "sums": torch.ones(10, 10, dtype=torch.float64),
                    "counts": torch.arange(10.0, dtype=torch.float64),
                }
            ),
            keys.DFL_GENERATIONS: ConfigRecord({"count": 3}),
        }
    )
    state = RunState(2, ArrayRecord({"w": torch.zeros(2)}), {4: client}, 1.5, {})
    save_checkpoint(tmp_path, state, Scaffold(), "h")
    restored = load_checkpoint(tmp_path, Scaffold(), "h").client_states[4]
    np.testing.assert_array_equal(restored[keys.DFL_SOFT_TARGETS]["soft"].numpy(), soft.numpy())
    np.testing.assert_array_equal(restored[keys.DFL_CLASS_STATS]["counts"].numpy(), np.arange(10.0))
    assert int(restored[keys.DFL_GENERATIONS]["count"]) == 3


# --- composition on the real engine --------------------------------------------------------------
TEXT = ["data=chatterbot", "model=text_classifier", "model.max_length=16", "client.max_steps=2"]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("overrides", "mode"),
    [
        (["strategy=scaffold"], "sample_local"),
        (["strategy=fedprox", "client=side_tuning", *TEXT], "sample_local"),
        (["client=pae_side_tuning", *TEXT], "class_global"),
        (["strategy=fedprox", "client=lora", *TEXT], "sample_local"),
    ],
    ids=["scaffold", "side_tuning", "pae_side_tuning", "lora"],
)
def test_dfl_composes_with_strategies_and_clients(overrides, mode, tmp_path: Path) -> None:
    cfg = compose_config(
        [
            *overrides,
            "distillation=dfl",
            f"distillation.soft_target_mode={mode}",
            "num_clients=3",
            "num_rounds=2",
            "strategy.fraction_train=1.0",
            "strategy.min_train_nodes=3",
            "runtime.progress=false",
        ]
    )
    summary = simulate(cfg, tmp_path / "run")
    assert summary["status"] == "completed"
    from fedsim.results import read_metrics

    rows = read_metrics(tmp_path / "run")
    assert [r["num_failed"] for r in rows] == [0, 0]  # round 2 trained with soft targets
    states = load_checkpoint(tmp_path / "run", Scaffold(), _hash(cfg)).client_states
    assert sorted(states) == [0, 1, 2]
    for state in states.values():
        assert int(state[keys.DFL_GENERATIONS]["count"]) == 2
        name = keys.DFL_SOFT_TARGETS if mode == "sample_local" else keys.DFL_CLASS_STATS
        assert name in state


def _hash(cfg) -> str:
    from fedsim.config import config_hash

    return config_hash(cfg)
