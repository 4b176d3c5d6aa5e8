"""``simulate``: one run, checked before it claims its folder, on the engine its config names.

``runtime.engine=ray`` (the default) runs Flower's simulation engine on Ray
(fedsim/engine/ray_engine.py, imported only then); ``runtime.engine=inline`` runs the same
ServerApp and ClientApp in this process (fedsim/engine/inline.py). Both compute the same rows.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any

# No telemetry or usage reporting: this machine has no internet and runs must be quiet.
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

import psutil  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from fedsim.clock.devices import warm_up_flop_counter  # noqa: E402
from fedsim.config import config_hash  # noqa: E402
from fedsim.engine.apps import make_server_app, quiet_flower, record_crash  # noqa: E402
from fedsim.engine.inline import check_inline, engine_of, run_inline  # noqa: E402
from fedsim.learning.params import to_arrays  # noqa: E402
from fedsim.learning.workload import get_workload  # noqa: E402
from fedsim.records.checkpoint import load_checkpoint  # noqa: E402
from fedsim.records.progress import StartupLog, keep_transcript, notices, transcript  # noqa: E402
from fedsim.records.results import RunWriter, check_folder_free  # noqa: E402
from fedsim.records.tracking import tracker_of  # noqa: E402
from fedsim.rounds import interrupt  # noqa: E402
from fedsim.rounds.hooks import ChecksModel  # noqa: E402
from fedsim.rounds.precheck import check_cheap_groups, validate_run  # noqa: E402
from fedsim.rounds.virtual_grid import WorkerSetupError  # noqa: E402

if TYPE_CHECKING:
    from types import ModuleType

__all__ = ["simulate", "release_engine"]

_RAY_ENGINE = "fedsim.engine.ray_engine"


def _ray_engine() -> ModuleType:
    """fedsim/engine/ray_engine.py, imported now (Ray and Flower's engine with it)."""
    import importlib

    return importlib.import_module(_RAY_ENGINE)


def release_engine() -> None:
    """Shut down the Ray engine this process kept, if a run started one (else nothing)."""
    if _RAY_ENGINE in sys.modules:
        sys.modules[_RAY_ENGINE].release_engine()


def _ray_processes() -> list[psutil.Process]:
    """The local Ray instance's processes now (none where Ray was never imported)."""
    if _RAY_ENGINE in sys.modules:
        return list(sys.modules[_RAY_ENGINE].ray_process_tree())
    return []


def simulate(
    cfg: DictConfig,
    run_dir: Path | str,
    resume: bool = False,
    made_by: Mapping[str, Any] | None = None,
) -> dict:
    """Validate ``cfg``, run the federation, write ``run_dir``; return the run summary.

    Every check that can fail on bad input (including Ray's start and whether one client fits
    on it) runs before the run folder is claimed. With ``resume``, the run continues in
    ``run_dir`` from its checkpoint. SIGINT or SIGTERM ends the run after its last complete
    round (status ``interrupted``; :mod:`fedsim.rounds.interrupt`). ``made_by``: the config groups'
    choices and the overrides (:func:`fedsim.config.provenance`), saved as ``choices.yaml``.
    """
    with interrupt.stop_on_signals(run_dir, release_engine, _ray_processes):
        return _simulate(cfg, run_dir, resume, made_by)


def _simulate(
    cfg: DictConfig, run_dir: Path | str, resume: bool, made_by: Mapping[str, Any] | None = None
) -> dict:
    startup = StartupLog(enabled=bool(cfg.runtime.progress), hold=True)
    with notices(bool(cfg.runtime.progress)), transcript():
        validate_run(cfg)
        check_folder_free(run_dir, resume)  # a run there, or a writer: before anything starts
        quiet_flower()
        strategy = check_cheap_groups(cfg)  # a bad strategy or client argument: before any data
        workload = get_workload(cfg)  # data, partitions, model factory: ConfigErrors surface here
        model = workload.build_model()
        startup.lap("data and model")
        if isinstance(strategy, ChecksModel):  # width slicing needs width axes
            strategy.check_model(model)
        _check_sampling(cfg, strategy)
        inline = engine_of(cfg) == "inline"
        if inline:
            check_inline(cfg)  # a cluster, a killed worker, a GPU that is not here: ConfigError
        else:
            ray_engine = _ray_engine()
            with _beside(warm_up_flop_counter):  # round 1's first FLOP count, while Ray starts
                started = ray_engine.start_ray(cfg)  # no cluster there, no node fits: refused
            startup.lap("Ray" if started else "Ray (kept from the last run)")
        tracker = tracker_of(cfg)  # logger=...: its library is imported (or refused) here
        interrupt.before_claim()  # a signal during start-up: RunInterrupted, nothing written
        writer = RunWriter(run_dir, tracker)
        state = None
        if resume:
            state = load_checkpoint(run_dir, strategy, config_hash(cfg), like=to_arrays(model))
            writer.reopen(state.server_round)
        else:
            writer.start(cfg, made_by)
        keep_transcript(run_dir)  # run.log: the lines so far, then each as it comes
        writer.track(cfg, None if state is None else state.server_round)
        startup.release()  # checks passed, folder claimed: the start-up phases so far
        summary: dict = {}
        app = make_server_app(cfg, strategy, writer, summary, state, startup)
        try:
            if inline:
                run_inline(app, cfg)
            else:
                lanes = ray_engine.num_lanes(cfg, ray_engine.cluster_cpus(cfg))
                ray_engine.run_flower(app, lanes, ray_engine.backend_config(cfg))
            if not summary:
                raise RuntimeError("the simulation ended without a summary; see the log above")
        except Exception as error:  # the folder says how its run ended, whatever ended it
            # The workers' set-up error is the command's own one line (fedsim/__main__.py).
            announce = not isinstance(error, WorkerSetupError)
            record_crash(writer, error, int(cfg.num_rounds), announce)
            raise
        finally:
            writer.close()  # the folder's lock: the next run of a sweep, or a resume, may take it
    return summary


@contextmanager
def _beside(work: Callable[[], None]) -> Iterator[None]:
    """Run ``work`` in a thread during the block; wait for it at the end (its errors: ignored).

    For start-up work that needs the CPU while the block mostly waits (Ray starting its
    processes). ``work`` must draw nothing from a shared random generator.
    """

    def quietly() -> None:
        with suppress(Exception):  # a warm-up only saves time; the real call raises if it must
            work()

    thread = threading.Thread(target=quietly, name="fedsim-warm-up", daemon=True)
    thread.start()
    try:
        yield
    finally:
        thread.join()


def _check_sampling(cfg: DictConfig, strategy: object) -> None:
    """A strategy that waits for more nodes than exist would hang: refuse it instead."""
    from fedsim.errors import ConfigError
    from fedsim.rounds.virtual_grid import listed_population_limit

    n = int(cfg.num_clients)
    for attr in ("min_available_nodes", "min_train_nodes"):
        value = getattr(strategy, attr, None)
        if isinstance(value, int) and value > n:
            raise ConfigError(f"strategy.{attr}", value, f"must be <= num_clients ({n})")
    fraction = getattr(strategy, "fraction_train", None)
    if isinstance(fraction, float | int) and not 0.0 < fraction <= 1.0:
        raise ConfigError("strategy.fraction_train", fraction, "must be in (0, 1]")
    limit = listed_population_limit(psutil.virtual_memory().available, n)  # Flower lists all ids
    if n > limit:
        raise ConfigError(
            "num_clients",
            n,
            f"must be <= {limit} (Flower lists every client's node"
            " id each round; that list must fit in the memory available now)",
        )
