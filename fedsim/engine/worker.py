"""What runs inside a Ray worker: one lane message = several virtual clients trained in turn.

The worker keeps the workload (data, features) and one model instance resident across rounds;
for each virtual client it loads the received tensors, trains, and packs the reply. One client's
exception is reported as that client's error; the other clients of the lane still answer. After
an injected hang past the lane's timeout the worker gives the lane up at once: the clients it did
not train are left out of the reply, and the server sends them again
(fedsim/rounds/virtual_grid.py).

With ``runtime.client_num_gpus > 0`` the worker trains on the GPU Ray assigned it
(:func:`client_device`), keeps its resident models there, computes frozen features there (stored
on CPU), and between two clients frees what the last one left (``fedsim.learning.placement``).
"""

from __future__ import annotations

import importlib
import os
import sys
import threading
import time

import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from fedsim import keys
from fedsim.engine.faults import LaneGivenUp
from fedsim.learning.params import array_record, decode_arrays, load_state, to_arrays
from fedsim.learning.placement import (
    CPU,
    apply_determinism,
    computing_on,
    peak_memory_bytes,
    release,
)
from fedsim.learning.workload import Workload, get_workload
from fedsim.rounds.interrupt import abandoned
from fedsim.rounds.virtual_grid import LaneSettings, lane_settings, pack_replies, unpack_lane
from fedsim.seeding import derive_seed, torch_generator
from fedsim.training.contract import TrainContext, behaviour_of

__all__ = ["GPU_PEAK_METRIC", "ClientRuntime", "client_device", "handle_lane"]

#: clients.jsonl column (on CUDA only): the worker's peak GPU memory during that client-round.
GPU_PEAK_METRIC = f"{keys.LOG_PREFIX}gpu_peak_bytes"


def client_device(num_gpus: float) -> torch.device:
    """Where a worker with ``runtime.client_num_gpus = num_gpus`` trains.

    0: CPU. Otherwise the first GPU the process sees: Ray 2.55 sets each actor's
    ``CUDA_VISIBLE_DEVICES`` to the ids it assigned (a fraction such as 0.25 gets the one GPU it
    sits on), so that is ``cuda:0``. Where Ray was told not to set it
    (``RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES``) every GPU is visible and the id comes from
    ``ray.get_gpu_ids()``. With more than one whole GPU a client still trains on one.
    """
    if num_gpus <= 0:
        return CPU
    if not torch.cuda.is_available():
        raise RuntimeError(
            f"runtime.client_num_gpus={num_gpus:g} but this worker sees no CUDA device "
            f"(torch {torch.__version__}, CUDA_VISIBLE_DEVICES="
            f"{os.environ.get('CUDA_VISIBLE_DEVICES')!r})"
        )
    index = 0
    ray = sys.modules.get("ray")  # a Ray worker has it; the inline engine never imports it
    noset = os.environ.get("RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES")
    if noset and ray is not None and ray.is_initialized():
        ids = ray.get_gpu_ids()
        index = int(ids[0]) if ids else 0
    return torch.device("cuda", index)


class ClientRuntime:
    """Process-resident state of one job in a worker: workload, a model, the behaviour."""

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg
        self.seed = int(cfg.seed)
        torch.set_num_threads(max(1, int(cfg.runtime.client_num_cpus)))
        self.device = client_device(float(cfg.runtime.client_num_gpus))
        apply_determinism(self.device, bool(cfg.runtime.get("deterministic_gpu", True)))
        # Inline, the server shares this process's workload, whose factory shares frozen parts
        # between the models it builds (side-tuning's backbone, across HeteroFL/WHALE-FL
        # widths): moving a client's sub-model to a GPU would move the server's CPU backbone
        # with it. An inline runtime on a GPU builds its models from a workload of its own.
        own = self.device.type != "cpu" and OmegaConf.select(cfg, "runtime.engine") == "inline"
        self.workload: Workload = Workload.from_config(cfg) if own else get_workload(cfg)
        # built on CPU (the same seeded init as everywhere), then moved: no-op on CPU
        self.model = self.workload.build_model().to(self.device)
        self._models: dict[float, torch.nn.Module] = {1.0: self.model}  # width -> resident
        # DFL and other cross-cutting client features wrap the behaviour (none: itself)
        self.behaviour = behaviour_of(cfg)
        self.faults = instantiate(cfg.faults)
        # torch.optim's first step imports torch._dynamo (1.4 s on 2 cores): pay it here, at
        # the warm-up before round 1, not inside round 1 and its lane timeout.
        importlib.import_module("torch._dynamo")

    def model_for(self, width: float) -> torch.nn.Module:
        """The resident model of a width (``keys.WIDTH``: a width-sliced sub-model), built once."""
        if width not in self._models:
            self._models[width] = self.workload.build_model(width).to(self.device)
        return self._models[width]

    def train_client(
        self,
        partition_id: int,
        content: RecordDict,
        state: RecordDict,
        received: dict[str, torch.Tensor] | None = None,
        lane: LaneSettings | None = None,
        time_left_s: float | None = None,
    ) -> RecordDict:
        """One client-round: load the received arrays, train locally, return the reply.

        ``state`` (the client's persistent state) is updated in place by the behaviour.
        ``received`` is ``content``'s arrays already decoded (clients of a lane share them).
        ``lane`` (which attempt, the lane's timeout) and ``time_left_s`` (of that timeout) tell
        injected faults how to strike (fedsim/engine/faults.py).
        """
        # This client-round's GPU peak starts here: not a client before it that raised, nor (on
        # the inline engine) the server's evaluation on the same GPU. None on CPU: a no-op.
        peak_memory_bytes(self.device)
        config = content.get(keys.CONFIG, ConfigRecord())
        assert isinstance(config, ConfigRecord)  # the strategy's train config
        server_round = int(keys.number(config, keys.SERVER_ROUND, 0))
        lane = lane or LaneSettings()
        self.faults.strike(
            self.seed,
            server_round,
            partition_id,
            first_attempt=lane.attempt == 1,
            timeout_s=lane.timeout_s,
            time_left_s=time_left_s,
        )
        model = self.model_for(float(keys.number(config, keys.WIDTH, 1.0)))
        load_state(model, received or decode_arrays(array_record(content, keys.ARRAYS)))
        # Dropout and other global-RNG draws, and the batch order, are named by (round, client).
        # (Not torch.manual_seed: without CUDA it queues a formatted stack trace on every call.)
        global_seed = derive_seed(self.seed, "train-global", server_round, partition_id)
        torch.default_generator.manual_seed(global_seed)
        if self.device.type == "cuda":  # dropout on a GPU draws from the GPU's generator
            torch.cuda.manual_seed_all(global_seed)
        ctx = TrainContext(
            partition_id=partition_id,
            server_round=server_round,
            config=config,
            generator=torch_generator(self.seed, "train-batches", server_round, partition_id),
            state=state,
            received=RecordDict(
                {k: v for k, v in content.items() if k not in (keys.ARRAYS, keys.CONFIG)}
            ),
            device=self.device,
        )
        with computing_on(self.device):  # the first client of a job computes the features
            data = self.workload.client_data(partition_id)  # on CPU; batches move in the loop
        outcome = self.behaviour.train(model, data, ctx)
        peak = peak_memory_bytes(self.device)  # None on CPU: no column
        metrics = MetricRecord(
            {
                keys.NUM_EXAMPLES: outcome.num_examples,
                keys.TRAIN_LOSS: outcome.mean_loss,
                keys.TRAIN_STEPS: outcome.num_steps,
                keys.EXTRA_UPLOAD_BYTES: outcome.extra_upload_bytes,
                **outcome.metrics,
                **({} if peak is None else {GPU_PEAK_METRIC: float(peak)}),
            }
        )
        arrays: ArrayRecord = to_arrays(model)  # .cpu() per tensor (fedsim/learning/params.py)
        clash = set(outcome.records) & {keys.ARRAYS, keys.METRICS}
        if clash:
            raise ValueError(f"a client's extra records may not be named {sorted(clash)}")
        return RecordDict({keys.ARRAYS: arrays, keys.METRICS: metrics, **outcome.records})


_RUNTIMES: dict[str, ClientRuntime] = {}
_LOCK = threading.Lock()


def _runtime(job: ConfigRecord) -> ClientRuntime:
    digest = str(job[keys.JOB_HASH])
    with _LOCK:
        if digest not in _RUNTIMES:
            _RUNTIMES.clear()
            cfg = OmegaConf.create(str(job[keys.JOB_YAML]))
            assert isinstance(cfg, DictConfig)  # a run's config is a mapping
            _RUNTIMES[digest] = ClientRuntime(cfg)
        return _RUNTIMES[digest]


def handle_lane(content: RecordDict) -> RecordDict:
    """Train every virtual client of a lane message; return the packed replies."""
    started_s = time.monotonic()  # the lane's timeout runs from about here (server: from push)
    job, clients = unpack_lane(content)
    lane = lane_settings(content)
    runtime = _runtime(job)
    if not clients:
        time.sleep(lane.hold_s)  # a probe keeps its worker busy (VirtualGrid.recover)
    deadline_s = None if lane.timeout_s is None else started_s + lane.timeout_s
    replies: list[tuple[int, RecordDict | str]] = []
    states: dict[int, RecordDict] = {}
    decoded: dict[int, dict[str, torch.Tensor]] = {}  # id(ArrayRecord) -> tensors, per lane
    for partition_id, client_content, state in clients:
        if abandoned():  # the inline engine, after a signal: the round is dropped (never on Ray)
            break
        try:
            arrays = array_record(client_content, keys.ARRAYS)
            if id(arrays) not in decoded:
                decoded[id(arrays)] = decode_arrays(arrays)
            left_s = None if deadline_s is None else deadline_s - time.monotonic()
            reply = runtime.train_client(
                partition_id, client_content, state, decoded[id(arrays)], lane, left_s
            )
        except LaneGivenUp:
            break  # past the timeout: the server sends this client and the rest again
        except Exception as exc:  # noqa: BLE001 - one client's failure must not sink its lane
            replies.append((partition_id, f"{type(exc).__name__}: {exc}"))
            release(runtime.device)
            continue
        replies.append((partition_id, reply))
        states[partition_id] = state
        release(runtime.device)  # GPU only: the next client starts from what the model holds
    return pack_replies(replies, states)
