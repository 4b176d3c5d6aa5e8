"""Where tensors live: the device a process trains or evaluates on, and moving data onto it.

CPU is the default everywhere, and on CPU every helper here is a no-op (``Tensor.to`` of a
tensor already on the device returns the tensor itself), so CPU runs stay bit for bit what
they were before devices were threaded through. A GPU is used only where the config asks:

* a Ray worker with ``runtime.client_num_gpus > 0`` trains on ``cuda:0`` of its own visible
  devices. Ray 2.55 sets ``CUDA_VISIBLE_DEVICES`` of each actor to the GPU ids it assigned
  (``ray.get_gpu_ids()``): with a fraction (0.25) that is the one GPU the fraction sits on, so
  four such workers see one GPU each, possibly the same one, always as ``cuda:0``. With
  ``num_gpus=0`` fedsim takes Ray's coming default (``RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=0``,
  fedsim/engine/ray_engine.py): Ray leaves the variable alone, so a CPU worker sees the
  machine's GPUs, but its device is the CPU (:func:`fedsim.engine.worker.client_device`) and
  every GPU step here is skipped on CPU;
* the server evaluates on ``runtime.server_device`` (:func:`server_device`);
* frozen-feature caches are computed on the device of the process that computes them
  (:func:`computing_on`, read by :func:`feature_device`) and stored on CPU.

Outgoing tensors go back to CPU where they are serialised (``fedsim/learning/params.py`` and
Flower's ``Array.from_torch_tensor`` both call ``.cpu()``).
"""

from __future__ import annotations

import contextvars
import gc
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch

__all__ = [
    "CPU",
    "CUBLAS_WORKSPACE",
    "apply_determinism",
    "computing_on",
    "feature_device",
    "model_device",
    "peak_memory_bytes",
    "release",
    "server_device",
    "to_device",
]

CPU = torch.device("cpu")
#: cuBLAS needs a fixed workspace for reproducible matmuls (CUDA docs, "Results reproducibility";
#: torch.use_deterministic_algorithms raises without it). ":4096:8" is the larger of the two
#: settings NVIDIA documents: 8 buffers of 4 MiB, about 24 MiB more GPU memory per process.
CUBLAS_WORKSPACE = ":4096:8"

_FEATURE_DEVICE: contextvars.ContextVar[torch.device] = contextvars.ContextVar(
    "fedsim_feature_device", default=CPU
)


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of ``model``'s first parameter (or buffer); CPU for a model with neither."""
    for param in model.parameters():
        return param.device
    for buffer in model.buffers():
        return buffer.device
    return CPU


def to_device(tensors: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Each tensor of ``tensors`` on ``device`` (the same objects when already there)."""
    return {key: value.to(device) for key, value in tensors.items()}


def server_device(spec: str | None) -> torch.device:
    """The device ``runtime.server_device`` names; ``fedsim.config.validate`` checked it exists.

    ``auto``: the visible GPU with the most free memory (``torch.cuda.mem_get_info``; the first
    of equals), CPU when there is none. The server shares the GPUs with the Ray workers, whose
    use Ray does not tell it about, so free memory is the one signal it has. ``None`` (a run
    folder saved before the key existed) is ``cpu``.
    """
    spec = "cpu" if spec is None else str(spec)
    if spec != "auto":
        return torch.device(spec)
    if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
        return CPU
    free = [torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count())]
    return torch.device("cuda", max(range(len(free)), key=lambda i: (free[i], -i)))


def apply_determinism(device: torch.device, deterministic: bool) -> None:
    """On CUDA with ``deterministic``: the switches PyTorch's reproducibility notes list.

    ``CUBLAS_WORKSPACE_CONFIG`` (set only where the user has not, and read by cuBLAS when a
    process makes its first handle: call this before the first GPU matmul),
    ``torch.use_deterministic_algorithms(True, warn_only=True)`` (an op without a deterministic
    CUDA kernel warns instead of stopping the run: ``index_add_``'s and ``scatter_add_``'s
    backward use atomics) and cuDNN without autotuning (``benchmark=False``,
    ``deterministic=True``). Process-wide: on CPU nothing is touched, so CPU runs are unchanged.
    """
    if device.type != "cuda" or not deterministic:
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True


def release(device: torch.device) -> None:
    """Between two clients on a GPU: collect the last one's garbage, return cached blocks.

    Only on CUDA: on CPU the allocator gives freed memory back itself, and a full collection
    per client-round would cost time for nothing.
    """
    if device.type != "cuda":
        return
    gc.collect()  # reference cycles (autograd graphs held by closures) free their tensors
    torch.cuda.empty_cache()


def peak_memory_bytes(device: torch.device) -> int | None:
    """Peak GPU memory allocated on ``device`` since the last call (None on CPU); resets it."""
    if device.type != "cuda":
        return None
    peak = int(torch.cuda.max_memory_allocated(device))
    torch.cuda.reset_peak_memory_stats(device)
    return peak


@contextmanager
def computing_on(device: torch.device) -> Iterator[None]:
    """Within the block, frozen features (``featurize``) are computed on ``device``."""
    token = _FEATURE_DEVICE.set(device)
    try:
        yield
    finally:
        _FEATURE_DEVICE.reset(token)


def feature_device() -> torch.device:
    """Where this process computes frozen features now (:func:`computing_on`; CPU by default)."""
    return _FEATURE_DEVICE.get()
