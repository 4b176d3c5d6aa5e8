"""The contract between the one ClientApp and a client behaviour (``conf/client/*.yaml``).

A behaviour is a small class whose constructor arguments are its YAML keys. ``wrap_factory``
lets it decide what the model and its features are (e.g. a side network over cached frozen
hidden states, or a peft-wrapped classifier); every process builds the model through it. The
worker calls
``train`` once per client-round on the process-resident model and the client's features; the
server calls ``device_cost`` to charge the device (and the server, for methods that offload
work) on the simulated clock. Nothing else is required: methods compose by wrapping.
Mini-batch training itself is ``fedsim/training/loop.py``'s ``train_loop``, where strategies plug
in their client terms (FedProx, SCAFFOLD, ...) without touching the behaviour.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from omegaconf import DictConfig, OmegaConf

from fedsim.clock.scheduler import DeviceCost
from fedsim.config import build
from fedsim.learning.models import ModelFactory

__all__ = [
    "ClientBehaviour",
    "DeviceCost",
    "Distillation",
    "ModelFactory",
    "NoDistillation",
    "TrainContext",
    "TrainOutcome",
    "behaviour_of",
    "distillation_of",
]


@dataclass
class TrainContext:
    """Everything a client-round knows besides the model and the data.

    ``state`` is the client's persistent state (soft targets, control variates, cache entries):
    the behaviour reads and updates it in place. It lives with the server between rounds
    (any worker may train any client), travels with the client's message, and is kept only
    when the client's update is used (a dropped straggler's round did not happen for it).
    """

    partition_id: int
    server_round: int
    config: ConfigRecord  # what the strategy sent (e.g. ``proximal-mu``)
    generator: torch.Generator  # named by (seed, round, client): batch order and sampling
    state: RecordDict = field(default_factory=RecordDict)
    # Records the strategy sent besides the model and the config (e.g. SCAFFOLD's server
    # control variate); they count towards the downlink bytes like the model does.
    received: RecordDict = field(default_factory=RecordDict)
    # Where the model lives and every batch goes (fedsim/learning/placement.py): the worker's
    # GPU with ``runtime.client_num_gpus > 0``, else CPU. Records in ``state`` and ``received``
    # stay on CPU (they travel); terms move what they read from them here.
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))


@dataclass(frozen=True)
class TrainOutcome:
    """What one client-round of local training did.

    ``extra_upload_bytes`` counts what the device sent besides the returned tensors, measured on
    the real payload (e.g. quantized activations in side-tuning); the clock charges it to the
    uplink. ``metrics`` are extra per-client numbers (float) the reply carries. ``records`` are
    extra records the reply carries for the strategy (e.g. SCAFFOLD's control variate update);
    their arrays count towards the uplink bytes like the model does.
    """

    num_examples: int
    num_steps: int
    mean_loss: float
    extra_upload_bytes: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    records: dict[str, ArrayRecord] = field(default_factory=dict)


class ClientBehaviour(Protocol):
    """What the ClientApp and the scheduler need from a client behaviour."""

    batch_size: int  # examples per step: the cost model counts FLOPs on a batch of this size

    def wrap_factory(self, factory: ModelFactory) -> ModelFactory:
        """The model factory this behaviour trains with (``factory`` itself for plain SGD)."""
        ...

    def train(
        self, model: torch.nn.Module, data: dict[str, torch.Tensor], ctx: TrainContext
    ) -> TrainOutcome:
        """Train ``model`` in place on one client's features."""
        ...

    def device_cost(
        self, model: torch.nn.Module, batch: dict[str, torch.Tensor], num_examples: int
    ) -> DeviceCost:
        """FLOPs (device and server) and device peak memory of one client-round."""
        ...


class Distillation(Protocol):
    """A cross-cutting client feature (``conf/distillation/*.yaml``): DFL, or none."""

    def wrap(self, behaviour: ClientBehaviour) -> ClientBehaviour:
        """The behaviour the workers train with (``behaviour`` itself when there is none)."""
        ...

    def attach(self, messages: Sequence[Message], states: Mapping[int, RecordDict]) -> None:
        """Add what the server sends with each round's train messages (soft targets)."""
        ...


class NoDistillation:
    """``distillation=none``: the behaviour and the messages are left as they are."""

    def wrap(self, behaviour: ClientBehaviour) -> ClientBehaviour:
        """The behaviour itself."""
        return behaviour

    def attach(self, messages: Sequence[Message], states: Mapping[int, RecordDict]) -> None:
        """Nothing to send."""


def distillation_of(cfg: DictConfig) -> Distillation:
    """The run's distillation object (``none`` for run configs saved before the group existed)."""
    if OmegaConf.select(cfg, "distillation") is None:
        return NoDistillation()
    distillation: Distillation = build(cfg, "distillation")
    return distillation


def behaviour_of(cfg: DictConfig, distillation: Distillation | None = None) -> ClientBehaviour:
    """The client behaviour of a run, wrapped by its distillation: the ONE way it is built.

    The workers train with it, the server sizes the device cost with it and the checks before
    a run (and a sweep's precheck) build it to refuse bad arguments: all through here. The
    server passes the ``distillation`` it keeps (it also attaches the soft targets).
    """
    behaviour: ClientBehaviour = build(cfg, "client")
    return (distillation or distillation_of(cfg)).wrap(behaviour)
