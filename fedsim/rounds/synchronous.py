"""The round loop of the ServerApp: sample, send, aggregate, evaluate, record.

fedsim drives Flower's Message-API strategies itself instead of calling ``Strategy.start``: the
strategy still decides whom to train (``configure_train``) and how to merge (``aggregate_train``),
but fedsim owns what happens around each round (seeded sampling, lanes, the run folder, the
progress line, stopping on divergence). ``Strategy.start`` always begins at round 1 and keeps
only aggregated metrics (landscape.md A.1.6), which a simulator cannot work with.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from omegaconf import DictConfig, OmegaConf

from fedsim import keys
from fedsim.clock.devices import SimClock
from fedsim.clock.scheduler import DeviceCost, RoundScheduler, RoundSettlement, charged_bytes
from fedsim.clock.server_view import FederationView, ObservationLog, slim_layout_of
from fedsim.config import build, config_hash
from fedsim.keys import Outcome
from fedsim.learning.evaluation import evaluate, evaluate_clients, sample_eval_clients
from fedsim.learning.params import arrays_nbytes, keep_dtypes, load_arrays, to_arrays
from fedsim.learning.placement import (
    CPU,
    apply_determinism,
    computing_on,
    server_device,
    to_device,
)
from fedsim.learning.workload import get_workload
from fedsim.records.checkpoint import RunState, save_checkpoint
from fedsim.records.progress import RoundProgress, StartupLog, format_sim_time
from fedsim.records.results import CLIENT_EVAL_FILE, CLIENTS_FILE, RunWriter
from fedsim.rounds import interrupt
from fedsim.rounds.asynchronous import AsyncLoop, AsyncStalled, AsyncStrategy, is_asynchronous
from fedsim.rounds.hooks import AdaptsToDevices
from fedsim.rounds.virtual_grid import VirtualGrid, job_record, partition_id_of
from fedsim.rounds.warm_start import warm_start_of
from fedsim.seeding import derive_seed, python_random_seeded
from fedsim.training.contract import (
    ClientBehaviour,
    Distillation,
    NoDistillation,
    behaviour_of,
    distillation_of,
)

__all__ = ["run_rounds", "RoundRecord"]

log = logging.getLogger("fedsim")
_WARNED_DTYPES: set[str] = set()  # strategies already warned about promoting the model's dtype


@dataclass
class RoundRecord:
    """What one synchronous round did, before evaluation."""

    num_sampled: int
    num_ok: int
    num_failed: int
    bytes_down: int
    bytes_up: int
    settlement: RoundSettlement
    train_metrics: dict[str, Any] = field(default_factory=dict)


def _width_of(message: Message) -> float:
    """The sub-model width a message asks its client to train (1 = the full model)."""
    config = message.content.get(keys.CONFIG)
    if not isinstance(config, ConfigRecord):
        return 1.0
    return float(keys.number(config, keys.WIDTH, 1.0))


def train_round(
    strategy: Strategy,
    server_round: int,
    arrays: ArrayRecord,
    grid: VirtualGrid,
    scheduler: RoundScheduler,
    cost_fn: Callable[[int, float], DeviceCost],
    seed: int,
    states: dict[int, RecordDict],
    attach: Callable[[list[Message], dict[int, RecordDict]], None] | None = None,
) -> tuple[ArrayRecord, RoundRecord]:
    """One round of federated training; returns the new global arrays and what it cost.

    ``states`` (partition id -> persistent client state) is updated in place.
    """
    # Flower samples with random.sample over the (sorted) virtual node ids: seed it by round.
    with python_random_seeded(derive_seed(seed, "sample", server_round)):
        messages: list[Message] = list(
            strategy.configure_train(server_round, arrays, ConfigRecord(), grid)
        )
    if attach is not None:  # records beside the strategy's (DFL's per-class soft targets)
        attach(messages, states)
    costs: dict[int, DeviceCost] = {}
    for message in messages:  # each client's job is costed on the sub-model it trains
        pid = partition_id_of(message.metadata.dst_node_id)
        costs[pid] = cost_fn(pid, _width_of(message))
    plan = scheduler.plan(server_round, messages, costs)
    replies, new_states = grid.exchange(plan.to_send, states)
    settled = scheduler.settle(plan, replies, costs)
    for reply in settled.kept:  # a dropped straggler's round did not happen for its state
        pid = partition_id_of(reply.metadata.src_node_id)
        if pid in new_states:
            states[pid] = new_states[pid]
    new_arrays, metrics = (None, None)
    if settled.kept:
        new_arrays, metrics = strategy.aggregate_train(server_round, settled.kept)
    if new_arrays is not None:
        returned = new_arrays
        new_arrays, promoted = keep_dtypes(returned, arrays)
        if promoted and type(strategy).__name__ not in _WARNED_DTYPES:
            _WARNED_DTYPES.add(type(strategy).__name__)
            log.warning(
                "%s returned %s arrays for the model's %s ones (%s, ...); cast back so that "
                "the global model keeps its dtype and its size on the wire",
                type(strategy).__name__,
                returned[promoted[0]].dtype,
                arrays[promoted[0]].dtype,
                promoted[0],
            )
    record = RoundRecord(
        num_sampled=len(messages),
        num_ok=len(settled.kept),
        num_failed=settled.counts[Outcome.FAILED],
        # Each device downloads its own copy and uploads its own update (stragglers too), as the
        # scheduler charged its link (nothing for a model that stays on the server).
        bytes_down=sum(
            plan.records[partition_id_of(m.metadata.dst_node_id)]["bytes_down"]
            for m in plan.to_send
        ),
        bytes_up=sum(row.get("bytes_up", 0) for row in settled.records),
        settlement=settled,
        train_metrics=dict(metrics) if metrics is not None else {},
    )
    return (new_arrays if new_arrays is not None else arrays), record


@dataclass
class Federation:
    """What the round loop works with: built once per run from the config."""

    cfg: DictConfig
    strategy: Strategy | AsyncStrategy  # a Flower strategy plays rounds; an AsyncStrategy events
    model: torch.nn.Module  # the server's copy of the global model (evaluation, cost model)
    behaviour: ClientBehaviour
    scheduler: RoundScheduler
    grid: VirtualGrid
    test: dict[str, torch.Tensor]
    cost_fn: Callable[[int, float], DeviceCost]  # (partition id, sub-model width) -> cost
    num_examples: Callable[[int], int]  # partition id -> its training examples
    distillation: Distillation = field(default_factory=NoDistillation)
    # ``runtime.server_device`` other than CPU: a copy of ``model`` there that scores the global
    # model (``test`` is then on that device too); ``model`` stays on CPU for the cost model.
    eval_model: torch.nn.Module | None = None

    @classmethod
    def build(cls, grid: Grid, cfg: DictConfig, strategy: Strategy | AsyncStrategy) -> Federation:
        """Workload, model, client behaviour, device scheduler and lanes of ``cfg``."""
        # More threads than the cores the workers leave idle only slow everything down.
        torch.set_num_threads(int(cfg.runtime.server_num_threads))
        device = server_device(OmegaConf.select(cfg, "runtime.server_device"))
        apply_determinism(
            device, bool(OmegaConf.select(cfg, "runtime.deterministic_gpu", default=True))
        )
        workload = get_workload(cfg)
        model = workload.build_model()
        distillation = distillation_of(cfg)
        behaviour = behaviour_of(cfg, distillation)  # as the workers build it
        with computing_on(device):  # frozen features on the server's GPU, if any; kept on CPU
            batch = workload.example_batch(behaviour.batch_size)

        models = {1.0: model}  # width -> the (sub-)model the cost model counts on

        def model_at(width: float) -> torch.nn.Module:
            if width not in models:
                models[width] = workload.build_model(width)
            return models[width]

        def cost_fn(pid: int, width: float = 1.0) -> DeviceCost:
            size = workload.num_examples(pid)
            sized = {k: v[: min(len(v), size)] for k, v in batch.items()}
            return behaviour.device_cost(model_at(width), sized, size)

        fleet = build(cfg, "devices")
        scheduler = RoundScheduler(
            fleet,
            int(cfg.seed),
            int(cfg.num_clients),
            deadline_s=cfg.clock.deadline_s,
            over_selection=cfg.clock.over_selection,
        )
        if isinstance(strategy, AdaptsToDevices):  # HeteroFL, WHALE-FL: per-device decisions
            strategy.bind(federation_view(scheduler, model_at, cost_fn))
        with computing_on(device):
            test = workload.test_features()
        eval_model = None if device == CPU else copy.deepcopy(model).to(device)
        return cls(
            cfg=cfg,
            strategy=strategy,
            model=model,
            behaviour=behaviour,
            scheduler=scheduler,
            grid=VirtualGrid(
                grid,
                num_clients=int(cfg.num_clients),
                job=job_record(cfg),
                cost=lambda pid: float(workload.num_examples(pid)),
                timeout_s=float(cfg.runtime.round_timeout_s),
            ),
            # on the server's GPU once, so that every round scores the same tensors
            test=test if eval_model is None else to_device(test, device),
            cost_fn=cost_fn,
            num_examples=workload.num_examples,
            distillation=distillation,
            eval_model=eval_model,
        )

    def scored(self, arrays: ArrayRecord) -> torch.nn.Module:
        """``model`` with ``arrays`` installed, or its copy on the server's device with them."""
        load_arrays(self.model, arrays)
        if self.eval_model is None:
            return self.model
        load_arrays(self.eval_model, arrays)
        return self.eval_model


def federation_view(
    scheduler: RoundScheduler,
    model_at: Callable[[float], torch.nn.Module],
    cost_fn: Callable[[int, float], DeviceCost],
) -> FederationView:
    """The read-only view a device-aware strategy is bound to (fedsim/clock/server_view.py).

    It never reads the conditions the clock charges for a round: only the check-in (online
    flag) of the round decided, and what ``scheduler`` measured in the rounds before (its
    settled rounds feed the view's ObservationLog).
    """
    fleet, seed = scheduler.fleet, scheduler.seed
    payloads: dict[float, int] = {}
    observations = ObservationLog()
    scheduler.observers.append(observations.record)

    def online(pid: int, rnd: int) -> bool:  # the check-in: availability, not the round's rates
        return fleet.conditions(scheduler.profiles[pid], seed, pid, rnd).online

    def payload_bytes(width: float) -> int:  # on the device's link: 0 for a server-side model
        if width not in payloads:
            cost = cost_fn(0, width)  # a cost backbone scales the bytes (DeviceCost.payload_scale)
            measured = arrays_nbytes(to_arrays(model_at(width)))
            payloads[width] = 0 if cost.model_on_server else charged_bytes(measured, cost)
        return payloads[width]

    return FederationView(
        seed=seed,
        profiles=scheduler.profiles,  # drawn per client on demand (devices.DeviceAssignment)
        server_gflops=fleet.server_gflops,
        deadline_s=scheduler.deadline_s,
        online=online,
        observations=observations,
        cost=cost_fn,
        payload_bytes=payload_bytes,
        slim_layout=lambda: slim_layout_of(model_at(1.0)),
    )


def initial_state(fed: Federation) -> RunState:
    """The loop state before round 1."""
    totals: dict[str, Any] = {
        "bytes_up_total": 0,
        "bytes_down_total": 0,
        "energy_j_total": 0.0,
        "best_accuracy": None,
        "best_round": 0,
        "num_rounds": 0,
        "final_accuracy": None,
        "final_loss": None,
        "final_macro_f1": None,
        keys.WALL_TIME_S: 0.0,
    }
    return RunState(0, to_arrays(fed.model), {}, 0.0, totals)


def close_round(
    fed: Federation,
    state: RunState,
    arrays: ArrayRecord,
    server_round: int,
    traffic: tuple[int, int, float],
    phase: str = "train",
) -> dict[str, Any]:
    """Install ``arrays`` as the global model of ``server_round``, score it, update the totals.

    ``traffic`` is what the round moved and spent: (bytes up, bytes down, device energy in J).
    Returns the start of its metrics row (round, phase, the scores, the traffic); the caller
    adds what only it knows (synchronous rounds, asynchronous updates and a warm start's
    cycles differ there). Only ``train`` rows count for the best and final accuracy: a warm
    start's cycles (round 0) add their traffic and time, not their scores.
    """
    scores = evaluate(fed.scored(arrays), fed.test)
    state.arrays, state.server_round = arrays, server_round
    state.sim_time_s = fed.scheduler.clock.now_s
    bytes_up, bytes_down, energy_j = traffic
    totals = state.totals
    totals["bytes_up_total"] += bytes_up
    totals["bytes_down_total"] += bytes_down
    totals["energy_j_total"] += energy_j
    if phase == "train":
        if totals["best_accuracy"] is None or scores["accuracy"] > totals["best_accuracy"]:
            totals["best_accuracy"], totals["best_round"] = scores["accuracy"], server_round
        totals.update(
            num_rounds=server_round,
            final_accuracy=scores["accuracy"],
            final_loss=scores["loss"],
            final_macro_f1=scores["macro_f1"],
        )
    row = {
        keys.ROUND: server_round,
        keys.PHASE: phase,
        keys.ACCURACY: scores["accuracy"],
        keys.LOSS: scores["loss"],
        keys.MACRO_F1: scores["macro_f1"],
        keys.BYTES_UP: bytes_up,
        keys.BYTES_DOWN: bytes_down,
        keys.ENERGY_J: energy_j,
    }
    cost_backbone = cost_backbone_of(fed.cfg)
    if cost_backbone is not None:  # the clock's numbers are of that model, not of this one
        row[keys.COST_BACKBONE] = cost_backbone
    return row


def cost_backbone_of(cfg: DictConfig) -> str | None:
    """The architecture the clock charges (``model.cost_backbone``), None for the trained one.

    Read with a default: a run folder saved before the key existed has none.
    """
    name = OmegaConf.select(cfg, "model.cost_backbone", default=None)
    return None if name is None else str(name)


def report_feasibility(fed: Federation) -> int | None:
    """With a cost backbone, say before round 1 how many devices can hold a round; return it.

    One line on the log: ``N of M devices can train <client> on <backbone> (needs X GiB)``,
    an error when N is 0 (every client would be set aside as infeasible, round after round).
    The memory is that of a full batch (a client with fewer examples needs less).
    """
    name = cost_backbone_of(fed.cfg)
    if name is None:
        return None
    cost = fed.cost_fn(0, 1.0)
    fitting, total = fed.scheduler.count_fitting(cost), len(fed.scheduler.profiles)
    method = OmegaConf.select(fed.cfg, "client.method", default=None)
    client = type(fed.behaviour).__name__ + (f" ({method})" if method else "")
    line = "%d of %d devices can train %s on %s (needs %.2f GiB; the fleet's largest: %.2f GB)"
    largest = max(p.memory_gb for p in fed.scheduler.fleet.profiles)
    args = (fitting, total, client, name, cost.peak_memory_bytes / 2**30, largest)
    (log.error if fitting == 0 else log.info)(line, *args)
    return fitting


def advance_one_round(
    fed: Federation, state: RunState, server_round: int
) -> tuple[dict, RoundSettlement]:
    """Train, aggregate and evaluate one round; advance ``state``; return the metrics row."""
    if isinstance(fed.strategy, AsyncStrategy):
        raise TypeError(f"{type(fed.strategy).__name__} runs on AsyncLoop: it has no rounds")
    arrays, record = train_round(
        fed.strategy,
        server_round,
        state.arrays,
        fed.grid,
        fed.scheduler,
        fed.cost_fn,
        int(fed.cfg.seed),
        state.client_states,
        fed.distillation.attach,
    )
    settled = record.settlement
    row = close_round(
        fed, state, arrays, server_round, (record.bytes_up, record.bytes_down, settled.energy_j)
    )
    row.update(
        {
            keys.NUM_CLIENTS: record.num_ok,
            keys.NUM_SAMPLED: record.num_sampled,
            keys.NUM_FAILED: record.num_failed,
            keys.TRAIN_LOSS: record.train_metrics.get(keys.TRAIN_LOSS),
            keys.SIM_TIME_S: state.sim_time_s,
            keys.ROUND_TIME_S: settled.round_time_s,
            keys.NUM_STRAGGLERS: settled.counts[Outcome.STRAGGLER],
            keys.NUM_OFFLINE: settled.counts[Outcome.OFFLINE],
            keys.NUM_INFEASIBLE: settled.counts[Outcome.INFEASIBLE],
        }
    )
    return row, settled


def run_rounds(
    grid: Grid,
    cfg: DictConfig,
    strategy: Strategy | AsyncStrategy,
    writer: RunWriter,
    resume: RunState | None = None,
    startup: StartupLog | None = None,
) -> dict:
    """Run rounds up to ``cfg.num_rounds`` (after ``resume``'s round); return the summary.

    Every round's rows are appended to the run folder as they come; every
    ``cfg.checkpoint_every`` rounds (and after the last) the state is checkpointed.
    ``startup`` (the run's :class:`StartupLog`, begun when the run began) makes the summary
    report ``startup_s``: what the run paid before its first round (engine, workers, data,
    model), and says so, with the engine's part, on stderr.
    """
    inline = OmegaConf.select(cfg, "runtime.engine", default="ray") == "inline"
    if startup is not None:
        startup.lap("engine" if inline else "Flower engine")
    fed = Federation.build(grid, cfg, strategy)
    if startup is not None:
        startup.lap("server (model inputs, strategy, fleet)")
    fed.grid.warm_up()  # worker start-up is not part of round 1 (nor of its timeout)
    workers = "client app (in this process)" if inline else "Ray workers"
    startup_s = None if startup is None else startup.done(workers)
    state = resume if resume is not None else initial_state(fed)
    fed.scheduler.clock = SimClock(state.sim_time_s)
    fed.scheduler.keep_state(state.extra)  # phones' batteries (if any) travel in checkpoints
    num_fitting = report_feasibility(fed)  # a cost backbone: who can hold a round at all
    warm_start_of(cfg).run(fed, state, writer)  # CyclicFL's stage; none / resumed: nothing
    num_rounds, every = int(cfg.num_rounds), int(cfg.checkpoint_every)
    progress = RoundProgress(num_rounds, enabled=bool(cfg.runtime.progress))
    started = time.perf_counter() - float(state.totals[keys.WALL_TIME_S])
    status = "completed"
    max_failed = int(cfg.runtime.max_failed_rounds)
    failed_streak = 0  # consecutive rounds in which every client sent work failed
    time_budget_s = cfg.clock.get("max_sim_time_s")
    if is_asynchronous(strategy):  # FedBuff, FedCompass: events on the simulated clock
        loop = AsyncLoop(fed, state, partial(close_round, fed))
        rounds: Iterator[tuple[dict, RoundSettlement]] = loop.steps(num_rounds)
    else:
        rounds = (
            advance_one_round(fed, state, r) for r in range(state.server_round + 1, num_rounds + 1)
        )
    if time_budget_s is not None and state.sim_time_s >= time_budget_s:
        rounds = iter(())  # resumed after the round that spent the budget: nothing left to play
    checkpointed = state.server_round  # the round the checkpoint in the folder holds
    while True:
        if interrupt.stop_requested() and state.server_round < num_rounds:
            status = "interrupted"  # SIGINT/SIGTERM: end on the last complete round
            if every and state.server_round > checkpointed:
                writer.sync()
                save_checkpoint(writer.run_dir, state, strategy, config_hash(cfg))
            break
        try:
            row, settled = next(rounds)
        except StopIteration:
            break
        except interrupt.RunInterrupted:  # the round in progress abandoned: the last one stands
            status = "interrupted"
            break
        except AsyncStalled as exc:
            status = "failed"
            log.error("%s; stopping (metrics so far are saved)", exc)
            break
        server_round = state.server_round
        state.totals[keys.WALL_TIME_S] = row[keys.WALL_TIME_S] = time.perf_counter() - started
        writer.log_row(row)
        for client_row in settled.records:
            writer.log_row(client_row, CLIENTS_FILE)
        progress.update(
            server_round,
            row[keys.ACCURACY],
            row[keys.LOSS],
            f"sim {format_sim_time(state.sim_time_s)}"
            + "".join(
                f"  {name} {settled.counts[name]}"
                for name in (Outcome.STRAGGLER, Outcome.OFFLINE, Outcome.INFEASIBLE, Outcome.FAILED)
                if settled.counts[name]
            ),
        )
        if settled.counts[Outcome.FAILED]:
            reasons = sorted(
                {r["error"] for r in settled.records if r["outcome"] == Outcome.FAILED}
            )
            log.warning(
                "round %d: %d client(s) failed: %s",
                server_round,
                settled.counts[Outcome.FAILED],
                "; ".join(reason[:120] for reason in reasons[:3]),
            )
        all_failed = settled.counts[Outcome.FAILED] > 0 and settled.counts[Outcome.FAILED] == len(
            [
                r
                for r in settled.records
                if r["outcome"] not in (Outcome.OFFLINE, Outcome.INFEASIBLE)
            ]
        )
        failed_streak = failed_streak + 1 if all_failed else 0
        if max_failed and failed_streak >= max_failed:
            status = "failed"
            log.error(
                "rounds %d-%d: every client failed; stopping (metrics so far are saved). "
                "The engine may have lost its workers; see clients.jsonl for the reasons.",
                server_round - failed_streak + 1,
                server_round,
            )
            break
        if not math.isfinite(row[keys.LOSS]):
            status = "diverged"
            log.error(
                "round %d: the global model's loss is %s; stopping (metrics so far are saved). "
                "Lower client.lr.",
                server_round,
                row[keys.LOSS],
            )
            break
        out_of_time = time_budget_s is not None and state.sim_time_s >= time_budget_s
        if every and (server_round % every == 0 or server_round == num_rounds or out_of_time):
            writer.sync()  # the rows it counts are on disk before it is
            save_checkpoint(writer.run_dir, state, strategy, config_hash(cfg))
            checkpointed = server_round
        if out_of_time:
            log.info(
                "round %d: simulated time %s reached clock.max_sim_time_s; stopping",
                server_round,
                format_sim_time(state.sim_time_s),
            )
            break
    if state.server_round > 0 and status != "interrupted":  # scored once a resume finishes
        writer.write_rows(evaluate_final_clients(fed, state), CLIENT_EVAL_FILE)
    summary: dict[str, Any] = {"status": status, **state.totals, "sim_time_s": state.sim_time_s}
    if state.server_round > 0 and status != "interrupted":
        # Each device downloads the tuned model once for on-device inference (side-tuning's
        # client.charge_final_download; 0 otherwise); not part of any round, nor of the clock.
        final_bytes = fed.cost_fn(0, 1.0).final_download_bytes * int(cfg.num_clients)
        summary["final_download_bytes"] = final_bytes
        summary["bytes_down_total"] += final_bytes
    summary[keys.STARTUP_S] = startup_s
    if num_fitting is not None:  # named, so that nobody mistakes it for training that model
        summary[keys.COST_BACKBONE] = cost_backbone_of(cfg)
        summary["num_clients_fitting"] = num_fitting
    writer.finish(summary)
    return summary


def evaluate_final_clients(fed: Federation, state: RunState) -> list[dict[str, Any]]:
    """Score the global model of ``state`` on the local data of ``eval.num_clients_final`` clients.

    Rows of :func:`fedsim.learning.evaluation.evaluate_clients`, each with the round of the model.
    """
    cfg = fed.cfg
    pids = sample_eval_clients(int(cfg.num_clients), cfg.eval.num_clients_final, int(cfg.seed))
    model = fed.scored(state.arrays)  # a resumed run may have played no round here
    rows = evaluate_clients(model, get_workload(cfg).client_data, pids)
    return [{keys.ROUND: state.server_round, **row} for row in rows]
