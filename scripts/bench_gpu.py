"""Benchmark case ``gpu``: side-tuning and LoRA clients on one GPU against the CPU (issue 17).

For each method (``client=side_tuning`` and ``client=lora`` on the showcase task,
``experiment=mobile_side_tuning``, every client in every round) it runs fedsim once on the CPU
(one worker per core) and once per GPU share in ``--gpu-shares`` (``runtime.client_num_gpus``:
1 = one worker on the GPU, 0.25 = four workers sharing it; ``runtime.server_device=cuda``), and
reports:

* client-rounds per second, after the first round (which also starts the workers and computes
  the frozen features): clients trained in rounds 2..R over the wall seconds they took;
* peak GPU memory per worker: the largest ``gpu_peak_bytes`` of ``clients.jsonl`` (the worker's
  ``torch.cuda.max_memory_allocated`` during one client-round, fedsim/engine/worker.py);
* the speed-up of the best GPU share over the CPU run;
* concurrent clients per GPU: the most workers a share ran (measured), and how many would fit
  in the GPU's memory at the measured peak plus each process's CUDA context (an estimate).

``--overrides`` are added to every run. ``scripts/gpu_check.sh`` gives
``model.backbone=<MiniLM's config and tokenizer> model.init=random``: the same architecture at
random weights, whose speed and memory are the pretrained model's (the weights do not fit in the
GPU machine's call; results/README.md shows both inits on the CPU).

Without CUDA it prints one line saying so and returns ``skipped`` with the reason (the JSON
keeps it): nothing here is measured on a CPU-only machine.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

import torch

from fedsim.scripts.bench_common import MiB, read_jsonl, run_fedsim

__all__ = ["METHODS", "gpu", "skip_reason"]

METHODS = ("side_tuning", "lora")
BASE = ["experiment=mobile_side_tuning", "strategy.fraction_train=1.0", "runtime.client_num_cpus=1"]
#: Memory a process's CUDA context takes besides its tensors (not in max_memory_allocated);
#: our assumption for the fit estimate, about what an H100/H200 context takes with PyTorch 2.x.
CUDA_CONTEXT_MIB = 500


def skip_reason() -> str | None:
    """Why the case cannot run here (no CUDA), or None."""
    if torch.cuda.is_available():
        return None
    return f"no CUDA device (torch {torch.__version__}: torch.cuda.is_available() is False)"


def _throughput(run_dir: Path) -> float:
    """Client-rounds per second over rounds 2..R (round 1 pays the start-up)."""
    rows = read_jsonl(run_dir / "metrics.jsonl")
    later = rows[1:]
    seconds = rows[-1]["wall_time_s"] - rows[0]["wall_time_s"]
    return sum(r["num_clients"] for r in later) / seconds if seconds > 0 else float("nan")


def _peak_mib(run_dir: Path) -> float:
    peaks = [
        r["gpu_peak_bytes"] for r in read_jsonl(run_dir / "clients.jsonl") if "gpu_peak_bytes" in r
    ]
    return max(peaks) / MiB if peaks else float("nan")


def _method(method: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    common = [*BASE, f"client={method}", f"num_rounds={args.gpu_rounds}", f"seed={args.seed}",
              *(args.overrides or [])]  # fmt: skip
    run_fedsim(common, work / method / "cpu")
    result: dict[str, Any] = {"cpu_client_rounds_per_s": _throughput(work / method / "cpu")}
    total_mib = torch.cuda.get_device_properties(0).total_memory / MiB
    shares: dict[str, dict[str, Any]] = {}
    for share in args.gpu_shares:
        workers = max(1, math.floor(1 / share))
        name = f"share_{share:g}"
        run_dir = work / method / name
        gpu = [f"runtime.client_num_gpus={share:g}", "runtime.server_device=cuda",
               f"runtime.num_lanes={workers}"]  # fmt: skip
        run_fedsim([*common, *gpu], run_dir)
        peak = _peak_mib(run_dir)
        shares[name] = {
            "workers_per_gpu": workers,
            "client_rounds_per_s": _throughput(run_dir),
            "peak_gpu_mib_per_worker": peak,
            "fit_estimate_workers_per_gpu": math.floor(total_mib / (peak + CUDA_CONTEXT_MIB)),
        }
        print(
            f"[bench] gpu {method} {name}: {shares[name]['client_rounds_per_s']:.2f} "
            f"client-rounds/s, peak {peak:.0f} MiB per worker"
        )
    best = max(shares.values(), key=lambda s: s["client_rounds_per_s"])
    result |= {
        "shares": shares,
        "speedup_over_cpu": best["client_rounds_per_s"] / result["cpu_client_rounds_per_s"],
        "concurrent_clients_per_gpu_measured": max(s["workers_per_gpu"] for s in shares.values()),
        "gpu_total_mib": total_mib,
    }
    print(
        f"[bench] gpu {method}: CPU {result['cpu_client_rounds_per_s']:.2f} client-rounds/s, "
        f"speed-up {result['speedup_over_cpu']:.1f}x"
    )
    return result


def gpu(args: argparse.Namespace) -> dict[str, Any]:
    """The ``gpu`` case (module docstring); one line and ``skipped`` where there is no CUDA."""
    reason = skip_reason()
    if reason is not None:
        print(f"[bench] gpu: skipped: {reason}")
        return {"skipped": True, "reason": reason}
    work = Path(args.work_dir) / "gpu"
    report: dict[str, Any] = {
        "skipped": False,
        "device": torch.cuda.get_device_name(0),
        "rounds": args.gpu_rounds,
        "overrides": list(args.overrides or []),
    }
    for method in METHODS:  # one method failing still leaves the other's figures
        try:
            report[method] = _method(method, args, work)
        except RuntimeError as exc:  # run_fedsim: a run exited non-zero (its log's tail)
            print(f"[bench] gpu {method}: failed: {exc}")
            report[method] = {"failed": str(exc)}
    return report
