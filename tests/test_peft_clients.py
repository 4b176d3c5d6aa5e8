"""Tests for the on-device baselines (LoRA, IA3, full fine-tuning) on the real MiniLM backbone."""

from __future__ import annotations

import datasets
import huggingface_hub.constants
import pytest
import torch
from flwr.app import ConfigRecord, RecordDict

from fedsim.clients.peft_tuning import PeftTuning
from fedsim.clients.side_tuning.tuning import SideTuning
from fedsim.errors import ConfigError
from fedsim.learning.data import ChatterbotData
from fedsim.learning.models import TextClassifier, count_parameters
from fedsim.learning.params import to_arrays
from fedsim.training.contract import TrainContext

NUM_CLASSES = 21
HEAD = 384 * NUM_CLASSES + NUM_CLASSES  # linear head on MiniLM's 384-wide pooled output


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Everything here is local: a hub lookup must fail at once instead of retrying."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def texts() -> datasets.Dataset:
    return ChatterbotData().load().train.select(range(24))


@pytest.fixture(scope="module")
def minilm() -> TextClassifier:
    return TextClassifier(backbone="minilm", max_length=16)


def context() -> TrainContext:
    return TrainContext(
        partition_id=0,
        server_round=1,
        config=ConfigRecord(),
        generator=torch.Generator().manual_seed(0),
        state=RecordDict(),
    )


def build(client: PeftTuning, minilm: TextClassifier) -> torch.nn.Module:
    torch.manual_seed(0)
    return client.wrap_factory(minilm).build(NUM_CLASSES)


@pytest.mark.parametrize(
    ("method", "adapter", "trainable"),
    [
        # LoRA r=8 on query and value of 6 layers: 6 x 2 x (A 8x384 + B 384x8) = 73,728
        ("lora", {"r": 8, "lora_alpha": 16}, 73_728 + HEAD),
        # IA3 on BERT (peft defaults): key, value, attention.output.dense scale their 384 outputs,
        # the FFN's output.dense (feed-forward) scales its 1,536 inputs: 6 x (3 x 384 + 1,536)
        ("ia3", {}, 16_128 + HEAD),
        ("full", {}, 22_713_216 + HEAD),  # every MiniLM parameter
    ],
)
def test_trainable_parameters_by_hand(minilm, method: str, adapter: dict, trainable: int) -> None:
    model = build(PeftTuning(method=method, adapter=adapter), minilm)
    assert count_parameters(model, trainable_only=True) == trainable
    assert sum(v.numel() for v in to_arrays(model).to_torch_state_dict().values()) == trainable


@pytest.mark.parametrize("method", ["lora", "ia3"])
def test_adapters_train_and_base_weights_stay(minilm, texts, method: str) -> None:
    client = PeftTuning(method=method, local_epochs=1, batch_size=8, lr=1e-2)
    model = build(client, minilm)
    data = client.wrap_factory(minilm).featurize(texts)
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = {n: p.clone() for n, p in model.named_parameters() if p.requires_grad}
    outcome = client.train(model, data, context())
    assert outcome.num_steps == 3 and outcome.num_examples == 24  # 24 rows / 8
    params = dict(model.named_parameters())
    assert all(torch.equal(params[n], v) for n, v in frozen.items())
    assert any(not torch.equal(params[n], v) for n, v in trainable.items())


def test_memory_estimates_order_side_tuning_below_lora_below_full(minilm, texts, tmp_path) -> None:
    # The cost model's device peak on one batch of 16: side-tuning holds weights plus one
    # forward's activations; LoRA adds the autograd-saved activations; full FT adds gradients
    # and two AdamW states for all 22.7 M weights (3 x 91 MB).
    peaks = {}
    for name, client in [
        ("lora", PeftTuning(method="lora")),
        ("full", PeftTuning(method="full")),
        ("side", SideTuning(feature_cache_dir=str(tmp_path))),
    ]:
        factory = client.wrap_factory(minilm)
        torch.manual_seed(0)
        model = factory.build(NUM_CLASSES)
        batch = {k: v[:16] for k, v in factory.featurize(texts).items()}
        peaks[name] = client.device_cost(model, batch, 24).peak_memory_bytes
    weights = 22_713_216 * 4
    assert weights < peaks["side"] < peaks["lora"] < peaks["full"]
    assert peaks["full"] > 4 * weights  # weights + grads + 2 AdamW states + activations


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"method": "prefix"}, "client.method"),
        ({"method": "full", "adapter": {"r": 4}}, "client.adapter"),
        ({"method": "lora", "adapter": {"rank": 4}}, "client.adapter"),
        ({"lr": 0}, "client.lr"),
    ],
)
def test_bad_config_is_one_line_error(minilm, kwargs: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        PeftTuning(**kwargs).wrap_factory(minilm)
