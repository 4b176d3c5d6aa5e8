"""Warm starts: a stage before the federated rounds that hands the strategy a better model.

CyclicFL (Zhang et al., arXiv 2301.12193, methods.md 4): starting from the initial model, the
model is trained *sequentially* on sampled clients, each on its own data (no public data), for a
number of cycles; round 1 of the configured strategy (any of them: it never knows) starts from
the result. Our decisions where the paper is OPEN (methods.md 4.3, 8) [D]:

* Each cycle visits ``clients_per_cycle`` distinct clients in a random order drawn from
  ``(seed, "cyclic", cycle)``; a visit runs the client's own local training (``client.*``, the
  same behaviour and client terms as the rounds, e.g. DFL's) ``passes_per_visit`` times.
* Visits go through the same lanes, workers and device clock as the rounds, one client at a
  time: a visit costs one model download, ``passes_per_visit`` x the client's compute, one
  upload, and the simulated clock advances by that latency (sequential: latencies add). An
  offline or infeasible client is skipped, a failed or late (``clock.deadline_s``) one leaves
  the model as it was. Bytes and energy go into the run totals.
* Visits are numbered -1, -2, ... in place of a round, so every draw keyed by the round (device
  conditions, batch order, dropout) is its own and never one of the federated rounds'.
* The model is evaluated after each cycle: one ``metrics.jsonl`` row with ``phase: warm_start``,
  ``round: 0`` and ``cycle`` (the rounds' rows carry ``phase: train``); per-visit rows go to
  ``clients.jsonl`` with ``phase``, ``cycle`` and ``step``. Best/final accuracy are the rounds'.
* After the stage the run is checkpointed (if ``checkpoint_every`` > 0); a resumed run finds
  ``warm_start_cycles`` in its totals and does not redo it.
"""

from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, MessageType, RecordDict
from omegaconf import DictConfig, OmegaConf

from fedsim import keys
from fedsim.checks import is_int
from fedsim.config import build, config_hash
from fedsim.errors import ConfigError
from fedsim.keys import Outcome, node_id_of
from fedsim.learning.params import array_record
from fedsim.records.checkpoint import RunState, save_checkpoint
from fedsim.records.progress import format_sim_time, say
from fedsim.records.results import CLIENTS_FILE, RunWriter
from fedsim.seeding import numpy_rng

if TYPE_CHECKING:
    from fedsim.rounds.synchronous import Federation

__all__ = ["CyclicWarmStart", "NoWarmStart", "cyclic_visit_order", "warm_start_of"]

PHASE = "warm_start"


def cyclic_visit_order(
    seed: int, cycle: int, num_clients: int, clients_per_cycle: int
) -> list[int]:
    """The clients a cycle visits, in order: distinct, drawn from (seed, "cyclic", cycle)."""
    rng = numpy_rng(seed, "cyclic", cycle)
    return [int(p) for p in rng.choice(num_clients, size=clients_per_cycle, replace=False)]


class NoWarmStart:
    """``warm_start=none``: round 1 starts from the initial model."""

    def __init__(self, *, num_clients: int = 0) -> None:
        self.num_clients = num_clients

    def run(self, fed: Federation, state: RunState, writer: RunWriter) -> None:
        """Nothing to do."""


class CyclicWarmStart:
    """CyclicFL's sequential pre-training; YAML keys = these arguments (warm_start/cyclic.yaml).

    Parameters
    ----------
    num_cycles
        Cycles of the stage.
    clients_per_cycle
        Distinct clients visited per cycle (at most ``num_clients``).
    passes_per_visit
        Calls of the client's local training per visit (each ``client.local_epochs`` epochs).
    num_clients
        Injected at build time from the run's ``num_clients``.

    """

    def __init__(
        self,
        *,
        num_cycles: int = 10,
        clients_per_cycle: int = 10,
        passes_per_visit: int = 1,
        num_clients: int,
    ) -> None:
        for key, value in (
            ("num_cycles", num_cycles),
            ("clients_per_cycle", clients_per_cycle),
            ("passes_per_visit", passes_per_visit),
        ):
            if not is_int(value, 1):
                raise ConfigError(f"warm_start.{key}", value, "must be an integer >= 1")
        if clients_per_cycle > num_clients:
            raise ConfigError(
                "warm_start.clients_per_cycle",
                clients_per_cycle,
                f"must be <= num_clients ({num_clients})",
            )
        self.num_cycles, self.clients_per_cycle = num_cycles, clients_per_cycle
        self.passes_per_visit, self.num_clients = passes_per_visit, num_clients

    def run(self, fed: Federation, state: RunState, writer: RunWriter) -> None:
        """Play the stage into ``state`` (model, clock, totals, client states) and the folder."""
        from fedsim.rounds.synchronous import close_round  # that module imports this one

        totals = state.totals
        if state.server_round > 0 or keys.WARM_START_CYCLES in totals:
            return  # a resumed run: the stage is behind it
        started = time.perf_counter() - float(totals[keys.WALL_TIME_S])
        seed, visit = int(fed.cfg.seed), 0
        for cycle in range(1, self.num_cycles + 1):
            cycle_start_s = fed.scheduler.clock.now_s
            counts = dict.fromkeys(
                (Outcome.OFFLINE, Outcome.INFEASIBLE, Outcome.STRAGGLER, Outcome.FAILED), 0
            )
            kept, bytes_up, bytes_down, energy_j, losses = 0, 0, 0, 0.0, []
            order = cyclic_visit_order(seed, cycle, self.num_clients, self.clients_per_cycle)
            for step, pid in enumerate(order):
                visit += 1
                arrays, rows, loss = self._visit(fed, state, pid, visit)
                for row in rows:
                    writer.log_row(
                        {**row, keys.PHASE: PHASE, keys.CYCLE: cycle, "step": step}, CLIENTS_FILE
                    )
                    bytes_up += row.get("bytes_up", 0)
                    bytes_down += (
                        row["bytes_down"]
                        if row["outcome"] not in (Outcome.OFFLINE, Outcome.INFEASIBLE)
                        else 0
                    )
                    energy_j += row.get("energy_j", 0.0)
                    if row["outcome"] in counts:
                        counts[row["outcome"]] += 1
                if arrays is not None:
                    state.arrays, kept = arrays, kept + 1
                    losses.append(loss)
            traffic = (bytes_up, bytes_down, energy_j)
            row = close_round(fed, state, state.arrays, 0, traffic, phase=PHASE)
            totals[keys.WALL_TIME_S] = time.perf_counter() - started
            row.update(
                {
                    keys.CYCLE: cycle,
                    keys.NUM_CLIENTS: kept,
                    keys.NUM_SAMPLED: len(order),
                    keys.NUM_FAILED: counts[Outcome.FAILED],
                    keys.TRAIN_LOSS: float(np.mean(losses)) if losses else None,
                    keys.SIM_TIME_S: state.sim_time_s,
                    keys.ROUND_TIME_S: state.sim_time_s - cycle_start_s,
                    keys.NUM_STRAGGLERS: counts[Outcome.STRAGGLER],
                    keys.NUM_OFFLINE: counts[Outcome.OFFLINE],
                    keys.NUM_INFEASIBLE: counts[Outcome.INFEASIBLE],
                    keys.WALL_TIME_S: totals[keys.WALL_TIME_S],
                }
            )
            writer.log_row(row)
            say(
                f"[fedsim] warm start cycle {cycle:2d}/{self.num_cycles}  "
                f"acc {row[keys.ACCURACY]:.4f}  loss {row[keys.LOSS]:.4f}  "
                f"sim {format_sim_time(state.sim_time_s)}",
                show=bool(fed.cfg.runtime.progress),
            )
        totals[keys.WARM_START_CYCLES] = self.num_cycles
        if int(fed.cfg.checkpoint_every):
            writer.sync()  # the rows it counts are on disk before it is
            save_checkpoint(writer.run_dir, state, fed.strategy, config_hash(fed.cfg))

    def _visit(
        self, fed: Federation, state: RunState, pid: int, visit: int
    ) -> tuple[ArrayRecord | None, list[dict[str, Any]], float]:
        """One client's turn: ``passes_per_visit`` trainings, then the clock; (model or None)."""
        first = -(visit - 1) * self.passes_per_visit - 1  # -1, -2, ...: one per pass
        cost = fed.cost_fn(pid, 1.0)
        cost = dataclasses.replace(  # keeps where the model lives (DeviceCost.model_on_server)
            cost,
            train_flops=cost.train_flops * self.passes_per_visit,
            server_flops=cost.server_flops * self.passes_per_visit,
        )
        arrays, client_state = state.arrays, state.client_states.get(pid, RecordDict())
        plan, reply = None, None
        for p in range(self.passes_per_visit):
            config = ConfigRecord({keys.SERVER_ROUND: first - p})
            message = fed.grid.create_message(
                RecordDict({keys.ARRAYS: arrays, keys.CONFIG: config}),
                MessageType.TRAIN,
                node_id_of(pid),
                group_id=str(first - p),
            )
            if plan is None:
                fed.distillation.attach([message], state.client_states)
                plan = fed.scheduler.plan(first, [message], {pid: cost})
                if not plan.to_send:  # offline or infeasible: skipped, no time passes
                    break
            replies, new_states = fed.grid.exchange([message], {pid: client_state})
            reply = replies[0]
            if reply.has_error():
                break
            arrays = array_record(reply.content, keys.ARRAYS)
            client_state = new_states.get(pid, client_state)
        assert plan is not None
        settled = fed.scheduler.settle(plan, [reply] if reply is not None else [], {pid: cost})
        if not settled.kept:
            return None, settled.records, 0.0
        state.client_states[pid] = client_state
        metrics = reply.content.get(keys.METRICS) if reply is not None else None
        loss = float(keys.number(metrics, keys.TRAIN_LOSS, 0.0)) if metrics is not None else 0.0
        return arrays, settled.records, loss


def warm_start_of(cfg: DictConfig) -> NoWarmStart | CyclicWarmStart:
    """The run's warm start (``none`` for run configs saved before the group existed)."""
    if OmegaConf.select(cfg, "warm_start") is None:
        return NoWarmStart()
    return build(cfg, "warm_start", num_clients=int(cfg.num_clients))
