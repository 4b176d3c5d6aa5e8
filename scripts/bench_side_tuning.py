"""Benchmark cases for side-tuning on the default text task (MiniLM + chatterbot, phones).

* ``cache_speedup``: a side-tuning run on the default task (experiment=mobile_side_tuning)
  without the frozen-feature cache (the backbone runs every time a client trains and at every
  evaluation), then with it from an empty cache folder (cold) and again (warm); same seed.
  Reports wall-time ratios and checks that the metric curves agree within ``--tolerance``.
* ``device_memory``: the device-side step of each method on one batch of the default task,
  peak memory measured with ``torch.profiler`` (``profile_memory=True``: resident tensors at
  entry + the peak of the allocations the step makes), beside the cost model's estimate.
* ``compare``: the methods side by side on the default task (one fedsim run each), table of
  final accuracy, macro-F1, device memory, bytes per client-round, simulated time to a target.
"""

from __future__ import annotations

import argparse
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from fedsim.scripts.bench_common import (
    MiB,
    measure_peak_bytes,
    multirun,
    read_jsonl,
    run_fedsim,
    steady_round_s,
)

__all__ = ["cache_speedup", "device_memory", "compare", "VARIANTS", "EXPERIMENT"]

EXPERIMENT = "experiment=mobile_side_tuning"


# --------------------------------------------------------------------------- cache_speedup
def cache_speedup(args: argparse.Namespace) -> dict[str, Any]:
    """Side-tuning without vs with the frozen-feature cache; same seed; curves must agree.

    Headline (``speedup_in_sweep``): the two runs as jobs of one Hydra sweep after a 1-round
    warm-up job (the engine warm, as for every run of a sweep but the first; the feature cache
    filled, as after any first run on the data): each run's start-up plus rounds. Beside it,
    the same runs as separate cold processes (no cache / cache computed in the run / cache
    read from disk) and the rounds alone.
    """
    work = Path(args.work_dir) / "cache_speedup"
    cache = work / "feature_cache"
    shutil.rmtree(cache, ignore_errors=True)
    base = [EXPERIMENT, f"seed={args.seed}", f"client.feature_cache_dir={cache}"]
    rounds = [f"num_rounds={args.rounds}"]
    runs = {
        "no_cache": run_fedsim([*base, *rounds, "client.cache_features=false"], work / "no_cache"),
        "cache_cold": run_fedsim([*base, *rounds], work / "cache_cold"),
        "cache_warm": run_fedsim([*base, *rounds], work / "cache_warm"),
    }
    jobs, _ = multirun(
        [*base, f"num_rounds=1,{args.rounds}", "client.cache_features=true,false"],
        work / "sweep",
    )
    in_sweep = {}
    for job in jobs:  # the measured jobs: num_rounds=R, with and without the cache
        config = yaml.safe_load((Path(job["dir"]) / "config.yaml").read_text())
        if config["num_rounds"] == args.rounds:
            in_sweep["cache" if config["client"]["cache_features"] else "no_cache"] = job
    run_s = {k: job["startup_s"] + job["wall_time_s"] for k, job in in_sweep.items()}
    curves = {name: read_jsonl(work / name / "metrics.jsonl") for name in runs}
    curves["sweep_cache"] = read_jsonl(Path(in_sweep["cache"]["dir"]) / "metrics.jsonl")
    steady = {name: steady_round_s(rows) for name, rows in curves.items()}
    ref = curves["no_cache"]
    agreement = {}
    for name in ("cache_cold", "cache_warm", "sweep_cache"):
        diffs = [abs(a["accuracy"] - b["accuracy"]) for a, b in zip(ref, curves[name], strict=True)]
        agreement[name] = {
            "max_abs_accuracy_diff": max(diffs),
            "mean_abs_accuracy_diff": sum(diffs) / len(diffs),
            "curve_mean_accuracy_diff": (
                sum(r["accuracy"] for r in curves[name]) - sum(r["accuracy"] for r in ref)
            )
            / len(ref),
            "final_accuracy_diff": curves[name][-1]["accuracy"] - ref[-1]["accuracy"],
            "final_loss_rel_diff": curves[name][-1]["loss"] / ref[-1]["loss"] - 1.0,
            "within_tolerance": max(diffs) <= args.tolerance,
        }
    out = {
        "rounds": args.rounds,
        "tolerance": args.tolerance,
        "in_sweep_s": {
            k: {"startup": job["startup_s"], "rounds": job["wall_time_s"]}
            for k, job in in_sweep.items()
        },
        "speedup_in_sweep": run_s["no_cache"] / run_s["cache"],
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
    for name, job in in_sweep.items():
        print(
            f"  in a sweep, {name:8s}: start-up {job['startup_s']:5.1f} s + rounds "
            f"{job['wall_time_s']:6.1f} s   final acc {job['final_accuracy']:.4f}"
        )
    for name, wall in out["wall_s"].items():
        print(
            f"  {name:11s} process {wall['process']:7.1f} s   rounds {wall['rounds']:7.1f} s   "
            f"final acc {runs[name]['final_accuracy']:.4f}"
        )
    print(
        f"  speed-up in a sweep {out['speedup_in_sweep']:.1f}x (target >= 10); separate "
        f"processes {out['speedup_process_cold']:.1f}x cold cache, "
        f"{out['speedup_process_warm']:.1f}x warm; rounds only {out['speedup_rounds']:.1f}x; "
        f"a steady round (median of rounds 2..) {out['speedup_steady_round']:.1f}x "
        f"({steady['no_cache']:.2f} s -> {steady['cache_warm']:.2f} s)"
    )
    for name, agree in agreement.items():
        verdict = "agree" if agree["within_tolerance"] else "DIFFER"
        print(
            f"  {name} vs no_cache: max |d acc| {agree['max_abs_accuracy_diff']:.4f} "
            f"(tolerance {args.tolerance}) -> {verdict}; mean |d acc| "
            f"{agree['mean_abs_accuracy_diff']:.4f}, curve means differ by "
            f"{agree['curve_mean_accuracy_diff']:+.4f}, "
            f"final by {agree['final_accuracy_diff']:+.4f}"
        )
    return out


# --------------------------------------------------------------------------- device_memory
def _memory_methods() -> dict[str, Any]:
    from hydra.utils import instantiate

    from fedsim.clients.peft_tuning import PeftTuning
    from fedsim.clients.side_tuning.tuning import SideTuning
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

    from fedsim.clients.side_tuning.tuning import SideTuning

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
    from fedsim.learning.data import ChatterbotData

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

    from fedsim.learning.workload import get_workload

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
    overrides = [
        EXPERIMENT,
        *VARIANTS[name],
        f"num_rounds={args.rounds}",
        f"seed={seed}",
        *(args.overrides or []),
    ]
    summary = run_fedsim(overrides, run_dir, reuse=args.reuse)
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    every = read_jsonl(run_dir / "clients.jsonl")
    clients = [r for r in every if "bytes_up" in r]  # the client-rounds that trained
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    reached = [m["sim_time_s"] for m in metrics if m["accuracy"] >= args.target_accuracy]

    def per_client_round(field: str) -> float | None:
        return sum(r[field] for r in clients) / len(clients) if clients else None

    peak = [r["peak_memory_bytes"] for r in every if "peak_memory_bytes" in r]
    row = {
        "final_accuracy": summary["final_accuracy"],
        "final_macro_f1": summary["final_macro_f1"],
        "best_accuracy": summary["best_accuracy"],
        "device_peak_estimate_bytes": peak[0] if peak else None,
        "bytes_up_per_client_round": per_client_round("bytes_up"),
        "bytes_down_per_client_round": per_client_round("bytes_down"),
        # what a client sent besides its trainable tensors (same size as what it downloaded)
        "activation_bytes_up_per_client_round": (
            sum(r["bytes_up"] - r["bytes_down"] for r in clients) / len(clients)
            if clients
            else None
        ),
        "energy_j_per_client_round": per_client_round("energy_j"),
        "client_rounds_trained": len(clients),
        "client_rounds_sent": len(every),
        "sim_time_to_target_s": reached[0] if reached else None,
        "rounds_to_target": next(
            (m["round"] for m in metrics if m["accuracy"] >= args.target_accuracy), None
        ),
        "sim_time_total_s": summary["sim_time_s"],
        "wall_time_s": summary["process_wall_s"],
        "overrides": overrides,
    }
    if "num_clients_fitting" in summary:  # a cost backbone: who can hold a round at all
        row["cost_backbone"] = summary["cost_backbone"]
        row["share_of_clients_fitting"] = summary["num_clients_fitting"] / int(
            config["num_clients"]
        )
    if config["client"].get("activation_cache"):
        row["cache_hit_rate"] = _hit_rate(run_dir, clients, config["client"]["local_epochs"])
    return row


def _mean_ci(values: Sequence[float], digits: int) -> str:
    """``mean`` or ``mean ± half-width of its 95% CI`` (Student t over seeds), rounded."""
    from fedsim.scripts.stats import mean_ci

    mean, half_width = mean_ci(values)
    if len(values) < 2:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {half_width:.{digits}f}"


def _cell(values: Sequence[float | None], digits: int, scale: float = 1.0) -> str:
    """``_mean_ci`` of the values that exist (a run in which nobody trained has none), or -."""
    present = [v / scale for v in values if v is not None]
    return _mean_ci(present, digits) if present else "-"


def _reached(runs: Sequence[dict[str, Any]], key: str, digits: int, scale: float = 1.0) -> str:
    """Mean ± CI over the seeds that reached the target, "never", and "(k/n)" when not all did."""
    reached = [r[key] / scale for r in runs if r[key] is not None]
    cell = _mean_ci(reached, digits) if reached else "never"
    return cell + (f" ({len(reached)}/{len(runs)})" if reached and len(reached) < len(runs) else "")


def compare(args: argparse.Namespace) -> dict[str, Any]:
    """Every variant on the default task for every seed; a markdown table of the numbers.

    Columns over seeds are mean ± the half-width of the 95% confidence interval (Student t).
    ``--overrides`` go to every run (``model.cost_backbone=Qwen2.5-0.5B``: the clock, memory
    and energy of that architecture, issue 20 item 4); the table then says which share of the
    clients can hold a round at all.
    """
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
        results[name] = {"device_peak_measured_bytes": measured, "seeds": args.seeds, "runs": runs}
        hit = [r["cache_hit_rate"] for r in runs if "cache_hit_rate" in r]
        estimate = runs[0]["device_peak_estimate_bytes"]
        fitting = [r["share_of_clients_fitting"] for r in runs if "share_of_clients_fitting" in r]
        table.append(
            [
                name,
                _mean_ci([r["final_accuracy"] for r in runs], 3),
                _mean_ci([r["final_macro_f1"] for r in runs], 3),
                f"{measured / MiB:.0f}" if measured else "-",
                f"{estimate / MiB:.0f}" if estimate else "-",
                _cell(fitting, 0, 0.01) if fitting else "all",  # each seed draws its phones
                _cell([r["client_rounds_trained"] / args.rounds for r in runs], 1),
                _cell([r["bytes_up_per_client_round"] for r in runs], 2, MiB),
                _cell([r["activation_bytes_up_per_client_round"] for r in runs], 2, MiB),
                _cell([r["bytes_down_per_client_round"] for r in runs], 2, MiB),
                _cell([r["energy_j_per_client_round"] for r in runs], 1),
                _reached(runs, "rounds_to_target", 1),
                _reached(runs, "sim_time_to_target_s", 1, 60),
                _mean_ci([r["sim_time_total_s"] / 60 for r in runs], 1),
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
            "clients that fit (%)",
            "trained / round",
            "MiB up / client-round",
            "of which activations",
            "MiB down / client-round",
            "J / client-round",
            f"rounds to acc {args.target_accuracy}",
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
        "overrides": args.overrides or [],
        "memory": memory,
        "variants": results,
        "table_markdown": text,
    }
