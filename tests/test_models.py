"""Tests for fedsim.learning.models: real MiniLM weights, a tiny GPT-2 folder, the digits CNN."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import datasets
import huggingface_hub.constants
import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from fedsim.errors import ConfigError
from fedsim.learning.models import (
    BACKBONE_ALIASES,
    ModelFactory,
    SmallCNN,
    TextClassifier,
    backbone_module,
    count_parameters,
    pool_hidden_states,
    resolve_backbone,
    sha256_of_file,
)

CONF_DIR = Path(__file__).resolve().parents[1] / "conf" / "model"
PINNED_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
SENTENCES = ["A man is eating food.", "Federated learning keeps the data on the phone."]
SEED = 1234


def digits_ds(num_rows: int = 6) -> datasets.Dataset:
    rng = np.random.default_rng(0)
    images = rng.random((num_rows, 8, 8), dtype=np.float32)
    return datasets.Dataset.from_dict(
        {"image": list(images), "label": [r % 10 for r in range(num_rows)]}
    )


def text_ds() -> datasets.Dataset:
    return datasets.Dataset.from_dict({"text": SENTENCES, "label": [0, 1]})


def assert_one_line_config_error(excinfo: pytest.ExceptionInfo[ConfigError], *parts: str) -> None:
    message = str(excinfo.value)
    assert "\n" not in message
    for part in parts:
        assert part in message


@pytest.fixture(scope="module")
def minilm() -> TextClassifier:
    return TextClassifier(backbone="minilm", max_length=32)


@pytest.fixture(scope="module")
def minilm_folder() -> Path:
    return Path(resolve_backbone("minilm"))


@pytest.fixture(scope="module")
def tiny_gpt2_folder(tmp_path_factory: pytest.TempPathFactory, minilm_folder: Path) -> Path:
    """Random 2-layer GPT-2 plus the MiniLM tokenizer stripped of its pad token, padding left."""
    from transformers import AutoTokenizer, GPT2Config, GPT2Model

    folder = tmp_path_factory.mktemp("tiny_gpt2")
    tokenizer = AutoTokenizer.from_pretrained(minilm_folder)
    tokenizer.pad_token = None  # like GPT-2/Llama: the factory must fall back to eos
    tokenizer.eos_token = "[SEP]"
    tokenizer.padding_side = "left"
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=64, vocab_size=len(tokenizer))
    GPT2Model(config).save_pretrained(folder)
    return folder


# --- helpers ------------------------------------------------------------------------------------
def test_count_parameters_trainable_only() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
    model[0].requires_grad_(False)
    assert count_parameters(model) == 11  # (3*2 + 2) + (2*1 + 1)
    assert count_parameters(model, trainable_only=True) == 3  # 2*1 + 1


@pytest.mark.parametrize(
    ("mask", "pooling", "expected"),
    [
        ([1, 1, 0], "mean", [2.0, 3.0]),  # ([1, 2] + [3, 4]) / 2; the pad row [50, 60] ignored
        ([1, 1, 0], "first", [1.0, 2.0]),
        ([1, 1, 0], "last", [3.0, 4.0]),  # right padding: last 1 is position 1
        ([0, 1, 1], "last", [50.0, 60.0]),  # left padding: last 1 is position 2
        ([0, 0, 0], "mean", [0.0, 0.0]),  # all pad: 0 / clamp(0, min=1)
    ],
)
def test_pool_hidden_states_by_hand(mask: list[int], pooling: str, expected: list[float]) -> None:
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [50.0, 60.0]]])  # (B=1, T=3, H=2)
    pooled = pool_hidden_states(hidden, torch.tensor([mask]), pooling)  # type: ignore[arg-type]
    assert pooled.tolist() == [expected]


# --- CNN ----------------------------------------------------------------------------------------
def test_small_cnn_shape_and_parameter_count() -> None:
    model = SmallCNN().build(num_classes=10)
    # conv1 1->16 3x3: 16*1*9 + 16 = 160; conv2 16->32 3x3: 32*16*9 + 32 = 4,640;
    # 8x8 -> pool -> 4x4 -> pool -> 2x2, so fc1 in = 32*2*2 = 128: 128*128 + 128 = 16,512;
    # fc2 128->10: 128*10 + 10 = 1,290. Total 160 + 4,640 + 16,512 + 1,290 = 22,602.
    assert count_parameters(model) == 22_602
    assert model(torch.zeros(5, 1, 8, 8)).shape == (5, 10)
    layer_types = {type(m) for m in model.modules() if list(m.parameters(recurse=False))}
    assert layer_types == {torch.nn.Conv2d, torch.nn.Linear}  # sliceable, no BatchNorm


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"image_size": 6}, "model.image_size"),  # 6 % 4 != 0 with two pools
        ({"kernel_size": 2}, "model.kernel_size"),
        ({"channels": []}, "model.channels"),
        ({"hidden_size": 0}, "model.hidden_size"),
    ],
)
def test_small_cnn_rejects_bad_config(kwargs: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError) as excinfo:
        SmallCNN(**kwargs)  # type: ignore[arg-type]
    assert_one_line_config_error(excinfo, key)


def test_small_cnn_featurize_rejects_wrong_image_size() -> None:
    with pytest.raises(ConfigError) as excinfo:
        SmallCNN(image_size=16).featurize(digits_ds())
    assert_one_line_config_error(excinfo, "model.image_size", "(1, 8, 8)")


# --- featurize and build, both factories --------------------------------------------------------
@pytest.mark.parametrize(
    ("factory_fn", "ds_fn", "expected"),
    [
        (SmallCNN, digits_ds, {"x": ((6, 1, 8, 8), torch.float32), "label": ((6,), torch.int64)}),
        (
            lambda: TextClassifier(max_length=32),
            text_ds,
            {
                "input_ids": ((2, 32), torch.int64),
                "attention_mask": ((2, 32), torch.int64),
                "label": ((2,), torch.int64),
            },
        ),
    ],
    ids=["cnn", "minilm"],
)
def test_featurize_shapes_and_forward(
    factory_fn: Callable[[], ModelFactory],
    ds_fn: Callable[[], datasets.Dataset],
    expected: dict[str, tuple[tuple[int, ...], torch.dtype]],
) -> None:
    factory = factory_fn()
    features = factory.featurize(ds_fn())
    assert {k: (tuple(v.shape), v.dtype) for k, v in features.items()} == expected
    model = factory.build(num_classes=3).eval()
    with torch.no_grad():
        logits = model(**{k: v for k, v in features.items() if k != "label"})
    assert logits.shape == (len(features["label"]), 3)


@pytest.mark.parametrize("factory_fn", [SmallCNN, TextClassifier], ids=["cnn", "minilm"])
def test_build_is_deterministic_under_seed(factory_fn: Callable[[], ModelFactory]) -> None:
    factory = factory_fn()
    states = []
    for seed in (SEED, SEED, SEED + 1):
        torch.manual_seed(seed)
        states.append(factory.build(num_classes=4).state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert not all(torch.equal(states[0][k], states[2][k]) for k in states[0])  # head differs


@pytest.mark.parametrize("option", ["cnn", "text_classifier"])
def test_yaml_option_instantiates(option: str) -> None:
    factory = instantiate(OmegaConf.load(CONF_DIR / f"{option}.yaml"))
    assert callable(factory.build) and callable(factory.featurize)


# --- MiniLM: real weights -----------------------------------------------------------------------
def test_minilm_alias_is_verified_and_pooling_matches_sentence_transformers(
    minilm: TextClassifier, minilm_folder: Path
) -> None:
    from sentence_transformers import SentenceTransformer

    assert minilm_folder.name == BACKBONE_ALIASES["minilm"].folder
    assert sha256_of_file(minilm_folder / "model.safetensors") == PINNED_SHA256
    model = minilm.build(num_classes=2).eval()
    features = minilm.featurize(text_ds())
    with torch.no_grad():
        ours = model.embed(features["input_ids"], features["attention_mask"])  # (2, 384)
    reference = SentenceTransformer(str(minilm_folder), device="cpu").encode(
        SENTENCES, convert_to_tensor=True
    )  # (2, 384), mean pooled then L2-normalised
    cosine = torch.nn.functional.cosine_similarity(ours, reference, dim=1)
    assert cosine.min().item() > 0.99


def test_minilm_backbone_reachable_with_hidden_states(minilm: TextClassifier) -> None:
    model = minilm.build(num_classes=2)
    features = minilm.featurize(text_ds())
    with torch.no_grad():
        out = backbone_module(model)(
            input_ids=features["input_ids"],
            attention_mask=features["attention_mask"],
            output_hidden_states=True,
        )
    assert len(out.hidden_states) == 7  # embeddings + 6 layers
    assert out.hidden_states[-1].shape == (2, 32, 384)
    with pytest.raises(TypeError):
        backbone_module(torch.nn.Linear(1, 1))


def test_minilm_frozen_backbone_trains_head_only() -> None:
    model = TextClassifier(freeze_backbone=True).build(num_classes=3)
    assert count_parameters(model, trainable_only=True) == 1_155  # head: 384*3 + 3
    model.train()
    assert model.head.training and not model.backbone.training  # frozen = no dropout


@pytest.mark.parametrize(
    ("use_alias", "expected_sha256"),
    [(False, PINNED_SHA256), (True, "0" * 64)],
    ids=["corrupted-copy", "alias-wrong-hash"],
)
def test_backbone_hash_mismatch_is_refused(
    tmp_path: Path, minilm_folder: Path, use_alias: bool, expected_sha256: str
) -> None:
    if use_alias:
        backbone = "minilm"
        weights = minilm_folder / "model.safetensors"
    else:
        copy = tmp_path / "minilm_copy"
        shutil.copytree(minilm_folder, copy)
        weights = copy / "model.safetensors"
        with weights.open("r+b") as handle:  # flip one byte of tensor data near the end
            handle.seek(-10, 2)
            byte = handle.read(1)
            handle.seek(-10, 2)
            handle.write(bytes([byte[0] ^ 0xFF]))
        backbone = str(copy)
    with pytest.raises(ConfigError) as excinfo:
        TextClassifier(backbone=backbone, expected_sha256=expected_sha256)
    assert_one_line_config_error(
        excinfo, "model.backbone", str(weights.resolve()), f"expected sha256 {expected_sha256}"
    )


@pytest.mark.parametrize("kind", ["absolute", "relative", "home", "file"])
def test_missing_backbone_path_is_refused(tmp_path: Path, kind: str) -> None:
    (tmp_path / "weights.bin").write_bytes(b"")
    backbone = {
        "absolute": str(tmp_path / "no_such_model"),
        "relative": "./no_such_model_folder",
        "home": "~/no_such_model_folder_fedsim",
        "file": str(tmp_path / "weights.bin"),
    }[kind]
    with pytest.raises(ConfigError) as excinfo:
        TextClassifier(backbone=backbone)
    assert_one_line_config_error(excinfo, f"model.backbone={backbone}", "local model folder")


def test_hub_name_offline_is_one_line_error(monkeypatch: pytest.MonkeyPatch) -> None:
    # Offline mode makes huggingface_hub fail at once instead of retrying for ~50 s.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    factory = TextClassifier(backbone="fedsim-test/no-such-model")
    for step in (lambda: factory.build(num_classes=2), lambda: factory.featurize(text_ds())):
        with pytest.raises(ConfigError) as excinfo:
            step()
        assert_one_line_config_error(excinfo, "model.backbone=fedsim-test/no-such-model", "HF hub")


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [({"pooling": "max"}, "model.pooling"), ({"max_length": 0}, "model.max_length")],
)
def test_text_classifier_rejects_bad_config(kwargs: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError) as excinfo:
        TextClassifier(**kwargs)  # type: ignore[arg-type]
    assert_one_line_config_error(excinfo, key)


# --- a text model from scratch: init: random (issue 14 item 7) ------------------------------
SMALL = {
    "num_hidden_layers": 2,
    "hidden_size": 64,
    "num_attention_heads": 2,
    "intermediate_size": 128,
}


def test_random_init_is_the_architecture_at_seeded_random_weights(monkeypatch) -> None:
    import fedsim.learning.models as models

    factory = TextClassifier(init="random", architecture=SMALL, init_seed=7)
    torch.manual_seed(SEED)
    model = factory.build(num_classes=3)
    backbone = backbone_module(model)
    assert (backbone.config.num_hidden_layers, backbone.config.hidden_size) == (2, 64)
    assert len(backbone.encoder.layer) == 2 and model.head.in_features == 64
    # The backbone's init draws from init_seed, not the caller's RNG: the head is the caller's
    # first draw, exactly as a bare Linear after the same manual_seed.
    torch.manual_seed(SEED)
    assert torch.equal(model.head.weight, torch.nn.Linear(64, 3).weight)
    # Every process builds the same weights (a fresh cache stands for another Ray worker); another
    # init_seed gives others.
    monkeypatch.setattr(models, "_RANDOM_BACKBONES", {})
    again = backbone_module(factory.build(num_classes=3)).state_dict()
    other = backbone_module(
        TextClassifier(init="random", architecture=SMALL, init_seed=8).build(num_classes=3)
    ).state_dict()
    for name, tensor in backbone.state_dict().items():
        assert torch.equal(tensor, again[name]), name
    assert not torch.equal(
        backbone.state_dict()["embeddings.word_embeddings.weight"],
        other["embeddings.word_embeddings.weight"],
    )
    # The tokenizer is MiniLM's: the same ids as the pretrained factory.
    ids = factory.featurize(text_ds())["input_ids"]
    assert torch.equal(ids, TextClassifier(max_length=32).featurize(text_ds())["input_ids"])


def test_random_init_at_full_size_is_not_the_pretrained_model(minilm: TextClassifier) -> None:
    random = backbone_module(TextClassifier(init="random").build(num_classes=2)).state_dict()
    pretrained = backbone_module(minilm.build(num_classes=2)).state_dict()
    assert random.keys() == pretrained.keys()
    for name in ("embeddings.word_embeddings.weight", "encoder.layer.0.output.dense.weight"):
        assert random[name].shape == pretrained[name].shape
        assert not torch.allclose(random[name], pretrained[name])


def test_text_scratch_option_composes_with_the_run_seed() -> None:
    from fedsim.config import compose_config

    cfg = compose_config(["model=text_scratch", "seed=5"])
    factory = instantiate(cfg.model)
    assert (factory.init, factory.init_seed) == ("random", 5)
    assert dict(factory.architecture)["num_hidden_layers"] == 2


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"init": "zeros"}, "model.init=zeros"),
        ({"architecture": {"num_hidden_layers": 2}}, "model.architecture="),
        ({"init": "random", "init_seed": 1.5}, "model.init_seed=1.5"),
    ],
)
def test_random_init_rejects_bad_config(kwargs: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError) as excinfo:
        TextClassifier(**kwargs)  # type: ignore[arg-type]
    assert_one_line_config_error(excinfo, key)


@pytest.mark.parametrize(
    ("architecture", "parts"),
    [
        ({"num_layerz": 2}, ("model.architecture.num_layerz=2", "is not a field of BertConfig")),
        ({"hidden_size": 65, "num_attention_heads": 2}, ("model.architecture=", "65")),
    ],
)
def test_random_init_bad_architecture_is_one_line_error(
    architecture: dict[str, object], parts: tuple[str, ...]
) -> None:
    factory = TextClassifier(init="random", architecture=architecture)
    with pytest.raises(ConfigError) as excinfo:
        factory.build(num_classes=2)
    assert_one_line_config_error(excinfo, *parts)


# --- decoder backbone from a local folder -------------------------------------------------------
@pytest.mark.parametrize(("pooling", "token_pooling"), [("mean", "mean"), ("cls", "last")])
def test_tiny_gpt2_local_folder(tiny_gpt2_folder: Path, pooling: str, token_pooling: str) -> None:
    factory = TextClassifier(backbone=str(tiny_gpt2_folder), max_length=16, pooling=pooling)
    features = factory.featurize(text_ds())
    assert features["input_ids"].shape == (2, 16)
    mask = features["attention_mask"]
    assert mask[:, 0].tolist() == [0, 0] and mask[:, -1].tolist() == [1, 1]  # padded on the left
    sep_id = 102  # MiniLM's [SEP], which the tokenizer now uses as eos and therefore as pad
    assert features["input_ids"][0, 0].item() == sep_id
    torch.manual_seed(SEED)
    model = factory.build(num_classes=3).eval()
    assert model.pooling == token_pooling  # "cls" on a causal decoder = last non-pad token
    with torch.no_grad():
        logits = model(features["input_ids"], features["attention_mask"])
        hidden = backbone_module(model)(**{k: features[k] for k in factory.input_keys})
    assert logits.shape == (2, 3)
    if token_pooling == "last":  # left padding: the last non-pad token is the final position
        expected = model.head(hidden.last_hidden_state[:, -1])
        torch.testing.assert_close(logits, expected)


def test_local_folder_without_model_is_one_line_error(tmp_path: Path) -> None:
    factory = TextClassifier(backbone=str(tmp_path))  # exists, so resolution passes
    with pytest.raises(ConfigError) as excinfo:
        factory.build(num_classes=2)
    assert_one_line_config_error(excinfo, f"model.backbone={tmp_path}", "not a loadable model")
