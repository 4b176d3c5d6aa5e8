"""Local SGD: the client of FedAvg and its server-side variants (FedProx, FedAvgM, FedOpt).

A client trains the received model for ``local_epochs`` passes over its partition with mini-batch
SGD (the shared loop of ``fedsim/training/loop.py``), then uploads its trainable tensors. Whatever a
strategy changes in local training (FedProx's proximal term when it sends ``proximal-mu``,
SCAFFOLD's control variates, ...) is a client term the loop adds; this class knows none of them.
"""

from __future__ import annotations

import torch

from fedsim.checks import is_int, is_number
from fedsim.clock.devices import count_train_flops, estimate_train_memory_bytes
from fedsim.clock.scheduler import DeviceCost
from fedsim.errors import ConfigError
from fedsim.learning.cost_backbone import (
    check_cost_seq_len,
    cost_seq_len_of,
    full_scale,
    load_cost_backbone,
    meta_model,
    train_step_cost,
    trainable_bytes,
)
from fedsim.learning.models import ModelFactory
from fedsim.training.contract import TrainContext, TrainOutcome
from fedsim.training.loop import check_max_grad_norm, train_loop

__all__ = ["LocalSGD"]


class LocalSGD:
    """Mini-batch SGD on the client's own data.

    Parameters
    ----------
    local_epochs
        Passes over the partition per round.
    batch_size
        Examples per step (the last batch of an epoch may be smaller).
    lr
        Learning rate.
    momentum
        SGD momentum; the optimizer state is fresh every round (clients are stateless here).
    weight_decay
        L2 penalty.
    max_steps
        Optional cap on steps per round (null = no cap), e.g. to bound very large partitions.
    max_grad_norm
        Clip every step's gradient to this global L2 norm (null = no clipping), the same for
        every strategy (fedsim/training/loop.py; default and source in conf/client/local_sgd.yaml).
    cost_backbone, cost_seq_len
        ``model.cost_backbone`` / ``model.cost_seq_len`` (the YAML reads them from the model):
        null charges the model that trains; a name charges that architecture's full fine-tuning
        with this SGD (fedsim/learning/cost_backbone.py) on the clock instead.

    """

    def __init__(
        self,
        *,
        local_epochs: int = 1,
        batch_size: int = 32,
        lr: float = 0.2,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        max_steps: int | None = None,
        max_grad_norm: float | None = 10.0,
        cost_backbone: str | None = None,
        cost_seq_len: int | None = None,
    ) -> None:
        for key, value, ok, accepted in (
            ("local_epochs", local_epochs, is_int(local_epochs, 1), "an integer >= 1"),
            ("batch_size", batch_size, is_int(batch_size, 1), "an integer >= 1"),
            ("lr", lr, is_number(lr) and lr > 0, "a number > 0"),
            ("momentum", momentum, is_number(momentum) and 0 <= momentum < 1, "in [0, 1)"),
            ("weight_decay", weight_decay, is_number(weight_decay) and weight_decay >= 0, ">= 0"),
            ("max_steps", max_steps, max_steps is None or is_int(max_steps, 1), "null or >= 1"),
        ):
            if not ok:
                raise ConfigError(f"client.{key}", value, f"must be {accepted}")
        self.local_epochs = local_epochs
        self.batch_size = batch_size
        self.lr = lr
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.max_steps = max_steps
        self.max_grad_norm = check_max_grad_norm(max_grad_norm)
        self.cost_backbone = None if cost_backbone is None else load_cost_backbone(cost_backbone)
        self.cost_seq_len = check_cost_seq_len(cost_seq_len)
        self._on_backbone: dict[tuple, tuple[int, int, float]] = {}  # -> (FLOPs, bytes, scale)
        self._per_batch: dict[tuple, tuple[int, int]] = {}  # (batch size, shapes) -> (FLOPs, bytes)

    def wrap_factory(self, factory: ModelFactory) -> ModelFactory:
        """Plain SGD trains the model as the model group builds it."""
        return factory

    def device_cost(
        self, model: torch.nn.Module, batch: dict[str, torch.Tensor], num_examples: int
    ) -> DeviceCost:
        """FLOPs and peak memory of a client-round, counted on the real model and batch shape.

        FLOPs of one full batch are counted once (torch's FlopCounterMode) and scaled by the
        examples the round processes: matmul and conv FLOPs are linear in the batch size.
        """
        size = len(batch["label"])
        examples = self.local_epochs * num_examples
        if self.max_steps is not None:
            examples = min(examples, self.max_steps * self.batch_size)
        if self.cost_backbone is not None:
            return self._backbone_cost(model, batch, examples)
        # per batch size and sub-model shape (a width-sliced sub-model costs less)
        memo = (size, tuple(tuple(p.shape) for p in model.parameters() if p.requires_grad))
        if memo not in self._per_batch:
            inputs = {k: v for k, v in batch.items() if k != "label"}
            flops = count_train_flops(model, inputs, batch["label"])
            estimate = estimate_train_memory_bytes(
                model, inputs, batch["label"], optimizer="sgd", momentum=self.momentum > 0
            )
            self._per_batch[memo] = (flops, estimate.total)
        flops, memory = self._per_batch[memo]
        return DeviceCost(
            train_flops=round(flops * examples / size),
            peak_memory_bytes=memory,
            train_examples=examples,  # what a measured seconds-per-example table multiplies
        )

    def _backbone_cost(
        self, model: torch.nn.Module, batch: dict[str, torch.Tensor], examples: int
    ) -> DeviceCost:
        """The round as full fine-tuning of the cost backbone with this SGD would cost it.

        Causal-LM steps on batches of this size and ``cost_seq_len`` tokens (FLOPs scale with
        the examples as above); every backbone tensor travels each way (``payload_scale``).
        No ``train_examples``: a measured seconds-per-example table is of another model.
        """
        assert self.cost_backbone is not None
        size, seq_len = len(batch["label"]), cost_seq_len_of(batch, self.cost_seq_len)
        memo = (size, seq_len, tuple(tuple(p.shape) for p in model.parameters() if p.requires_grad))
        if memo not in self._on_backbone:
            step = train_step_cost(
                self.cost_backbone,
                "full",
                size,
                seq_len,
                optimizer_states=1 if self.momentum > 0 else 0,
            )
            scale = full_scale(trainable_bytes(meta_model(self.cost_backbone)), model)
            self._on_backbone[memo] = (step.train_flops, step.memory.total, scale)
        flops, memory, scale = self._on_backbone[memo]
        return DeviceCost(
            train_flops=round(flops * examples / size),
            peak_memory_bytes=memory,
            payload_scale=scale,
        )

    def train(
        self, model: torch.nn.Module, data: dict[str, torch.Tensor], ctx: TrainContext
    ) -> TrainOutcome:
        """Train ``model`` in place on ``data``; batches are shuffled with ``ctx.generator``."""
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(
            params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay
        )
        return train_loop(
            model,
            data,
            ctx,
            optimizer,
            local_epochs=self.local_epochs,
            batch_size=self.batch_size,
            max_steps=self.max_steps,
            max_grad_norm=self.max_grad_norm,
        )
