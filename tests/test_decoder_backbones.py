"""Side-tuning and the peft baselines on decoder backbones: tiny random GPT-2 and Llama configs.

Each backbone is saved to a temporary folder with the MiniLM tokenizer stripped of its pad token
and padding on the left, as GPT-2/Llama tokenizers are set up for batched classification.
"""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import huggingface_hub.constants
import pytest
import torch
from flwr.app import ConfigRecord, RecordDict

from fedsim.clients.peft_tuning import PeftTuning
from fedsim.clients.side_tuning.network import TAPS_KEY, SideTunedModel
from fedsim.clients.side_tuning.tuning import SideTuning
from fedsim.config import compose_config
from fedsim.learning.evaluation import evaluate
from fedsim.learning.models import TextClassifier, resolve_backbone
from fedsim.training.contract import TrainContext

TEXTS = [
    "how do I reset my phone",
    "tell me a joke",
    "what is a neural network",
    "I feel happy today",
    "who won the game",
    "is python a snake or a language",
]


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Everything here is local: a hub lookup must fail at once instead of retrying."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def save_decoder(folder: Path, kind: str) -> Path:
    from transformers import AutoTokenizer, GPT2Config, GPT2Model, LlamaConfig, LlamaModel

    tokenizer = AutoTokenizer.from_pretrained(resolve_backbone("minilm"))
    tokenizer.pad_token = None  # like GPT-2/Llama: the factory must fall back to eos
    tokenizer.eos_token = "[SEP]"
    tokenizer.padding_side = "left"
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    if kind == "gpt2":
        model = GPT2Model(
            GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=64, vocab_size=len(tokenizer))
        )
    else:
        model = LlamaModel(
            LlamaConfig(
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=2,
                num_key_value_heads=1,
                max_position_embeddings=64,
                vocab_size=len(tokenizer),
            )
        )
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def decoder_folder(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    return save_decoder(tmp_path_factory.mktemp(f"tiny_{request.param}"), request.param)


@pytest.fixture(scope="module")
def texts() -> datasets.Dataset:
    return datasets.Dataset.from_dict({"text": TEXTS, "label": [0, 1, 2, 1, 0, 2]})


def context(state: RecordDict | None = None) -> TrainContext:
    return TrainContext(
        partition_id=0,
        server_round=1,
        config=ConfigRecord(),
        generator=torch.Generator().manual_seed(0),
        state=state if state is not None else RecordDict(),
    )


@pytest.mark.parametrize(
    ("pooling", "pivot", "rule"),
    [
        ("cls", False, None),  # all tokens, pooled at the last non-pad token
        ("cls", True, "last"),  # auto pivot on a decoder: the token whose state the head reads
        ("mean", True, "mean"),
    ],
)
def test_side_tuning_on_decoder(
    decoder_folder, texts, tmp_path, pooling: str, pivot: bool, rule: str | None
) -> None:
    client = SideTuning(
        local_epochs=2,
        batch_size=4,
        pivot_token=pivot,
        additive=pivot,
        activation_cache=pivot,
        feature_cache_dir=str(tmp_path),
    )
    factory = client.wrap_factory(
        TextClassifier(backbone=str(decoder_folder), max_length=8, pooling=pooling)
    )
    torch.manual_seed(0)
    model = factory.build(3)
    assert isinstance(model, SideTunedModel) and model.pivot == rule
    data = factory.featurize(texts)
    assert data[TAPS_KEY].shape == (6, 2, 1 if pivot else 8, 32)  # (N, K=2 layers, T', d)
    if rule == "last":  # left padding: the last position is the last real token
        direct = model.device_activations(data["input_ids"], data["attention_mask"])
        assert torch.allclose(data[TAPS_KEY].float(), direct, atol=1e-2)
    outcome = client.train(model, data, context())
    assert outcome.num_steps == 4 and outcome.extra_upload_bytes > 0
    assert evaluate(model, data)["accuracy"] >= 0.0
    cost = client.device_cost(model, {k: v[:4] for k, v in data.items()}, 6)
    assert cost.train_flops > 0 and cost.server_flops > 0


@pytest.mark.parametrize("method", ["lora", "ia3"])
def test_peft_on_decoder(decoder_folder, texts, method: str) -> None:
    client = PeftTuning(method=method, local_epochs=1, batch_size=3)
    factory = client.wrap_factory(
        TextClassifier(backbone=str(decoder_folder), max_length=8, pooling="cls")
    )
    torch.manual_seed(0)
    model = factory.build(3)
    data = factory.featurize(texts)
    outcome = client.train(model, data, context())
    assert outcome.num_steps == 2
    assert client.device_cost(model, {k: v[:3] for k, v in data.items()}, 6).train_flops > 0


@pytest.mark.slow
def test_simulation_pae_cache_cuts_round_two_upload(tmp_path: Path) -> None:
    from fedsim.engine.simulation import simulate

    folder = save_decoder(tmp_path / "gpt2", "gpt2")
    cfg = compose_config(
        [
            "experiment=mobile_side_tuning",
            "client=pae_side_tuning",
            "num_clients=3",
            "num_rounds=2",
            f"model.backbone={folder}",
            "model.max_length=8",
            "strategy.fraction_train=1.0",
            "devices=uniform",
            "runtime.progress=false",
            "runtime.engine=inline",
            f"client.feature_cache_dir={tmp_path / 'cache'}",
        ]
    )
    summary = simulate(cfg, tmp_path / "run")
    assert summary["status"] == "completed"
    rows = [json.loads(line) for line in (tmp_path / "run" / "clients.jsonl").open()]
    up = {(r["round"], r["partition_id"]): r["bytes_up"] for r in rows if "bytes_up" in r}
    assert len(up) == 6  # uniform fleet: always online, every client trains in both rounds
    for pid in range(3):  # round 2 uploads nothing: its activations are cached (server-side)
        assert up[(2, pid)] < up[(1, pid)]
