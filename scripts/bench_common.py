"""What the benchmark cases share: running fedsim in a fresh process, reading its files."""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fedsim.records.results import read_jsonl

__all__ = ["MiB", "multirun", "run_fedsim", "read_jsonl", "measure_peak_bytes", "steady_round_s"]

MiB = 2**20


def run_fedsim(overrides: Sequence[str], run_dir: Path, reuse: bool = False) -> dict[str, Any]:
    """Run ``fedsim`` in a fresh process; return its summary plus the process wall time."""
    summary_path = run_dir / "summary.json"
    if reuse and summary_path.is_file():
        return json.loads(summary_path.read_text()) | json.loads(
            (run_dir / "bench_wall.json").read_text()
        )
    if run_dir.exists():
        shutil.rmtree(run_dir)
    env = os.environ | {"HF_HUB_OFFLINE": "1"}
    cmd = [
        sys.executable,
        "-m",
        "fedsim",
        *overrides,
        f"hydra.run.dir={run_dir}",
        "runtime.progress=false",
    ]
    started = time.perf_counter()
    log = run_dir.parent / f"{run_dir.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as handle:
        done = subprocess.run(cmd, env=env, stdout=handle, stderr=subprocess.STDOUT, check=False)
    if done.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-15:])
        raise RuntimeError(f"fedsim failed ({done.returncode}), see {log}:\n{tail}")
    wall = {"process_wall_s": time.perf_counter() - started}
    (run_dir / "bench_wall.json").write_text(json.dumps(wall))
    return json.loads(summary_path.read_text()) | wall


def measure_peak_bytes(step: Callable[[], object], resident_bytes: int) -> int:
    """``resident_bytes`` + the peak of the allocations ``step`` makes, seen by torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted(
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]"
    )
    running = peak = 0
    for _, nbytes in events:  # allocations are positive, frees negative
        running += nbytes
        peak = max(peak, running)
    return resident_bytes + peak


def steady_round_s(rows: list[dict[str, Any]]) -> float:
    """Median wall seconds of a round after the first (round 1 also starts the Ray workers)."""
    times = [b["wall_time_s"] - a["wall_time_s"] for a, b in zip(rows, rows[1:], strict=False)]
    return statistics.median(times) if times else float("nan")


def multirun(overrides: list[str], sweep_dir: Path) -> tuple[list[dict[str, Any]], float]:
    """A Hydra multirun in a fresh process; each job's summary and the process wall time."""
    shutil.rmtree(sweep_dir, ignore_errors=True)  # the bench owns its work folder
    env = os.environ | {"HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "fedsim", "--multirun", *overrides]
    cmd += [f"hydra.sweep.dir={sweep_dir}", "runtime.progress=false"]
    started = time.perf_counter()
    log = sweep_dir.parent / f"{sweep_dir.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as handle:
        done = subprocess.run(cmd, env=env, stdout=handle, stderr=subprocess.STDOUT, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"fedsim --multirun failed ({done.returncode}), see {log}")
    wall = time.perf_counter() - started
    jobs = sorted((p for p in sweep_dir.iterdir() if p.is_dir()), key=lambda p: int(p.name))
    return [
        json.loads((job / "summary.json").read_text()) | {"dir": str(job)} for job in jobs
    ], wall
