"""Cost backbones (fedsim/learning/cost_backbone.py): meta-device costs checked by hand, the
shipped architectures against their published sizes, and the clients charging them."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest
import torch

from fedsim.clients.local_sgd import LocalSGD
from fedsim.clients.peft_tuning import PeftTuning
from fedsim.clock.scheduler import DeviceCost, charged_bytes
from fedsim.errors import ConfigError
from fedsim.learning.cost_backbone import (
    CostBackbone,
    activation_bytes_per_vector,
    cost_backbone_names,
    forward_flops,
    load_cost_backbone,
    meta_model,
    train_step_cost,
    trainable_bytes,
)
from fedsim.learning.params import arrays_nbytes, to_arrays

# A hand-made Llama: d = 64, 2 layers, 4 heads of 16 (2 kv heads: k and v are 64 -> 32), FFN 128,
# vocab 100, untied LM head.
TINY = CostBackbone(
    name="tiny",
    source="tests",
    published_params=0,
    config={
        "model_type": "llama",
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 128,
        "vocab_size": 100,
        "tie_word_embeddings": False,
    },
)
B, T = 2, 8  # N = 16 tokens
# Forward FLOPs, 2 per multiply-accumulate, N = 16 tokens:
#   q, o: 2 x 16 x 64 x 64 = 131,072 each; k, v: 2 x 16 x 64 x 32 = 65,536 each
#   attention: QK^T and PV, 2 x T x T x 16 per (sample, head), 8 of them: 2 x 16,384 = 32,768
#   FFN gate, up, down: 2 x 16 x 64 x 128 = 262,144 each
#   a layer: 2 x 131,072 + 2 x 65,536 + 32,768 + 3 x 262,144 = 1,212,416; two: 2,424,832
#   LM head: 2 x 16 x 64 x 100 = 204,800
BASE_FORWARD = 2_424_832
FORWARD = BASE_FORWARD + 204_800
# Parameters: embeddings 100 x 64 = 6,400; a layer: q 4,096 + k 2,048 + v 2,048 + o 4,096
# + 3 x 8,192 (FFN) + 2 x 64 (norms) = 36,992; final norm 64; LM head 6,400.
PARAMS = 6_400 + 2 * 36_992 + 64 + 6_400  # 86,848


def test_tiny_forward_flops_by_hand() -> None:
    assert forward_flops(TINY, B, T, lm_head=False) == BASE_FORWARD
    assert forward_flops(TINY, B, T, lm_head=True) == FORWARD


def test_tiny_full_fine_tuning_by_hand() -> None:
    step = train_step_cost(TINY, "full", B, T)
    # every linear needs its input and weight gradient: backward = 2 x forward
    assert step.train_flops == 3 * FORWARD
    assert step.num_params == step.trainable_params == PARAMS
    assert step.memory.params == step.memory.grads == 4 * PARAMS  # float32
    assert step.memory.optimizer_state == 2 * 4 * PARAMS  # AdamW: two states
    # activations are measured; at least the 2 x 16 x 100 float32 log-probabilities of the loss
    assert step.memory.activations >= 4 * B * T * 100
    sgd = train_step_cost(TINY, "full", B, T, optimizer_states=0)
    assert sgd.memory.total == step.memory.total - 2 * 4 * PARAMS


def test_tiny_lora_by_hand() -> None:
    adapter = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0}
    step = train_step_cost(TINY, "lora", B, T, adapter=adapter)
    # peft's default targets for Llama: q_proj (A 4x64 + B 64x4 = 512), v_proj (256 + 32x4 = 384)
    lora = 2 * (512 + 384)  # 1,792
    assert step.trainable_params == lora
    assert trainable_bytes(meta_model(TINY, "lora", adapter)) == 4 * lora
    assert step.memory.grads == 4 * lora and step.memory.optimizer_state == 8 * lora
    full = train_step_cost(TINY, "full", B, T)
    # no weight gradients of the frozen base: between forward + input gradients and full FT
    assert FORWARD < step.train_flops < full.train_flops
    assert step.memory.total < full.memory.total


@pytest.mark.parametrize(
    ("bits", "per_token", "expected"),
    [(32, True, 256), (16, True, 128), (8, True, 66), (8, False, 64), (4, True, 34)],
)  # d = 64: 4 / 2 / 1 / 0.5 bytes a value, + 2 bytes of float16 scale below 16 bits per token
def test_activation_bytes_per_vector(bits: int, per_token: bool, expected: int) -> None:
    assert activation_bytes_per_vector(64, bits, per_token) == expected


@pytest.mark.parametrize("name", ["Qwen2.5-0.5B", "TinyLlama-1.1B", "OPT-1.3B", "GPT-2"])
def test_shipped_backbone_has_its_published_size_and_flops(name: str) -> None:
    backbone = load_cost_backbone(name)
    assert backbone.source.startswith("https://huggingface.co/")
    params = sum(p.numel() for p in meta_model(backbone).parameters())
    assert abs(params - backbone.published_params) <= 0.02 * backbone.published_params
    tokens = 1 * 128
    ratio = forward_flops(backbone, 1, 128, lm_head=True) / (2 * params * tokens)
    assert 0.9 <= ratio <= 1.1, ratio


def test_every_shipped_backbone_is_listed() -> None:
    assert cost_backbone_names() == ["GPT-2", "OPT-1.3B", "Qwen2.5-0.5B", "TinyLlama-1.1B"]


def test_unknown_backbone_names_the_key_and_the_choices() -> None:
    with pytest.raises(ConfigError) as error:
        LocalSGD(cost_backbone="Qwen-9B")
    assert error.value.key == "model.cost_backbone"
    assert "Qwen2.5-0.5B" in str(error.value) and "Qwen-9B" in str(error.value)
    with pytest.raises(ConfigError):
        LocalSGD(cost_backbone="GPT-2", cost_seq_len=0)


def test_cli_refuses_an_unknown_backbone_before_anything_starts() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "fedsim", "model.cost_backbone=Llama-70B"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "model.cost_backbone" in proc.stderr and "TinyLlama-1.1B" in proc.stderr
    assert "Ray" not in proc.stderr  # nothing started


def test_payload_scale_charges_scaled_bytes_and_is_exact_at_one() -> None:
    assert charged_bytes(12_345, DeviceCost(1, 1)) == 12_345
    assert charged_bytes(1_000, DeviceCost(1, 1, payload_scale=2.5)) == 2_500


def _digits_batch() -> dict[str, torch.Tensor]:
    return {"x": torch.zeros(16, 1, 8, 8), "label": torch.zeros(16, dtype=torch.long)}


def test_local_sgd_charges_the_backbone_and_its_bytes() -> None:
    from fedsim.learning.models import SmallCNN

    model = SmallCNN().build(10)
    plain = LocalSGD(batch_size=16, local_epochs=2).device_cost(model, _digits_batch(), 32)
    client = LocalSGD(batch_size=16, local_epochs=2, cost_backbone="GPT-2", cost_seq_len=64)
    cost = client.device_cost(model, _digits_batch(), 32)
    gpt2 = load_cost_backbone("GPT-2")
    # 2 local epochs x 32 examples = 4 batches of 16 causal-LM steps of 64 tokens
    step = train_step_cost(gpt2, "full", 16, 64, optimizer_states=0)
    assert cost.train_flops == 4 * step.train_flops
    assert cost.peak_memory_bytes == step.memory.total > 100 * plain.peak_memory_bytes
    # a message holding the CNN (22,602 float32 values as measured on the wire, .npy headers
    # included) is charged as GPT-2's 124,439,808 float32 values
    assert charged_bytes(arrays_nbytes(to_arrays(model)), cost) == 124_439_808 * 4
    with pytest.raises(ConfigError, match="model.cost_seq_len"):
        SmallCNN(cost_backbone="GPT-2")


def test_memory_orders_full_over_lora_over_side_tuning_on_qwen() -> None:
    qwen = load_cost_backbone("Qwen2.5-0.5B")
    lora = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": None}
    full = train_step_cost(qwen, "full", 16, 32).memory.total
    low = train_step_cost(qwen, "lora", 16, 32, adapter=lora).memory.total
    from fedsim.clients.side_tuning.network import estimate_forward_memory_bytes

    frozen = meta_model(qwen, "frozen").base_model
    side = estimate_forward_memory_bytes(frozen, 16, 32, 16 * 24 * 32 * 896)
    assert full > low > side
    assert PeftTuning(method="lora", adapter=lora, cost_backbone="Qwen2.5-0.5B").cost_backbone


# ----------------------------------------------------------------------------- DFL and widths
def test_dfl_charges_the_teachers_forward_on_the_backbone() -> None:
    from fedsim.clients.distillation import DFL, Distilled
    from fedsim.learning.models import SmallCNN

    model = SmallCNN().build(10)
    inner = LocalSGD(batch_size=16, local_epochs=2, cost_backbone="GPT-2", cost_seq_len=64)
    cost = Distilled(inner, DFL()).device_cost(model, _digits_batch(), 32)
    gpt2 = load_cost_backbone("GPT-2")
    # the teacher's one forward over the client's 32 examples: 2 batches of 16 x 64 tokens, LM
    # head included (a causal LM predicts), beside the 4 training batches of full fine-tuning
    teacher = 2 * forward_flops(gpt2, 16, 64, lm_head=True)
    assert cost.train_flops == inner.device_cost(model, _digits_batch(), 32).train_flops + teacher
    # the CNN's own forward is ~1e5 times smaller: it must not be what is added
    plain = Distilled(LocalSGD(batch_size=16, local_epochs=2), DFL())
    assert teacher > 1e4 * (
        plain.device_cost(model, _digits_batch(), 32).train_flops
        - LocalSGD(batch_size=16, local_epochs=2)
        .device_cost(model, _digits_batch(), 32)
        .train_flops
    )


def test_width_sliced_sub_models_are_refused_with_a_cost_backbone() -> None:
    from fedsim.learning.models import SmallCNN

    factory = SmallCNN(cost_backbone="GPT-2", cost_seq_len=64)
    full = factory.build(10)  # width 1: the model that trains, as without a backbone
    assert sum(p.numel() for p in full.parameters()) == 22_602
    with pytest.raises(ConfigError) as error:
        factory.build(10, width=0.5)  # HeteroFL's, FedRolex's and WHALE-FL's sub-models
    assert error.value.key == "model.cost_backbone" and "heterofl" in str(error.value)
    assert SmallCNN().build(10, width=0.5) is not None  # without a backbone: as before


# ----------------------------------------------------------------------------- llm_costs table
def test_llm_costs_table_is_the_clocks_numbers(tmp_path, capsys) -> None:
    """GPT-2 over 40 seeded phones: every cell recomputed from the clock's own functions."""
    from fedsim.clients.side_tuning.network import estimate_forward_memory_bytes
    from fedsim.clock.devices import ClientWork, client_energy_j, client_latency, fits_in_memory
    from fedsim.clock.server_view import nominal_observation
    from fedsim.config import build, compose_config
    from fedsim.scripts import llm_costs

    out = tmp_path / "costs.json"
    argv = ["--backbones", "GPT-2", "--methods", "lora", "side_tuning", "--population", "40"]
    assert llm_costs.main([*argv, "--examples", "40", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    rows = {row["method"]: row for row in json.loads(out.read_text())}
    gpt2 = load_cost_backbone("GPT-2")
    fleet = build(compose_config(["devices=phones_mixed"]), "devices")
    devices = fleet.assign(40, 0)
    lora = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": None}  # lora.yaml
    step = train_step_cost(gpt2, "lora", 16, 32, adapter=lora)
    # lora.yaml: 2 local epochs over 40 examples = 80 examples = 5 batches of 16
    payload = trainable_bytes(meta_model(gpt2, "lora", lora))  # c_attn's A and B, 12 layers
    assert payload == 12 * (768 * 8 + 8 * 2304) * 4
    # side_tuning.yaml: every one of the 12 layers tapped, 8 bits per token (d + 2 bytes); no
    # activation cache: the device forwards 80 samples of 32 tokens
    side_memory = estimate_forward_memory_bytes(
        meta_model(gpt2, "frozen").base_model, 16, 32, 16 * 12 * 32 * 768
    )
    expected = {
        "lora": (step.memory.total, 5 * step.train_flops, payload, payload),
        "side_tuning": (
            side_memory,
            5 * forward_flops(gpt2, 16, 32, lm_head=False),
            80 * 32 * 12 * (768 + 2),
            0,
        ),
    }
    for method, (memory, flops, up, down) in expected.items():
        row = rows[method]
        assert (row["peak_memory_bytes"], row["round_flops"]) == (memory, flops)
        assert (row["bytes_up"], row["bytes_down"]) == (up, down)
        assert row["gflops_per_sample"] == pytest.approx(flops / 80 / 1e9)
        work = ClientWork(flops, down, up, memory)
        fitting = [p for p in devices if fits_in_memory(p, work)]
        assert row["fit_share"] == len(fitting) / 40 and fitting
        latencies = sorted(
            (
                (client_latency(nominal_observation(p).state(), work, fleet.server_gflops), p)
                for p in fitting
            ),
            key=lambda pair: pair[0].total_s,
        )
        latency, profile = latencies[(len(latencies) - 1) // 2]  # the median feasible phone
        assert row["device"] == profile.name and row["round_s"] == latency.total_s
        assert row["energy_j"] == client_energy_j(profile, latency)
        assert f"| GPT-2 | {method} | {memory / 2**30:.2f} GiB |" in printed


# ----------------------------------------------------------------------------- real runs
QWEN = "Qwen2.5-0.5B"
#: MiniLM on chatterbot, two local steps of 16 samples of 16 tokens, 2 of 4 phones sampled. Seed 1
#: assigns low, high, mid, mid and samples clients 0 (low-end) and 1 (high-end).
RUN = [
    "data=chatterbot",
    "model=text_classifier",
    "model.max_length=16",
    "client.max_steps=2",
    "num_clients=4",
    "num_rounds=1",
    "strategy.fraction_train=0.5",
    "runtime.progress=false",
    "runtime.engine=inline",
    "devices=phones_mixed",
    "seed=1",
]


def _run(tmp_path, client: str, backbone: str | None) -> tuple[dict, list[dict], list[dict], Any]:
    """summary, metrics rows and clients rows of one real run, and its config."""
    from fedsim.config import compose_config
    from fedsim.engine.simulation import simulate
    from fedsim.records.results import read_jsonl, read_metrics

    overrides = [*RUN, f"client={client}"]
    overrides += [] if backbone is None else [f"model.cost_backbone={backbone}"]
    cfg = compose_config(overrides)
    run_dir = tmp_path / f"{client}-{backbone}"
    summary = simulate(cfg, run_dir)
    return summary, read_metrics(run_dir), list(read_jsonl(run_dir / "clients.jsonl")), cfg


def _expected_device_cost(cfg: Any) -> tuple[int, int]:
    """(train FLOPs, peak memory) of a client-round, from the cost model's own functions.

    Every sampled client has more than 32 examples: two steps of 16 samples of 16 tokens (lora:
    2 training steps; side-tuning: the device forwards the 32 samples the server trains on).
    """
    from fedsim.clients.side_tuning.network import estimate_forward_memory_bytes
    from fedsim.config import build

    qwen = load_cost_backbone(QWEN)
    behaviour = build(cfg, "client")
    if isinstance(behaviour, PeftTuning):
        step = train_step_cost(qwen, "lora", 16, 16, adapter=dict(cfg.client.adapter))
        return 2 * step.train_flops, step.memory.total
    # every one of Qwen's 24 layers tapped at d = 896; PAE keeps one position (the pivot)
    positions = 1 if behaviour.spec.pivot_token else 16
    base = meta_model(qwen, "frozen").base_model
    memory = estimate_forward_memory_bytes(base, 16, 16, 16 * 24 * positions * 896)
    return 2 * forward_flops(qwen, 16, 16, lm_head=False), memory


def _check_clock(rows: list[dict], summary: dict, cfg: Any) -> list[dict]:
    """The rows are the cost model's: FLOPs, memory, the infeasible low-end phone, the clock."""
    from fedsim.clock.devices import Latency, client_energy_j
    from fedsim.config import build

    flops, memory = _expected_device_cost(cfg)
    fleet = build(cfg, "devices")
    profiles = {p.name: p for p in fleet.profiles}
    assert [(r["partition_id"], r["device"]) for r in rows] == [
        (0, "low_end_phone"),
        (1, "high_end_phone"),
    ]
    for row in rows:
        assert (row["train_flops"], row["peak_memory_bytes"]) == (flops, memory)
    # 2.04 / 2.64 GB do not fit the low-end phone's 2 GB: never sent, recorded as infeasible
    assert memory > profiles["low_end_phone"].memory_gb * 1e9
    assert rows[0]["outcome"] == "infeasible" and "latency_s" not in rows[0]
    ok = rows[1]
    assert ok["outcome"] == "ok"
    # the clock's arithmetic on those numbers: seconds = FLOPs / rate, bits / link rate
    assert ok["compute_s"] == pytest.approx(flops / (ok["compute_gflops"] * 1e9), rel=1e-12)
    assert ok["upload_s"] == pytest.approx(ok["bytes_up"] * 8 / (ok["uplink_mbps"] * 1e6))
    assert ok["download_s"] == pytest.approx(ok["bytes_down"] * 8 / (ok["downlink_mbps"] * 1e6))
    parts = (ok["download_s"], ok["compute_s"], ok["upload_s"], ok["server_s"], ok["latency_s"])
    energy = client_energy_j(profiles["high_end_phone"], Latency(*parts))
    assert ok["energy_j"] == pytest.approx(energy, rel=1e-12)
    assert summary["sim_time_s"] == pytest.approx(ok["latency_s"], rel=1e-12)
    # seed 1's four phones: the low-end one holds neither method; mid-range (3 GB) and high do
    assert summary["num_clients_fitting"] == 3
    return rows


def _names_the_backbone(summary: dict, metrics: list[dict]) -> None:
    assert summary["status"] == "completed" and summary["cost_backbone"] == QWEN
    assert [row["cost_backbone"] for row in metrics] == [QWEN]


@pytest.mark.slow
def test_lora_run_charges_qwen(tmp_path) -> None:
    from fedsim.scripts import plot

    summary, metrics, rows, cfg = _run(tmp_path, "lora", QWEN)
    _names_the_backbone(summary, metrics)
    _check_clock(rows, summary, cfg)
    # Qwen's LoRA (r 8 on q_proj and v_proj, 24 layers: 540,672 values) each way, not MiniLM's
    qwen_lora = 24 * (8 * 896 + 896 * 8 + 8 * 896 + 128 * 8) * 4
    assert rows[1]["bytes_down"] == rows[1]["bytes_up"] == qwen_lora == 2_162_688
    assert summary["bytes_up_total"] == summary["bytes_down_total"] == qwen_lora
    # fedsim-plot names the backbone on the cost axes and in the caption
    out = tmp_path / "fig.png"
    assert plot.main([str(tmp_path), "--out", str(out), "--x", "sim_time"]) == 0
    assert f"charged for {QWEN} (model.cost_backbone)" in out.with_suffix(".md").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("client", ["side_tuning", "pae_side_tuning"])
def test_side_tuning_run_charges_qwen(tmp_path, client: str) -> None:
    from fedsim.clients.side_tuning.network import select_layers

    plain, _, plain_rows, _ = _run(tmp_path, client, None)
    summary, metrics, rows, cfg = _run(tmp_path, client, QWEN)
    _names_the_backbone(summary, metrics)
    _check_clock(rows, summary, cfg)
    assert "cost_backbone" not in plain
    # MiniLM fits the low-end phone; Qwen does not, so only client 1 trains with the backbone
    # (the accuracies differ by that). Client 1 trains the same round in both runs: its
    # uploaded activations are the measured ones scaled per vector, Qwen's 24 taps of 896 + 2
    # bytes over MiniLM-L6's taps of 384 + 2 bytes (8 bits, a float16 scale per token).
    assert [row["outcome"] for row in plain_rows] == ["ok", "ok"]
    minilm_taps = len(select_layers(6, cfg.client.num_taps))
    scale = (24 * (896 + 2)) / (minilm_taps * (384 + 2))
    measured = plain_rows[1]["bytes_up"]
    assert plain_rows[1]["bytes_down"] == rows[1]["bytes_down"] == 0  # the side net stays put
    assert abs(rows[1]["bytes_up"] - measured * scale) <= 1
    # the same phone in the same conditions computes Qwen's forward, ~30x MiniLM-L6's
    assert rows[1]["compute_gflops"] == plain_rows[1]["compute_gflops"]
    assert rows[1]["compute_s"] > 20 * plain_rows[1]["compute_s"]


def test_only_model_sized_records_and_payload_extras_scale() -> None:
    """DFL's per-class targets (C x C) travel as measured beside a scaled model."""
    import numpy as np
    from flwr.app import Array, ArrayRecord, RecordDict

    from fedsim import keys
    from fedsim.clock.scheduler import device_link_bytes

    model = ArrayRecord({"w": Array(np.zeros(1000, dtype=np.float32))})
    targets = ArrayRecord({"q": Array(np.zeros((10, 10), dtype=np.float32))})
    content = RecordDict({keys.ARRAYS: model, keys.DFL_CLASS_TARGETS: targets})
    model_bytes, target_bytes = arrays_nbytes(model), arrays_nbytes(targets)
    cost = DeviceCost(1, 1, payload_scale=10.0)
    assert device_link_bytes(content, cost) == 10 * model_bytes + target_bytes
    assert device_link_bytes(content, DeviceCost(1, 1)) == model_bytes + target_bytes
    assert device_link_bytes(content, DeviceCost(1, 1, model_on_server=True)) == 0
