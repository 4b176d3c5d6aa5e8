"""The Ray engine (``runtime.engine=ray``, the default): Flower's simulation engine on Ray.

Flower 1.28+ deprecates the in-process ``run_simulation`` in favour of ``flwr run`` (which goes
through a local SuperLink process). fedsim keeps the in-process path because a Hydra sweep needs
Python-level control of each run (results folder, error codes, Ray reuse); the choice is isolated
here, and the same ServerApp/ClientApp also run under ``flwr run .`` (see fedsim/engine/apps.py).
Only a run on this engine imports this module (and Ray): ``fedsim.engine.simulation`` loads it
when a run needs it, so that a run on the inline engine (fedsim/engine/inline.py) never pays
Ray's import nor its processes.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
from contextlib import suppress
from queue import Queue

from omegaconf import DictConfig

# No telemetry or usage reporting: this machine has no internet and runs must be quiet.
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# Ray's coming default, which also keeps it from printing a FutureWarning about it: a worker
# without GPUs keeps CUDA_VISIBLE_DEVICES as it is (its device is the CPU all the same).
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")

import psutil  # noqa: E402
import ray  # noqa: E402
from flwr.app import Message  # noqa: E402
from flwr.server.superlink.fleet.vce import vce_api  # noqa: E402
from flwr.server.superlink.fleet.vce.backend import raybackend  # noqa: E402
from flwr.server.superlink.linkstate import LinkState  # noqa: E402
from flwr.serverapp import ServerApp  # noqa: E402

from fedsim.engine.apps import client_app, quiet_flower  # noqa: E402
from fedsim.errors import ConfigError  # noqa: E402
from fedsim.rounds.virtual_grid import MESSAGES_PUSHED  # noqa: E402

__all__ = [
    "KeptRayBackend",
    "backend_config",
    "num_lanes",
    "ray_process_tree",
    "release_engine",
    "run_flower",
    "start_ray",
]


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
_ray_head: list[psutil.Process] = []  # what ray.init started here: a local instance's processes


def release_engine() -> None:
    """Terminate the kept actors and shut Ray down (what Flower does after every run)."""
    global _ray_target
    if KeptRayBackend._kept is not None and ray.is_initialized():
        KeptRayBackend._kept[1].terminate_all_actors()  # type: ignore[attr-defined]
    KeptRayBackend._kept = None
    if ray.is_initialized():
        ray.shutdown()
    _ray_target = None
    _ray_head.clear()


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
    (``fedsim.rounds.virtual_grid.MESSAGES_PUSHED``); the 0.1 s poll remains for anything else.
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
    # "local": a Ray instance of this run's own. Without an address, ray.init joins the last
    # cluster started on the machine (RAY_ADDRESS, or the ray_current_cluster file in Ray's temp
    # folder) and, if that cluster died, retries its address forever.
    init_args: dict = {"address": "local", "logging_level": "ERROR", "include_dashboard": False}
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


#: Seconds to wait for ``runtime.ray_address`` to accept a connection (ray.init itself would
#: retry an unreachable address for ever).
CONNECT_TIMEOUT_S = 10.0


def start_ray(cfg: DictConfig) -> bool:
    """Start this run's local Ray instance, or join ``runtime.ray_address``; check a client fits.

    Runs before the run folder is claimed, so that an unreachable cluster, or one none of whose
    nodes can host one client (Flower's actor pool would be empty and the run would hang), is
    refused in one line (:class:`ConfigError`) and leaves nothing behind. Returns whether Ray
    was started (or joined) now, rather than kept from the process's last run.
    """
    _prepare_ray(cfg)
    started = not ray.is_initialized()
    if started:
        address = str(cfg.runtime.ray_address or "")
        if address:
            _check_reachable(address)
        before = {child.pid for child in psutil.Process().children()}
        try:
            _init_ray(backend_config(cfg)["init_args"])
        except Exception as exc:  # noqa: BLE001 - Ray raises several types, with long texts
            if not address:
                raise
            reason = " ".join(str(exc).split())[:160]
            raise ConfigError("runtime.ray_address", address, f"cannot join it: {reason}") from None
        _ray_head[:] = [p for p in psutil.Process().children() if p.pid not in before]
    _check_fits(cfg)
    return started


def _init_ray(init_args: dict) -> None:
    """``ray.init`` as Flower's ``RayBackend.init_ray`` does it (workers get the driver's path).

    Flower skips its own ``ray.init`` when Ray is already up, which is what lets fedsim start
    (and check) Ray before the run folder is claimed. Unlike Flower, the caller's PYTHONPATH is
    put back once Ray's processes have started with the long one: otherwise every later
    subprocess of the caller (a pip, a second run) sees the checkout, and each run of a sweep
    would grow the variable by the whole ``sys.path`` again.

    A local instance gets the path from the environment its raylet inherits, and no job
    ``runtime_env``: with one, Ray cannot hand the run the workers it prestarts (they have no
    runtime env) and starts new ones, about 1.3 s more before the first actor answers
    (measured on 2 cores). A cluster's workers did not inherit this process's environment, so
    joining one still sends the path as the job's ``runtime_env``.
    """
    before = os.environ.get("PYTHONPATH")
    pythonpath = os.pathsep.join(sys.path)
    if before:
        pythonpath = f"{pythonpath}{os.pathsep}{before}"
    os.environ["PYTHONPATH"] = pythonpath  # the local raylet (and its workers) inherit it
    if init_args.get("address") != "local":
        init_args = {**init_args, "runtime_env": {"env_vars": {"PYTHONPATH": pythonpath}}}
    try:
        ray.init(**init_args)
    finally:
        if before is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = before


def _check_reachable(address: str) -> None:
    """Refuse a ``runtime.ray_address`` where no Ray head answers within CONNECT_TIMEOUT_S."""
    from ray._private.services import canonicalize_bootstrap_address  # Ray's own resolver

    accepted = "accepted: HOST:PORT of a running Ray head, auto, or null for a local Ray"
    try:  # "auto": RAY_ADDRESS or the last cluster started on this machine
        resolved = canonicalize_bootstrap_address(address) or ""
        host, port = resolved.rsplit(":", 1)
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except (OSError, ValueError) as exc:
        reason = " ".join(str(exc).split())[:120] or type(exc).__name__
        raise ConfigError(
            "runtime.ray_address", address, f"unreachable ({reason}); {accepted}"
        ) from None


def _check_fits(cfg: DictConfig) -> None:
    """One client's CPUs and GPUs must fit on one live Ray node (Flower's pool rule)."""
    cpus, gpus = float(cfg.runtime.client_num_cpus), float(cfg.runtime.client_num_gpus)
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive") and n.get("Resources")]
    if any(r.get("CPU", 0.0) >= cpus and r.get("GPU", 0.0) >= gpus for r in nodes):
        return
    most_gpus = max((r.get("GPU", 0.0) for r in nodes), default=0.0)
    most_cpus = max((r.get("CPU", 0.0) for r in nodes), default=0.0)
    release_engine()
    if gpus > most_gpus:
        raise ConfigError(
            "runtime.client_num_gpus",
            cfg.runtime.client_num_gpus,
            f"must be at most the GPUs of one Ray node ({most_gpus:g} here)",
        )
    raise ConfigError(
        "runtime.client_num_cpus",
        cfg.runtime.client_num_cpus,
        f"must be at most the CPUs of one Ray node ({most_cpus:g} here)",
    )


def ray_process_tree() -> list[psutil.Process]:
    """The local Ray instance's processes and their children (workers, agents) now."""
    tree: list[psutil.Process] = []
    for head in _ray_head:
        with suppress(psutil.Error):
            if head.is_running():
                tree += [head, *head.children(recursive=True)]
    return tree


def cluster_cpus(cfg: DictConfig) -> float | None:
    """CPUs of the Ray cluster at ``runtime.ray_address`` (connects once; Flower reuses it)."""
    if not cfg.runtime.ray_address:
        return None
    if not ray.is_initialized():
        # ray.init annotates logging_level as int, but takes a level name (its default is "info")
        ray.init(address=str(cfg.runtime.ray_address), logging_level="ERROR")  # type: ignore[arg-type]
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
