"""Cost backbones: the architecture the simulated clock charges, apart from the model that trains.

The model that trains here is small (MiniLM-L6, 22 M parameters, or a CNN), so that a CPU can run
a federation; the devices the mission is about fine-tune 0.5-1.5 B parameter LLMs. A cost backbone
(``model.cost_backbone``, a file ``conf/cost_backbone/<name>.yaml`` holding fields copied from a
hub repo's config.json) is built from its config on the meta device: exact shapes, no weights,
no memory. Accuracy still comes from the model that trains; FLOPs, device memory and the bytes
that travel come from here. Every output of such a run names the backbone (``cost_backbone``).

What is counted, per batch of B samples of T tokens (N = B x T), float32 throughout (the trained
model is charged in float32 too; mixed precision would halve weights and activations):

* **FLOPs**: ``torch.utils.flop_counter.FlopCounterMode`` runs on meta tensors, so a causal-LM
  step (forward with the LM head at every position, cross-entropy on the next token) is counted
  as the trained model's is (2 FLOPs per multiply-accumulate, element-wise ops 0). The backward
  asks for the gradients of the trainable tensors only (``torch.autograd.grad``): LoRA and IA3
  pay the input-gradient chain down to their first adapter, not the weight gradients of the
  frozen base. The check: a forward is 2 x parameters x tokens within 10% (tests).
* **Training memory** = parameters (all) + gradients (trainable) + optimizer states (AdamW: 2,
  SGD with momentum: 1, plain SGD: 0 per trainable value) + the activations autograd saves for
  backward, measured on the meta model (``saved_tensors_hooks``, deduplicated by storage, as
  ``fedsim.clock.devices.estimate_train_memory_bytes`` does on real tensors). peft builds LoRA
  and IA3 on the meta model with the client's own adapter arguments (null target modules =
  peft's default for the architecture, e.g. q_proj and v_proj of Qwen2 and Llama).
* **Frozen forward** (MobiLLM side-tuning's device): FLOPs of the base model without its LM head
  (the device stops at the last tapped layer; the side network's head is on the server), memory
  from the side-tuning method's own formula (weights + kept hidden states + one layer's working
  set), applied to the meta model by the method.
* **Bytes that travel**: trainable-state bytes (:func:`trainable_bytes`) and quantized
  activations at the tapped layers (:func:`activation_bytes_per_vector`, the wire format of
  ``clients/side_tuning/quantize.py``).
"""

from __future__ import annotations

import functools
import json
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from fedsim.config import CONF_DIR
from fedsim.errors import ConfigError
from fedsim.learning.params import arrays_nbytes, to_arrays

__all__ = [
    "CostBackbone",
    "MemoryBreakdown",
    "TrainStepCost",
    "activation_bytes_per_vector",
    "check_cost_seq_len",
    "cost_backbone_names",
    "cost_seq_len_of",
    "full_scale",
    "forward_flops",
    "load_cost_backbone",
    "meta_model",
    "train_step_cost",
    "trainable_bytes",
]

#: Where the shipped architectures are (``fedsim/conf/cost_backbone/`` in a wheel).
BACKBONE_DIR = CONF_DIR / "cost_backbone"
_FLOAT32_BYTES = 4
_FLOAT16_BYTES = 2  # a per-token quantization scale (clients/side_tuning/quantize.py)
_BITS_PER_BYTE = 8
#: Optimizer states per trainable value: AdamW keeps exp_avg and exp_avg_sq.
ADAMW_STATES = 2


@dataclass(frozen=True)
class CostBackbone:
    """One shipped architecture: its name, where its numbers come from, the config fields."""

    name: str
    source: str  # the config.json the fields were copied from
    published_params: int  # the parameter count its authors publish (tests compare the build)
    config: Mapping[str, Any]  # transformers config fields, ``model_type`` included

    @functools.cached_property
    def hf_config(self) -> Any:
        """The ``transformers`` config object (attribute maps give ``hidden_size`` for GPT-2)."""
        from transformers import AutoConfig

        fields = dict(self.config)
        return AutoConfig.for_model(fields.pop("model_type"), **fields)

    @property
    def hidden_size(self) -> int:
        """Width d of the residual stream (what a tapped layer's vector holds)."""
        return int(self.hf_config.hidden_size)

    @property
    def num_layers(self) -> int:
        """Transformer layers L (the layers side-tuning can tap)."""
        return int(self.hf_config.num_hidden_layers)


def cost_backbone_names() -> list[str]:
    """Names ``model.cost_backbone`` accepts: the files of ``conf/cost_backbone/``."""
    return sorted(p.stem for p in BACKBONE_DIR.glob("*.yaml"))


@functools.cache
def load_cost_backbone(name: str) -> CostBackbone:
    """The shipped architecture ``name``; an unknown name is a one-line ConfigError."""
    names = cost_backbone_names()
    if not isinstance(name, str) or name not in names:
        raise ConfigError("model.cost_backbone", name, f"must be null or one of {names}")
    raw = yaml.safe_load(Path(BACKBONE_DIR, f"{name}.yaml").read_text())
    return CostBackbone(
        name=name,
        source=str(raw["source"]),
        published_params=int(raw["published_params"]),
        config=dict(raw["config"]),
    )


def check_cost_seq_len(value: object) -> int | None:
    """``model.cost_seq_len``: null (the trained batch's length) or tokens per sample >= 1."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError("model.cost_seq_len", value, "must be null or an integer >= 1")
    return value


def _adapter_key(method: str, adapter: Mapping[str, Any]) -> str:
    return json.dumps([method, dict(adapter)], sort_keys=True, default=str)


def _config_key(backbone: CostBackbone) -> str:
    """What the caches below are keyed by: the architecture's fields (not its name)."""
    return json.dumps(dict(backbone.config), sort_keys=True)


def _from_key(config_key: str) -> CostBackbone:
    return CostBackbone("", "", 0, json.loads(config_key))


@functools.cache
def _meta_model(config_key: str, adapter_key: str) -> nn.Module:
    from transformers import AutoModelForCausalLM

    method, adapter = json.loads(adapter_key)
    backbone = _from_key(config_key)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(backbone.hf_config)
    if method in ("lora", "ia3"):
        import peft

        config_class = {"lora": peft.LoraConfig, "ia3": peft.IA3Config}[method]
        config = config_class(task_type="CAUSAL_LM", **adapter)
        with torch.device("meta"), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
            warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")  # GPT-2's Conv1D
            model = peft.get_peft_model(model, config)  # freezes the base, as on the device
    elif method == "frozen":
        model.requires_grad_(False)
    return model


def meta_model(
    backbone: CostBackbone, method: str = "full", adapter: Mapping[str, Any] | None = None
) -> nn.Module:
    """The causal LM of ``backbone`` on the meta device, as ``method`` trains it (cached).

    ``method``: ``full`` (every tensor trains), ``lora`` / ``ia3`` (peft with ``adapter``'s
    keyword arguments; the base is frozen) or ``frozen`` (nothing trains).
    """
    if method not in ("full", "lora", "ia3", "frozen"):
        raise ValueError(f"method must be full, lora, ia3 or frozen, got {method!r}")
    return _meta_model(_config_key(backbone), _adapter_key(method, adapter or {}))


def _ids(batch_size: int, seq_len: int) -> torch.Tensor:
    return torch.zeros(batch_size, seq_len, dtype=torch.long, device="meta")


@functools.cache
def _forward_flops(config_key: str, batch_size: int, seq_len: int, lm_head: bool) -> int:
    model = meta_model(_from_key(config_key), "frozen")
    module: Any = model if lm_head else model.base_model  # the decoder without its LM head
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(input_ids=_ids(batch_size, seq_len))
    return int(counter.get_total_flops())


def forward_flops(backbone: CostBackbone, batch_size: int, seq_len: int, lm_head: bool) -> int:
    """FLOPs of one forward pass over a (batch_size, seq_len) batch, counted on the meta model.

    ``lm_head=False`` stops after the last layer (a side-tuning device); with it, the logits
    over the vocabulary at every position (a causal-LM fine-tuning step's forward).
    """
    return _forward_flops(_config_key(backbone), batch_size, seq_len, lm_head)


@dataclass(frozen=True)
class MemoryBreakdown:
    """Bytes one training step holds on the device (float32)."""

    params: int  # every parameter, trainable or frozen
    grads: int  # trainable parameters only
    optimizer_state: int  # states x trainable parameters
    activations: int  # tensors autograd saves for backward, deduplicated by storage

    @property
    def total(self) -> int:
        """Peak device memory of the step: the sum of the parts."""
        return self.params + self.grads + self.optimizer_state + self.activations


@dataclass(frozen=True)
class TrainStepCost:
    """One on-device training step of a batch on a cost backbone."""

    train_flops: int  # forward + backward of the trainable tensors, the whole batch
    memory: MemoryBreakdown
    num_params: int
    trainable_params: int


def trainable_bytes(model: nn.Module) -> int:
    """Bytes of the trainable tensors: what a device uploads (and downloads) per round."""
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


def _saved_activation_bytes(model: nn.Module, loss_fn: Any) -> int:
    """Bytes autograd saves for backward while ``loss_fn()`` runs, deduplicated by storage.

    Meta tensors have no addresses (every ``data_ptr`` is 0), so storages are told apart by
    their C++ object (``_cdata``); holding them keeps that key from being reused in the pass.
    """
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    saved: dict[int, torch.UntypedStorage] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage._cdata not in params:
            saved[storage._cdata] = storage
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss_fn()
    return sum(storage.nbytes() for storage in saved.values())


@functools.cache
def _train_step_cost(
    config_key: str, adapter_key: str, batch_size: int, seq_len: int, optimizer_states: int
) -> TrainStepCost:
    method, adapter = json.loads(adapter_key)
    model = meta_model(_from_key(config_key), method, adapter)
    ids = _ids(batch_size, seq_len)
    trainable = [p for p in model.parameters() if p.requires_grad]

    def loss() -> torch.Tensor:  # next-token cross-entropy over the batch (labels = inputs)
        return model(input_ids=ids, labels=ids).loss

    with FlopCounterMode(display=False) as counter:
        torch.autograd.grad(loss(), trainable)
    num_params = sum(p.numel() for p in model.parameters())
    num_trainable = sum(p.numel() for p in trainable)
    return TrainStepCost(
        train_flops=int(counter.get_total_flops()),
        memory=MemoryBreakdown(
            params=num_params * _FLOAT32_BYTES,
            grads=num_trainable * _FLOAT32_BYTES,
            optimizer_state=optimizer_states * num_trainable * _FLOAT32_BYTES,
            activations=_saved_activation_bytes(model, loss),
        ),
        num_params=num_params,
        trainable_params=num_trainable,
    )


def train_step_cost(
    backbone: CostBackbone,
    method: str,
    batch_size: int,
    seq_len: int,
    *,
    adapter: Mapping[str, Any] | None = None,
    optimizer_states: int = ADAMW_STATES,
) -> TrainStepCost:
    """FLOPs and memory of one causal-LM training step on the device (cached per shape).

    ``method`` is ``full``, ``lora`` or ``ia3`` (:func:`meta_model`); ``optimizer_states`` the
    states kept per trainable value (AdamW 2, SGD with momentum 1, plain SGD 0).
    """
    if method not in ("full", "lora", "ia3"):
        raise ValueError(f"method must be full, lora or ia3, got {method!r}")
    key = _adapter_key(method, adapter or {})
    return _train_step_cost(_config_key(backbone), key, batch_size, seq_len, optimizer_states)


def activation_bytes_per_vector(hidden_size: int, bits: int, per_token_scale: bool) -> int:
    """Wire bytes of one d-vector at ``bits`` (clients/side_tuning/quantize.py's format).

    32 / 16 bits: 4 / 2 bytes a value; 8 bits: 1 byte a value; 4 bits: two values a byte
    (``ceil(d / 2)``); a per-token scale adds 2 bytes (float16) below 16 bits. A per-tensor
    scale (2 bytes a payload) is left out: it is shared by a whole micro-batch.
    """
    values = math.ceil(hidden_size * bits / _BITS_PER_BYTE)
    return values + (_FLOAT16_BYTES if bits < 16 and per_token_scale else 0)


def cost_seq_len_of(batch: Mapping[str, torch.Tensor], cost_seq_len: int | None) -> int:
    """Tokens per sample the cost backbone is charged for (``model.cost_seq_len``).

    Null: the trained batch's (padded) length, which a model without tokens (model=cnn) lacks.
    """
    if cost_seq_len is not None:
        return cost_seq_len
    ids = batch.get("input_ids")
    if ids is None:
        raise ConfigError(
            "model.cost_seq_len", None, "must be set: the trained model reads no tokens"
        )
    return int(ids.shape[1])


def full_scale(backbone_bytes: int, trained: nn.Module) -> float:
    """:attr:`DeviceCost.payload_scale` of a method whose payload is its trainable tensors.

    The cost backbone's trainable bytes over the trained model's as they travel (its arrays'
    bytes, the ones the clock measures), so that a message holding exactly the trained model is
    charged exactly the backbone's bytes.
    """
    return backbone_bytes / max(arrays_nbytes(to_arrays(trained)), 1)
