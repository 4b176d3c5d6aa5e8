"""What an LLM costs a phone fleet, per method, from the cost model alone (nothing trains).

``python -m fedsim.scripts.llm_costs --devices phones_mixed --backbones Qwen2.5-0.5B
TinyLlama-1.1B --methods full_ft lora ia3 side_tuning pae_side_tuning [--batch 16] [--seq-len 32]
[--examples 64] [--population 1000] [--seed 0] [--out FILE.json]``

Each method is its ``conf/client/<method>.yaml`` as a run builds it (adapter, optimizer, taps,
bits, local epochs, step limit), with ``model.cost_backbone`` set; each number comes from the
functions the simulated clock charges a run with (no second formula):

* peak device memory and FLOPs of a batch: the behaviour's own cost-backbone methods
  (``PeftTuning.backbone_step``, ``SideTuning.backbone_device_step``, on the meta model);
* FLOPs of a client-round: that batch's, times the examples the behaviour's ``round_examples``
  says a client with ``--examples`` examples processes, over the batch;
* bytes: the backbone's trainable tensors each way (full FT, LoRA, IA3); side-tuning uploads
  ``tokens x taps x bytes per d-vector`` per forwarded sample (pivot: one token; labels, masks,
  sample ids and PAE's differences, under 1% of a payload in runs, are left out) and downloads
  nothing (the side network stays on the server);
* phones that fit: ``fits_in_memory`` over the fleet's own assignment of ``--population``
  devices (``Fleet.assign``, seeded);
* seconds and energy: ``client_latency`` and ``client_energy_j`` of the median feasible device
  (by nominal latency) at nominal conditions (``nominal_observation``: its profile's compute and
  bandwidth, a good channel). Side-tuning's server time (its side network, about a millisecond
  in runs) is left out: it needs the trained side network.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fedsim.clients.peft_tuning import PeftTuning
from fedsim.clients.side_tuning.tuning import SideTuning
from fedsim.clock.devices import (
    ClientWork,
    DeviceProfile,
    client_energy_j,
    client_latency,
    fits_in_memory,
)
from fedsim.clock.server_view import nominal_observation
from fedsim.config import build, compose_config
from fedsim.errors import ConfigError

__all__ = ["MethodCost", "costs_of", "main", "markdown"]

_GIB = 2**30
_GIGA = 1e9
_MB = 1e6


@dataclass(frozen=True)
class MethodCost:
    """One (backbone, method) row: a client-round of ``examples`` examples on the fleet."""

    backbone: str
    method: str
    peak_memory_bytes: int
    fit_share: float  # of the assigned devices, those whose memory holds the peak
    gflops_per_sample: float  # device FLOPs of the round / examples it processed, in GFLOP
    round_flops: int  # device FLOPs of the round
    bytes_up: int
    bytes_down: int
    device: str | None  # the median feasible device's profile; None if none fits
    round_s: float | None  # its nominal seconds: download + compute + upload
    energy_j: float | None  # its energy for the round


def _behaviour(method: str, backbone: str, batch: int | None, seq_len: int) -> Any:
    """The client behaviour of ``conf/client/<method>.yaml`` charging ``backbone``."""
    overrides = [
        "model=text_classifier",
        f"client={method}",
        f"model.cost_backbone={backbone}",
        f"model.cost_seq_len={seq_len}",
    ]
    if batch is not None:
        overrides.append(f"client.batch_size={batch}")
    behaviour = build(compose_config(overrides), "client")
    if not isinstance(behaviour, PeftTuning | SideTuning):
        raise ConfigError("--methods", method, "must be full_ft, lora, ia3 or a side-tuning one")
    return behaviour


def _round(behaviour: Any, seq_len: int, examples: int) -> tuple[int, int, int, int, int]:
    """(round FLOPs, memory, bytes up, bytes down, device examples) of one client-round."""
    size = behaviour.batch_size
    if isinstance(behaviour, SideTuning):
        forward, memory = behaviour.backbone_device_step(size, seq_len)
        _, device_examples = behaviour.round_examples(examples)
        tokens = 1 if behaviour.spec.pivot_token else seq_len
        per_sample = tokens * behaviour.backbone_taps() * behaviour.backbone_vector_bytes()
        flops = round(forward * device_examples / size)  # as SideTuning.device_cost scales it
        return flops, memory, per_sample * device_examples, 0, device_examples
    step = behaviour.backbone_step(size, seq_len)
    trained = behaviour.round_examples(examples)
    payload = behaviour.backbone_payload_bytes()
    return round(step.train_flops * trained / size), step.memory.total, payload, payload, trained


def costs_of(
    fleet: Any,
    backbone: str,
    method: str,
    *,
    batch: int | None = None,
    seq_len: int = 32,
    examples: int = 64,
    population: int = 1000,
    seed: int = 0,
) -> MethodCost:
    """One row: the method's client-round on ``backbone`` over ``fleet``'s assigned devices."""
    behaviour = _behaviour(method, backbone, batch, seq_len)
    flops, memory, up, down, processed = _round(behaviour, seq_len, examples)
    work = ClientWork(flops, down, up, memory)
    devices: list[DeviceProfile] = list(fleet.assign(population, seed))
    feasible = [p for p in devices if fits_in_memory(p, work)]
    device, round_s, energy = None, None, None
    if feasible:
        server_gflops = float(fleet.server_gflops)
        timed = sorted(
            (
                (client_latency(nominal_observation(p).state(), work, server_gflops), p)
                for p in feasible
            ),
            key=lambda pair: pair[0].total_s,
        )
        latency, profile = timed[(len(timed) - 1) // 2]
        device, round_s, energy = profile.name, latency.total_s, client_energy_j(profile, latency)
    return MethodCost(
        backbone=backbone,
        method=method,
        peak_memory_bytes=memory,
        fit_share=len(feasible) / max(len(devices), 1),
        gflops_per_sample=flops / max(processed, 1) / _GIGA,
        round_flops=flops,
        bytes_up=up,
        bytes_down=down,
        device=device,
        round_s=round_s,
        energy_j=energy,
    )


def markdown(rows: Sequence[MethodCost]) -> str:
    """The rows as a Markdown table (memory in GiB, bytes in MB = 1e6 B)."""
    lines = [
        "| backbone | method | peak memory | phones that fit | GFLOP/sample "
        "| s/client-round (median feasible phone) | MB up / down | J/client-round |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        timed = "none fits" if r.device is None else f"{r.round_s:.1f} ({r.device})"
        energy = "-" if r.energy_j is None else f"{r.energy_j:.0f}"
        lines.append(
            f"| {r.backbone} | {r.method} | {r.peak_memory_bytes / _GIB:.2f} GiB "
            f"| {100 * r.fit_share:.0f}% | {r.gflops_per_sample:.1f} | {timed} "
            f"| {r.bytes_up / _MB:.2f} / {r.bytes_down / _MB:.2f} | {energy} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Print the table (and write the rows as JSON with ``--out``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", default="phones_mixed", help="a conf/devices/ fleet")
    parser.add_argument("--backbones", nargs="+", default=["Qwen2.5-0.5B", "TinyLlama-1.1B"])
    parser.add_argument(
        "--methods",
        nargs="+",
        default=["full_ft", "lora", "ia3", "side_tuning", "pae_side_tuning"],
    )
    parser.add_argument("--batch", type=int, default=None, help="null = each method's YAML")
    parser.add_argument("--seq-len", type=int, default=32, help="tokens per sample")
    parser.add_argument("--examples", type=int, default=64, help="a client's training examples")
    parser.add_argument("--population", type=int, default=1000, help="devices assigned")
    parser.add_argument("--seed", type=int, default=0, help="the fleet assignment's seed")
    parser.add_argument("--out", type=Path, default=None, help="write the rows as JSON")
    args = parser.parse_args(argv)
    try:
        fleet = build(compose_config([f"devices={args.devices}"]), "devices")
        rows = [
            costs_of(
                fleet,
                backbone,
                method,
                batch=args.batch,
                seq_len=args.seq_len,
                examples=args.examples,
                population=args.population,
                seed=args.seed,
            )
            for backbone in args.backbones
            for method in args.methods
        ]
    except ConfigError as error:
        print(f"llm_costs: error: {error.one_line()}", file=sys.stderr)
        return 2
    print(
        f"{args.devices}: {args.population} devices (seed {args.seed}), a client of "
        f"{args.examples} examples, {args.seq_len} tokens a sample, float32\n"
    )
    print(markdown(rows))
    if args.out is not None:
        args.out.write_text(json.dumps([asdict(r) for r in rows], indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
