"""DFL (clients/distillation.py): maths by hand, its term on real steps, its state on the engine."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict
from hydra.utils import instantiate

from fedsim import keys
from fedsim.clients.distillation import (
    DFL,
    average_class_targets,
    class_target_sums,
    dfl_beta,
    kd_loss,
    soft_targets,
)
from fedsim.clients.local_sgd import LocalSGD
from fedsim.config import compose_config
from fedsim.engine.simulation import simulate
from fedsim.errors import ConfigError
from fedsim.records.checkpoint import RunState, load_checkpoint, save_checkpoint
from fedsim.strategies.scaffold import Scaffold
from fedsim.training.contract import TrainContext
from fedsim.training.loop import train_loop


# --- maths ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(("t_squared", "factor"), [(True, 4.0), (False, 1.0)])  # T^2 = 4 or 1
def test_kd_loss_at_temperature_by_hand(t_squared: bool, factor: float) -> None:
    # z / T = [0, ln 3] -> p = [1/4, 3/4]; KL([1/2, 1/2] || p) = 1/2 ln 2 + 1/2 ln(2/3)
    #       = 1/2 ln(4/3)
    logits = torch.tensor([[0.0, 2 * math.log(3.0)]])
    loss = kd_loss(logits, torch.tensor([[0.5, 0.5]]), temperature=2.0, t_squared=t_squared)
    assert float(loss) == pytest.approx(factor * 0.5 * math.log(4 / 3))


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
        ({"teacher": "ensemble"}, "distillation.teacher"),
        ({"teacher": "sample_local"}, "distillation.teacher"),  # the old mode's name
        ({"t_squared": "yes"}, "distillation.t_squared"),
        ({"t_squared": 1}, "distillation.t_squared"),
    ],
)
def test_bad_dfl_knobs_raise_config_error(kwargs, key) -> None:
    with pytest.raises(ConfigError) as err:
        DFL(**kwargs)
    assert err.value.key == key
    assert "\n" not in str(err.value)  # one line, naming the key and what it accepts


# --- the term on real steps ----------------------------------------------------------------------
class _Bias(torch.nn.Module):
    """Logits = a trainable bias b (C,), whatever the input: d loss / d b is done by hand."""

    def __init__(self, num_classes: int = 2) -> None:
        super().__init__()
        self.bias = torch.nn.Parameter(torch.zeros(num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bias.expand(len(x), -1)


def _ctx(
    config: dict, state: RecordDict | None = None, received: RecordDict | None = None
) -> TrainContext:
    return TrainContext(
        0,
        2,
        ConfigRecord(config),
        torch.Generator().manual_seed(0),
        state if state is not None else RecordDict(),
        received if received is not None else RecordDict(),
    )


def _dfl_config(**kwargs) -> dict:
    return {keys.CLIENT_TERMS: ["dfl"], **DFL(**kwargs).train_config()}


def _class_targets(q: list[list[float]], count: list[float]) -> RecordDict:
    """What ``DFL.attach`` adds to a message for ``class_global``."""
    record = ArrayRecord({"q": torch.tensor(q), "count": torch.tensor(count)})
    return RecordDict({keys.DFL_CLASS_TARGETS: record})


def _stale_targets(soft: list[list[float]]) -> RecordDict:
    """A client state holding its last visit's per-sample soft targets."""
    return RecordDict(
        {
            keys.DFL_SOFT_TARGETS: ArrayRecord({"soft": torch.tensor(soft)}),
            keys.DFL_GENERATIONS: ConfigRecord({"count": 1}),
        }
    )


@pytest.mark.parametrize(
    ("teacher", "t_squared", "bias"),
    [
        # grad = (1 - b) (softmax(z) - onehot(y)) + b T^2 (1/T) (softmax(z / T) - q), z = 0,
        # T = 2, b = 0.5, q = [0.2, 0.8]: 0.5 [-0.5, 0.5] + 0.5 * 2 [0.3, -0.3] = [0.05, -0.05]
        ("stale_local", True, [-0.05, 0.05]),  # lr 1: bias = -grad
        ("class_global", True, [-0.05, 0.05]),  # the same q, read as Q[y = 0]
        # no T^2: 0.5 [-0.5, 0.5] + 0.5 / 2 [0.3, -0.3] = [-0.175, 0.175]
        ("stale_local", False, [0.175, -0.175]),
        ("class_global", False, [0.175, -0.175]),
    ],
)
def test_dfl_term_one_step_by_hand(teacher: str, t_squared: bool, bias: list[float]) -> None:
    model = _Bias()
    local = teacher == "stale_local"
    state = _stale_targets([[0.2, 0.8]]) if local else RecordDict()
    received = None if local else _class_targets([[0.2, 0.8], [0.5, 0.5]], [3, 0])
    config = _dfl_config(
        temperature=2.0, beta0=0.5, beta_schedule="constant", teacher=teacher, t_squared=t_squared
    )
    ctx = _ctx(config, state, received)
    data = {"x": torch.zeros(1, 1), "label": torch.tensor([0])}
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    train_loop(model, data, ctx, optimizer, local_epochs=1, batch_size=1)
    torch.testing.assert_close(model.bias.detach(), torch.tensor(bias))


@pytest.mark.parametrize(
    ("ready", "bias0"),
    [
        # T = 1, b = 0.5, lr 1, two samples of class 0, the received bias 0: q = [1/2, 1/2].
        # Step 1: z = 0 is the teacher itself, so KD adds nothing: 0.5 [-1/2, 1/2] -> z = [1/4,
        # -1/4]. Step 2: p = [s, 1 - s], s = sigmoid(1/2); grad_0 = 0.5 (s - 1) + 0.5 (s - 1/2)
        # = s - 3/4 -> bias_0 = 1/4 - (s - 3/4) = 1 - s.
        (True, 1 - 1 / (1 + math.exp(-0.5))),
        # the global model is the untrained initial one: no teacher, plain cross-entropy,
        # bias_0 = 1/2 + (1 - sigmoid(1)) (p after step 1 = softmax([1/2, -1/2]))
        (False, 0.5 + 1 - 1 / (1 + math.exp(-1.0))),
    ],
)
def test_global_teacher_is_the_received_model(ready: bool, bias0: float) -> None:
    behaviour = DFL(temperature=1.0, beta_schedule="constant", teacher="global").wrap(
        LocalSGD(local_epochs=1, batch_size=1, lr=1.0)
    )
    flag = RecordDict({keys.DFL_GLOBAL_READY: ConfigRecord({"ready": True})})
    ctx = _ctx({}, received=flag if ready else RecordDict())
    data = {"x": torch.zeros(2, 1), "label": torch.tensor([0, 0])}
    model = _Bias()
    outcome = behaviour.train(model, data, ctx)
    torch.testing.assert_close(model.bias.detach(), torch.tensor([bias0, -bias0]))
    assert outcome.metrics["log.dfl_teacher"] == float(ready)
    assert outcome.metrics["log.dfl_beta"] == (0.5 if ready else 0.0)
    assert keys.DFL_SOFT_TARGETS not in ctx.state  # nothing kept for the next round
    assert outcome.extra_upload_bytes == 0  # and nothing uploaded


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
    zero = _dfl_config(beta0=0.0, beta_schedule="constant", teacher="stale_local")
    for model, ctx in ((plain, _ctx({})), (kd, _ctx(zero, state))):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.3)
        train_loop(model, data, ctx, optimizer, local_epochs=2, batch_size=5)
    for a, b in zip(plain.parameters(), kd.parameters(), strict=True):
        assert torch.equal(a, b)


def test_distilled_behaviour_stores_soft_targets_in_client_state() -> None:
    torch.manual_seed(1)
    model = _Linear(2, 2)
    data = {"x": torch.randn(5, 2), "label": torch.tensor([0, 1, 0, 1, 1])}
    dfl = DFL(temperature=2.0, teacher="stale_local")
    behaviour = dfl.wrap(LocalSGD(local_epochs=1, batch_size=2, lr=0.1))
    ctx = _ctx({keys.CLIENT_TERMS: ["fedprox"], keys.PROXIMAL_MU: 0.1})
    outcome = behaviour.train(model, data, ctx)
    assert list(ctx.config[keys.CLIENT_TERMS]) == ["dfl", "fedprox"]  # dfl first: sees task loss
    soft = ctx.state[keys.DFL_SOFT_TARGETS]["soft"].numpy()
    with torch.no_grad():
        expected = torch.softmax(model(data["x"]) / 2.0, dim=1).numpy()
    np.testing.assert_allclose(soft, expected, rtol=1e-6)  # the trained model's predictions
    assert int(ctx.state[keys.DFL_GENERATIONS]["count"]) == 1
    assert outcome.extra_upload_bytes == 0  # stale_local: nothing leaves the device

    per_class = DFL(teacher="class_global").wrap(LocalSGD(local_epochs=1, batch_size=2))
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
    DFL(teacher="class_global").attach(messages, states)
    q = messages[1].content[keys.DFL_CLASS_TARGETS]["q"].numpy()
    np.testing.assert_allclose(q, [[0.75, 0.25], [0.0, 1.0]])  # (3 + 3) / 8, (2 + 2) / 4
    local = Message(RecordDict(), 1, "train")
    DFL(teacher="stale_local").attach([local], states)
    assert not local.content  # stale_local: the server sends nothing


def test_global_attach_says_when_the_model_has_trained(flower_identity) -> None:
    from flwr.app import Message

    dfl, untrained = DFL(teacher="global"), {0: RecordDict(), 1: RecordDict()}
    first = Message(RecordDict(), 1, "train")
    dfl.attach([first], untrained)  # nobody has trained: the initial model, no teacher
    assert keys.DFL_GLOBAL_READY not in first.content
    trained = {**untrained, 1: RecordDict({keys.DFL_GENERATIONS: ConfigRecord({"count": 1})})}
    later = Message(RecordDict(), 1, "train")
    dfl.attach([later], trained)
    assert keys.DFL_GLOBAL_READY in later.content
    assert keys.DFL_CLASS_TARGETS not in later.content  # no statistics travel


# --- one label space under PAE's key -------------------------------------------------------------
# Threat model: an honest-but-curious server sees every payload (under PAE, pi(y) = argmin delta
# for each sample) and must not learn a device's key pi. DFL's statistics must add nothing to it.
KEY = torch.tensor([1, 2, 0])  # pi: class c is trained at index KEY[c]; no class stays put
LABELS = torch.tensor([0, 0, 1, 2, 2, 2])  # true classes of six samples; pi(y) = [1, 1, 2, 0, 0, 0]


class _Perfect(torch.nn.Module):
    """Logits = 10 x: fed x = onehot(pi(y)), always right in the space it trains in."""

    def __init__(self) -> None:
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(1))  # SGD needs a parameter; its grad is 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 10.0 * x + 0.0 * self.unused


class _Keyed:
    """Trains and predicts where PAE's server does, on labels pi(y) (``SideTuning.predict``)."""

    batch_size = 2

    def __init__(self, key: torch.Tensor) -> None:
        self.key, self.inner = key, LocalSGD(local_epochs=1, batch_size=2)

    def train(self, model, data, ctx):
        return self.inner.train(model, {**data, "label": self.key[data["label"]]}, ctx)

    def predict(self, model, data, ctx):
        with torch.no_grad():
            return model(x=data["x"]), self.key[data["label"]]


def _two_rounds(key: torch.Tensor, labels: torch.Tensor):
    """Round 1 keeps class statistics, the server averages them, round 2 trains with ``Q``."""
    from flwr.app import Message

    data = {"x": torch.nn.functional.one_hot(key[labels], 3).float(), "label": labels}
    dfl, model = DFL(teacher="class_global"), _Perfect()
    behaviour = dfl.wrap(_Keyed(key))
    first = _ctx({})
    first_outcome = behaviour.train(model, data, first)
    message = Message(RecordDict(), 1, "train")
    dfl.attach([message], {0: first.state})
    received = RecordDict(dict(message.content.items()))
    return first.state, first_outcome, behaviour.train(model, data, _ctx({}, first.state, received))


def test_class_global_teacher_of_a_perfect_model_is_right_under_a_key(flower_identity) -> None:
    _, first, second = _two_rounds(KEY, LABELS)
    assert first.metrics["log.dfl_teacher"] == 0.0  # round 1: no statistics yet
    # Q's row pi(y) is softmax(10 onehot(pi(y)) / 3): its argmax is pi(y), every sample's target
    # (with rows by true y, the teacher of target pi(y) was row pi(y), argmax pi(pi(y)): 0 right)
    assert second.metrics["log.dfl_teacher"] == 1.0
    assert second.metrics["log.dfl_teacher_acc"] == 1.0
    assert second.metrics["log.dfl_model_acc"] == 1.0


def test_class_global_statistics_do_not_reveal_the_key(flower_identity) -> None:
    state, _, _ = _two_rounds(KEY, LABELS)
    stats = state[keys.DFL_CLASS_STATS]
    # What a device with no key whose labels were pi(y) uploads: a function of what the
    # server already sees (pi(y) and its own predictions), the same whatever the key.
    keyless = _two_rounds(torch.arange(3), KEY[LABELS])[0][keys.DFL_CLASS_STATS]
    for name in ("sums", "counts"):
        np.testing.assert_array_equal(stats[name].numpy(), keyless[name].numpy())
    # counts of pi(y); the true-label counts [2, 1, 3] would give pi away: matched by size,
    # [2, 1, 3][c] = [3, 2, 1][pi(c)]
    np.testing.assert_array_equal(stats["counts"].numpy(), [3, 2, 1])
    # each row: count x softmax(10 e_r / 3) = count x [e^(10/3), 1, 1] / (e^(10/3) + 2)
    top = math.exp(10 / 3) / (math.exp(10 / 3) + 2)  # 0.9334
    np.testing.assert_allclose(np.diag(stats["sums"].numpy()), [3 * top, 2 * top, top], rtol=1e-6)
    assert stats["sums"].numpy().argmax(axis=1).tolist() == [0, 1, 2]  # identity, not the key


def test_side_tuning_predicts_in_the_space_of_its_payloads(tmp_path: Path, monkeypatch) -> None:
    # The real PAE client: DFL's labels are what the server reads from the deltas, never y.
    import huggingface_hub.constants

    from fedsim.clients.side_tuning.tuning import SideTuning
    from fedsim.learning.data import ChatterbotData
    from fedsim.learning.models import TextClassifier

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    splits = ChatterbotData().load()
    client = SideTuning(
        local_epochs=1,
        batch_size=8,
        feature_cache_dir=str(tmp_path),
        additive=True,
        pivot_token=True,
        label_key_seed=11,
        per_device_keys=False,  # class_global needs one label space (refused per device)
    )
    factory = client.wrap_factory(TextClassifier(backbone="minilm", max_length=16))
    torch.manual_seed(0)
    model = factory.build(splits.num_classes)
    data = factory.featurize(splits.train.select(range(16)))
    sent: list = []
    client.uplink_observer = sent.append
    ctx = _ctx({})
    DFL(teacher="class_global").wrap(client).train(model, data, ctx)
    seen = {
        int(row): int(label)
        for payload in sent
        for row, label in zip(payload.sample_ids, payload.delta.float().argmin(dim=1), strict=True)
    }
    assert sorted(seen) == list(range(16))
    _, labels = client.predict(model, data, ctx)
    assert labels.tolist() == [seen[row] for row in range(16)]  # the server's own view
    key = client.device_key(model, ctx.partition_id)  # the fleet's one key here
    assert torch.equal(labels, key[data["label"]])
    counts = ctx.state[keys.DFL_CLASS_STATS]["counts"].numpy()
    np.testing.assert_array_equal(counts, np.bincount(labels.numpy(), minlength=len(counts)))


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
    ("overrides", "teacher"),
    [
        (["strategy=scaffold"], "global"),
        (["strategy=fedprox", "client=side_tuning", *TEXT], "stale_local"),
        (["client=pae_side_tuning", "client.per_device_keys=false", *TEXT], "class_global"),
        (["client=pae_side_tuning", *TEXT], "stale_local"),
        (["strategy=fedprox", "client=lora", *TEXT], "stale_local"),
    ],
    ids=["scaffold", "side_tuning", "pae_one_key", "pae_device_keys", "lora"],
)
def test_dfl_composes_with_strategies_and_clients(overrides, teacher, tmp_path: Path) -> None:
    cfg = compose_config(
        [
            *overrides,
            "distillation=dfl",
            f"distillation.teacher={teacher}",
            "num_clients=3",
            "num_rounds=2",
            "strategy.fraction_train=1.0",
            "strategy.min_train_nodes=3",
            "runtime.progress=false",
            "runtime.engine=inline",
        ]
    )
    summary = simulate(cfg, tmp_path / "run")
    assert summary["status"] == "completed"
    from fedsim.records.results import read_metrics

    rows = read_metrics(tmp_path / "run")
    assert [r["num_failed"] for r in rows] == [0, 0]  # round 2 trained with soft targets
    lines = (tmp_path / "run" / "clients.jsonl").read_text().splitlines()
    logged = [(row["round"], row["dfl_teacher"]) for row in map(json.loads, lines)]
    assert sorted(logged) == [(1, 0.0)] * 3 + [(2, 1.0)] * 3  # every client has one in round 2
    states = load_checkpoint(tmp_path / "run", Scaffold(), _hash(cfg)).client_states
    assert sorted(states) == [0, 1, 2]
    for state in states.values():
        assert int(state[keys.DFL_GENERATIONS]["count"]) == 2
        kept = {"stale_local": keys.DFL_SOFT_TARGETS, "class_global": keys.DFL_CLASS_STATS}
        assert teacher == "global" or kept[teacher] in state


def _hash(cfg) -> str:
    from fedsim.config import config_hash

    return config_hash(cfg)


@pytest.mark.parametrize("teacher", ["global", "class_global"])
def test_server_side_teachers_are_refused_with_per_device_keys(teacher: str) -> None:
    cfg = compose_config(["client=pae_side_tuning", *TEXT])
    client = instantiate(cfg.client)
    assert client.per_device_keys  # the default: each device its own label space
    with pytest.raises(ConfigError, match="must be stale_local with client.per_device_keys"):
        DFL(teacher=teacher).wrap(client)
    DFL(teacher="stale_local").wrap(client)  # the device's own teacher is fine
