"""Side networks over a frozen backbone (MobiLLM, PAE MobiLLM) and the features they read.

MobiLLM (arXiv 2502.20421) keeps a frozen backbone on the device, which only runs forward
passes, and trains "a set of parallel adapters separated from the backbone" on the server from the
device's activations; no gradient ever flows through the backbone. The side network's topology
is OPEN for MobiLLM (reference/methods.md sections 1.5, 8). Our decisions, each a config key of
``clients/side_tuning/tuning.py``:

* **Form** (decision, methods.md 1.5): the gated adapter chain of PAE MobiLLM (arXiv 2507.01216,
  as three reviews render its equations, methods.md 2.2), one adapter per tapped layer i::

      mu_i     = sigmoid(alpha_i / gate_temperature)          alpha_i: learnable, init gate_init
      S_i_in   = (1 - mu_i) * A_i + mu_i * h_{i-1}            S_1_in = A_1 (nothing to mix in)
      h_i      = S_i_in + gelu(S_i_in W_down_i) W_up_i        W_down_i: d x r, W_up_i: r x d

  with ``r = d // reduction_factor`` (LST's default reduction is 8) and W_up zero-initialised,
  so the untrained chain is a gated mixture of the tapped layers. PAE writes no temperature
  (gate_temperature 1.0); LST uses 0.1. The nonlinearity is not named in the reviews: GELU.
* **Tapped layers** (decision, Fed MobiLLM's rule, methods.md 2.5): ``num_taps = k`` splits the L
  transformer layers into k blocks and taps the last layer of each (``ceil(j * L / k)``);
  null taps all L layers. The embedding output is never tapped.
* **Tokens**: all tokens (MobiLLM), or PAE's pivot-token shortcut, one vector per layer. v2 of
  PAE sends "only the token involved in the loss calculation"; our ``auto`` rule sends what the
  classifier's pooling reads: the masked mean over tokens for ``pooling: mean`` (a pooled
  pseudo-token, one token's worth of bytes; not a token of the sequence), the first token
  ([CLS]) for ``cls`` on encoders and the last non-pad token for ``cls`` on causal decoders.
  ``first``/``last``/``mean`` force a rule.
* **Head** (decision, methods.md 1.5 (a)): the side output is pooled like the classifier pools
  (masked mean, or the single pivot vector) and read by a trainable linear head (the classifier
  factory's own head, same init as the baselines'), trained and aggregated with the side net.
* **Additive output** (PAE, decision (b)): logits = backbone logits z_b + side logits. An
  AutoModel backbone (MiniLM) has no task head, so ``base_head`` says what z_b is: ``none``, a
  uniform prediction (z_b = 0); ``zero_shot``, a frozen zero-shot head, ``zero_shot_scale`` x
  the cosine between the text's sentence embedding and each class name's (both the backbone's
  pooled last layer; the latent-embedding approach of Veeranna et al. 2016 and Davison's
  "Zero-Shot Learning in Modern NLP", 2020, with Sentence-BERT embeddings; all-MiniLM-L6-v2 is
  such a model). Class names come from the dataset's ClassLabel (``_`` read as a space). The
  device computes z_b once per text (feature ``BASE_KEY``). PAE's label-free training targets
  live in ``clients/side_tuning/tuning.py``. With ``label_key_seed`` set (one key for the fleet),
  the side head predicts in a label space permuted by that key; ``forward`` decodes it.

Frozen features: the backbone's hidden states never change, so the factory computes them once per
text (``featurize``) and the model reads them instead of running the backbone (``cache_features``).
They are stored as float32 (``feature_dtype``; float16 halves the disk but lets training drift
from an uncached run) in a ``.npy`` file per (backbone weights, token ids)
under ``feature_cache_dir``, opened as a copy-on-write memmap: the server and each Ray worker
share one copy through the OS page cache instead of each recomputing (~35 s for chatterbot
english on 2 cores) and holding its own, and later runs (sweeps, benches) reuse it. A null
``feature_cache_dir`` keeps them in-process only.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from fedsim.clients.side_tuning.quantize import fake_quantize
from fedsim.learning.models import TextClassifier, TextClassifierModel, pool_hidden_states
from fedsim.learning.placement import feature_device
from fedsim.learning.slicing import AxisDim, SlimLayout, scaled_size
from fedsim.records.progress import notice, progress_bars
from fedsim.seeding import numpy_rng

if TYPE_CHECKING:
    import datasets
    from transformers import PreTrainedModel

__all__ = [
    "GatedAdapterChain",
    "SideSpec",
    "SideTunedModel",
    "SideTuningFactory",
    "TAPS_KEY",
    "BASE_KEY",
    "class_names_of",
    "zero_shot_logits",
    "estimate_forward_memory_bytes",
    "label_permutation",
    "pack_tokens",
    "select_layers",
    "select_tokens",
    "unpack_tokens",
]

TAPS_KEY = "taps"  # feature key: (N, K, T', d) hidden states at the tapped layers and tokens
BASE_KEY = "base_logits"  # feature key: (N, C) the frozen zero-shot head's logits z_b (PAE)
_FORMAT_VERSION = "hidden-states-v1"  # bump when the cached array layout changes
_FEATURIZE_BATCH = 64  # rows per backbone forward while filling the cache
_FLOAT32_BYTES = 4
_DTYPES = {"float16": (torch.float16, np.float16), "float32": (torch.float32, np.float32)}


@dataclass(frozen=True)
class SideSpec:
    """What the side-tuned model is (see the module docstring); built by the client behaviour."""

    num_taps: int | None
    reduction_factor: int
    gate_temperature: float
    gate_init: float
    pivot_token: bool
    pivot_rule: str  # auto | first | last | mean
    bits: int
    quant_scheme: str
    additive: bool
    label_key_seed: int | None  # one key shared by the fleet (None: none, or one per device)
    cache_features: bool
    feature_cache_dir: str | None
    feature_dtype: str  # float16 | float32
    base_head: str = "none"  # none | zero_shot: the backbone's own prediction z_b
    zero_shot_scale: float = 20.0  # z_b = scale x cosine (zero_shot)


# --------------------------------------------------------------------------- pure selections
def select_layers(num_layers: int, num_taps: int | None) -> tuple[int, ...]:
    """Indices into ``hidden_states`` (1..L) of the tapped layers: last layer of each block."""
    if num_taps is None or num_taps >= num_layers:
        return tuple(range(1, num_layers + 1))
    return tuple(math.ceil(j * num_layers / num_taps) for j in range(1, num_taps + 1))


def resolve_pivot(rule: str, pooling: str) -> str:
    """The pivot token rule; ``auto`` follows the classifier's token pooling (mean/first/last)."""
    return pooling if rule == "auto" else rule


def select_tokens(hidden: torch.Tensor, mask: torch.Tensor, pivot: str | None) -> torch.Tensor:
    """Keep all tokens (``pivot=None``) or one vector per layer: (B, K, T, d) -> (B, K, T', d)."""
    if pivot is None:
        return hidden
    batch, layers, tokens, width = hidden.shape
    flat = hidden.transpose(1, 2).reshape(batch, tokens, layers * width)  # (B, T, K*d)
    pooled = pool_hidden_states(flat, mask, pivot)  # type: ignore[arg-type]  # (B, K*d)
    return pooled.reshape(batch, layers, 1, width)


def label_permutation(seed: int | None, num_classes: int, *names: object) -> torch.Tensor:
    """A device-held label key: class c is predicted at index ``perm[c]`` (identity if None).

    ``names`` name whose key it is (a device's partition id); none: the fleet's one key.
    """
    if seed is None:
        return torch.arange(num_classes)
    return torch.from_numpy(numpy_rng(seed, "label-key", *names).permutation(num_classes))


def class_names_of(ds: datasets.Dataset) -> list[str]:
    """The label texts of a dataset's ClassLabel column, ``_`` read as a space."""
    from fedsim.errors import ConfigError

    feature = ds.features.get("label")
    names = getattr(feature, "names", None)
    if not names:
        raise ConfigError(
            "client.base_head", "zero_shot", "needs class names (a ClassLabel 'label' column)"
        )
    return [str(name).replace("_", " ") for name in names]


def zero_shot_logits(
    embeddings: torch.Tensor, prototypes: torch.Tensor, scale: float
) -> torch.Tensor:
    """``scale`` x cosine of each embedding (N, d) with each class prototype (C, d): (N, C)."""
    unit = nn.functional.normalize(embeddings.float(), dim=-1)
    return scale * unit @ nn.functional.normalize(prototypes.float(), dim=-1).T


# --------------------------------------------------------------------------- the side network
class GatedAdapterChain(nn.Module):
    """PAE's gated bottleneck adapter chain over K tapped layers (equations in the docstring)."""

    def __init__(
        self,
        num_layers: int,
        hidden_size: int,
        bottleneck: int,
        gate_temperature: float,
        gate_init: float,
    ) -> None:
        super().__init__()
        self.gate_temperature = gate_temperature
        self.alpha = nn.Parameter(torch.full((max(num_layers - 1, 0),), float(gate_init)))
        self.down = nn.ModuleList(nn.Linear(hidden_size, bottleneck) for _ in range(num_layers))
        self.up = nn.ModuleList(nn.Linear(bottleneck, hidden_size) for _ in range(num_layers))
        for up in self.up:  # adapters start as the identity: h_i = S_i_in
            assert isinstance(up, nn.Linear)  # (a ModuleList yields Modules)
            nn.init.zeros_(up.weight)
            nn.init.zeros_(up.bias)

    def forward(self, taps: torch.Tensor) -> torch.Tensor:
        """Tapped activations (..., K, d) of each token -> side output h_K (..., d)."""
        h = taps[..., 0, :]
        for i, (down, up) in enumerate(zip(self.down, self.up, strict=True)):
            if i > 0:
                mu = torch.sigmoid(self.alpha[i - 1] / self.gate_temperature)
                h = (1 - mu) * taps[..., i, :] + mu * h
            h = h + up(nn.functional.gelu(down(h)))
        return h


def pack_tokens(activations: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
    """(n, K, T', d) -> (M, K, d): the real tokens' vectors, sample-major (no mask: T' = 1, M = n).

    Pad tokens are never sent nor computed on: chatterbot texts fill 11.8 of 32 positions.
    """
    if token_mask is None:
        return activations[:, :, 0]
    return activations.transpose(1, 2)[token_mask]


def unpack_tokens(tokens: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
    """Inverse of :func:`pack_tokens`: (M, K, ...) -> (n, K, T', ...), zeros where not sent."""
    if token_mask is None:
        return tokens.unsqueeze(2)
    out = tokens.new_zeros((*token_mask.shape, *tokens.shape[1:]))  # (n, T, K, ...)
    out[token_mask] = tokens
    return out.transpose(1, 2)


_RECEIVED_MEMO_SIZE = 64  # evaluation batches remembered (test split, final per-client scores)


def _view_key(tensor: torch.Tensor) -> tuple:
    """Identity of a tensor view: its memory, offset, shape and strides (not its values)."""
    return (
        tensor.untyped_storage().data_ptr(),
        tensor.storage_offset(),
        tuple(tensor.shape),
        tensor.stride(),
        tensor.dtype,
    )


class SideTunedModel(nn.Module):
    """Frozen backbone (device) + gated adapter chain and head (server); logits (B, C).

    ``forward(input_ids, attention_mask, taps=None)``: with ``taps`` (cached features) the
    backbone is not run. Either way the activations pass the quantized link, so inference sees
    what training saw. Only ``side`` and ``head`` have ``requires_grad``: they are what travels.
    """

    label_perm: torch.Tensor  # a buffer (registered in __init__): head label -> true label

    def __init__(
        self, base: TextClassifierModel, spec: SideSpec, num_classes: int, width: float = 1.0
    ) -> None:
        super().__init__()
        config = base.backbone.config
        self.spec = spec
        self._received_memo: dict[tuple, tuple] = {}  # see forward()
        self.backbone = base.backbone.requires_grad_(False).eval()
        self.pooling = base.pooling  # "mean" | "first" | "last": how the head reads tokens
        self.layers = select_layers(int(config.num_hidden_layers), spec.num_taps)
        self.pivot = resolve_pivot(spec.pivot_rule, base.pooling) if spec.pivot_token else None
        hidden = int(config.hidden_size)
        self.side = GatedAdapterChain(
            len(self.layers),
            hidden,
            # width < 1: a width-sliced sub-model's adapters (fedsim/learning/slicing.py)
            scaled_size(max(1, hidden // spec.reduction_factor), width),
            spec.gate_temperature,
            spec.gate_init,
        )
        self.head = base.head  # trainable, same seeded init as the classifier's
        self.register_buffer(
            "label_perm", label_permutation(spec.label_key_seed, num_classes), persistent=False
        )

    def slim_layout(self) -> SlimLayout:
        """Width axes: each adapter's bottleneck (``side.<i>``); d, gates and head stay whole."""
        axes: dict[str, int] = {}
        dims: dict[str, tuple[AxisDim | None, ...]] = {}
        for i, down in enumerate(self.side.down):
            assert isinstance(down, nn.Linear)  # (a ModuleList yields Modules)
            axis = AxisDim(f"side.{i}")
            axes[axis.axis] = int(down.out_features)
            dims[f"side.down.{i}.weight"] = (axis, None)  # (r, d)
            dims[f"side.down.{i}.bias"] = (axis,)
            dims[f"side.up.{i}.weight"] = (None, axis)  # (d, r)
        return SlimLayout(axes=axes, dims=dims)

    def train(self, mode: bool = True) -> SideTunedModel:
        """Set training mode; the frozen backbone stays in eval mode (no dropout)."""
        super().train(mode)
        self.backbone.train(False)
        return self

    @torch.no_grad()
    def device_activations(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """The device's forward pass: (B, K, T', d) float32 at the tapped layers and tokens."""
        out = self.backbone(
            input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True
        )
        hidden = torch.stack([out.hidden_states[i] for i in self.layers], dim=1)
        return select_tokens(hidden, attention_mask, self.pivot).float()

    def token_mask(self, attention_mask: torch.Tensor) -> torch.Tensor | None:
        """Where the sent token vectors sit (B, T) bool; None with the pivot (one per sample)."""
        return attention_mask.bool() if self.pivot is None else None

    def side_logits(self, tokens: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
        """Server side: received token vectors (M, K, d) -> logits (n, C), head label space.

        The chain runs on the M real tokens only (it is position-wise); their outputs are then
        pooled per sample as the classifier pools (masked mean, first or last token).
        """
        h = self.side(tokens)  # (M, d)
        if token_mask is None:  # pivot: one vector per sample is already "pooled"
            return self.head(h)
        dense = h.new_zeros((*token_mask.shape, h.shape[-1]))  # (n, T, d)
        dense[token_mask] = h
        return self.head(pool_hidden_states(dense, token_mask, self.pooling))

    def decode(self, logits: torch.Tensor) -> torch.Tensor:
        """Head label space -> true label order (the device applies its key)."""
        return logits[:, self.label_perm]

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        taps: torch.Tensor | None = None,
        base_logits: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (B, C) in true label order, as the device would see them at inference.

        ``base_logits`` (B, C): the backbone's own prediction z_b, added (PAE's additive output).
        Evaluation on cached hidden states (``taps`` given, no autograd) sees the same batch
        every round: what the link delivers for it is a pure function of the batch, so it is
        computed once and remembered, keyed by the batch tensors' identity.
        """
        side = self._side_forward(input_ids, attention_mask, taps)
        return side if base_logits is None else base_logits.float() + side

    def _side_forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, taps: torch.Tensor | None
    ) -> torch.Tensor:
        if taps is None:
            taps = self.device_activations(input_ids, attention_mask)
        elif not torch.is_grad_enabled():
            key = (_view_key(taps), _view_key(attention_mask))
            memo = self._received_memo.get(key)
            if memo is None:
                memo = self._received(taps, attention_mask)
                while self._received_memo and len(self._received_memo) >= _RECEIVED_MEMO_SIZE:
                    self._received_memo.pop(next(iter(self._received_memo)))  # oldest first
                # The tensors ride along: their memory cannot be reused while the key lives.
                self._received_memo[key] = (*memo, taps, attention_mask)
            received, mask = memo[0], memo[1]
            return self.decode(self.side_logits(received, mask))
        received, mask = self._received(taps, attention_mask)
        return self.decode(self.side_logits(received, mask))

    def forget_batches(self) -> None:
        """Drop the remembered evaluation batches (``fedsim.learning.evaluation``'s protocol)."""
        self._received_memo.clear()

    def _received(
        self, taps: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """What the server reconstructs of ``taps`` (M, K, d) and where the tokens sit."""
        mask = self.token_mask(attention_mask)
        tokens = pack_tokens(taps, mask).float()  # what the link carries: (M, K, d)
        received = fake_quantize(tokens, self.spec.bits, self.spec.quant_scheme)  # type: ignore[arg-type]
        return received, mask


# --------------------------------------------------------------------------- the factory
def _weights_digest(backbone: nn.Module) -> str:
    """sha256 over the backbone's tensors (names, dtypes, shapes, bytes): the cache's identity."""
    digest = hashlib.sha256()
    for name, tensor in sorted(backbone.state_dict().items()):
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class SideTuningFactory:
    """Wraps a :class:`~fedsim.learning.models.TextClassifier`: a side-tuned model over it.

    ``featurize`` returns the classifier's ``input_ids``/``attention_mask``/``label`` plus, with
    ``cache_features``, ``taps``: (N, K, T', d) hidden states of the tapped layers and tokens.
    """

    def __init__(self, inner: TextClassifier, spec: SideSpec) -> None:
        if not isinstance(inner, TextClassifier):
            from fedsim.errors import ConfigError

            raise ConfigError(
                "model",
                type(inner).__name__,
                "side-tuning needs model=text_classifier (a transformers backbone)",
            )
        self.inner = inner
        self.spec = spec
        self._digest: str | None = None
        self._backbone: PreTrainedModel | None = None  # frozen: width-sliced sub-models share it

    def build(self, num_classes: int, width: float = 1.0) -> SideTunedModel:
        """A side-tuned model; head and side-net inits are drawn from the caller's seed.

        ``width`` < 1 scales every adapter's bottleneck (the HeteroFL sub-model of the side
        network); such sub-models share the frozen backbone of this factory's first build
        instead of holding a copy each (it never changes and runs without autograd).
        """
        base = self.inner.build(num_classes)
        if width != 1.0 and self._backbone is not None:
            base.backbone = self._backbone
        model = SideTunedModel(base, self.spec, num_classes, width)
        if self._backbone is None:
            self._backbone = model.backbone
        return model

    def featurize(self, ds: datasets.Dataset) -> dict[str, torch.Tensor]:
        """Token ids, mask and labels; plus the frozen backbone's tapped states if cached."""
        features = self.inner.featurize(ds)
        if not self.spec.cache_features:
            return self._with_base(ds, features, None)
        with torch.random.fork_rng(devices=[]):  # building draws inits: leave the caller's RNG
            probe = SideTunedModel(self.inner.build(1), self.spec, 1)
        stack = self._hidden_stack(probe.backbone, features)  # (N, L+1, T, d)
        layers = list(probe.layers)
        if layers == list(range(layers[0], layers[-1] + 1)):
            tapped = stack[:, layers[0] : layers[-1] + 1]  # a view: no copy of the memmap
        else:
            tapped = stack[:, layers]
        mask = features["attention_mask"]
        if probe.pivot is None:
            features[TAPS_KEY] = tapped
        else:  # one vector per layer, computed in chunks from the (possibly memmapped) stack
            features[TAPS_KEY] = torch.cat(
                [
                    select_tokens(
                        tapped[i : i + _FEATURIZE_BATCH].float(),
                        mask[i : i + _FEATURIZE_BATCH],
                        probe.pivot,
                    ).to(stack.dtype)
                    for i in range(0, len(mask), _FEATURIZE_BATCH)
                ]
            )
        return self._with_base(ds, features, stack)

    def _with_base(
        self, ds: datasets.Dataset, features: dict[str, torch.Tensor], stack: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        """``features`` plus the frozen zero-shot head's logits z_b (``base_head: zero_shot``)."""
        if self.spec.base_head != "zero_shot":
            return features
        import datasets as hf_datasets

        with torch.random.fork_rng(devices=[]):  # building draws a head init: leave the RNG
            base = self.inner.build(1)
        backbone = base.backbone.eval()  # frozen: no dropout
        names = class_names_of(ds)
        labels = hf_datasets.Dataset.from_dict({"text": names, "label": list(range(len(names)))})
        prototypes = _pooled_last(backbone, self.inner.featurize(labels), None, base.pooling)
        embeddings = _pooled_last(backbone, features, stack, base.pooling)
        features[BASE_KEY] = zero_shot_logits(embeddings, prototypes, self.spec.zero_shot_scale)
        return features

    def _hidden_stack(
        self, backbone: PreTrainedModel, features: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """All L+1 hidden states (N, L+1, T, d), from the disk cache or computed once."""
        torch_dtype, np_dtype = _DTYPES[self.spec.feature_dtype]
        ids, mask = features["input_ids"], features["attention_mask"]
        config = backbone.config
        shape = (len(ids), int(config.num_hidden_layers) + 1, ids.shape[1], int(config.hidden_size))
        if self.spec.feature_cache_dir is None:
            out = torch.empty(shape, dtype=torch_dtype)
            self._fill(backbone, ids, mask, out)
            return out
        if self._digest is None:
            self._digest = _weights_digest(backbone)
        key = hashlib.sha256()
        for part in (_FORMAT_VERSION, self._digest, self.spec.feature_dtype):
            key.update(part.encode())
        key.update(ids.numpy().tobytes())
        key.update(mask.numpy().tobytes())
        folder = Path(self.spec.feature_cache_dir).expanduser()
        path = folder / f"{key.hexdigest()[:32]}.npy"
        size_mb = math.prod(shape) * np.dtype(np_dtype).itemsize / 1e6
        if not path.exists():
            notice(
                f"computing the frozen backbone's hidden states of {len(ids):,} texts once "
                f"({size_mb:,.0f} MB, {self.spec.feature_dtype}) into {path}"
            )
            started = time.perf_counter()
            folder.mkdir(parents=True, exist_ok=True)
            tmp = folder / f"{path.stem}.{os.getpid()}.tmp.npy"
            array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np_dtype, shape=shape)
            self._fill(backbone, ids, mask, torch.from_numpy(array), bar=progress_bars())
            array.flush()
            del array
            os.replace(tmp, path)  # atomic: a concurrent reader sees no file or a whole one
            notice(f"hidden states cached in {time.perf_counter() - started:.1f} s")
        else:
            notice(f"hidden states of {len(ids):,} texts read from {path} ({size_mb:,.0f} MB)")
        return torch.from_numpy(np.load(path, mmap_mode="c"))  # copy-on-write: shared pages

    @staticmethod
    @torch.no_grad()
    def _fill(
        backbone: nn.Module,
        ids: torch.Tensor,
        mask: torch.Tensor,
        out: torch.Tensor,
        bar: bool = False,
    ) -> None:
        """Write the stacked hidden states of every row into ``out`` (N, L+1, T, d).

        ``bar``: a tqdm progress bar over the texts (on a terminal, for the one-off cache fill).
        The backbone (featurize's own probe copy) runs on the process's feature device, a GPU
        where the worker or server has one (fedsim/learning/placement.py); ``out`` stays on CPU.
        """
        from tqdm.auto import tqdm

        device = feature_device()
        backbone = backbone.to(device)  # no-op on CPU
        starts = range(0, len(ids), _FEATURIZE_BATCH)
        for start in tqdm(starts, desc="[fedsim] hidden states", unit="batch", disable=not bar):
            rows = slice(start, start + _FEATURIZE_BATCH)
            hidden = backbone(
                input_ids=ids[rows].to(device),
                attention_mask=mask[rows].to(device),
                output_hidden_states=True,
            ).hidden_states
            out[rows] = torch.stack(hidden, dim=1).to(device=out.device, dtype=out.dtype)


@torch.no_grad()
def _pooled_last(
    backbone: nn.Module,
    features: dict[str, torch.Tensor],
    stack: torch.Tensor | None,
    pooling: str,
) -> torch.Tensor:
    """Each row's pooled last hidden state (N, d): from ``stack`` (N, L+1, T, d), or computed."""
    ids, mask = features["input_ids"], features["attention_mask"]
    out = []
    for start in range(0, len(ids), _FEATURIZE_BATCH):
        rows = slice(start, start + _FEATURIZE_BATCH)
        if stack is not None:
            hidden = stack[rows, -1].float()
        else:
            hidden = backbone(input_ids=ids[rows], attention_mask=mask[rows]).last_hidden_state
        out.append(pool_hidden_states(hidden, mask[rows], pooling))  # type: ignore[arg-type]
    return torch.cat(out)


# --------------------------------------------------------------------------- device memory
def estimate_forward_memory_bytes(
    backbone: PreTrainedModel, batch_size: int, seq_len: int, payload_floats: int
) -> int:
    """Peak bytes of the device's forward-only step (float32), an analytic estimate.

    = all parameters
    + the L+1 hidden states ``output_hidden_states`` keeps until the forward returns
    + one layer's transient working set: Q, K, V, context and output (5 x B*T*d), attention
      scores and probabilities (2 x B*heads*T*T), the FFN's pre- and post-activation
      (2 x B*T*d_ff)
    + the tapped copy being quantized (``payload_floats`` float32 values).
    No autograd graph is kept (``torch.no_grad``); allocator overhead is not included.
    """
    config = backbone.config
    width, layers = int(config.hidden_size), int(config.num_hidden_layers)
    heads = int(config.num_attention_heads)
    ffn = int(
        getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * width
    )
    params = sum(p.numel() * p.element_size() for p in backbone.parameters())
    tokens = batch_size * seq_len
    hidden_kept = (layers + 1) * tokens * width
    layer_peak = 5 * tokens * width + 2 * batch_size * heads * seq_len**2 + 2 * tokens * ffn
    return params + _FLOAT32_BYTES * (hidden_kept + layer_peak + payload_floats)
