"""The ONE place that talks to Flower's simulation engine and to Ray.

Flower 1.28+ deprecates the in-process ``run_simulation`` in favour of ``flwr run`` (which goes
through a local SuperLink process). fedsim keeps the in-process path because a Hydra sweep needs
Python-level control of each run (results folder, error codes, Ray reuse); the choice is isolated
here, and the same ServerApp/ClientApp also run under ``flwr run .`` (see fedsim/apps.py).
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from queue import Queue

from omegaconf import DictConfig

# No telemetry or usage reporting: this machine has no internet and runs must be quiet.
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# CPU-only runs: keeps Ray from printing a FutureWarning about accelerator env vars.
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")

import ray  # noqa: E402
from flwr.app import Message  # noqa: E402
from flwr.server.superlink.fleet.vce import vce_api  # noqa: E402
from flwr.server.superlink.fleet.vce.backend import raybackend  # noqa: E402
from flwr.server.superlink.linkstate import LinkState  # noqa: E402
from flwr.serverapp import ServerApp  # noqa: E402

from fedsim.apps import client_app, make_server_app, quiet_flower  # noqa: E402
from fedsim.checkpoint import load_checkpoint  # noqa: E402
from fedsim.clients.distillation import distillation_of  # noqa: E402
from fedsim.cohort import MESSAGES_PUSHED  # noqa: E402
from fedsim.config import build, config_hash, validate  # noqa: E402
from fedsim.results import RunWriter  # noqa: E402
from fedsim.warm_start import warm_start_of  # noqa: E402
from fedsim.workload import get_workload  # noqa: E402

__all__ = ["simulate", "num_lanes", "backend_config", "release_engine"]


class KeptRayBackend(raybackend.RayBackend):
    """Flower's Ray backend, but Ray and its warm actors outlive a run for the next one.

    Flower builds a fresh actor pool for every ``run_simulation`` and shuts Ray down after it
    (``RayBackend.terminate``), so each run of a Hydra sweep would pay Ray's start, new worker
    processes, their imports and data loading again (seconds per run, landscape.md part D).
    Within one process (a sweep, a test session, a notebook) fedsim instead keeps the pool: a
    run whose resources match the previous run's reuses its actors, whose process-resident
    state (imports, datasets, frozen features, models) is keyed by job and reused where it
    applies. :func:`release_engine` (or process exit) ends it.
    """

    _kept: tuple[str, object] | None = None  # (client resources, BasicActorPool)

    def _key(self) -> str:
        return repr(sorted(self.client_resources.items()))

    def build(self, app_fn) -> None:  # noqa: ANN001 - Flower's signature
        """Reuse the kept pool when it fits this run (all its actors idle), else build one."""
        kept = KeptRayBackend._kept
        if kept is not None and not ray.is_initialized():  # someone shut Ray down meanwhile
            kept = KeptRayBackend._kept = None
        if kept is not None:
            key, pool = kept
            if key == self._key() and len(pool.pool) == pool.num_actors:  # type: ignore[attr-defined]
                self.pool, self.app_fn = pool, app_fn  # type: ignore[assignment]
                return
            pool.terminate_all_actors()  # type: ignore[attr-defined]
            KeptRayBackend._kept = None
        super().build(app_fn)
        KeptRayBackend._kept = (self._key(), self.pool)

    def terminate(self) -> None:
        """Keep Ray and the actors for the next run of this process (see the class doc)."""


_ray_target: str | None = None  # the runtime.ray_address ("" = local) Ray was started for


def release_engine() -> None:
    """Terminate the kept actors and shut Ray down (what Flower does after every run)."""
    global _ray_target
    if KeptRayBackend._kept is not None and ray.is_initialized():
        KeptRayBackend._kept[1].terminate_all_actors()  # type: ignore[attr-defined]
    KeptRayBackend._kept = None
    if ray.is_initialized():
        ray.shutdown()
    _ray_target = None


def _prepare_ray(cfg: DictConfig) -> None:
    """A run for another Ray cluster than the kept one's starts from a clean slate."""
    global _ray_target
    target = str(cfg.runtime.ray_address or "")
    if _ray_target is not None and _ray_target != target:
        release_engine()
    _ray_target = target


def _use_kept_backend() -> None:
    # Flower's start_vce imports ``RayBackend`` from this module when a run starts.
    raybackend.RayBackend = KeptRayBackend  # type: ignore[misc]
    vce_api.add_messages_to_queue = pump_messages  # run_api starts it by this global name


def pump_messages(
    state: LinkState,
    queue: Queue[Message],
    nodes_mapping: dict,
    f_stop: threading.Event,
) -> None:
    """Flower's message pump (``vce_api.add_messages_to_queue``), woken by fedsim's pushes.

    Flower's pump looks for new messages every 0.1 s, so each round's lane messages waited
    50 ms on average (up to 100 ms) before a worker saw them: a fixed tax on every round.
    This one does the same work but also wakes as soon as fedsim pushes messages
    (``fedsim.cohort.MESSAGES_PUSHED``); the 0.1 s poll remains for anything else.
    """
    while not f_stop.is_set():
        MESSAGES_PUSHED.clear()  # a push from here on wakes the wait below at once
        for node_id in nodes_mapping:
            for msg in state.get_message_ins(node_id=node_id, limit=1):
                queue.put(msg)
        MESSAGES_PUSHED.wait(_PUMP_POLL_S)


_PUMP_POLL_S = 0.1  # Flower's own polling interval, kept as the fallback


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
    if not ray.is_initialized():
        ray.init(address=str(cfg.runtime.ray_address), logging_level="ERROR")
    return float(ray.cluster_resources().get("CPU", 1.0))


def run_flower(server_app: ServerApp, lanes: int, config: dict) -> None:
    """Run ``server_app`` and fedsim's ClientApp on Flower's simulation engine (Ray backend)."""
    from flwr.simulation import run_simulation

    quiet_flower()
    _use_kept_backend()
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
    started_at = time.perf_counter()
    validate(cfg)
    quiet_flower()
    workload = get_workload(cfg)  # data, partitions, model factory: ConfigErrors surface here
    model = workload.build_model()
    strategy = build(cfg, "strategy")
    check_model = getattr(strategy, "check_model", None)  # e.g. width slicing needs width axes
    if check_model is not None:
        check_model(model)
    build(cfg, "devices")  # the fleet checks its profiles and shares
    build(cfg, "faults")
    build(cfg, "client")  # the workers build it too; check its arguments here, once
    distillation_of(cfg)  # the optional groups check their arguments too
    warm_start_of(cfg)
    _check_sampling(cfg, strategy)
    writer = RunWriter(run_dir)
    state = None
    if resume:
        state = load_checkpoint(run_dir, strategy, config_hash(cfg))
        writer.reopen(state.server_round)
    else:
        writer.start(cfg)
    summary: dict = {}
    _prepare_ray(cfg)
    lanes = num_lanes(cfg, _cluster_cpus(cfg))
    app = make_server_app(cfg, strategy, writer, summary, state, started_at)
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
