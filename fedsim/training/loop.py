"""The one mini-batch training loop, and the client terms strategies plug into it.

A strategy that changes local training (FedProx's proximal term, SCAFFOLD's control variates,
FedDyn's linear term, FedSpeed's perturbed gradient, MOON's contrastive term) is not a flag in
every client class: the strategy names a *client term* in the train config
(``keys.CLIENT_TERMS``) and :func:`train_loop` builds it for the client-round and calls its
hooks, in this order::

    before_train(model, ctx)                 once, the received global model loaded
    loss(model, batch, loss) -> loss         every step, after the forward pass
    after_backward(model, recompute)         every step, gradients in .grad, before the step
    [clip]                                   every step: the shared ``client.max_grad_norm``
    before_step(model)                       every step, after the clip (weight decay only)
    after_step(model)                        every step, after the optimizer step
    after_train(model, ctx, run) -> TermOutput   once: records for the reply, metrics

**The same training rules for every strategy** (issue 14): every client behaviour steps through
:func:`optimizer_step`, which clips the trainable parameters' gradient by its global norm
(``torch.nn.utils.clip_grad_norm_``) to ``client.max_grad_norm`` *after* every term's ``loss``
and ``after_backward`` hook and *before* the optimizer step. So the clip sees the whole loss
gradient: the task loss, FedProx's and MOON's loss terms, DFL's distillation term, and what
SCAFFOLD (c - c_i), FedDyn (linear + quadratic term) and FedSpeed (SAM gradient + prox-correction)
add to ``.grad``; no strategy clips privately and no loss gradient bypasses the clip. This is
FL-Simulator's rule (``client/client.py`` and every algorithm's client: ``loss.backward()``,
``clip_grad_norm_(max_norm=10)``, ``optimizer.step()``), where SCAFFOLD's correction is a loss
term and so clipped. Weight decay is not clipped, as in FL-Simulator where it lives inside the
SGD optimizer: the optimizer's own ``weight_decay``, and FedSpeed's extra decay lambda * w
(FL-Simulator: ``SGD(weight_decay=wd + lamb)``), which FedSpeed adds in ``before_step``; that
hook is for such optimizer-side terms only, never for a loss gradient.

A term object lives for one client-round, so per-round scratch (e.g. a copy of the global
weights) is plain attributes; what must survive rounds goes to ``ctx.state``. Terms are
registered by name (:func:`register_term`). A name unknown to the process is imported as the
module ``fedsim.strategies.<name>``: a strategy file registers its own client term, and Ray
workers need no import list. Flower's FedProx announces its term by its own key
(``proximal-mu``), which selects the ``fedprox`` term defined here.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import TypeVar

import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from fedsim import keys
from fedsim.errors import ConfigError
from fedsim.learning.models import forward_with_features
from fedsim.learning.params import array_record
from fedsim.training.contract import TrainContext, TrainOutcome

__all__ = [
    "Batch",
    "BatchStep",
    "ClientTerm",
    "LocalRun",
    "TermOutput",
    "build_terms",
    "check_max_grad_norm",
    "clip_gradients",
    "optimizer_step",
    "register_term",
    "snapshot",
    "state_tensors",
    "train_loop",
    "trainable",
]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
#: One mini-batch of a method that is not "forward the batch, take the loss" (side-tuning: the
#: device's payload, then the server's loss on it): rows of the client's data -> (the loss with
#: the terms' loss hooks applied, a function that recomputes the gradient of that loss for
#: terms that need a second backward pass, as SAM in FedSpeed).
BatchStep = Callable[[torch.Tensor], tuple[torch.Tensor, Callable[[], None]]]


@dataclass
class Batch:
    """One mini-batch after the forward pass."""

    inputs: dict[str, torch.Tensor]
    labels: torch.Tensor  # (B,) int64
    logits: torch.Tensor  # (B, C)
    features: torch.Tensor | None = None  # (B, D) representation, if a term needs_features
    indices: torch.Tensor | None = None  # (B,) int64 rows of the client's data (per-sample state)


@dataclass(frozen=True)
class LocalRun:
    """What the loop did, for terms that scale by it (SCAFFOLD's K * lr, FedNova's ||a_i||_1)."""

    num_steps: int
    lr: float  # the optimizer's learning rate (first parameter group)
    momentum: float  # SGD momentum (0 for optimizers without one)


@dataclass
class TermOutput:
    """What a term adds to the reply: records (arrays for the strategy) and metrics."""

    records: dict[str, ArrayRecord] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)


class ClientTerm:
    """A change to local training, built per client-round from the train config.

    Every hook is a no-op here; a term overrides the ones it needs. ``needs_features`` asks the
    loop for the representation (``Batch.features``) of every forward pass.
    """

    needs_features: bool = False

    def __init__(self, config: ConfigRecord) -> None:
        self.config = config

    def before_train(self, model: torch.nn.Module, ctx: TrainContext) -> None:
        """Once per client-round, with the received global model loaded."""

    def loss(self, model: torch.nn.Module, batch: Batch, loss: torch.Tensor) -> torch.Tensor:
        """The batch loss with this term added (``loss`` is the task loss plus earlier terms)."""
        return loss

    def after_backward(self, model: torch.nn.Module, recompute: Callable[[], None]) -> None:
        """Edit ``.grad`` before the optimizer step.

        ``recompute()`` recomputes the batch loss at the model's current weights and
        backpropagates it into fresh gradients (e.g. SAM's second gradient).
        """

    def before_step(self, model: torch.nn.Module) -> None:
        """Edit ``.grad`` after the shared clip, right before the optimizer step.

        Only for what an optimizer would add itself (decoupled weight decay): a loss gradient
        belongs in ``loss`` or ``after_backward``, where the clip sees it.
        """

    def after_step(self, model: torch.nn.Module) -> None:
        """After every optimizer step."""

    def after_train(self, model: torch.nn.Module, ctx: TrainContext, run: LocalRun) -> TermOutput:
        """Once after local training: update ``ctx.state``, return what the reply carries."""
        return TermOutput()


_TERMS: dict[str, type[ClientTerm]] = {}
T = TypeVar("T", bound=type[ClientTerm])


def register_term(name: str) -> Callable[[T], T]:
    """Class decorator: make a :class:`ClientTerm` selectable by ``name`` in the train config."""

    def register(cls: T) -> T:
        _TERMS[name] = cls
        return cls

    return register


def _term_class(name: str) -> type[ClientTerm]:
    if name not in _TERMS and name.isidentifier():
        try:  # a strategy file registers its own client term when imported
            importlib.import_module(f"fedsim.strategies.{name}")
        except ModuleNotFoundError:
            pass
    if name not in _TERMS:
        raise KeyError(f"unknown client term {name!r}; registered: {sorted(_TERMS)}")
    return _TERMS[name]


def build_terms(config: ConfigRecord) -> list[ClientTerm]:
    """The client terms the train config asks for, in the order named."""
    asked = config.get(keys.CLIENT_TERMS, [])
    assert isinstance(asked, list)  # of term names
    names = [str(name) for name in asked]
    if keys.number(config, keys.PROXIMAL_MU, 0.0) > 0 and "fedprox" not in names:
        names.append("fedprox")  # Flower's FedProx sends only its own key
    return [_term_class(name)(config) for name in names]


# --- helpers for terms ---------------------------------------------------------------------------
def trainable(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The parameters that train (and travel), keyed as in ``state_dict``."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Detached copies of the trainable parameters (e.g. the global model before training)."""
    return {name: p.detach().clone() for name, p in trainable(model).items()}


def state_tensors(
    state: RecordDict, name: str, like: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Tensors kept in ``state[name]``, or zeros shaped like ``like`` for a first round.

    Each on the device of its namesake in ``like`` (the model's): the state travels on CPU.
    """
    if name in state:
        kept = array_record(state, name).to_torch_state_dict()
        return {
            key: value.to(like[key].device) if key in like else value for key, value in kept.items()
        }
    return {key: torch.zeros_like(value) for key, value in like.items()}


# --- the step, shared by every client behaviour --------------------------------------------------
def check_max_grad_norm(value: object) -> float | None:
    """``client.max_grad_norm`` as a float (null: no clipping), or a one-line ConfigError."""
    if value is None:
        return None
    ok = isinstance(value, int | float) and not isinstance(value, bool) and value > 0
    if not ok:  # also refuses NaN (NaN > 0 is False)
        raise ConfigError("client.max_grad_norm", value, "must be null (no clip) or a number > 0")
    return float(value)  # type: ignore[arg-type]


def clip_gradients(model: torch.nn.Module, max_grad_norm: float | None) -> None:
    """Scale the trainable parameters' ``.grad`` so their global L2 norm is <= ``max_grad_norm``.

    One norm over all tensors (not per tensor), as ``torch.nn.utils.clip_grad_norm_``: a
    gradient (3, 4) with max norm 1 becomes (0.6, 0.8); below the norm nothing changes.
    """
    if max_grad_norm is not None:
        params = [p for p in model.parameters() if p.requires_grad and p.grad is not None]
        torch.nn.utils.clip_grad_norm_(params, max_norm=max_grad_norm)


def optimizer_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    terms: Sequence[ClientTerm],
    recompute: Callable[[], None],
    max_grad_norm: float | None,
) -> None:
    """One step after ``loss.backward()``: terms' gradients, the clip, the update (module doc)."""
    for term in terms:
        term.after_backward(model, recompute)
    clip_gradients(model, max_grad_norm)
    for term in terms:
        term.before_step(model)
    optimizer.step()
    for term in terms:
        term.after_step(model)


# --- the loop ------------------------------------------------------------------------------------
def _batch_loss(
    model: torch.nn.Module,
    inputs: dict[str, torch.Tensor],
    labels: torch.Tensor,
    loss_fn: LossFn,
    terms: Sequence[ClientTerm],
    needs_features: bool,
    indices: torch.Tensor | None = None,
) -> torch.Tensor:
    if needs_features:
        logits, features = forward_with_features(model, inputs)
    else:
        logits, features = model(**inputs), None
    batch = Batch(inputs, labels, logits, features, indices)
    loss = loss_fn(logits, labels)
    for term in terms:
        loss = term.loss(model, batch, loss)
    return loss


def _backward(
    optimizer: torch.optim.Optimizer,
    model: torch.nn.Module,
    inputs: dict[str, torch.Tensor],
    labels: torch.Tensor,
    loss_fn: LossFn,
    terms: Sequence[ClientTerm],
    needs_features: bool,
    indices: torch.Tensor | None = None,
) -> None:
    optimizer.zero_grad(set_to_none=True)
    _batch_loss(model, inputs, labels, loss_fn, terms, needs_features, indices).backward()


def _forward_step(
    model: torch.nn.Module,
    data: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    loss_fn: LossFn,
    terms: Sequence[ClientTerm],
    needs_features: bool,
    device: torch.device,
    idx: torch.Tensor,
) -> tuple[torch.Tensor, Callable[[], None]]:
    """The plain batch step: forward the rows through ``model``, the task loss plus terms.

    The rows are picked on CPU (where the client's data and the batch order live) and only the
    batch moves to ``device``: a whole partition never has to fit on the GPU.
    """
    inputs = {k: v[idx].to(device) for k, v in data.items() if k != "label"}
    labels = data["label"][idx].to(device)
    loss = _batch_loss(model, inputs, labels, loss_fn, terms, needs_features, idx)
    recompute = partial(
        _backward, optimizer, model, inputs, labels, loss_fn, terms, needs_features, idx
    )
    return loss, recompute


def step_budget(
    config: ConfigRecord,
    local_epochs: int,
    max_steps: int | None,
    num_examples: int,
    batch_size: int,
) -> tuple[int, int | None]:
    """(epochs, step cap) of a client-round: the client's own, or what the strategy asked.

    A strategy that sets ``fedsim.local-steps`` = Q in the train config (FedCompass) gets
    exactly Q mini-batch steps: as many shuffled passes as Q needs, the last one cut short.
    """
    asked = config.get(keys.LOCAL_STEPS)
    if asked is None:
        return local_epochs, max_steps
    steps = int(keys.number(config, keys.LOCAL_STEPS))
    per_epoch = max(1, math.ceil(num_examples / batch_size))
    return math.ceil(steps / per_epoch), steps


def train_loop(
    model: torch.nn.Module,
    data: dict[str, torch.Tensor],
    ctx: TrainContext,
    optimizer: torch.optim.Optimizer,
    *,
    local_epochs: int,
    batch_size: int,
    max_steps: int | None = None,
    loss_fn: LossFn = torch.nn.functional.cross_entropy,
    terms: Sequence[ClientTerm] | None = None,
    max_grad_norm: float | None = None,
    batch_step: BatchStep | None = None,
) -> TrainOutcome:
    """Train ``model`` in place: ``local_epochs`` shuffled passes of mini-batch steps.

    ``data`` holds the model's inputs and ``"label"`` (first dim = examples); ``model(**inputs)``
    gives logits (B, C) and ``loss_fn(logits, labels)`` the task loss. Batches are shuffled with
    ``ctx.generator``; at most ``max_steps`` steps run (or what the strategy asked,
    :func:`step_budget`). ``terms`` default to those the train config names
    (:func:`build_terms`). The reported loss includes the terms' loss hooks. Every step clips
    the gradient to ``max_grad_norm`` (None: no clip; :func:`optimizer_step`).

    A method whose batch is not a forward pass of ``model`` supplies ``batch_step`` (rows ->
    loss and its recompute; ``loss_fn`` is then unused): the budget, the shuffling, the hook
    order, the shared clip and the outcome stay this loop's, for every method alike.

    ``model`` lives on ``ctx.device`` (the worker put it there); each batch is moved there. The
    batch order is drawn on CPU from ``ctx.generator``, so it is the same on every device.
    """
    terms = build_terms(ctx.config) if terms is None else list(terms)
    labels_all = data["label"]
    n = len(labels_all)
    if batch_step is None:
        needs_features = any(term.needs_features for term in terms)
        batch_step = partial(
            _forward_step, model, data, optimizer, loss_fn, terms, needs_features, ctx.device
        )
    local_epochs, max_steps = step_budget(ctx.config, local_epochs, max_steps, n, batch_size)
    model.train()
    for term in terms:
        term.before_train(model, ctx)
    steps, loss_sum = 0, 0.0
    for _ in range(local_epochs):
        order = torch.randperm(n, generator=ctx.generator)
        for start in range(0, n, batch_size):
            if max_steps is not None and steps >= max_steps:
                break
            loss, recompute = batch_step(order[start : start + batch_size])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer_step(model, optimizer, terms, recompute, max_grad_norm)
            steps += 1
            loss_sum += float(loss.detach())
    group = optimizer.param_groups[0]
    run = LocalRun(steps, float(group["lr"]), float(group.get("momentum", 0.0)))
    records: dict[str, ArrayRecord] = {}
    metrics: dict[str, float] = {}
    for term in terms:
        out = term.after_train(model, ctx, run)
        records.update(out.records)
        metrics.update(out.metrics)
    return TrainOutcome(
        num_examples=n,
        num_steps=steps,
        mean_loss=loss_sum / max(steps, 1),
        metrics=metrics,
        records=records,
    )


@register_term("fedprox")
class ProximalTerm(ClientTerm):
    """FedProx: (mu / 2) * ||w - w_global||^2 added to the loss (Li et al., MLSys 2020, eq. 2).

    ``mu`` is Flower FedProx's ``proximal-mu``; w_global is the received model.
    """

    def __init__(self, config: ConfigRecord) -> None:
        super().__init__(config)
        self.mu = float(keys.number(config, keys.PROXIMAL_MU, 0.0))

    def before_train(self, model: torch.nn.Module, ctx: TrainContext) -> None:
        """Keep the global weights the proximal term pulls towards."""
        self.params = list(trainable(model).values())
        self.anchor = [p.detach().clone() for p in self.params]

    def loss(self, model: torch.nn.Module, batch: Batch, loss: torch.Tensor) -> torch.Tensor:
        """``loss + (mu / 2) * sum ||w - w_global||^2`` over the trainable tensors."""
        prox = sum(((p - g) ** 2).sum() for p, g in zip(self.params, self.anchor, strict=True))
        return loss + 0.5 * self.mu * prox
