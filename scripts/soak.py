"""Soak: many rounds of a small config, to see whether memory creeps or files and processes leak.

Runs ``fedsim`` in-process on the real engine while a sampler thread sums the resident memory of
this process and all its descendants (the Ray head, raylet and workers) once a second. RSS growth
compares the mean of the last tenth of the samples with the mean of the samples just after round
``warmup_rounds`` (start-up allocations are not growth). Target: growth < 5%. Also reports the open
file descriptors and the descendant processes at the end.

    .venv/bin/python -m fedsim.scripts.bench --cases soak --rounds 500 --out results/bench_soak.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import psutil

__all__ = ["soak", "tree_rss_bytes"]

SOAK_OVERRIDES = [
    "num_clients=20",
    "strategy.fraction_train=0.25",
    "client.local_epochs=1",
    "checkpoint_every=50",
    "runtime.progress=false",
]
GROWTH_TARGET = 0.05  # the target: RSS grows less than 5% over the soak


def tree_rss_bytes(root: psutil.Process) -> tuple[int, int]:
    """Resident bytes of ``root`` and all its descendants, and how many descendants there are."""
    total, count = 0, 0
    for proc in [root, *root.children(recursive=True)]:
        try:
            total += proc.memory_info().rss
            count += proc is not root
        except psutil.Error:  # a process that ended while we looked
            continue
    return total, count


def soak(args: argparse.Namespace) -> dict[str, Any]:
    """``args.rounds`` rounds (500 for the issue's soak) of a small digits config."""
    from fedsim.config import compose_config
    from fedsim.engine.simulation import simulate

    run_dir = Path(args.work_dir) / "soak"
    shutil.rmtree(run_dir, ignore_errors=True)
    me = psutil.Process()
    samples: list[tuple[float, int, int]] = []  # (seconds since start, tree rss, rounds written)
    done = threading.Event()
    started = time.perf_counter()

    def sample() -> None:
        while not done.wait(1.0):
            rss, _ = tree_rss_bytes(me)
            metrics = run_dir / "metrics.jsonl"
            rounds = len(metrics.read_text().splitlines()) if metrics.exists() else 0
            samples.append((time.perf_counter() - started, rss, rounds))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    overrides = [*SOAK_OVERRIDES, f"num_rounds={args.rounds}", f"seed={args.seed}"]
    summary = simulate(compose_config(overrides), run_dir)
    done.set()
    sampler.join()
    warmup_rounds = max(1, args.rounds // 10)
    after_warmup = [rss for _, rss, rounds in samples if rounds >= warmup_rounds]
    if len(after_warmup) < 4:
        raise RuntimeError("soak too short to measure growth: use more --rounds")
    head = after_warmup[: max(1, len(after_warmup) // 10)]
    tail = after_warmup[-max(1, len(after_warmup) // 10) :]
    base, end = sum(head) / len(head), sum(tail) / len(tail)
    rss_end, descendants_end = tree_rss_bytes(me)
    result = {
        "rounds": summary["num_rounds"],
        "status": summary["status"],
        "final_accuracy": summary["final_accuracy"],
        "rss_after_warmup_gb": base / 1e9,
        "rss_end_gb": end / 1e9,
        "rss_growth": end / base - 1,
        "rss_growth_target": GROWTH_TARGET,
        "rss_growth_ok": end / base - 1 < GROWTH_TARGET,
        "rss_peak_gb": max(rss for _, rss, _ in samples) / 1e9,
        "open_files_end": me.num_fds(),
        "descendant_processes_end": descendants_end,
        "rss_after_run_gb": rss_end / 1e9,
        "seconds_per_round": samples[-1][0] / max(1, summary["num_rounds"]),
    }
    print(json.dumps(result, indent=2))
    return result
