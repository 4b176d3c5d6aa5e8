r"""Benchmarks: fedsim's speed and memory targets, measured (never asserted in timed tests).

Each case is a function ``(args) -> dict`` registered in :data:`CASES`; it prints its figures and
its dict goes into the ``--out`` JSON under the case's name. Cases live beside this file:

* engine (``bench_engine.py``): ``overhead_vs_plain``, ``speedup_vs_flower``, ``scale``,
  ``sweep_startup`` -- fedsim against a plain PyTorch loop and plain Flower, 1,000,000 clients,
  the start-up each run of a sweep pays;
* side-tuning (``bench_side_tuning.py``): ``cache_speedup``, ``device_memory``, ``compare``;
* ``soak`` (``soak.py``): 500 rounds, memory growth, open files, leftover processes;
* ``peers`` (``bench_peers.py``): the same FedAvg in fedsim, Flower, pfl and FLGo (each peer in
  a venv of its own, built by the case), cold and in a sweep; BlazeFL's published ratio beside;
* ``gpu`` (``bench_gpu.py``): side-tuning and LoRA client-rounds per second on one GPU against
  the CPU, peak GPU memory per worker, workers per GPU (without CUDA: skipped, with the reason).

Usage::

    .venv/bin/python -m fedsim.scripts.bench --cases overhead_vs_plain speedup_vs_flower \\
        scale sweep_startup cache_speedup --out results/bench.json
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fedsim.scripts.bench_engine import overhead_vs_plain, scale, speedup_vs_flower, sweep_startup
from fedsim.scripts.bench_gpu import gpu
from fedsim.scripts.bench_peers import PEERS, PEERS_DIR, WORKLOADS, peers
from fedsim.scripts.bench_side_tuning import VARIANTS, cache_speedup, compare, device_memory
from fedsim.scripts.soak import soak

__all__ = ["CASES", "main"]

CASES: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {
    "overhead_vs_plain": overhead_vs_plain,
    "speedup_vs_flower": speedup_vs_flower,
    "scale": scale,
    "sweep_startup": sweep_startup,
    "cache_speedup": cache_speedup,
    "device_memory": device_memory,
    "compare": compare,
    "soak": soak,
    "gpu": gpu,
    "peers": peers,
}


#: issue 8's headline figures: name -> (case, key of the case's dict, target, verdict on it)
TARGETS: dict[str, tuple[str, str, str, Callable[[dict[str, Any]], bool]]] = {
    "overhead_vs_plain": (
        "overhead_vs_plain",
        "overhead_vs_plain",
        "<= 1.0",
        lambda c: c["overhead_vs_plain"] <= 1.0,
    ),
    "cold_startup_s": (
        "overhead_vs_plain",
        "cold_startup_s",
        "<= 5",
        lambda c: c["cold_startup_s"] <= 5,
    ),
    "cold_overhead_vs_plain": (
        "overhead_vs_plain",
        "cold_overhead_vs_plain",
        "<= 1.5",
        lambda c: c["cold_overhead_vs_plain"] <= 1.5,
    ),
    "cold_startup_s_inline": (
        "overhead_vs_plain",
        "cold_startup_s_inline",
        "<= 5",
        lambda c: c["cold_startup_s_inline"] <= 5,
    ),
    "cold_overhead_vs_plain_inline": (
        "overhead_vs_plain",
        "cold_overhead_vs_plain_inline",
        "<= 1.5",
        lambda c: c["cold_overhead_vs_plain_inline"] <= 1.5,
    ),
    "speedup_vs_flower": (
        "speedup_vs_flower",
        "speedup_vs_flower",
        ">= 2",
        lambda c: c["speedup_vs_flower"] >= 2,
    ),
    "cache_speedup": (
        "cache_speedup",
        "speedup_in_sweep",
        ">= 10",
        lambda c: c["speedup_in_sweep"] >= 10,
    ),
    "scale_rss_gb": ("scale", "scale_rss_gb", "<= 4", lambda c: c["scale_rss_gb"] <= 4),
    "scale_round_time_ratio": (
        "scale",
        "scale_round_time_ratio",
        "<= 1.1",
        lambda c: c["scale_round_time_ratio"] <= 1.1,
    ),
    "sweep_startup_s": (
        "sweep_startup",
        "later_runs_mean_startup_s",
        "paid once per sweep (later runs < 10% of run 1)",
        lambda c: c["later_over_first"] < 0.1,
    ),
}


def targets(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The headline figures of the cases that ran, each with its target and verdict."""
    return {
        name: {
            "value": float(report[case][key]),
            "target": target,
            "met": bool(verdict(report[case])),
            "from": f"{case}.{key}",
        }
        for name, (case, key, target, verdict) in TARGETS.items()
        if case in report
    }


def _at_least_one(text: str) -> int:
    """An argparse type: an integer >= 1 (argparse names the option, exits 2 otherwise)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: must be an integer >= 1")
    return value


def main(argv: Sequence[str] | None = None) -> None:
    """Run the chosen cases; print their figures and write one JSON file."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=["cache_speedup"], choices=list(CASES))
    parser.add_argument("--out", type=Path, default=Path("results/bench.json"))
    parser.add_argument("--work-dir", default="results/bench", help="run folders of the cases")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0, help="cache_speedup: the run seed")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="compare: run seeds")
    parser.add_argument(
        "--tolerance",
        type=float,
        default=0.02,
        help="cache_speedup: max |accuracy difference| per round",
    )
    parser.add_argument("--batch-size", type=int, default=16, help="device_memory batch")
    parser.add_argument("--target-accuracy", type=float, default=0.75)
    parser.add_argument("--variants", nargs="*", choices=list(VARIANTS), help="compare: subset")
    parser.add_argument(
        "--no-memory",
        dest="measure_memory",
        action="store_false",
        help="compare: skip the device_memory measurement",
    )
    parser.add_argument("--reuse", action="store_true", help="compare: keep finished runs")
    parser.add_argument(
        "--overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="compare, gpu: Hydra overrides added to every run (model.cost_backbone=Qwen2.5-0.5B)",
    )
    parser.add_argument(
        "--flower-rounds", type=int, default=20, help="speedup_vs_flower: rounds of both runs"
    )
    parser.add_argument(
        "--scale-clients", type=int, default=1_000_000, help="scale: population (issue 19: 1M)"
    )
    parser.add_argument("--sweep-runs", type=int, default=8, help="sweep_startup: runs")
    parser.add_argument("--gpu-rounds", type=int, default=5, help="gpu: rounds of each run")
    parser.add_argument(
        "--gpu-shares",
        type=float,
        nargs="+",
        default=[1.0, 0.25],
        help="gpu: runtime.client_num_gpus values (0.25: four workers per GPU)",
    )
    parser.add_argument(
        "--peers", nargs="+", choices=list(PEERS), default=list(PEERS), help="peers: frameworks"
    )
    parser.add_argument(
        "--peer-workload", choices=list(WORKLOADS), default="digits", help="peers: the work"
    )
    parser.add_argument(
        "--peer-examples",
        type=_at_least_one,
        default=500,
        help="peers: rows per client of the blazefl workload (CIFAR-10: 500)",
    )
    parser.add_argument(
        "--peers-dir", type=Path, default=PEERS_DIR, help="peers: where their venvs are kept"
    )
    args = parser.parse_args(argv)
    report: dict[str, Any] = {}
    for case in args.cases:
        print(f"[bench] {case}")
        started = time.perf_counter()
        report[case] = CASES[case](args) | {"bench_wall_s": time.perf_counter() - started}
    report["targets"] = targets(report)
    for key, verdict in report["targets"].items():
        print(
            f"[bench] {key} = {verdict['value']:.3g} (target {verdict['target']}): "
            + ("met" if verdict["met"] else "NOT MET")
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str))
    print(f"[bench] wrote {args.out}")


if __name__ == "__main__":
    main()
