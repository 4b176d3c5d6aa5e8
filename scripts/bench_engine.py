"""Benchmark cases for the engine: overhead against the physical limit, plain Flower, scale, sweeps.

Every case runs its contenders on the same machine in the same bench invocation and reports
ratios (issue 8's targets in brackets):

* ``overhead_vs_plain`` (<= 1.0, never above 1.25): fedsim's wall time / a plain sequential
  PyTorch loop (``scripts/plain_loop.py``, one thread) doing identical FedAvg training on the
  digits CNN with 100 clients per round. fedsim's figure is a run inside a sweep (the engine
  already warm, as for every run of a sweep but the first: start-up included, imports not);
  the cold single run and the rounds alone are reported beside it. Issue 19's cold figures:
  ``cold_startup_s`` (<= 5), the seconds of a cold ``fedsim`` process outside its rounds
  (imports, Ray and workers, data, final evaluation, exit), and ``cold_overhead_vs_plain``
  (<= 1.5), that process / the plain loop run as a process of its own
  (``python -m fedsim.scripts.plain_loop``: its imports and data loading included). The same
  figures for ``runtime.engine=inline`` (no Ray: the clients train in turn in the driver) end
  in ``_inline`` (``cold_startup_s_inline``, ``cold_overhead_vs_plain_inline``,
  ``overhead_vs_plain_inline``), with whether its accuracy curve is the Ray engine's.
* ``speedup_vs_flower`` (>= 2): the same work as a minimal Flower app in the quickstart pattern
  (``scripts/flower_baseline.py``: one SuperNode per client) / fedsim, per run of a sweep:
  Flower starts its process and engine afresh for every run; fedsim's figure is a run inside
  a sweep (start-up and rounds). Beside it: both as cold single processes (fixed start-up
  weighs heavily on short runs), and the rounds alone. The two final global models are
  compared too (fedsim's FedAvg is Flower's).
* ``scale`` (``scale_rss_gb`` <= 4, ``scale_round_time_ratio`` <= 1.1): ``--scale-clients``
  virtual clients (1,000,000 by default, issue 19), 100 per round, against a 100-client
  population; RSS summed over the whole process tree (driver, Ray's daemons, workers), sampled
  every 0.2 s. Partitions and devices are drawn per client on demand, so the population costs
  what the clients a run touches cost.
* ``sweep_startup`` (paid once per sweep): an 8-run Hydra multirun; each run's ``startup_s``
  (what it paid before its first round) from its summary.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from fedsim.scripts.bench_common import multirun, read_jsonl, run_fedsim

__all__ = ["overhead_vs_plain", "speedup_vs_flower", "scale", "sweep_startup"]

CLIENTS_PER_ROUND = 100
ALL_SAMPLED = [f"num_clients={CLIENTS_PER_ROUND}", "strategy.fraction_train=1.0"]


def _throughput(client_rounds: int, seconds: float) -> float:
    return client_rounds / seconds if seconds > 0 else float("nan")


# --------------------------------------------------------------------------- overhead_vs_plain
def overhead_vs_plain(args: argparse.Namespace) -> dict[str, Any]:
    """Fedsim (warm engine, cold, rounds only) / the plain loop; accuracy curves compared."""
    from fedsim.config import compose_config
    from fedsim.learning.workload import get_workload
    from fedsim.scripts.plain_loop import plain_fedavg

    work = Path(args.work_dir) / "overhead_vs_plain"
    rounds = args.rounds
    overrides = [*ALL_SAMPLED, f"num_rounds={rounds}", f"seed={args.seed}"]
    cfg = compose_config(overrides)
    started = time.perf_counter()
    get_workload(cfg)  # the plain loop's start-up: load and partition the data
    plain_setup_s = time.perf_counter() - started
    plain = plain_fedavg(cfg)
    plain_total = plain_setup_s + plain.rounds_wall_s
    # Job 0 warms the engine up (1 round), job 1 is the measured run, as in any sweep.
    jobs, _ = multirun(
        [*overrides[:-2], f"seed={args.seed}", f"num_rounds=1,{rounds}"], work / "sweep"
    )
    warm = jobs[1]
    cold = run_fedsim(overrides, work / "cold")
    started = time.perf_counter()
    subprocess.run(  # the plain loop cold: a process of its own, imports and data included
        [sys.executable, "-m", "fedsim.scripts.plain_loop", *overrides],
        check=True,
        capture_output=True,
    )
    plain_cold_s = time.perf_counter() - started
    # The inline engine (no Ray, the clients in turn in the driver): the same two runs.
    inline = "runtime.engine=inline"
    jobs_inline, _ = multirun(
        [*overrides[:-2], f"seed={args.seed}", inline, f"num_rounds=1,{rounds}"],
        work / "sweep_inline",
    )
    warm_inline = jobs_inline[1]
    cold_inline = run_fedsim([*overrides, inline], work / "cold_inline")
    curve = [row["accuracy"] for row in read_jsonl(Path(warm["dir"]) / "metrics.jsonl")]
    curve_inline = [
        row["accuracy"] for row in read_jsonl(Path(warm_inline["dir"]) / "metrics.jsonl")
    ]
    warm_inline_total = warm_inline["startup_s"] + warm_inline["wall_time_s"]
    warm_total = warm["startup_s"] + warm["wall_time_s"]
    out = {
        "clients_per_round": CLIENTS_PER_ROUND,
        "rounds": rounds,
        "plain": {
            "setup_s": plain_setup_s,
            "rounds_s": plain.rounds_wall_s,
            "client_rounds_per_s": _throughput(plain.client_rounds, plain.rounds_wall_s),
        },
        "fedsim_in_sweep": {"startup_s": warm["startup_s"], "rounds_s": warm["wall_time_s"]},
        "fedsim_cold": {
            "startup_s": cold["startup_s"],
            "rounds_s": cold["wall_time_s"],
            "process_s": cold["process_wall_s"],
        },
        "overhead_vs_plain": warm_total / plain_total,
        "overhead_rounds_only": warm["wall_time_s"] / plain.rounds_wall_s,
        "overhead_cold_run": (cold["startup_s"] + cold["wall_time_s"]) / plain_total,
        "plain_cold_process_s": plain_cold_s,
        # issue 19: everything a cold process pays besides its rounds, and cold against cold
        "cold_startup_s": cold["process_wall_s"] - cold["wall_time_s"],
        "cold_overhead_vs_plain": cold["process_wall_s"] / plain_cold_s,
        "client_rounds_per_s": _throughput(plain.client_rounds, warm_total),
        # runtime.engine=inline: the same figures, and whether its curve is Ray's
        "inline": {
            "in_sweep": {
                "startup_s": warm_inline["startup_s"],
                "rounds_s": warm_inline["wall_time_s"],
            },
            "cold": {
                "startup_s": cold_inline["startup_s"],
                "rounds_s": cold_inline["wall_time_s"],
                "process_s": cold_inline["process_wall_s"],
            },
            "client_rounds_per_s": _throughput(plain.client_rounds, warm_inline_total),
            "same_accuracy_curve_as_ray": curve_inline == curve,
        },
        "overhead_vs_plain_inline": warm_inline_total / plain_total,
        "cold_startup_s_inline": cold_inline["process_wall_s"] - cold_inline["wall_time_s"],
        "cold_overhead_vs_plain_inline": cold_inline["process_wall_s"] / plain_cold_s,
        "max_abs_accuracy_diff": max(
            abs(a - b) for a, b in zip(curve, plain.accuracies, strict=True)
        ),
        "final_accuracy": {"fedsim": curve[-1], "plain": plain.accuracies[-1]},
    }
    print(
        f"  plain loop: set-up {plain_setup_s:.2f} s + rounds {plain.rounds_wall_s:.2f} s "
        f"({out['plain']['client_rounds_per_s']:.0f} client-rounds/s, 1 thread)\n"
        f"  fedsim in a sweep: start-up {warm['startup_s']:.2f} s + rounds "
        f"{warm['wall_time_s']:.2f} s ({out['client_rounds_per_s']:.0f} client-rounds/s)\n"
        f"  fedsim cold: start-up {cold['startup_s']:.2f} s + rounds {cold['wall_time_s']:.2f} s "
        f"(process {cold['process_wall_s']:.1f} s with imports; outside its rounds "
        f"{out['cold_startup_s']:.1f} s, target <= 5)\n"
        f"  plain loop cold (its own process): {plain_cold_s:.1f} s; cold_overhead_vs_plain "
        f"{out['cold_overhead_vs_plain']:.2f} (target <= 1.5)\n"
        f"  overhead_vs_plain {out['overhead_vs_plain']:.2f} (target <= 1.0); rounds only "
        f"{out['overhead_rounds_only']:.2f}; cold run {out['overhead_cold_run']:.2f}; "
        f"max |d accuracy| vs plain {out['max_abs_accuracy_diff']:.4f}\n"
        f"  runtime.engine=inline in a sweep: start-up {warm_inline['startup_s']:.2f} s + rounds "
        f"{warm_inline['wall_time_s']:.2f} s ({out['inline']['client_rounds_per_s']:.0f} "
        f"client-rounds/s; overhead_vs_plain_inline {out['overhead_vs_plain_inline']:.2f})\n"
        f"  runtime.engine=inline cold: process {cold_inline['process_wall_s']:.1f} s; outside "
        f"its rounds {out['cold_startup_s_inline']:.1f} s (target <= 5); "
        f"cold_overhead_vs_plain_inline {out['cold_overhead_vs_plain_inline']:.2f} "
        f"(target <= 1.5); accuracy curve = Ray's: {out['inline']['same_accuracy_curve_as_ray']}"
    )
    return out


# --------------------------------------------------------------------------- speedup_vs_flower
def speedup_vs_flower(args: argparse.Namespace) -> dict[str, Any]:
    """Plain Flower (quickstart pattern) / fedsim, same work, both cold; final models compared."""
    import torch
    from safetensors.torch import load_file

    from fedsim.records.checkpoint import read_checkpoint

    work = Path(args.work_dir) / "speedup_vs_flower"
    work.mkdir(parents=True, exist_ok=True)
    overrides = [*ALL_SAMPLED, f"num_rounds={args.flower_rounds}", f"seed={args.seed}"]
    figures, final = work / "flower.json", work / "flower_final.safetensors"
    cmd = [sys.executable, "-m", "fedsim.scripts.flower_baseline", "--json", str(figures)]
    cmd += ["--out", str(final), *overrides]
    started = time.perf_counter()
    with (work / "flower.log").open("w") as handle:
        subprocess.run(cmd, stdout=handle, stderr=subprocess.STDOUT, check=True)
    flower_process_s = time.perf_counter() - started
    flower = json.loads(figures.read_text())
    ours = run_fedsim(overrides, work / "fedsim")
    # The same run inside a sweep (after a 1-round job): how fedsim runs the runs of a sweep.
    jobs, _ = multirun(
        [*ALL_SAMPLED, f"seed={args.seed}", f"num_rounds=1,{args.flower_rounds}"],
        work / "sweep",
    )
    in_sweep_s = jobs[1]["startup_s"] + jobs[1]["wall_time_s"]
    meta, tensors = read_checkpoint(work / "fedsim")  # the final global model, by name
    names = meta["arrays"]["keys"]
    fedsim_model = {n: torch.from_numpy(tensors[f"global/{i}"]) for i, n in enumerate(names)}
    flower_model = load_file(final)
    max_diff = max(float((fedsim_model[k] - flower_model[k]).abs().max()) for k in flower_model)
    client_rounds = CLIENTS_PER_ROUND * args.flower_rounds
    out = {
        "rounds": args.flower_rounds,
        "flower": {"process_s": flower_process_s, "rounds_s": flower["rounds_wall_s"]},
        "fedsim": {"process_s": ours["process_wall_s"], "rounds_s": ours["wall_time_s"]},
        # headline: each tool's cost per run of a sweep (Flower starts afresh every run)
        "speedup_vs_flower": flower_process_s / in_sweep_s,
        "speedup_cold_process": flower_process_s / ours["process_wall_s"],
        "speedup_rounds": flower["rounds_wall_s"] / ours["wall_time_s"],
        "fedsim_in_sweep_s": in_sweep_s,
        "client_rounds_per_s": {
            "flower": _throughput(client_rounds, flower["rounds_wall_s"]),
            "fedsim": _throughput(client_rounds, ours["wall_time_s"]),
        },
        "final_accuracy": {"flower": flower["accuracies"][-1], "fedsim": ours["final_accuracy"]},
        "final_model_max_abs_diff": max_diff,
        "final_model_equal": max_diff == 0.0,
        "dtype": str(next(iter(flower_model.values())).dtype),
    }
    assert all(isinstance(v, torch.Tensor) for v in flower_model.values())
    print(
        f"  Flower quickstart pattern: process {flower_process_s:.1f} s, rounds "
        f"{flower['rounds_wall_s']:.1f} s ({out['client_rounds_per_s']['flower']:.1f} "
        f"client-rounds/s)\n  fedsim: process {ours['process_wall_s']:.1f} s, rounds "
        f"{ours['wall_time_s']:.1f} s ({out['client_rounds_per_s']['fedsim']:.1f} client-rounds/s)"
        f"\n  fedsim in a sweep: {in_sweep_s:.1f} s per run (start-up and rounds)"
        f"\n  speedup_vs_flower {out['speedup_vs_flower']:.1f}x per run of a sweep (target >= 2); "
        f"cold single process {out['speedup_cold_process']:.1f}x; rounds only "
        f"{out['speedup_rounds']:.1f}x; final models max |diff| {max_diff:.2e}"
    )
    return out


# --------------------------------------------------------------------------- scale
def _tree_rss_peak(stop: threading.Event, peak: list[int]) -> None:
    import psutil

    from fedsim.scripts.soak import tree_rss_bytes

    me = psutil.Process()
    while not stop.wait(0.2):
        peak[0] = max(peak[0], tree_rss_bytes(me)[0])


def _scale_run(num_clients: int, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """One run with ``num_clients`` clients, 100 sampled per round, in this process."""
    from fedsim.config import compose_config
    from fedsim.engine.simulation import simulate
    from fedsim.scripts.bench_common import steady_round_s

    cfg = compose_config(
        [
            "partition=sampled",
            f"num_clients={num_clients}",
            f"strategy.fraction_train={CLIENTS_PER_ROUND / num_clients}",
            f"num_rounds={args.rounds}",
            f"seed={args.seed}",
            "runtime.progress=false",
        ]
    )
    run_dir = work / f"clients_{num_clients}"
    shutil.rmtree(run_dir, ignore_errors=True)  # the bench owns its work folder (a rerun)
    stop, peak = threading.Event(), [0]
    sampler = threading.Thread(target=_tree_rss_peak, args=(stop, peak), daemon=True)
    sampler.start()
    summary = simulate(cfg, run_dir)
    stop.set()
    sampler.join()
    rows = read_jsonl(run_dir / "metrics.jsonl")
    return {
        "peak_tree_rss_gb": peak[0] / 1e9,
        "steady_round_s": steady_round_s(rows),
        "mean_round_s": summary["wall_time_s"] / args.rounds,
        "startup_s": summary["startup_s"],
        "final_accuracy": summary["final_accuracy"],
    }


def scale(args: argparse.Namespace) -> dict[str, Any]:
    """``--scale-clients`` virtual clients vs 100, 100 per round: tree RSS and round time."""
    work = Path(args.work_dir) / "scale"
    small = _scale_run(CLIENTS_PER_ROUND, args, work)  # also warms the engine for the big run
    big = _scale_run(args.scale_clients, args, work)
    out = {
        "clients": {"small": CLIENTS_PER_ROUND, "large": args.scale_clients},
        "small": small,
        "large": big,
        "scale_rss_gb": big["peak_tree_rss_gb"],
        "scale_round_time_ratio": big["steady_round_s"] / small["steady_round_s"],
        "client_rounds_per_s": _throughput(CLIENTS_PER_ROUND, big["steady_round_s"]),
    }
    print(
        f"  {CLIENTS_PER_ROUND} clients: steady round {small['steady_round_s']:.3f} s, peak tree "
        f"RSS {small['peak_tree_rss_gb']:.2f} GB\n  {args.scale_clients} clients: steady round "
        f"{big['steady_round_s']:.3f} s, peak tree RSS {big['peak_tree_rss_gb']:.2f} GB "
        f"(start-up {big['startup_s']:.1f} s)\n  scale_rss_gb {out['scale_rss_gb']:.2f} "
        f"(target <= 4); scale_round_time_ratio {out['scale_round_time_ratio']:.2f} "
        "(target <= 1.1)"
    )
    return out


# --------------------------------------------------------------------------- sweep_startup
def sweep_startup(args: argparse.Namespace) -> dict[str, Any]:
    """An 8-run multirun: what each run pays before its first round."""
    seeds = ",".join(str(args.seed + k) for k in range(args.sweep_runs))
    jobs, wall = multirun([f"seed={seeds}", "num_rounds=2"], Path(args.work_dir) / "sweep")
    startups = [job["startup_s"] for job in jobs]
    rest = statistics.fmean(startups[1:]) if len(startups) > 1 else float("nan")
    out = {
        "runs": len(jobs),
        "startup_s": startups,
        "sweep_startup_s": startups[0],
        "later_runs_mean_startup_s": rest,
        "later_over_first": rest / startups[0],
        "process_wall_s": wall,
        "rounds_wall_s": sum(job["wall_time_s"] for job in jobs),
    }
    print(
        f"  {len(jobs)} runs: start-up of run 1 {startups[0]:.2f} s, runs 2..{len(jobs)} "
        f"{rest:.2f} s on average ({', '.join(f'{s:.2f}' for s in startups[1:])})\n"
        f"  whole sweep {wall:.1f} s in one process, of which rounds {out['rounds_wall_s']:.1f} s"
    )
    return out
