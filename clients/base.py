"""The contract between the one ClientApp and a client behaviour (``conf/client/*.yaml``).

A behaviour is a small class whose constructor arguments are its YAML keys. ``wrap_factory``
lets it decide what the model and its features are (e.g. a side network over cached frozen
hidden states, or a peft-wrapped classifier); every process builds the model through it. The
worker calls
``train`` once per client-round on the process-resident model and the client's features; the
server calls ``device_cost`` to charge the device (and the server, for methods that offload
work) on the simulated clock. Nothing else is required: methods compose by wrapping.
Mini-batch training itself is ``clients/loop.py``'s ``train_loop``, where strategies plug
in their client terms (FedProx, SCAFFOLD, ...) without touching the behaviour.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from fedsim.models import ModelFactory
from fedsim.scheduler import DeviceCost

__all__ = ["ClientBehaviour", "TrainContext", "TrainOutcome", "DeviceCost", "ModelFactory"]


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
