"""On-device fine-tuning baselines through peft: LoRA, IA3, and full fine-tuning.

The device trains the whole classifier graph itself (forward *and* backward through the
backbone), with AdamW, for ``local_epochs`` passes; only the trainable tensors go on the wire:
the adapter tensors plus the classifier head (LoRA: Hu et al. 2021, arXiv 2106.09685; IA3: Liu et
al. 2022, arXiv 2205.05638), or every tensor for full fine-tuning. peft's own defaults pick the
adapted modules per architecture (``target_modules: null``): BERT's query/value (LoRA) and
key/value/FFN-output (IA3), GPT-2's c_attn, Llama's q/v_proj. ``method: full`` adds no adapter.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from fedsim.checks import is_int
from fedsim.clock.devices import count_train_flops, estimate_train_memory_bytes
from fedsim.clock.scheduler import DeviceCost
from fedsim.errors import ConfigError
from fedsim.learning.cost_backbone import (
    ADAMW_STATES,
    TrainStepCost,
    check_cost_seq_len,
    cost_seq_len_of,
    full_scale,
    load_cost_backbone,
    meta_model,
    train_step_cost,
    trainable_bytes,
)
from fedsim.learning.models import (
    ModelFactory,
    TextClassifier,
    TextClassifierModel,
    check_full_width,
)
from fedsim.training.contract import TrainContext, TrainOutcome
from fedsim.training.loop import check_max_grad_norm, train_loop

__all__ = ["PeftFactory", "PeftTuning"]

_METHODS = ("lora", "ia3", "full")


def _peft_config(method: str, adapter: Mapping[str, Any]) -> Any:
    """The peft config object for ``method`` (None for full fine-tuning)."""
    import peft

    classes = {"lora": peft.LoraConfig, "ia3": peft.IA3Config}
    if method == "full":
        if adapter:
            raise ConfigError("client.adapter", dict(adapter), "must be empty for method=full")
        return None
    try:
        return classes[method](**adapter)
    except TypeError as error:
        raise ConfigError(
            "client.adapter", dict(adapter), f"not a {method} config: {error}"
        ) from None


class PeftFactory:
    """Wraps a :class:`~fedsim.learning.models.TextClassifier`: its backbone gets a peft adapter."""

    def __init__(self, inner: TextClassifier, method: str, adapter: Mapping[str, Any]) -> None:
        if not isinstance(inner, TextClassifier):
            raise ConfigError(
                "model",
                type(inner).__name__,
                "peft clients need model=text_classifier (a transformers backbone)",
            )
        self.inner, self.method, self.adapter = inner, method, dict(adapter)
        _peft_config(method, self.adapter)  # fail at instantiation, not in a worker

    def build(self, num_classes: int, width: float = 1.0) -> TextClassifierModel:
        """The classifier with a peft-wrapped backbone; adapter inits use the caller's seed."""
        import peft

        check_full_width(width, f"client={self.method}")
        model = self.inner.build(num_classes)
        config = _peft_config(self.method, self.adapter)
        if config is not None:
            with warnings.catch_warnings():  # peft 0.21 calls a name transformers 5 deprecated
                warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
                model.backbone = peft.get_peft_model(model.backbone, config)  # freezes the base
        return model

    def featurize(self, ds: Any) -> dict[str, torch.Tensor]:
        """The classifier's token ids, attention mask and labels."""
        return self.inner.featurize(ds)


class PeftTuning:
    """Local AdamW training of a peft-adapted (or fully trainable) classifier on the device.

    Parameters
    ----------
    method
        ``lora``, ``ia3`` or ``full``.
    adapter
        Keyword arguments of ``peft.LoraConfig`` / ``peft.IA3Config`` (empty for ``full``).
    local_epochs, batch_size, lr, weight_decay, max_steps
        Local AdamW training per round; the optimizer state is fresh every round.
    max_grad_norm
        Clip every step's gradient to this global L2 norm (null = no clipping), the same for
        every strategy (fedsim/training/loop.py; default and source in conf/client/local_sgd.yaml).
    cost_backbone, cost_seq_len
        ``model.cost_backbone`` / ``model.cost_seq_len`` (the YAML reads them from the model):
        null charges the model that trains; a name charges the same method (this ``adapter``
        on that architecture, AdamW) on the clock instead (fedsim/learning/cost_backbone.py).

    """

    def __init__(
        self,
        *,
        method: str = "lora",
        adapter: Mapping[str, Any] | None = None,
        local_epochs: int = 2,
        batch_size: int = 16,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        max_steps: int | None = None,
        max_grad_norm: float | None = 10.0,
        cost_backbone: str | None = None,
        cost_seq_len: int | None = None,
    ) -> None:
        if method not in _METHODS:
            raise ConfigError("client.method", method, f"must be one of {list(_METHODS)}")
        for key, value, ok, accepted in (
            ("local_epochs", local_epochs, is_int(local_epochs, 1), "an integer >= 1"),
            ("batch_size", batch_size, is_int(batch_size, 1), "an integer >= 1"),
            ("lr", lr, isinstance(lr, int | float) and lr > 0, "a number > 0"),
            (
                "weight_decay",
                weight_decay,
                isinstance(weight_decay, int | float) and weight_decay >= 0,
                "a number >= 0",
            ),
            ("max_steps", max_steps, max_steps is None or is_int(max_steps, 1), "null or >= 1"),
        ):
            if not ok:
                raise ConfigError(f"client.{key}", value, f"must be {accepted}")
        if isinstance(adapter, DictConfig):  # Hydra hands nested YAML over as a DictConfig
            adapter = OmegaConf.to_container(adapter, resolve=True)  # type: ignore[assignment]
        self.method, self.adapter = method, dict(adapter or {})
        self.local_epochs, self.batch_size, self.lr = local_epochs, batch_size, float(lr)
        self.weight_decay, self.max_steps = float(weight_decay), max_steps
        self.max_grad_norm = check_max_grad_norm(max_grad_norm)
        self.cost_backbone = None if cost_backbone is None else load_cost_backbone(cost_backbone)
        self.cost_seq_len = check_cost_seq_len(cost_seq_len)
        self._on_backbone: dict[tuple, tuple[int, int, float]] = {}  # -> (FLOPs, bytes, scale)
        self._per_batch: dict[tuple, tuple[int, int]] = {}  # (batch size, shapes) -> (FLOPs, bytes)

    def wrap_factory(self, factory: ModelFactory) -> ModelFactory:
        """The classifier with the adapter applied to its backbone."""
        return PeftFactory(factory, self.method, self.adapter)  # type: ignore[arg-type]

    def train(
        self, model: nn.Module, data: dict[str, torch.Tensor], ctx: TrainContext
    ) -> TrainOutcome:
        """Train ``model`` in place with AdamW; batches shuffled with ``ctx.generator``."""
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        # The shared loop: the same steps as a plain loop, plus any client terms (FedProx, DFL).
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

    def device_cost(
        self, model: nn.Module, batch: dict[str, torch.Tensor], num_examples: int
    ) -> DeviceCost:
        """Training FLOPs and peak memory (AdamW: two states per trainable parameter)."""
        size = len(batch["label"])
        if self.cost_backbone is not None:
            return self._backbone_cost(model, batch, num_examples)
        # per batch size and sub-model shape (a width-sliced sub-model costs less)
        memo = (size, tuple(tuple(p.shape) for p in model.parameters() if p.requires_grad))
        if memo not in self._per_batch:
            inputs = {k: v for k, v in batch.items() if k != "label"}
            flops = count_train_flops(model, inputs, batch["label"])
            estimate = estimate_train_memory_bytes(model, inputs, batch["label"], optimizer="adam")
            self._per_batch[memo] = (flops, estimate.total)
        flops, memory = self._per_batch[memo]
        examples = self.round_examples(num_examples)
        return DeviceCost(train_flops=round(flops * examples / size), peak_memory_bytes=memory)

    def round_examples(self, num_examples: int) -> int:
        """Examples a round trains on: local epochs over the data, capped by the step limit."""
        examples = self.local_epochs * num_examples
        if self.max_steps is not None:
            examples = min(examples, self.max_steps * self.batch_size)
        return examples

    def backbone_step(self, batch_size: int, seq_len: int) -> TrainStepCost:
        """One step of this method (adapter, AdamW) on the cost backbone, counted on meta."""
        assert self.cost_backbone is not None
        return train_step_cost(
            self.cost_backbone,
            self.method,
            batch_size,
            seq_len,
            adapter=self.adapter,
            optimizer_states=ADAMW_STATES,
        )

    def backbone_payload_bytes(self) -> int:
        """Bytes of the cost backbone's trainable tensors: what travels each way per round."""
        assert self.cost_backbone is not None
        return trainable_bytes(meta_model(self.cost_backbone, self.method, self.adapter))

    def _backbone_cost(
        self, model: nn.Module, batch: dict[str, torch.Tensor], num_examples: int
    ) -> DeviceCost:
        """The round as this method on the cost backbone would cost it (causal-LM steps).

        FLOPs and memory of a step on batches of this size and ``cost_seq_len`` tokens, counted
        on the meta model with the same adapter arguments; the backbone's trainable tensors
        (adapters; every tensor for ``full``) travel each way instead of the trained model's.
        """
        assert self.cost_backbone is not None
        size, seq_len = len(batch["label"]), cost_seq_len_of(batch, self.cost_seq_len)
        memo = (size, seq_len, tuple(tuple(p.shape) for p in model.parameters() if p.requires_grad))
        if memo not in self._on_backbone:
            step = self.backbone_step(size, seq_len)
            scale = full_scale(self.backbone_payload_bytes(), model)
            self._on_backbone[memo] = (step.train_flops, step.memory.total, scale)
        flops, memory, scale = self._on_backbone[memo]
        examples = self.round_examples(num_examples)
        return DeviceCost(
            train_flops=round(flops * examples / size),
            peak_memory_bytes=memory,
            payload_scale=scale,
        )
