"""The ONE place that talks to Flower's simulation engine and to Ray.

Flower 1.28+ deprecates the in-process ``run_simulation`` in favour of ``flwr run`` (which goes
through a local SuperLink process). fedsim keeps the in-process path because a Hydra sweep needs
Python-level control of each run (results folder, error codes, Ray reuse); the choice is isolated
here, and the same ServerApp/ClientApp also run under ``flwr run .`` (see fedsim/apps.py).
"""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import DictConfig

# No telemetry or usage reporting: this machine has no internet and runs must be quiet.
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# CPU-only runs: keeps Ray from printing a FutureWarning about accelerator env vars.
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")

from flwr.serverapp import ServerApp  # noqa: E402

from fedsim.apps import client_app, make_server_app, quiet_flower  # noqa: E402
from fedsim.checkpoint import load_checkpoint  # noqa: E402
from fedsim.config import build, config_hash, validate  # noqa: E402
from fedsim.results import RunWriter  # noqa: E402
from fedsim.workload import get_workload  # noqa: E402

__all__ = ["simulate", "num_lanes", "backend_config"]


def num_lanes(cfg: DictConfig, cluster_cpus: float | None = None) -> int:
    """Physical SuperNodes: one per Ray worker slot unless ``runtime.num_lanes`` says otherwise."""
    if cfg.runtime.num_lanes is not None:
        return int(cfg.runtime.num_lanes)
    cpus = cluster_cpus if cluster_cpus is not None else float(os.cpu_count() or 1)
    return max(1, int(cpus // float(cfg.runtime.client_num_cpus)))


def backend_config(cfg: DictConfig) -> dict:
    """Flower's Ray backend settings: resources per ClientApp and ``ray.init`` arguments."""
    init_args: dict = {"logging_level": "ERROR", "include_dashboard": False}
    if cfg.runtime.ray_address:
        init_args = {"address": str(cfg.runtime.ray_address), "logging_level": "ERROR"}
    # Worker output stays in the workers: a client's exception travels back in its reply.
    init_args["log_to_driver"] = False
    return {
        "client_resources": {
            "num_cpus": float(cfg.runtime.client_num_cpus),
            "num_gpus": float(cfg.runtime.client_num_gpus),
            # Flower passes these to ClientAppActor.options(): Ray restarts a crashed worker
            # (Flower itself would keep handing messages to the dead actor).
            "max_restarts": -1,
        },
        "init_args": init_args,
    }


def _cluster_cpus(cfg: DictConfig) -> float | None:
    """CPUs of the Ray cluster at ``runtime.ray_address`` (connects once; Flower reuses it)."""
    if not cfg.runtime.ray_address:
        return None
    import ray

    if not ray.is_initialized():
        ray.init(address=str(cfg.runtime.ray_address), logging_level="ERROR")
    return float(ray.cluster_resources().get("CPU", 1.0))


def run_flower(server_app: ServerApp, lanes: int, config: dict) -> None:
    """Run ``server_app`` and fedsim's ClientApp on Flower's simulation engine (Ray backend)."""
    from flwr.simulation import run_simulation

    quiet_flower()
    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=lanes,
        backend_name="ray",
        backend_config=config,
    )


def simulate(cfg: DictConfig, run_dir: Path | str, resume: bool = False) -> dict:
    """Validate ``cfg``, run the federation, write ``run_dir``; return the run summary.

    Every check that can fail on bad input runs before the run folder is claimed. With
    ``resume``, the run continues in ``run_dir`` from its checkpoint.
    """
    validate(cfg)
    quiet_flower()
    workload = get_workload(cfg)  # data, partitions, model factory: ConfigErrors surface here
    workload.build_model()
    strategy = build(cfg, "strategy")
    build(cfg, "devices")  # the fleet checks its profiles and shares
    build(cfg, "faults")
    build(cfg, "client")  # the workers build it too; check its arguments here, once
    _check_sampling(cfg, strategy)
    writer = RunWriter(run_dir)
    state = None
    if resume:
        state = load_checkpoint(run_dir, strategy, config_hash(cfg))
        writer.reopen(state.server_round)
    else:
        writer.start(cfg)
    summary: dict = {}
    lanes = num_lanes(cfg, _cluster_cpus(cfg))
    app = make_server_app(cfg, strategy, writer, summary, state)
    run_flower(app, lanes, backend_config(cfg))
    if not summary:
        raise RuntimeError("the simulation ended without a summary; see the log above")
    return summary


def _check_sampling(cfg: DictConfig, strategy: object) -> None:
    """A strategy that waits for more nodes than exist would hang: refuse it instead."""
    from fedsim.errors import ConfigError

    n = int(cfg.num_clients)
    for attr in ("min_available_nodes", "min_train_nodes"):
        value = getattr(strategy, attr, None)
        if isinstance(value, int) and value > n:
            raise ConfigError(f"strategy.{attr}", value, f"must be <= num_clients ({n})")
    fraction = getattr(strategy, "fraction_train", None)
    if isinstance(fraction, float | int) and not 0.0 < fraction <= 1.0:
        raise ConfigError("strategy.fraction_train", fraction, "must be in (0, 1]")
