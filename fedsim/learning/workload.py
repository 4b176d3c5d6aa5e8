"""What a job trains on: data splits, client partitions, features and the model, built once.

A workload is a pure function of the config's ``data``, ``partition``, ``model``, ``client``,
``seed`` and ``num_clients``. Every process (the server and each Ray worker) builds it once and
keeps it resident, keyed by that part of the config: no per-client or per-round rebuilds.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from fedsim.config import build
from fedsim.learning.data import DataSplits, build_partitioner, partition_train
from fedsim.seeding import derive_seed

if TYPE_CHECKING:
    from fedsim.learning.models import ModelFactory

__all__ = ["Workload", "get_workload", "workload_key"]

_WORKLOAD_KEYS = ("data", "partition", "model", "client", "seed", "num_clients")


def workload_key(cfg: DictConfig) -> str:
    """Hash of the config parts a workload depends on."""
    # A DictConfig's container is a dict; OmegaConf annotates any container (or None, or str).
    part = {
        k: cast(dict[str, Any], OmegaConf.to_container(cfg, resolve=True))[k]
        for k in _WORKLOAD_KEYS
    }
    return hashlib.sha256(repr(sorted(part.items())).encode()).hexdigest()[:16]


@dataclass
class Workload:
    """Data, partitions and model factory of one job; features computed once, lazily."""

    seed: int
    splits: DataSplits
    partitions: Sequence[np.ndarray]  # a list, or computed per client on demand (data.py)
    model_factory: ModelFactory
    _train: dict[str, torch.Tensor] | None = field(default=None, repr=False)
    _test: dict[str, torch.Tensor] | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def from_config(cls, cfg: DictConfig) -> Workload:
        """Load data, partition it over ``cfg.num_clients`` clients, prepare the model factory."""
        splits: DataSplits = build(cfg, "data").load()
        partitioner = build_partitioner(cfg.partition, int(cfg.num_clients))
        partitions = partition_train(splits, partitioner, int(cfg.num_clients))
        return cls(
            seed=int(cfg.seed),
            splits=splits,
            partitions=partitions,
            # The client behaviour decides what is trained (e.g. a side network over cached
            # backbone features, or a LoRA-wrapped classifier) and on which features.
            model_factory=build(cfg, "client").wrap_factory(build(cfg, "model")),
        )

    @property
    def num_classes(self) -> int:
        """Number of label classes."""
        return self.splits.num_classes

    def build_model(self, width: float = 1.0) -> torch.nn.Module:
        """The initial global model: same weights in every process for the same seed.

        ``width`` < 1: a width-sliced sub-model (its weights are always loaded from a slice of
        the global model, so its init draws stay off the process's global RNG).
        """
        if width == 1.0:
            torch.manual_seed(derive_seed(self.seed, "model-init"))
            return self.model_factory.build(self.num_classes)
        with torch.random.fork_rng(devices=[]):
            return self.model_factory.build(self.num_classes, width=width)

    def train_features(self) -> dict[str, torch.Tensor]:
        """Features of the whole training split (first dim = example)."""
        with self._lock:
            if self._train is None:
                self._train = self.model_factory.featurize(self.splits.train)
            return self._train

    def test_features(self) -> dict[str, torch.Tensor]:
        """Features of the held-out test split."""
        with self._lock:
            if self._test is None:
                self._test = self.model_factory.featurize(self.splits.test)
            return self._test

    def client_data(self, partition_id: int) -> dict[str, torch.Tensor]:
        """Features of one client's partition."""
        index = torch.as_tensor(self.partitions[partition_id], dtype=torch.long)
        return {k: v.index_select(0, index) for k, v in self.train_features().items()}

    def example_batch(self, batch_size: int) -> dict[str, torch.Tensor]:
        """The first ``batch_size`` training examples: a batch of the real shape for costing."""
        return {k: v[:batch_size] for k, v in self.train_features().items()}

    def num_examples(self, partition_id: int) -> int:
        """Number of training examples of a client."""
        return len(self.partitions[partition_id])


_CACHE: dict[str, Workload] = {}
_CACHE_LOCK = threading.Lock()


def get_workload(cfg: DictConfig) -> Workload:
    """The process-resident workload for ``cfg`` (built on first use)."""
    key = workload_key(cfg)
    with _CACHE_LOCK:
        if key not in _CACHE:
            _CACHE.clear()  # one job at a time per process: drop the previous sweep job's data
            _CACHE[key] = Workload.from_config(cfg)
        return _CACHE[key]
