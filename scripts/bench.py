"""Benchmarks: fedsim's speed and memory targets, measured (never asserted in timed tests).

Each case is a function ``(args) -> dict`` registered in :data:`CASES`; it prints its figures and
its dict goes into the ``--out`` JSON under the case's name. Add a case by writing a function and
registering it (e.g. overhead vs a plain loop, scale, sweep start-up).

* ``cache_speedup``: a side-tuning run on the default task (experiment=mobile_side_tuning)
  without the frozen-feature cache (the backbone runs every time a client trains and at every
  evaluation), then with it from an empty cache folder (cold) and again (warm); same seed.
  Reports wall-time ratios and checks that the metric curves agree within ``--tolerance``.
* ``device_memory``: the device-side step of each method on one batch of the default task,
  peak memory measured with ``torch.profiler`` (``profile_memory=True``: resident tensors at
  entry + the peak of the allocations the step makes), beside the cost model's estimate.
* ``compare``: the methods side by side on the default task (one fedsim run each), table of
  final accuracy, macro-F1, device memory, bytes per client-round, simulated time to a target.

Usage::

    .venv/bin/python -m fedsim.scripts.bench --cases cache_speedup --out results/bench.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fedsim.scripts.soak import soak

__all__ = ["CASES", "main", "measure_peak_bytes"]

EXPERIMENT = "experiment=mobile_side_tuning"
MiB = 2**20


# --------------------------------------------------------------------------- helpers
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


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSON-lines file."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


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


def _steady_round_s(rows: list[dict[str, Any]]) -> float:
    """Median wall seconds of a round after the first (round 1 also starts the Ray workers)."""
    import statistics

    times = [b["wall_time_s"] - a["wall_time_s"] for a, b in zip(rows, rows[1:], strict=False)]
    return statistics.median(times) if times else float("nan")


# --------------------------------------------------------------------------- cache_speedup
def cache_speedup(args: argparse.Namespace) -> dict[str, Any]:
    """Side-tuning without vs with the frozen-feature cache; same seed; curves must agree."""
    work = Path(args.work_dir) / "cache_speedup"
    cache = work / "feature_cache"
    shutil.rmtree(cache, ignore_errors=True)
    base = [
        EXPERIMENT,
        f"num_rounds={args.rounds}",
        f"seed={args.seed}",
        f"client.feature_cache_dir={cache}",
    ]
    runs = {
        "no_cache": run_fedsim([*base, "client.cache_features=false"], work / "no_cache"),
        "cache_cold": run_fedsim(base, work / "cache_cold"),
        "cache_warm": run_fedsim(base, work / "cache_warm"),
    }
    curves = {name: read_jsonl(work / name / "metrics.jsonl") for name in runs}
    steady = {name: _steady_round_s(rows) for name, rows in curves.items()}
    ref = curves["no_cache"]
    agreement = {}
    for name in ("cache_cold", "cache_warm"):
        diffs = [abs(a["accuracy"] - b["accuracy"]) for a, b in zip(ref, curves[name], strict=True)]
        agreement[name] = {
            "max_abs_accuracy_diff": max(diffs),
            "final_accuracy_diff": curves[name][-1]["accuracy"] - ref[-1]["accuracy"],
            "final_loss_rel_diff": curves[name][-1]["loss"] / ref[-1]["loss"] - 1.0,
            "within_tolerance": max(diffs) <= args.tolerance,
        }
    out = {
        "rounds": args.rounds,
        "tolerance": args.tolerance,
        "wall_s": {
            n: {"process": r["process_wall_s"], "rounds": r["wall_time_s"]} for n, r in runs.items()
        },
        "speedup_process_cold": runs["no_cache"]["process_wall_s"]
        / runs["cache_cold"]["process_wall_s"],
        "speedup_process_warm": runs["no_cache"]["process_wall_s"]
        / runs["cache_warm"]["process_wall_s"],
        "speedup_rounds": runs["no_cache"]["wall_time_s"] / runs["cache_warm"]["wall_time_s"],
        "steady_round_s": steady,
        "speedup_steady_round": steady["no_cache"] / steady["cache_warm"],
        "agreement": agreement,
        "final_accuracy": {n: r["final_accuracy"] for n, r in runs.items()},
    }
    for name, wall in out["wall_s"].items():
        print(
            f"  {name:11s} process {wall['process']:7.1f} s   rounds {wall['rounds']:7.1f} s   "
            f"final acc {runs[name]['final_accuracy']:.4f}"
        )
    print(
        f"  speed-up: process {out['speedup_process_cold']:.1f}x cold cache, "
        f"{out['speedup_process_warm']:.1f}x warm; rounds only {out['speedup_rounds']:.1f}x; "
        f"a steady round (median of rounds 2..) {out['speedup_steady_round']:.1f}x "
        f"({steady['no_cache']:.2f} s -> {steady['cache_warm']:.2f} s)"
    )
    for name, agree in agreement.items():
        verdict = "agree" if agree["within_tolerance"] else "DIFFER"
        print(
            f"  {name} vs no_cache: max |d acc| {agree['max_abs_accuracy_diff']:.4f} "
            f"(tolerance {args.tolerance}) -> {verdict}"
        )
    return out


# --------------------------------------------------------------------------- device_memory
def _memory_methods() -> dict[str, Any]:
    from hydra.utils import instantiate

    from fedsim.clients.peft_tuning import PeftTuning
    from fedsim.clients.side_tuning import SideTuning
    from fedsim.config import compose_config

    def client(name: str, *overrides: str) -> Any:
        return instantiate(compose_config([f"client={name}", *overrides]).client)

    methods: dict[str, Any] = {
        "side_tuning": client("side_tuning"),
        "side_tuning pivot": client("side_tuning", "client.pivot_token=true"),
        "lora": client("lora"),
        "ia3": client("ia3"),
        "full_ft": client("full_ft"),
    }
    assert all(isinstance(c, SideTuning | PeftTuning) for c in methods.values())
    return methods


def _device_step(
    client: Any, model: Any, batch: dict[str, Any]
) -> tuple[Callable[[], object], int]:
    """The device's step of ``client`` on ``batch`` and the bytes resident before it runs."""
    import torch

    from fedsim.clients.side_tuning import SideTuning

    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    resident = sum(
        t.numel() * t.element_size()
        for t in [*model.parameters(), *model.buffers(), *inputs.values()]
    )
    if isinstance(client, SideTuning):  # the device only forwards, quantizes and packs
        data = {k: v for k, v in batch.items() if k != "taps"}  # run the real backbone
        rows = torch.arange(len(batch["label"]))
        server_side = [*model.side.parameters(), *model.head.parameters()]
        resident -= sum(p.numel() * p.element_size() for p in server_side)
        return (lambda: client.device_step(model, data, rows)), resident
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    model.train()

    def step() -> object:
        loss = torch.nn.functional.cross_entropy(model(**inputs), batch["label"])
        loss.backward()
        optimizer.step()  # AdamW allocates its two states here, inside the measured step
        return loss

    return step, resident


def device_memory(args: argparse.Namespace) -> dict[str, Any]:
    """Measured device-side peak (torch.profiler) and the cost model's estimate, per method."""
    import torch
    from hydra.utils import instantiate

    from fedsim.config import compose_config
    from fedsim.data import ChatterbotData

    torch.set_num_threads(2)
    model_cfg = compose_config([EXPERIMENT]).model
    texts = ChatterbotData().load().train.select(range(args.batch_size))
    out: dict[str, Any] = {"batch_size": args.batch_size}
    for name, client in _memory_methods().items():
        factory = client.wrap_factory(instantiate(model_cfg))
        torch.manual_seed(0)
        model = factory.build(21)
        batch = factory.featurize(texts)
        estimate = client.device_cost(model, batch, args.batch_size).peak_memory_bytes
        step, resident = _device_step(client, model, batch)
        measured = measure_peak_bytes(step, resident)
        out[name] = {"measured_bytes": measured, "estimate_bytes": estimate}
        print(
            f"  {name:18s} measured {measured / MiB:7.1f} MiB   estimate {estimate / MiB:7.1f} MiB"
        )
    base = out["side_tuning"]["measured_bytes"]
    for name in ("lora", "ia3", "full_ft"):
        print(f"  {name} / side_tuning measured: {out[name]['measured_bytes'] / base:.2f}x")
    return out


# --------------------------------------------------------------------------- compare
VARIANTS: dict[str, list[str]] = {
    "side_tuning fp16": ["client=side_tuning", "client.bits=16"],
    "side_tuning int8": ["client=side_tuning"],
    "side_tuning int4": ["client=side_tuning", "client.bits=4"],
    "PAE pivot token": ["client=side_tuning", "client.pivot_token=true"],
    "PAE additive (no labels)": ["client=side_tuning", "client.additive=true"],
    "PAE activation cache": ["client=side_tuning", "client.activation_cache=true"],
    "PAE all three": ["client=pae_side_tuning"],
    "lora": ["client=lora"],
    "ia3": ["client=ia3"],
    "full_ft": ["client=full_ft"],
}
MEMORY_KEY = {"lora": "lora", "ia3": "ia3", "full_ft": "full_ft"}  # others: side-tuning forward


def _hit_rate(run_dir: Path, rows: list[dict[str, Any]], local_epochs: int) -> float:
    """Cache hits / sample uses, from who trained when (a client's first kept round misses)."""
    from omegaconf import DictConfig, OmegaConf

    from fedsim.workload import get_workload

    cfg = OmegaConf.load(run_dir / "config.yaml")  # the resolved config the run saved
    assert isinstance(cfg, DictConfig)
    workload = get_workload(cfg)  # data and partitions only: no features are computed
    seen: set[int] = set()
    hits = uses = 0
    for row in sorted(rows, key=lambda r: (r["round"], r["partition_id"])):
        if row.get("outcome") != "ok":
            continue
        n = workload.num_examples(row["partition_id"])
        uses += local_epochs * n
        hits += local_epochs * n - (0 if row["partition_id"] in seen else n)
        seen.add(row["partition_id"])
    return hits / max(uses, 1)


def _run_row(name: str, seed: int, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """One variant's run for one seed (reused if finished and ``--reuse``): its numbers."""
    import yaml

    slug = name.replace(" ", "_").replace("(", "").replace(")", "")
    run_dir = work / slug / f"seed{seed}"
    overrides = [EXPERIMENT, *VARIANTS[name], f"num_rounds={args.rounds}", f"seed={seed}"]
    summary = run_fedsim(overrides, run_dir, reuse=args.reuse)
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    clients = [r for r in read_jsonl(run_dir / "clients.jsonl") if "bytes_up" in r]
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    reached = [m["sim_time_s"] for m in metrics if m["accuracy"] >= args.target_accuracy]
    row = {
        "final_accuracy": summary["final_accuracy"],
        "final_macro_f1": summary["final_macro_f1"],
        "best_accuracy": summary["best_accuracy"],
        "device_peak_estimate_bytes": clients[0]["peak_memory_bytes"],
        "bytes_up_per_client_round": sum(r["bytes_up"] for r in clients) / len(clients),
        "bytes_down_per_client_round": sum(r["bytes_down"] for r in clients) / len(clients),
        # what a client sent besides its trainable tensors (same size as what it downloaded)
        "activation_bytes_up_per_client_round": sum(
            r["bytes_up"] - r["bytes_down"] for r in clients
        )
        / len(clients),
        "sim_time_to_target_s": reached[0] if reached else None,
        "sim_time_total_s": summary["sim_time_s"],
        "wall_time_s": summary["process_wall_s"],
        "overrides": overrides,
    }
    if config["client"].get("activation_cache"):
        row["cache_hit_rate"] = _hit_rate(run_dir, clients, config["client"]["local_epochs"])
    return row


def _mean_sd(values: Sequence[float], digits: int) -> str:
    """``mean`` or ``mean ± sd`` (sample sd) of the values, rounded."""
    import statistics

    mean = statistics.fmean(values)
    if len(values) < 2:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def compare(args: argparse.Namespace) -> dict[str, Any]:
    """Every variant on the default task for every seed; a markdown table of the numbers."""
    from fedsim.scripts.runs import markdown_table

    work = Path(args.work_dir) / "compare"
    memory = device_memory(args) if args.measure_memory else {}
    results: dict[str, Any] = {}
    table = []
    for name in args.variants or list(VARIANTS):
        runs = [_run_row(name, seed, args, work) for seed in args.seeds]
        key = MEMORY_KEY.get(
            name, "side_tuning pivot" if "pivot" in name or "all" in name else "side_tuning"
        )
        measured = memory.get(key, {}).get("measured_bytes")
        reached = [r["sim_time_to_target_s"] / 60 for r in runs if r["sim_time_to_target_s"]]
        results[name] = {"device_peak_measured_bytes": measured, "seeds": args.seeds, "runs": runs}
        hit = [r["cache_hit_rate"] for r in runs if "cache_hit_rate" in r]
        table.append(
            [
                name,
                _mean_sd([r["final_accuracy"] for r in runs], 3),
                _mean_sd([r["final_macro_f1"] for r in runs], 3),
                f"{measured / MiB:.0f}" if measured else "-",
                f"{runs[0]['device_peak_estimate_bytes'] / MiB:.0f}",
                _mean_sd([r["bytes_up_per_client_round"] / MiB for r in runs], 2),
                _mean_sd([r["activation_bytes_up_per_client_round"] / MiB for r in runs], 2),
                f"{runs[0]['bytes_down_per_client_round'] / MiB:.2f}",
                (_mean_sd(reached, 1) if reached else "never")
                + (f" ({len(reached)}/{len(runs)})" if len(reached) < len(runs) else ""),
                _mean_sd([r["sim_time_total_s"] / 60 for r in runs], 1),
                f"{hit[0]:.2f}" if hit else "-",
                f"{sum(r['wall_time_s'] for r in runs) / len(runs):.0f}",
            ]
        )
        print(f"  {name}: done")
    text = markdown_table(
        [
            "method",
            "final acc",
            "macro-F1",
            "device peak MiB (measured)",
            "device peak MiB (cost model)",
            "MiB up / client-round",
            "of which activations",
            "MiB down / client-round",
            f"sim min to acc {args.target_accuracy}",
            "sim min total",
            "cache hit rate",
            "wall s / run",
        ],
        table,
    )
    print(text)
    return {
        "rounds": args.rounds,
        "seeds": args.seeds,
        "target_accuracy": args.target_accuracy,
        "memory": memory,
        "variants": results,
        "table_markdown": text,
    }


CASES: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {
    "cache_speedup": cache_speedup,
    "device_memory": device_memory,
    "compare": compare,
    "soak": soak,
}


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
    args = parser.parse_args(argv)
    report: dict[str, Any] = {}
    for case in args.cases:
        print(f"[bench] {case}")
        started = time.perf_counter()
        report[case] = CASES[case](args) | {"bench_wall_s": time.perf_counter() - started}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str))
    print(f"[bench] wrote {args.out}")


if __name__ == "__main__":
    main()
