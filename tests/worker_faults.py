"""A fault injector that only a Ray worker fails to build (as a class whose data or library
exists on the driver's machine but not on a cluster node would); imported by the workers."""

from __future__ import annotations

import ray

from fedsim.engine.faults import FaultInjector


class MissingOnWorkers(FaultInjector):
    """Builds on the driver (the run's checks pass), raises in every Ray actor."""

    def __init__(self, **probs: float) -> None:
        if ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None:
            raise FileNotFoundError("/data/shards: not on this node")
        super().__init__(**probs)
