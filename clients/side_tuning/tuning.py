"""Server-assisted side-tuning: MobiLLM, with PAE MobiLLM's options as switches.

MobiLLM (arXiv 2502.20421): the device holds the frozen backbone and only runs forward passes;
per micro-batch it sends the tapped activations, quantized (``bits``), one way to the server,
which trains the side network (``clients/side_tuning/network.py``) on them with AdamW; no gradient
returns and nothing backpropagates through the backbone. In MobiLLM the server computes the loss,
so **the labels travel with the activations** (methods.md 1.2, item 5). In simulation one
``train`` call plays both ends of one client-round; :meth:`SideTuning.device_step` builds the
one device->server payload (:class:`DevicePayload`), :meth:`SideTuning.server_loss` trains on it,
and every payload passes :meth:`SideTuning.send`, where ``uplink_observer`` can inspect it. The
strategy then aggregates the side networks (side + head tensors) across clients.

Traffic as the paper places it (issue 14 item 4): the side network lives on the server. The Ray
worker that trains it plays the server, so the side-network tensors in its messages, and the
strategy's FedAvg of them, are server-internal: zero device bytes (``DeviceCost.model_on_server``).
Per client-round the device downloads nothing (its backbone is frozen and already installed)
and uploads only its payloads (``extra_upload_bytes``); the clock charges exactly that. With
``charge_final_download`` each device downloads the tuned side network once after the last
round, for on-device inference (run summary ``final_download_bytes``; not on the clock).

PAE MobiLLM (arXiv 2507.01216) switches, each OPEN in detail (methods.md 2.3-2.4), our decisions:

* ``activation_cache``: the server keeps every payload it received, keyed by (client, sample
  row), for the whole run (no eviction; the client's persistent state holds it, so its size is
  the ``server_cache_bytes`` metric). A cached sample costs the device no forward pass and no
  upload in later epochs and rounds; ``cache_hit_rate`` = cached uses / all uses. The clock
  cannot see per-client cache state (``device_cost`` gets no client), so it charges one forward
  pass over the data every round: exact in a client's first round, an upper bound after.
* ``pivot_token``: one vector per tapped layer instead of every token (``pivot_rule``, see
  side_network.py): activation bytes fall by the mean text length in tokens. Without it the
  device sends every real token's vectors (pad positions, an artefact of batching, are not
  sent; chatterbot texts fill 11.8 of 32 positions) plus the (n, T) token mask.
* ``additive``: no labels leave the device. It sends the prediction difference
  ``delta = softmax(z_b) - onehot(y)`` (z_b: the backbone's own logits, ``base_head``: 0, or a
  frozen zero-shot head over the class names, clients/side_tuning/network.py) with its classes
  permuted by a device-held key (in simulation only device-side code reads it). ``per_device_keys``
  (default): each device draws its own key from (``label_key_seed``, partition id), the same in
  every round; otherwise one key for the fleet. A plain delta leaks y (its only negative entry,
  methods.md 2.4); permuted, the server sees pi_k(y), which groups a device's samples by label.
  ``delta_loss: ce`` recovers pi(y) = argmin(delta) and p_b = delta + onehot(pi(y)) and
  minimises CE(log p_b + z_side, pi(y)): the gradient equals central cross-entropy fine-tuning
  of the additive model (methods.md 2.4 ``grad``, one-way since delta fixes p_b). ``mse`` fits
  z_side to -delta (methods.md ``residual_mse``).
  Per-device keys and a shared head do not mix: index j of device k's head is another class
  than index j of device k', and the server cannot align them without the keys. So the server
  keeps one head per device (its client state, in that device's key order; zero at the first
  visit) and only the adapter chain is shared (FedPer's split); the reply carries the device's
  head decoded to true order, and the strategy's mean of those is the global model's head, a
  measurement (what the devices hold, as if they aggregated their heads securely) that no
  device's training reads.
  What the server can still infer (clients/side_tuning/label_attack.py, tests/test_side_tuning.py,
  measured on one real client-round of the 20 showcase phones): frequency matching recovers 0.95 of
  the labels under one fleet key and 0.32 under per-device keys (chance, the majority class: 0.27);
  a server that runs the public backbone's zero-shot head on the activations it receives and
  names each device's groups by it recovers 0.76 under either; with ``base_head: zero_shot`` it
  recomputes p_b from the last layer it receives and reads every key (1.00).

``cache_features`` is a simulation speed switch, not a method: with it the device's forward
pass is read from the frozen features computed once; without it the backbone runs every time a
client trains (the bench baseline). The clock charges the device the same either way.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import torch
from flwr.app import ArrayRecord

from fedsim.checks import is_int
from fedsim.clients.side_tuning.link import LinkMemo
from fedsim.clients.side_tuning.network import (
    BASE_KEY,
    TAPS_KEY,
    SideSpec,
    SideTunedModel,
    SideTuningFactory,
    estimate_forward_memory_bytes,
    label_permutation,
    pack_tokens,
    select_layers,
)
from fedsim.clients.side_tuning.quantize import (
    QuantizedTensor,
    check_quant_config,
    dequantize,
    quantize,
)
from fedsim.clock.devices import count_forward_flops, count_train_flops
from fedsim.clock.scheduler import DeviceCost
from fedsim.errors import ConfigError
from fedsim.learning.cost_backbone import (
    activation_bytes_per_vector,
    check_cost_seq_len,
    cost_seq_len_of,
    forward_flops,
    load_cost_backbone,
    meta_model,
)
from fedsim.learning.models import ModelFactory
from fedsim.learning.params import arrays_nbytes, to_arrays
from fedsim.training.contract import TrainContext, TrainOutcome
from fedsim.training.loop import (
    Batch,
    ClientTerm,
    build_terms,
    check_max_grad_norm,
    train_loop,
)

__all__ = [
    "DevicePayload",
    "SideTuning",
    "delta_targets",
    "encode_delta",
]

CACHE_STATE_KEY = "side_tuning.activation_cache"
HEAD_STATE_KEY = "side_tuning.device_head"  # per-device keys: the device's head, its key's order
_BASE_HEADS = ("none", "zero_shot")
_PIVOT_RULES = ("auto", "first", "last", "mean")
_DELTA_LOSSES = ("ce", "mse")
_FEATURE_DTYPES = ("float16", "float32")
_UINT8_CLASSES = 256  # labels fit one byte below this many classes


@dataclass(frozen=True)
class DevicePayload:
    """What one device micro-batch of n samples sends the server; ``None`` fields are not sent."""

    sample_ids: torch.Tensor  # (n,) int32: rows of the client's data (the server cache key)
    activations: QuantizedTensor  # (M, K, d): the sent token vectors, sample-major; pads not sent
    token_mask: torch.Tensor | None  # (n, T) bool: where the M vectors sit; pivot: None (M = n)
    labels: torch.Tensor | None  # (n,) uint8/int32: MobiLLM only, the server computes the loss
    delta: torch.Tensor | None  # (n, C) float16: PAE only, key-permuted prediction difference

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor on the wire, by name (the activations as codes and scales)."""
        out = {"sample_ids": self.sample_ids, "activation_codes": self.activations.data}
        if self.activations.scale is not None:
            out["activation_scales"] = self.activations.scale
        for name in ("token_mask", "labels", "delta"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        return out

    def nbytes(self) -> int:
        """Bytes on the wire: every tensor's elements at its dtype's size."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def to(self, device: torch.device) -> DevicePayload:
        """The payload as the server holds it on ``device`` (itself on CPU, where it travels)."""
        if device == self.sample_ids.device:
            return self
        q = self.activations
        scale = None if q.scale is None else q.scale.to(device)
        return DevicePayload(
            self.sample_ids.to(device),
            QuantizedTensor(q.data.to(device), scale, q.bits, q.last_dim),
            *(
                None if t is None else t.to(device)
                for t in (self.token_mask, self.labels, self.delta)
            ),
        )


def encode_delta(
    labels: torch.Tensor,
    backbone_logits: torch.Tensor,
    label_perm: torch.Tensor,
    dtype: torch.dtype = torch.float16,
) -> torch.Tensor:
    """Device: ``softmax(z_b) - onehot(y)`` with class c moved to index ``label_perm[c]``.

    Sent as float16 (float32 on a 32-bit link): float16 rounds p_b - 1 to a 2**-11 grid, which
    shifts the server's recovered base log-probability of the true class by ~1% of p_b.
    """
    delta = torch.softmax(backbone_logits.float(), dim=1)
    delta[torch.arange(len(labels)), labels] -= 1.0
    encoded = torch.empty_like(delta)
    encoded[:, label_perm] = delta
    return encoded.to(dtype)


def delta_targets(delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Server: (encoded label argmin(delta), log p_b) from a delta; p_b = delta + onehot."""
    target = delta.float().argmin(dim=1)
    probs = delta.float().clone()
    probs[torch.arange(len(target), device=target.device), target] += 1.0
    return target, probs.clamp(min=torch.finfo(torch.float32).tiny).log()


@dataclass
class _LinkCounts:
    """What one client-round sent over the device's link: for its metrics and bytes."""

    uploaded: int = 0  # payload bytes, device -> server
    forwarded: int = 0  # samples the device forwarded through the backbone
    hits: int = 0  # samples the server took from its activation cache instead


class _ServerCache:
    """Server-side store of every payload row received from one client, as received.

    Token vectors are kept packed in arrival order (``codes``/``scales``: (tokens, K, ...));
    ``start``/``count`` say where each row's tokens are; per-row tensors are indexed by row.
    """

    _PER_ROW = ("token_mask", "labels", "delta")

    def __init__(
        self, num_rows: int, bits: int, last_dim: int, record: ArrayRecord | None = None
    ) -> None:
        self.bits, self.last_dim = bits, last_dim
        self.filled = torch.zeros(num_rows, dtype=torch.bool)
        self.start = torch.zeros(num_rows, dtype=torch.int64)
        self.count = torch.zeros(num_rows, dtype=torch.int64)
        self.tensors: dict[str, torch.Tensor] = {}  # codes, scales (packed); per-row tensors
        if record is not None:
            stored = record.to_torch_state_dict()
            if len(stored.get("filled", ())) == num_rows:
                self.filled, self.start = stored.pop("filled"), stored.pop("start")
                self.count, self.tensors = stored.pop("count"), stored

    def insert(self, payload: DevicePayload) -> None:
        ids = payload.sample_ids.long()
        mask = payload.token_mask
        count = mask.sum(dim=1) if mask is not None else torch.ones(len(ids), dtype=torch.int64)
        used = len(self.tensors["codes"]) if "codes" in self.tensors else 0
        self.start[ids] = used + torch.cumsum(count, 0) - count  # packed rows are sample-major
        self.count[ids] = count
        packed = {"codes": payload.activations.data}
        if payload.activations.scale is not None:  # a per-tensor scale becomes one per token
            packed["scales"] = payload.activations.scale.expand(
                *payload.activations.data.shape[:-1], 1
            )
        for name, value in packed.items():
            old = self.tensors.get(name, value[:0])
            self.tensors[name] = torch.cat([old, value])
        for name in self._PER_ROW:
            value = getattr(payload, name)
            if value is not None:
                if name not in self.tensors:
                    self.tensors[name] = value.new_zeros((len(self.filled), *value.shape[1:]))
                self.tensors[name][ids] = value
        self.filled[ids] = True

    def gather(self, ids: torch.Tensor) -> DevicePayload:
        count = self.count[ids]
        offsets = torch.cumsum(count, 0) - count  # where each row starts in the gathered batch
        within = torch.arange(int(count.sum())) - torch.repeat_interleave(offsets, count)
        index = torch.repeat_interleave(self.start[ids], count) + within
        scale = self.tensors["scales"][index] if "scales" in self.tensors else None
        activations = QuantizedTensor(self.tensors["codes"][index], scale, self.bits, self.last_dim)
        rows = {
            name: self.tensors[name][ids] if name in self.tensors else None
            for name in self._PER_ROW
        }
        return DevicePayload(ids.int(), activations, **rows)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def record(self) -> ArrayRecord:
        return ArrayRecord(
            {"filled": self.filled, "start": self.start, "count": self.count, **self.tensors}
        )


def _check(key: str, value: object, ok: bool, accepted: str) -> None:
    if not ok:
        raise ConfigError(f"client.{key}", value, f"must be {accepted}")


class SideTuning:
    """MobiLLM side-tuning client; YAML keys = these arguments (see conf/client/side_tuning.yaml).

    Parameters
    ----------
    local_epochs, batch_size, lr, weight_decay, max_steps
        Server-side AdamW training of the side network per client-round (fresh optimizer state
        every round); ``batch_size`` is also the device's forward micro-batch.
    max_grad_norm
        Clip every server-side step's gradient (side network + head) to this global L2 norm
        (null = no clipping): the shared step of fedsim/training/loop.py, the same for every
        strategy.
    num_taps, reduction_factor, gate_temperature, gate_init
        Side network (clients/side_tuning/network.py): tapped layers (null = all), bottleneck
        ``d // reduction_factor``, gate ``sigmoid(alpha / T)`` with alpha starting at gate_init.
    bits, quant_scheme
        Activation link: 32 (none), 16 (float16), 8 or 4 bits; per_token or per_tensor absmax.
    activation_cache, pivot_token, pivot_rule, additive, delta_loss, label_key_seed
        PAE MobiLLM switches (module docstring). ``label_key_seed`` null sends plain deltas.
    per_device_keys, base_head, zero_shot_scale
        PAE: one label key (and server-side head) per device, or one key for the fleet; the
        backbone's own prediction z_b in delta (``none``: uniform; ``zero_shot``: the class
        names' prototypes, ``zero_shot_scale`` x cosine).
    cache_features, feature_cache_dir, feature_dtype
        Simulation speed: compute the frozen hidden states once (disk memmap if a folder).
    charge_final_download
        Charge each device one download of the tuned side network after the last round.
    cost_backbone, cost_seq_len
        ``model.cost_backbone`` / ``model.cost_seq_len`` (the YAML reads them from the model):
        null charges the model that trains; a name charges that architecture's frozen forward,
        taps and activation bytes on the clock instead (:meth:`_backbone_cost`).

    """

    def __init__(
        self,
        *,
        local_epochs: int = 2,
        batch_size: int = 16,
        lr: float = 1e-2,
        weight_decay: float = 0.0,
        max_steps: int | None = None,
        max_grad_norm: float | None = 10.0,
        num_taps: int | None = None,
        reduction_factor: int = 8,
        gate_temperature: float = 1.0,
        gate_init: float = 0.0,
        bits: int = 8,
        quant_scheme: str = "per_token",
        activation_cache: bool = False,
        pivot_token: bool = False,
        pivot_rule: str = "auto",
        additive: bool = False,
        delta_loss: str = "ce",
        label_key_seed: int | None = 0,
        per_device_keys: bool = True,
        base_head: str = "none",
        zero_shot_scale: float = 20.0,
        cache_features: bool = True,
        feature_cache_dir: str | None = "~/.cache/fedsim/hidden_states",
        feature_dtype: str = "float32",
        charge_final_download: bool = False,
        cost_backbone: str | None = None,
        cost_seq_len: int | None = None,
    ) -> None:
        num = (int, float)
        _check("local_epochs", local_epochs, is_int(local_epochs, 1), "an integer >= 1")
        _check("batch_size", batch_size, is_int(batch_size, 1), "an integer >= 1")
        _check("lr", lr, isinstance(lr, num) and lr > 0, "a number > 0")
        _check(
            "weight_decay",
            weight_decay,
            isinstance(weight_decay, num) and weight_decay >= 0,
            "a number >= 0",
        )
        _check("max_steps", max_steps, max_steps is None or is_int(max_steps, 1), "null or >= 1")
        _check("num_taps", num_taps, num_taps is None or is_int(num_taps, 1), "null or >= 1")
        _check("reduction_factor", reduction_factor, is_int(reduction_factor, 1), ">= 1")
        _check(
            "gate_temperature",
            gate_temperature,
            isinstance(gate_temperature, num) and gate_temperature > 0,
            "a number > 0",
        )
        check_quant_config(bits, quant_scheme)
        _check("pivot_rule", pivot_rule, pivot_rule in _PIVOT_RULES, f"one of {_PIVOT_RULES}")
        _check("delta_loss", delta_loss, delta_loss in _DELTA_LOSSES, f"one of {_DELTA_LOSSES}")
        _check(
            "label_key_seed",
            label_key_seed,
            label_key_seed is None or is_int(label_key_seed, 0),
            "null or an integer >= 0",
        )
        _check("base_head", base_head, base_head in _BASE_HEADS, f"one of {_BASE_HEADS}")
        _check(
            "zero_shot_scale",
            zero_shot_scale,
            isinstance(zero_shot_scale, num) and zero_shot_scale > 0,
            "a number > 0",
        )
        _check(
            "feature_dtype",
            feature_dtype,
            feature_dtype in _FEATURE_DTYPES,
            f"one of {_FEATURE_DTYPES}",
        )
        self.local_epochs, self.batch_size, self.lr = local_epochs, batch_size, float(lr)
        self.weight_decay, self.max_steps = float(weight_decay), max_steps
        self.max_grad_norm = check_max_grad_norm(max_grad_norm)
        self.activation_cache, self.delta_loss = bool(activation_cache), delta_loss
        self.charge_final_download = bool(charge_final_download)
        self.label_key_seed = label_key_seed if additive else None
        # one key per device (from (label_key_seed, partition id)) and so one head per device
        self.per_device_keys = bool(per_device_keys) and self.label_key_seed is not None
        self.spec = SideSpec(
            num_taps=num_taps,
            reduction_factor=reduction_factor,
            gate_temperature=float(gate_temperature),
            gate_init=float(gate_init),
            pivot_token=bool(pivot_token),
            pivot_rule=pivot_rule,
            bits=bits,
            quant_scheme=quant_scheme,
            additive=bool(additive),
            # the model decodes the fleet's one key; per-device keys are decoded per device here
            label_key_seed=None if self.per_device_keys else self.label_key_seed,
            cache_features=bool(cache_features),
            feature_cache_dir=None if feature_cache_dir is None else str(feature_cache_dir),
            feature_dtype=feature_dtype,
            base_head=base_head if additive else "none",
            zero_shot_scale=float(zero_shot_scale),
        )
        #: Called with every device->server payload (tests inspect what the server receives).
        self.uplink_observer: Callable[[DevicePayload], None] | None = None
        self._per_batch: dict[tuple, tuple[int, int, int]] = {}  # (size, shapes) -> costs
        self._link = LinkMemo()  # simulation speed: each sample's payload computed once
        self.cost_backbone = None if cost_backbone is None else load_cost_backbone(cost_backbone)
        self.cost_seq_len = check_cost_seq_len(cost_seq_len)

    def wrap_factory(self, factory: ModelFactory) -> ModelFactory:
        """The side-tuned model over the classifier's frozen backbone (and cached features)."""
        return SideTuningFactory(factory, self.spec)  # type: ignore[arg-type]

    # ----------------------------------------------------------------------- the two ends
    def device_step(
        self,
        model: SideTunedModel,
        data: dict[str, torch.Tensor],
        rows: torch.Tensor,
        partition_id: int = 0,
    ) -> DevicePayload:
        """Device ``partition_id``: forward ``rows`` through the frozen backbone; the payload."""
        activations, token_mask = self.device_activations(model, data, rows)
        labels, delta = self.device_targets(model, data, rows, partition_id)
        return DevicePayload(rows.to(torch.int32), activations, token_mask, labels, delta)

    def device_activations(
        self, model: SideTunedModel, data: dict[str, torch.Tensor], rows: torch.Tensor
    ) -> tuple[QuantizedTensor, torch.Tensor | None]:
        """Device: the quantized token vectors (M, K, d) of ``rows`` and where they sit."""
        mask = data["attention_mask"][rows]
        # the same forward pass, computed once (clients/side_tuning/network.py)
        if TAPS_KEY in data:
            activations = data[TAPS_KEY][rows].float()
        else:  # the backbone runs where the model lives; the payload is made on CPU
            device = model.label_perm.device
            ids = data["input_ids"][rows].to(device)
            activations = model.device_activations(ids, mask.to(device)).cpu()
        token_mask = model.token_mask(mask)
        tokens = pack_tokens(activations, token_mask)  # (M, K, d)
        return quantize(tokens, model.spec.bits, model.spec.quant_scheme), token_mask  # type: ignore[arg-type]

    def device_targets(
        self,
        model: SideTunedModel,
        data: dict[str, torch.Tensor],
        rows: torch.Tensor,
        partition_id: int = 0,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Device: what it sends about the labels of ``rows``: labels (MobiLLM) or delta (PAE)."""
        labels = data["label"][rows]
        if model.spec.additive:
            dtype = torch.float32 if model.spec.bits == 32 else torch.float16
            base = data[BASE_KEY][rows] if BASE_KEY in data else torch.zeros(len(rows), 1)
            base = base.expand(len(rows), len(model.label_perm))  # z_b = 0: a uniform p_b
            key = self.device_key(model, partition_id)
            return None, encode_delta(labels, base, key, dtype)
        small = len(model.label_perm) < _UINT8_CLASSES
        return labels.to(torch.uint8 if small else torch.int32), None

    def device_key(self, model: SideTunedModel, partition_id: int) -> torch.Tensor:
        """Device: its label key (class c at index ``key[c]``), never sent to the server.

        Per device: drawn from (``label_key_seed``, partition id), the same in every round;
        otherwise the fleet's one key (the model's, identity when ``label_key_seed`` is null).
        """
        if self.per_device_keys:
            return label_permutation(self.label_key_seed, len(model.label_perm), partition_id)
        return model.label_perm.cpu()  # the device side works on CPU (no-op there)

    def _swap_in_device_head(
        self, model: SideTunedModel, ctx: TrainContext
    ) -> dict[str, torch.Tensor] | None:
        """Server, per-device keys: put the device's own head in ``model``; return the replaced one.

        A head trained on one device's permuted targets means nothing to another, and the server
        cannot align them without the keys, so it keeps one head per device (its client state,
        in that device's key order) and shares only the adapter chain (FedPer's split). A
        device's first head is zero (decision): the additive model starts at the base prediction.
        """
        if not self.per_device_keys:
            return None
        replaced = {k: v.detach().clone() for k, v in model.head.state_dict().items()}
        record = ctx.state.get(HEAD_STATE_KEY)
        with torch.no_grad():
            if isinstance(record, ArrayRecord):
                model.head.load_state_dict(record.to_torch_state_dict())
            else:
                for param in model.head.parameters():
                    param.zero_()
        return replaced

    def _keep_device_head(self, model: SideTunedModel, ctx: TrainContext) -> None:
        """Server keeps the trained head; the reply carries it in true order (see train)."""
        head = model.head.state_dict()
        ctx.state[HEAD_STATE_KEY] = ArrayRecord({k: v.detach().clone() for k, v in head.items()})
        key = self.device_key(model, ctx.partition_id)
        with torch.no_grad():  # row c of the true-order head = row key[c] of the device's
            for param in model.head.parameters():
                param.copy_(param[key])

    def send(self, payload: DevicePayload) -> int:
        """The uplink: the only way device data reaches the server; returns its bytes."""
        if self.uplink_observer is not None:
            self.uplink_observer(payload)
        return payload.nbytes()

    def server_loss(
        self, model: SideTunedModel, payload: DevicePayload, terms: Sequence[ClientTerm] = ()
    ) -> torch.Tensor:
        """Server: the side network's loss on a received payload (labels or deltas only).

        Client terms (fedsim/training/loop.py: a strategy's, DFL's) add to it; they see the logits
        and labels of the space the server trains in (PAE: key-permuted, base logits added).
        """
        logits = model.side_logits(dequantize(payload.activations), payload.token_mask)
        if payload.labels is not None:
            target, full = payload.labels.long(), logits
            loss = torch.nn.functional.cross_entropy(logits, target)
        else:
            assert payload.delta is not None
            target, log_base = delta_targets(payload.delta)
            full = log_base + logits
            if self.delta_loss == "mse":
                loss = 0.5 * ((logits + payload.delta.float()) ** 2).sum(dim=1).mean()
            else:
                loss = torch.nn.functional.cross_entropy(full, target)
        batch = Batch({}, target, full, indices=payload.sample_ids.long())
        for term in terms:
            loss = term.loss(model, batch, loss)
        return loss

    def _recompute(
        self,
        optimizer: torch.optim.Optimizer,
        model: SideTunedModel,
        payload: DevicePayload,
        terms: Sequence[ClientTerm],
    ) -> None:
        optimizer.zero_grad(set_to_none=True)
        self.server_loss(model, payload, terms).backward()

    def predict(
        self, model: torch.nn.Module, data: dict[str, torch.Tensor], ctx: TrainContext
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Server: logits (n, C) and labels (n,) of every row, in the space the server trains in.

        PAE: key-permuted, the label pi(y) = argmin delta; MobiLLM: y as sent. For DFL's soft
        targets (clients/distillation.py): from the payloads of the rows (what the server
        received, or a cached copy), so DFL never needs the device's key.
        """
        assert isinstance(model, SideTunedModel)
        rows = torch.arange(len(data["label"]))
        was_training = model.training
        model.eval()
        replaced = self._swap_in_device_head(model, ctx)
        chunks, labels = [], []
        with torch.no_grad():
            for start in range(0, len(rows), self.batch_size):
                part = rows[start : start + self.batch_size]
                payload = (
                    self._link.payload(self, model, data, part, ctx.partition_id)
                    if self._link.applies(self, data)
                    else self.device_step(model, data, part, ctx.partition_id)
                )
                payload = payload.to(ctx.device)
                logits = model.side_logits(dequantize(payload.activations), payload.token_mask)
                if payload.delta is not None:
                    target, log_base = delta_targets(payload.delta)
                    logits = log_base + logits
                else:
                    assert payload.labels is not None
                    target = payload.labels
                chunks.append(logits)
                labels.append(target.long())
        model.train(was_training)
        if replaced is not None:
            model.head.load_state_dict(replaced)
        return torch.cat(chunks).float().cpu(), torch.cat(labels).cpu()

    # ----------------------------------------------------------------------- behaviour hooks
    def train(
        self, model: torch.nn.Module, data: dict[str, torch.Tensor], ctx: TrainContext
    ) -> TrainOutcome:
        """One client-round: device payloads up, server-side AdamW on the side network."""
        assert isinstance(model, SideTunedModel)
        n = len(data["label"])
        cache = None
        if self.activation_cache:
            record = ctx.state.get(CACHE_STATE_KEY)
            first_down = model.side.down[0]
            assert isinstance(first_down, torch.nn.Linear)  # (a ModuleList yields Modules)
            cache = _ServerCache(
                n,
                model.spec.bits,
                int(first_down.in_features),
                record if isinstance(record, ArrayRecord) else None,
            )
        self._swap_in_device_head(model, ctx)
        params = [p for p in model.parameters() if p.requires_grad]
        # fused: one kernel for all of the side network's small tensors (16% faster a step on
        # CPU than the per-tensor loop; the same update up to float rounding, ~3e-8)
        optimizer = torch.optim.AdamW(
            params, lr=self.lr, weight_decay=self.weight_decay, fused=True
        )
        # a strategy's or DFL's client terms (fedsim/training/loop.py)
        terms = build_terms(ctx.config)
        if any(term.needs_features for term in terms):
            raise ValueError("side-tuning has no backbone features for this client term")
        link = _LinkCounts()

        def batch_step(rows: torch.Tensor) -> tuple[torch.Tensor, Callable[[], None]]:
            # device: payloads of the rows the server has not cached; server: the loss on them
            new = rows if cache is None else rows[~cache.filled[rows]]
            payload = None
            if len(new):
                payload = (
                    self._link.payload(self, model, data, new, ctx.partition_id)
                    if self._link.applies(self, data)
                    else self.device_step(model, data, new, ctx.partition_id)
                )
                link.uploaded += self.send(payload)
                link.forwarded += len(new)
                if cache is not None:
                    cache.insert(payload)
            link.hits += len(rows) - len(new)
            received = payload if cache is None else cache.gather(rows)
            assert received is not None
            received = received.to(ctx.device)  # the server trains where the model lives
            loss = self.server_loss(model, received, terms)
            return loss, partial(self._recompute, optimizer, model, received, terms)

        outcome = train_loop(
            model, data, ctx, optimizer,
            local_epochs=self.local_epochs, batch_size=self.batch_size,
            max_steps=self.max_steps, terms=terms, max_grad_norm=self.max_grad_norm,
            batch_step=batch_step,
        )  # fmt: skip
        metrics = {
            "device_forward_samples": float(link.forwarded),
            "cache_hit_rate": link.hits / max(link.hits + link.forwarded, 1),
        }
        if cache is not None:
            ctx.state[CACHE_STATE_KEY] = cache.record()
            metrics["server_cache_bytes"] = float(cache.nbytes())
        if self.per_device_keys:
            self._keep_device_head(model, ctx)
        return dataclasses.replace(
            outcome, extra_upload_bytes=link.uploaded, metrics={**metrics, **outcome.metrics}
        )

    def device_cost(
        self, model: torch.nn.Module, batch: dict[str, torch.Tensor], num_examples: int
    ) -> DeviceCost:
        """Device: backbone forward FLOPs and forward-only peak memory; server: side training.

        Counted once per batch size on the real modules (FlopCounterMode) and scaled by the
        examples: the device forwards its data once per epoch (once per round with the
        activation cache), the server trains ``local_epochs`` passes.
        """
        assert isinstance(model, SideTunedModel)
        size = len(batch["label"])
        # per batch size and sub-model shape (a width-sliced sub-model costs less)
        memo = (size, tuple(tuple(p.shape) for p in model.parameters() if p.requires_grad))
        if memo not in self._per_batch:
            inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
            forward = count_forward_flops(model.backbone, inputs)
            taps = batch.get(TAPS_KEY)
            if taps is None:
                taps = model.device_activations(**inputs)
            side = count_train_flops(model, {**inputs, TAPS_KEY: taps.float()}, batch["label"])
            memory = estimate_forward_memory_bytes(
                model.backbone, size, int(batch["input_ids"].shape[1]), taps.numel()
            )
            self._per_batch[memo] = (forward, side, memory)
        forward, side, memory = self._per_batch[memo]
        scale, final_scale = 1.0, 1.0
        if self.cost_backbone is not None:
            forward, side, memory, scale, final_scale = self._backbone_cost(model, batch, side)
        server_examples, device_examples = self.round_examples(num_examples)
        return DeviceCost(
            train_flops=round(forward * device_examples / size),
            peak_memory_bytes=memory,
            server_flops=round(side * server_examples / size),
            model_on_server=True,  # the side network never crosses the device's link
            final_download_bytes=(
                round(arrays_nbytes(to_arrays(model)) * final_scale)
                if self.charge_final_download
                else 0
            ),
            payload_scale=scale,
            scale_extra_upload=True,  # the activations are the payload that crosses the link
        )

    def round_examples(self, num_examples: int) -> tuple[int, int]:
        """Examples of a round: (the server trains on, the device forwards).

        The server trains ``local_epochs`` passes capped by the step limit; the device forwards
        its data once per epoch, or each sample once per round with the activation cache.
        """
        server_examples = self.local_epochs * num_examples
        if self.max_steps is not None:
            server_examples = min(server_examples, self.max_steps * self.batch_size)
        device_examples = (
            min(num_examples, server_examples) if self.activation_cache else (server_examples)
        )
        return server_examples, device_examples

    def backbone_taps(self) -> int:
        """Layers of the cost backbone the device taps (``num_taps`` of its L layers)."""
        assert self.cost_backbone is not None
        return len(select_layers(self.cost_backbone.num_layers, self.spec.num_taps))

    def backbone_vector_bytes(self) -> int:
        """Wire bytes of one tapped d-vector of the cost backbone at ``bits``."""
        assert self.cost_backbone is not None
        per_token = self.spec.quant_scheme == "per_token"
        return activation_bytes_per_vector(
            self.cost_backbone.hidden_size, self.spec.bits, per_token
        )

    def backbone_device_step(self, batch_size: int, seq_len: int) -> tuple[int, int]:
        """The device's batch on the cost backbone: (frozen-forward FLOPs, peak memory bytes).

        The base model without its LM head, counted on the meta model; memory by
        :func:`estimate_forward_memory_bytes` on it with the tapped copy at the backbone's taps
        and width (one position per sample with the pivot token, else every token).
        """
        backbone = self.cost_backbone
        assert backbone is not None
        positions = 1 if self.spec.pivot_token else seq_len
        memory = estimate_forward_memory_bytes(
            meta_model(backbone, "frozen").base_model,  # type: ignore[arg-type]
            batch_size,
            seq_len,
            batch_size * self.backbone_taps() * positions * backbone.hidden_size,
        )
        return forward_flops(backbone, batch_size, seq_len, lm_head=False), memory

    def _backbone_cost(
        self, model: SideTunedModel, batch: dict[str, torch.Tensor], side_flops: int
    ) -> tuple[int, int, int, float, float]:
        """Per batch on the cost backbone: device and server FLOPs, memory, two byte scales.

        The scales are those of the uploaded activations and of the side network (its final
        download).
        Device: the base model's frozen forward (no LM head) over ``cost_seq_len`` tokens,
        counted on the meta model; memory by :func:`estimate_forward_memory_bytes` on it, with
        the tapped copy at the backbone's taps and width. Upload: the measured payloads scaled
        by activation bytes per sample, ``tokens x taps x bytes per d-vector`` at ``bits``
        (pivot: one token), backbone over trained model; tokens are the batch's real ones
        (pads are not sent) unless ``cost_seq_len`` says a sample has that many. Labels, masks
        and sample ids (under 1% of a payload) scale along. Server: the side network's FLOPs
        scale with taps x d^2 x positions (its adapters are d x d/r), an approximation that
        also scales the small head; so does the side network's size (final download).
        """
        backbone = self.cost_backbone
        assert backbone is not None
        size = len(batch["label"])
        seq_len = cost_seq_len_of(batch, self.cost_seq_len)
        taps = self.backbone_taps()
        hidden = backbone.hidden_size
        trained_taps, trained_hidden = len(model.layers), int(model.backbone.config.hidden_size)
        real_tokens = float(batch["attention_mask"].sum()) / size
        if self.spec.pivot_token:
            sent, trained_sent, positions, trained_positions = 1.0, 1.0, 1, 1
        else:
            sent = real_tokens if self.cost_seq_len is None else float(seq_len)
            trained_sent = real_tokens
            positions, trained_positions = seq_len, int(batch["input_ids"].shape[1])
        per_token = self.spec.quant_scheme == "per_token"
        scale = (sent * taps * self.backbone_vector_bytes()) / (
            trained_sent
            * trained_taps
            * activation_bytes_per_vector(trained_hidden, self.spec.bits, per_token)
        )
        size_ratio = (taps * hidden**2) / (trained_taps * trained_hidden**2)
        forward, memory = self.backbone_device_step(size, seq_len)
        return (
            forward,
            round(side_flops * size_ratio * positions / trained_positions),
            memory,
            scale,
            size_ratio,
        )
