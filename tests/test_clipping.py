"""The same training rules for every strategy: one ``client.max_grad_norm`` (issue 14).

Every client behaviour steps through ``fedsim/training/loop.py``'s ``optimizer_step``: the terms'
gradients, then the clip of the trainable parameters' global gradient norm, then the optimizer.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import datasets
import huggingface_hub.constants
import pytest
import torch
from conftest import cnn_and_data as _cnn_and_data
from flwr.app import ArrayRecord, ConfigRecord, RecordDict
from torch.optim.optimizer import register_optimizer_step_pre_hook

from fedsim import keys
from fedsim.clients.local_sgd import LocalSGD
from fedsim.clients.peft_tuning import PeftTuning
from fedsim.clients.side_tuning.tuning import SideTuning
from fedsim.config import compose_config
from fedsim.engine.simulation import simulate
from fedsim.errors import ConfigError
from fedsim.learning.data import ChatterbotData
from fedsim.learning.models import TextClassifier
from fedsim.records.results import read_metrics
from fedsim.strategies.fedspeed import FedSpeedTerm, sam_perturbation
from fedsim.training.contract import TrainContext
from fedsim.training.loop import clip_gradients, train_loop, trainable

TINY_NORM = 1e-3  # below every gradient norm of these models: every step is clipped


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """MiniLM and chatterbot are local: a hub lookup must fail at once instead of retrying."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


# --- the clip by hand -----------------------------------------------------------------------------
def _grad_model(grad: list[float]) -> torch.nn.Linear:
    """A bias-free Linear(2, 1) at w = 0 whose loss ``w . grad`` has gradient ``grad``."""
    model = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.zero_()
    model(torch.tensor([grad])).sum().backward()
    return model


@pytest.mark.parametrize(
    ("max_norm", "expected"),
    [
        (1.0, [0.6, 0.8]),  # ||(3, 4)|| = 5 > 1: scaled by 1 / 5
        (2.5, [1.5, 2.0]),  # scaled by 2.5 / 5
        (10.0, [3.0, 4.0]),  # 5 <= 10: unchanged
        (None, [3.0, 4.0]),  # null: no clipping
    ],
)
def test_clip_gradients_by_hand(max_norm: float | None, expected: list[float]) -> None:
    model = _grad_model([3.0, 4.0])
    clip_gradients(model, max_norm)
    torch.testing.assert_close(model.weight.grad, torch.tensor([expected]), atol=1e-6, rtol=0)


def test_clip_is_one_global_norm_over_all_tensors() -> None:
    model = torch.nn.Linear(1, 1)  # weight and bias: two tensors
    model.weight.grad, model.bias.grad = torch.tensor([[3.0]]), torch.tensor([4.0])
    clip_gradients(model, 1.0)  # the norm of (3, 4) together is 5, not 3 and 4 apart
    assert float(model.weight.grad) == pytest.approx(0.6, abs=1e-6)
    assert float(model.bias.grad) == pytest.approx(0.8, abs=1e-6)


def test_train_loop_step_uses_the_clipped_gradient() -> None:
    model = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.zero_()
    data = {"input": torch.tensor([[3.0, 4.0]]), "label": torch.zeros(1)}
    ctx = TrainContext(0, 1, ConfigRecord(), torch.Generator().manual_seed(0), RecordDict())
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    train_loop(
        model,
        data,
        ctx,
        optimizer,
        local_epochs=1,
        batch_size=1,
        loss_fn=lambda out, _: out.sum(),
        max_grad_norm=1.0,
    )
    # gradient (3, 4) -> clipped (0.6, 0.8); w = 0 - 1.0 * (0.6, 0.8)
    torch.testing.assert_close(
        model.weight.detach(), torch.tensor([[-0.6, -0.8]]), atol=1e-6, rtol=0
    )


# --- bad values and the one default ---------------------------------------------------------------
@pytest.mark.parametrize("client_cls", [LocalSGD, PeftTuning, SideTuning])
@pytest.mark.parametrize("value", [0, -1.0, "10", True, float("nan")])
def test_bad_max_grad_norm_is_refused_naming_the_key(client_cls: type, value: object) -> None:
    with pytest.raises(ConfigError) as info:
        client_cls(max_grad_norm=value)
    assert info.value.key == "client.max_grad_norm"
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("client_cls", [LocalSGD, PeftTuning, SideTuning])
def test_good_max_grad_norm_is_kept(client_cls: type) -> None:
    assert client_cls(max_grad_norm=None).max_grad_norm is None
    assert client_cls(max_grad_norm=3).max_grad_norm == 3.0


def test_every_client_option_has_the_same_default() -> None:
    options = sorted(p.stem for p in (Path(__file__).parents[1] / "conf/client").glob("*.yaml"))
    defaults = {o: compose_config([f"client={o}"]).client.max_grad_norm for o in options}
    assert set(defaults.values()) == {10.0}, defaults  # FL-Simulator's max norm, for everyone


# --- every client behaviour clips, whatever the strategy's term -----------------------------------
@contextmanager
def step_norms() -> Iterator[list[float]]:
    """The global gradient norm of each optimizer's parameters, seen just before each step."""
    norms: list[float] = []

    def record(optimizer: torch.optim.Optimizer, args: object, kwargs: object) -> None:
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        norms.append(float(torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads]))))

    handle = register_optimizer_step_pre_hook(record)
    try:
        yield norms
    finally:
        handle.remove()


def _assert_clipped(norms: list[float], max_norm: float) -> None:
    assert norms, "no optimizer step ran"
    # at most max_norm, and at it (the clip ran: every unclipped norm here is far above it);
    # 1e-4: float32 rounding of a norm over ~10^5 entries, measured up to 1.7e-5 relative
    assert all(max_norm * (1 - 1e-3) <= n <= max_norm * (1 + 1e-4) for n in norms), norms


def _context(config: dict | None = None, received: RecordDict | None = None) -> TrainContext:
    return TrainContext(
        0,
        1,
        ConfigRecord(config or {}),
        torch.Generator().manual_seed(0),
        RecordDict(),
        received if received is not None else RecordDict(),
    )


def _ones_like(model: torch.nn.Module) -> ArrayRecord:
    return ArrayRecord({k: torch.ones_like(p) for k, p in trainable(model).items()})


# Every kind of term: loss terms (FedProx, MOON), terms that add to .grad after backward
# (SCAFFOLD with c - c_i = 1 on every weight, FedDyn), and FedSpeed's SAM second gradient.
TERMS: dict[str, tuple[dict, Callable[[torch.nn.Module], RecordDict]]] = {
    "none": ({}, lambda m: RecordDict()),
    "fedprox": ({keys.PROXIMAL_MU: 0.1}, lambda m: RecordDict()),
    "moon": (
        {keys.CLIENT_TERMS: ["moon"], keys.MOON_MU: 1.0, keys.MOON_TEMPERATURE: 0.5},
        lambda m: RecordDict(),
    ),
    "scaffold": (
        {keys.CLIENT_TERMS: ["scaffold"]},
        lambda m: RecordDict({keys.SCAFFOLD_CONTROL: _ones_like(m)}),
    ),
    "feddyn": ({keys.CLIENT_TERMS: ["feddyn"], keys.FEDDYN_ALPHA: 0.1}, lambda m: RecordDict()),
    # lamb = 0: FedSpeed's decay lambda * w, added after the clip, is tested further down
    "fedspeed": (
        {keys.CLIENT_TERMS: ["fedspeed"], keys.FEDSPEED_RHO: 0.1, keys.FEDSPEED_LAMBDA: 0.0},
        lambda m: RecordDict(),
    ),
}


@pytest.mark.parametrize("term", sorted(TERMS))
def test_local_sgd_clips_every_step_after_every_term(term: str) -> None:
    config, received = TERMS[term]
    model, data = _cnn_and_data()
    client = LocalSGD(local_epochs=2, batch_size=4, lr=0.1, max_grad_norm=TINY_NORM)
    with step_norms() as norms:
        client.train(model, data, _context(config, received(model)))
    assert len(norms) == 6  # 12 rows / 4 x 2 epochs
    _assert_clipped(norms, TINY_NORM)


def test_local_sgd_without_clip_sees_the_raw_norms() -> None:
    model, data = _cnn_and_data()
    with step_norms() as norms:
        LocalSGD(local_epochs=1, batch_size=4, max_grad_norm=None).train(model, data, _context())
    assert min(norms) > 100 * TINY_NORM  # what the clipped runs above cut down


@pytest.fixture(scope="module")
def texts() -> datasets.Dataset:
    return ChatterbotData().load().train.select(range(16))


@pytest.fixture(scope="module")
def minilm() -> TextClassifier:
    return TextClassifier(backbone="minilm", max_length=16)


@pytest.mark.parametrize(
    "make_client",
    [
        pytest.param(
            lambda tmp: PeftTuning(
                method="lora", local_epochs=1, batch_size=8, max_grad_norm=TINY_NORM
            ),
            id="lora",
        ),
        pytest.param(
            lambda tmp: SideTuning(
                local_epochs=1, batch_size=8, max_grad_norm=TINY_NORM, feature_cache_dir=str(tmp)
            ),
            id="side_tuning",
        ),
    ],
)
@pytest.mark.parametrize("term", ["none", "scaffold"])
def test_text_clients_clip_every_step(make_client, term, minilm, texts, tmp_path) -> None:
    client = make_client(tmp_path)
    factory = client.wrap_factory(minilm)
    torch.manual_seed(0)
    model = factory.build(21)
    data = factory.featurize(texts)
    config, received = TERMS[term]
    with step_norms() as norms:
        client.train(model, data, _context(config, received(model)))
    assert len(norms) == 2  # 16 rows / 8, one epoch
    _assert_clipped(norms, TINY_NORM)


# --- FedSpeed: the shared clip gives its old private clip's update --------------------------------
class _PrivateClipFedSpeed(FedSpeedTerm):
    """FedSpeed's client step as it was before issue 14: its own clip inside ``after_backward``."""

    def __init__(self, config: ConfigRecord, grad_clip: float) -> None:
        super().__init__(config)
        self.grad_clip = grad_clip

    def after_backward(self, model: torch.nn.Module, recompute: Callable[[], None]) -> None:
        params = trainable(model)
        with_grad = {k: p for k, p in params.items() if p.grad is not None}
        steps = sam_perturbation([p.grad for p in with_grad.values()], self.rho)
        with torch.no_grad():
            for p, e in zip(with_grad.values(), steps, strict=True):
                p.add_(e)
        recompute()
        with torch.no_grad():
            for p, e in zip(with_grad.values(), steps, strict=True):
                p.sub_(e)
            for name, p in params.items():
                p.grad.add_(self.correction[name])
        torch.nn.utils.clip_grad_norm_(list(params.values()), max_norm=self.grad_clip)
        with torch.no_grad():
            for p in params.values():
                p.grad.add_(p, alpha=self.lamb)

    def before_step(self, model: torch.nn.Module) -> None:
        """The decay was already added above."""


def _fedspeed_run(max_grad_norm: float | None, private_clip: float | None) -> torch.nn.Module:
    model, data = _cnn_and_data()
    config = ConfigRecord(
        {keys.CLIENT_TERMS: ["fedspeed"], keys.FEDSPEED_RHO: 0.1, keys.FEDSPEED_LAMBDA: 0.1}
    )
    gen = torch.Generator().manual_seed(5)
    dual = {k: 0.05 * torch.randn(p.shape, generator=gen) for k, p in trainable(model).items()}
    ctx = TrainContext(
        3,
        2,
        config,
        torch.Generator().manual_seed(1),
        RecordDict({keys.FEDSPEED_DUAL: ArrayRecord(dual)}),
    )
    terms = None if private_clip is None else [_PrivateClipFedSpeed(config, private_clip)]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=1e-3)
    train_loop(
        model,
        data,
        ctx,
        optimizer,
        local_epochs=2,
        batch_size=4,
        terms=terms,
        max_grad_norm=max_grad_norm,
    )
    return model


def test_fedspeed_shared_clip_equals_its_old_private_clip() -> None:
    # Both clip g2 + lambda (h_i - w_t) and add the decay lambda * w after the clip (as
    # FL-Simulator, whose decay is inside SGD), so the updates agree to the bit.
    shared = _fedspeed_run(max_grad_norm=0.5, private_clip=None)
    private = _fedspeed_run(max_grad_norm=None, private_clip=0.5)
    unclipped = _fedspeed_run(max_grad_norm=None, private_clip=None)
    for (name, a), b in zip(shared.named_parameters(), private.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    assert any(
        not torch.equal(a, c)
        for a, c in zip(shared.parameters(), unclipped.parameters(), strict=True)
    )  # the clip of 0.5 did act


# --- SCAFFOLD at the zoo's settings no longer diverges --------------------------------------------
@pytest.mark.slow
def test_scaffold_at_lr_0_2_does_not_diverge_with_the_clip(tmp_path: Path) -> None:
    # conf/experiment/zoo_digits.yaml's data (40 clients, Dirichlet 0.1, client lr 0.2) on the
    # uniform fleet, with every client in every round: the control-variate loop runs fastest.
    # Without the clip (client.max_grad_norm=null) this run's loss was 2.3 until round 9, then
    # 71 at round 10 and 1.2e8 at round 11; round 12 was NaN (status "diverged").
    cfg = compose_config(
        [
            "strategy=scaffold",
            "client.lr=0.2",
            "partition=dirichlet",
            "partition.alpha=0.1",
            "num_clients=40",
            "strategy.fraction_train=1.0",
            "num_rounds=12",
            "seed=0",
            "checkpoint_every=0",
            "eval.num_clients_final=0",
            "runtime.progress=false",
            "runtime.engine=inline",
        ]
    )
    summary = simulate(cfg, tmp_path / "run")
    losses = [r["loss"] for r in read_metrics(tmp_path / "run")]
    assert summary["status"] == "completed" and len(losses) == 12
    assert all(math.isfinite(x) for x in losses) and max(losses) < 2.5, losses
    assert losses[-1] < losses[0], losses
