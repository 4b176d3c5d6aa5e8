"""DFL: distillation-based FL with soft targets (Liu et al., arXiv 2111.14347 / IEEE IoTJ 2023).

A client mixes knowledge distillation (KD) to a *teacher's* soft targets into its loss::

    (1 - beta) * CE(y, softmax(z)) + beta * T^2 * KL(q || softmax(z / T))       (Hinton KD form)

``teacher`` says where ``q`` comes from (methods.md 5.2-5.3):

* ``class_global`` (default; the IoTJ version): after local training a client keeps per-class
  sums of its soft vectors ``softmax(z / T)`` (C x C floats and C counts, uploaded); the server
  sends back their count-weighted average ``Q``, and a sample of class y gets ``q = Q[y]``. The
  default because it is what the paper describes: soft targets uploaded with the model update,
  aggregated by the server and dispatched for the next round, at negligible cost (C^2 + C
  floats against a model's thousands).
* ``stale_local`` (the arXiv wording, "local sample predictions ... used for the next round"):
  per-sample ``q(x)`` from the client's own model at the end of its previous visit; stays on the
  device. Under label skew and partial participation that model is many rounds old.
* ``global``: per-sample ``q(x)`` from the global model the client has just received, before it
  trains (one forward pass over its data, nothing extra on the wire).

Our decisions [D], behind knobs: the paper's equations were not available (methods.md 8, DFL):

* ``temperature`` 3.0 and ``beta0`` 0.5 (textbook KD values); ``t_squared`` (default true)
  scales the KD term by T^2 as Hinton et al. do, keeping its gradient, which shrinks as 1/T^2,
  on the scale of the cross-entropy's; false uses the bare KL.
* The dynamic ratio rule, ``beta_schedule``: ``acc_based`` (default) sets, at every step,
  ``beta = acc_soft / (acc_soft + acc_model)`` (methods.md 5.3): ``acc_soft`` is how often the
  teacher's argmax is the label and ``acc_model`` how often the model being trained predicts
  it, both running over this round's batches so far (no extra pass over the data).
  ``constant``: beta0. ``linear_up``: ``beta0 * min(1, generations / ramp_rounds)``, where a
  client's generation is 1 the first round it trains with a teacher.
* No teacher, no KD (beta = 0, plain cross-entropy): ``stale_local`` on a client's first visit;
  ``class_global`` until the server has statistics; ``global`` while the global model is still
  the untrained initial one (the server says when it has trained: ``DFL.attach``).
* ``class_global``: the server averages the latest per-class sums of *every* client that has
  trained so far (it keeps what each uploaded last, in that client's state): with 10% of the
  clients per round and label skew, one round's participants miss most classes. Classes no
  client has seen get no KD term. ``Q`` is a pure function of the client states, so a checkpoint
  (which saves them) restores it.

Every client term reads the teacher's targets and the labels in the one label space the
behaviour trains in. A behaviour that trains in its own label space (side-tuning: the server
trains on payloads; PAE's are key-permuted) defines ``predict`` returning logits *and* labels
in that space; otherwise the wrapper runs ``model(**inputs)`` in eval mode on the true labels.
So under PAE the per-class statistics have rows pi(y) and columns pi(c). Threat model: an
honest-but-curious server that sees every payload must not learn a device's key pi; the
statistics are computed from what it already holds (its own side network's predictions and
argmin(delta) = pi(y)), so they add nothing. True-label statistics would leak pi through the
counts alone (count_true[y] = count_seen[pi(y)]). The server then averages rows of clients that
share a label space; clients with different keys would mix spaces (as their heads would).

Composition, not a flag in every class: ``distillation=dfl`` wraps the client behaviour
(:class:`Distilled`, built by the worker and by the server's cost model). The wrapper puts the
``dfl`` client term *first* in the train config's term list, so the ``loss`` it receives is the
task loss alone and the strategy's own terms (FedProx, SCAFFOLD, ...) are added after it,
unscaled; around the inner round it runs the teacher's prediction pass (before: ``global``;
after: the others) and keeps what the next round needs in ``ctx.state`` (so it travels with the
client and is checkpointed). No strategy knows. Each client-round logs ``dfl_teacher``
(1 if it had one), ``dfl_teacher_acc``, ``dfl_model_acc`` and ``dfl_beta`` (means over the
round) to its ``clients.jsonl`` row.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

from fedsim import keys
from fedsim.clock.devices import count_forward_flops
from fedsim.clock.scheduler import DeviceCost
from fedsim.errors import ConfigError
from fedsim.learning.cost_backbone import cost_seq_len_of, forward_flops
from fedsim.learning.models import ModelFactory
from fedsim.learning.params import array_record
from fedsim.learning.placement import model_device
from fedsim.training.contract import (
    ClientBehaviour,
    NoDistillation,
    TrainContext,
    TrainOutcome,
    distillation_of,
)
from fedsim.training.loop import Batch, ClientTerm, LocalRun, TermOutput, register_term

__all__ = [
    "DFL",
    "DFLTerm",
    "Distilled",
    "NoDistillation",
    "average_class_targets",
    "class_target_sums",
    "dfl_beta",
    "distillation_of",
    "kd_loss",
    "soft_targets",
]

NAME = "dfl"
SCHEDULES = ("constant", "linear_up", "acc_based")
TEACHERS = ("class_global", "stale_local", "global")
_FLOAT_BYTES = 4  # per-class sums and counts travel as float32


# --- maths ---------------------------------------------------------------------------------------
def soft_targets(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``softmax(z / T)`` row-wise: (n, C) logits -> (n, C) probabilities."""
    return torch.softmax(logits.float() / temperature, dim=1)


def kd_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    temperature: float,
    mask: torch.Tensor | None = None,
    t_squared: bool = True,
) -> torch.Tensor:
    """``T^2 * mean_b KL(q_b || softmax(z_b / T))`` over the rows of ``mask`` (all by default).

    ``KL(q || p) = sum_c q_c (log q_c - log p_c)`` with ``0 log 0 = 0``. No row: 0. Without
    ``t_squared`` the mean KL itself.
    """
    log_p = torch.log_softmax(logits / temperature, dim=1)
    per_row = (torch.special.xlogy(targets, targets) - targets * log_p).sum(dim=1)  # (B,)
    if mask is not None:
        per_row = per_row[mask]
    if per_row.numel() == 0:
        return logits.sum() * 0.0  # keeps the graph, adds nothing
    return (temperature**2 if t_squared else 1.0) * per_row.mean()


def dfl_beta(
    schedule: str,
    beta0: float,
    generations: int,
    ramp_rounds: int,
    acc_soft: float,
    acc_model: float,
) -> float:
    """The KD weight of a step (module docstring); ``generations`` 0: no teacher, 0."""
    if generations == 0:
        return 0.0
    if schedule == "constant":
        return beta0
    if schedule == "linear_up":
        return beta0 * min(1.0, generations / ramp_rounds)
    if acc_soft + acc_model == 0:
        return beta0  # neither is right on anything yet: no evidence either way
    return acc_soft / (acc_soft + acc_model)


def class_target_sums(
    probs: torch.Tensor, labels: torch.Tensor, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per class y of ``labels``: the sum of its samples' soft vectors (C, C) and their count (C,).

    ``labels`` and the columns of ``probs`` must be in one label space (module docstring).
    """
    sums = torch.zeros(num_classes, probs.shape[1], dtype=torch.float64)
    sums.index_add_(0, labels.long(), probs.double())
    counts = torch.bincount(labels.long(), minlength=num_classes).double()
    return sums.numpy(), counts.numpy()


def average_class_targets(
    stats: Iterable[tuple[np.ndarray, np.ndarray]],
) -> tuple[np.ndarray, np.ndarray]:
    """Count-weighted mean soft vector per class over clients: (Q (C, C), counts (C,)).

    A class no client holds gets a zero row and count 0.
    """
    total_sums: np.ndarray | None = None
    total_counts: np.ndarray | None = None
    for sums, counts in stats:
        total_sums = sums.copy() if total_sums is None else total_sums + sums
        total_counts = counts.copy() if total_counts is None else total_counts + counts
    if total_sums is None or total_counts is None:
        raise ValueError("no client statistics to average")
    safe = np.where(total_counts > 0, total_counts, 1.0)[:, None]
    return total_sums / safe, total_counts


# --- the client term -----------------------------------------------------------------------------
def _generations(state: RecordDict) -> int:
    meta = state.get(keys.DFL_GENERATIONS)
    if not isinstance(meta, ConfigRecord):
        return 0
    count = meta["count"]
    assert isinstance(count, int)  # Distilled.train writes an int
    return int(count)


@register_term(NAME)
class DFLTerm(ClientTerm):
    """Mixes the task loss with KD to the teacher's soft targets (module docstring)."""

    def __init__(self, config: ConfigRecord) -> None:
        super().__init__(config)
        self.temperature = float(keys.number(config, keys.DFL_TEMPERATURE))
        self.beta0 = float(keys.number(config, keys.DFL_BETA0))
        self.schedule = str(config[keys.DFL_SCHEDULE])
        self.ramp_rounds = int(keys.number(config, keys.DFL_RAMP_ROUNDS))
        self.teacher = str(config[keys.DFL_TEACHER])
        self.t_squared = bool(config[keys.DFL_T_SQUARED])

    def before_train(self, model: torch.nn.Module, ctx: TrainContext) -> None:
        """Read the teacher's targets: per sample (n, C) or, ``class_global``, per class (C, C)."""
        self.targets: torch.Tensor | None = None
        self.known: torch.Tensor | None = None  # (C,) bool: classes with a global target
        source = {"stale_local": ctx.state, "global": ctx.received}.get(self.teacher)
        name = keys.DFL_SOFT_TARGETS if self.teacher == "stale_local" else keys.DFL_GLOBAL_TARGETS
        if source is not None and name in source:
            self.targets = torch.from_numpy(array_record(source, name)["soft"].numpy()).float()
        elif self.teacher == "class_global" and keys.DFL_CLASS_TARGETS in ctx.received:
            record = array_record(ctx.received, keys.DFL_CLASS_TARGETS)
            self.targets = torch.from_numpy(record["q"].numpy()).float()
            self.known = (torch.from_numpy(record["count"].numpy()) > 0).to(ctx.device)
        if self.targets is not None:  # where the logits are (a no-op on CPU)
            self.targets = self.targets.to(ctx.device)
        # linear_up's ramp: 1 the first round this client trains with a teacher. The client's
        # own count (rounds under DFL) is the stale_local targets' generation; a server-side
        # teacher is there from the client's first round, which then counts as the first.
        own = _generations(ctx.state) + int(self.teacher != "stale_local")
        self.generations = 0 if self.targets is None else own
        self.seen = self.taught = self.soft_right = self.model_right = 0
        self.betas: list[float] = []

    def loss(self, model: torch.nn.Module, batch: Batch, loss: torch.Tensor) -> torch.Tensor:
        """``(1 - beta) * loss + beta * T^2 * KL(q || softmax(z / T))``; ``loss`` = task loss."""
        labels = batch.labels.long()  # (B,), in the space the behaviour trains in
        with torch.no_grad():
            self.seen += len(labels)
            self.model_right += int((batch.logits.argmax(dim=1) == labels).sum())
        if self.targets is None:
            return loss  # no teacher: plain cross-entropy, bit for bit
        if self.known is None:  # per sample: the rows of the client's data
            if batch.indices is None:
                raise RuntimeError("the dfl term needs the batch's sample rows (Batch.indices)")
            q, mask = self.targets[batch.indices.long()], torch.ones_like(labels, dtype=torch.bool)
        else:  # per class: Q's rows are in that same space (Distilled.train)
            q, mask = self.targets[labels], self.known[labels]
        with torch.no_grad():
            self.taught += int(mask.sum())
            self.soft_right += int(((q.argmax(dim=1) == labels) & mask).sum())
        beta = dfl_beta(
            self.schedule,
            self.beta0,
            self.generations,
            self.ramp_rounds,
            self.soft_right / max(self.taught, 1),
            self.model_right / self.seen,
        )
        self.betas.append(beta)
        kd = kd_loss(batch.logits, q, self.temperature, mask, self.t_squared)
        return (1.0 - beta) * loss + beta * kd

    def after_train(self, model: torch.nn.Module, ctx: TrainContext, run: LocalRun) -> TermOutput:
        """Log (clients.jsonl) whether it had a teacher, both accuracies and the mean beta."""
        log = keys.LOG_PREFIX
        return TermOutput(
            metrics={
                f"{log}dfl_teacher": float(self.targets is not None),
                f"{log}dfl_teacher_acc": self.soft_right / max(self.taught, 1),
                f"{log}dfl_model_acc": self.model_right / max(self.seen, 1),
                f"{log}dfl_beta": sum(self.betas) / len(self.betas) if self.betas else 0.0,
            }
        )


# --- the behaviour wrapper -----------------------------------------------------------------------
def predict_logits(
    model: torch.nn.Module, data: Mapping[str, torch.Tensor], batch_size: int
) -> torch.Tensor:
    """Logits (n, C) of ``model`` in eval mode on every row of ``data`` (no autograd).

    Batches run where the model lives; the logits come back on CPU (they go into records).
    """
    was_training = model.training
    model.eval()
    n = len(data["label"])
    device = model_device(model)
    with torch.no_grad():
        chunks = [
            model(
                **{
                    k: v[start : start + batch_size].to(device)
                    for k, v in data.items()
                    if k != "label"
                }
            )
            for start in range(0, n, batch_size)
        ]
    model.train(was_training)
    return torch.cat(chunks).float().cpu()


class Distilled:
    """A client behaviour with DFL's term and teacher added (module docstring)."""

    def __init__(self, inner: ClientBehaviour, dfl: DFL) -> None:
        self.inner, self.dfl = inner, dfl
        self.batch_size = inner.batch_size
        self._forward: dict[tuple, int] = {}  # (batch size, shapes) -> forward FLOPs per batch

    def wrap_factory(self, factory: ModelFactory) -> ModelFactory:
        """The inner behaviour's model."""
        return self.inner.wrap_factory(factory)

    def device_cost(
        self, model: torch.nn.Module, batch: dict[str, torch.Tensor], num_examples: int
    ) -> DeviceCost:
        """The inner cost plus the teacher's prediction pass: one forward over the client's data.

        A behaviour with its own ``predict`` (side-tuning) predicts on the server, from payloads
        it receives anyway; that forward through the side network is not charged. With a cost
        backbone (``model.cost_backbone``) the inner cost is that architecture's, so the teacher's
        forward is too: a causal-LM forward (LM head included, as its training step counts it)
        over the same tokens per sample, counted on the meta model.
        """
        cost = self.inner.device_cost(model, batch, num_examples)
        if hasattr(self.inner, "predict"):
            return cost
        size = len(batch["label"])
        backbone = getattr(self.inner, "cost_backbone", None)
        if backbone is not None:  # cached per shape by forward_flops
            seq_len = cost_seq_len_of(batch, getattr(self.inner, "cost_seq_len", None))
            forward = forward_flops(backbone, size, seq_len, lm_head=True)
        else:
            memo = (size, tuple(tuple(p.shape) for p in model.parameters()))
            if memo not in self._forward:
                inputs = {k: v for k, v in batch.items() if k != "label"}
                self._forward[memo] = count_forward_flops(model, inputs)
            forward = self._forward[memo]
        extra = round(forward * num_examples / size)
        return dataclasses.replace(cost, train_flops=cost.train_flops + extra)

    def predict(
        self, model: torch.nn.Module, data: dict[str, torch.Tensor], ctx: TrainContext
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (n, C) and labels (n,) in the label space the inner behaviour trains in."""
        inner = getattr(self.inner, "predict", None)
        if inner is not None:
            return inner(model, data, ctx)
        return predict_logits(model, data, self.batch_size), data["label"].long()

    def train(
        self, model: torch.nn.Module, data: dict[str, torch.Tensor], ctx: TrainContext
    ) -> TrainOutcome:
        """The inner round with the ``dfl`` term first, the teacher's prediction pass around it."""
        asked = ctx.config.get(keys.CLIENT_TERMS, [])
        assert isinstance(asked, list)  # of term names
        terms = [NAME, *(str(t) for t in asked if t != NAME)]
        ctx.config = ConfigRecord(
            {**ctx.config, **self.dfl.train_config(), keys.CLIENT_TERMS: terms}
        )
        temperature, teacher = self.dfl.temperature, self.dfl.teacher
        if teacher == "global" and keys.DFL_GLOBAL_READY in ctx.received:
            logits, _ = self.predict(model, data, ctx)  # the received model, before training
            soft = soft_targets(logits, temperature).contiguous()  # (n, C)
            ctx.received[keys.DFL_GLOBAL_TARGETS] = ArrayRecord({"soft": soft})
        outcome = self.inner.train(model, data, ctx)
        extra_bytes = 0
        if teacher == "stale_local":  # per sample, stays on the device
            soft = soft_targets(self.predict(model, data, ctx)[0], temperature)
            ctx.state[keys.DFL_SOFT_TARGETS] = ArrayRecord({"soft": soft.contiguous()})
        elif teacher == "class_global":  # per class, rows and columns in the training space
            logits, labels = self.predict(model, data, ctx)
            num_classes = logits.shape[1]
            sums, counts = class_target_sums(soft_targets(logits, temperature), labels, num_classes)
            ctx.state[keys.DFL_CLASS_STATS] = ArrayRecord(
                {"sums": torch.from_numpy(sums), "counts": torch.from_numpy(counts)}
            )
            if not hasattr(self.inner, "predict"):  # made on the server otherwise: not uploaded
                extra_bytes = (num_classes * num_classes + num_classes) * _FLOAT_BYTES
        ctx.state[keys.DFL_GENERATIONS] = ConfigRecord({"count": _generations(ctx.state) + 1})
        return dataclasses.replace(
            outcome, extra_upload_bytes=outcome.extra_upload_bytes + extra_bytes
        )


# --- the config group: conf/distillation/{none,dfl}.yaml ------------------------------------------
# ``distillation=none`` is ``fedsim.training.contract.NoDistillation`` (imported above: its YAML
# names it here, so that old run folders resume unchanged).


class DFL:
    """``distillation=dfl``; YAML keys = these arguments (conf/distillation/dfl.yaml).

    Parameters
    ----------
    temperature
        T of the soft targets and of the KD term (> 0).
    beta0
        KD weight of ``constant`` and ``linear_up``, and ``acc_based``'s when it has no evidence.
    beta_schedule
        ``acc_based``, ``constant`` or ``linear_up`` (module docstring).
    ramp_rounds
        ``linear_up``: rounds with a teacher until beta reaches beta0.
    teacher
        ``class_global`` (per class, averaged by the server), ``stale_local`` (per sample, the
        client's own model from its last visit) or ``global`` (per sample, the received model).
    t_squared
        Scale the KD term by T^2 (Hinton) or not.

    """

    def __init__(
        self,
        *,
        temperature: float = 3.0,
        beta0: float = 0.5,
        beta_schedule: str = "acc_based",
        ramp_rounds: int = 5,
        teacher: str = "class_global",
        t_squared: bool = True,
    ) -> None:
        number = (int, float)
        checks = (
            (
                "temperature",
                temperature,
                isinstance(temperature, number) and temperature > 0,
                "a number > 0",
            ),
            ("beta0", beta0, isinstance(beta0, number) and 0 <= beta0 <= 1, "a number in [0, 1]"),
            ("beta_schedule", beta_schedule, beta_schedule in SCHEDULES, f"one of {SCHEDULES}"),
            (
                "ramp_rounds",
                ramp_rounds,
                isinstance(ramp_rounds, int)
                and not isinstance(ramp_rounds, bool)
                and ramp_rounds >= 1,
                "an integer >= 1",
            ),
            ("teacher", teacher, teacher in TEACHERS, f"one of {TEACHERS}"),
        )
        for key, value, ok, accepted in checks:
            if not ok or isinstance(value, bool):
                raise ConfigError(f"distillation.{key}", value, f"must be {accepted}")
        if not isinstance(t_squared, bool):
            raise ConfigError("distillation.t_squared", t_squared, "must be true or false")
        self.temperature, self.beta0 = float(temperature), float(beta0)
        self.beta_schedule, self.ramp_rounds = beta_schedule, ramp_rounds
        self.teacher, self.t_squared = teacher, t_squared

    def train_config(self) -> dict[str, Any]:
        """The knobs the ``dfl`` term reads from the train config."""
        return {
            keys.DFL_TEMPERATURE: self.temperature,
            keys.DFL_BETA0: self.beta0,
            keys.DFL_SCHEDULE: self.beta_schedule,
            keys.DFL_RAMP_ROUNDS: self.ramp_rounds,
            keys.DFL_TEACHER: self.teacher,
            keys.DFL_T_SQUARED: self.t_squared,
        }

    def wrap(self, behaviour: ClientBehaviour) -> Distilled:
        """``behaviour`` with DFL added.

        A behaviour whose devices each train in a label space of their own (PAE side-tuning
        with ``per_device_keys``) admits only the device's own teacher: server-side targets
        (``global``, ``class_global``) would average or read across those spaces.
        """
        if getattr(behaviour, "per_device_keys", False) and self.teacher != "stale_local":
            raise ConfigError(
                "distillation.teacher",
                self.teacher,
                "must be stale_local with client.per_device_keys=true (each device trains in "
                "its own label space; server-side targets would mix them), or set "
                "client.per_device_keys=false",
            )
        return Distilled(behaviour, self)

    def attach(self, messages: Sequence[Message], states: Mapping[int, RecordDict]) -> None:
        """The server piece of DFL, outside every strategy, added to every message.

        The round loop calls it between the strategy's ``configure_train`` and sending.
        ``class_global``: the per-class average (C x C + C floats of downlink); no client
        statistics yet, nothing. ``global``: a flag once some client's update has been kept, so
        the model sent is no longer the untrained initial one. ``stale_local``: nothing.
        """
        contents = {id(m.content): m.content for m in messages}.values()
        if self.teacher == "global":
            if any(keys.DFL_GENERATIONS in state for state in states.values()):
                for content in contents:
                    content[keys.DFL_GLOBAL_READY] = ConfigRecord({"ready": True})
            return
        if self.teacher != "class_global":
            return
        stats = [
            (record["sums"].numpy(), record["counts"].numpy())
            for _, state in sorted(states.items())
            if isinstance(record := state.get(keys.DFL_CLASS_STATS), ArrayRecord)
        ]
        if not stats:
            return
        q, counts = average_class_targets(stats)
        record = ArrayRecord(
            {"q": torch.from_numpy(q).float(), "count": torch.from_numpy(counts).float()}
        )
        for content in contents:
            content[keys.DFL_CLASS_TARGETS] = record
