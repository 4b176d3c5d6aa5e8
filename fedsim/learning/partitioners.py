"""Partitioners flwr-datasets does not have (same ``Partitioner`` interface, same YAML shape).

``SampledPartitioner`` serves population-scale studies, where the simulated population is
larger than the dataset: FedScale-style traces have millions of devices, an offline dataset
thousands of rows. Each client holds ``examples_per_client`` rows drawn without replacement
from the whole training split, seeded by (seed, client): clients are IID and overlap (a row
may sit on several devices), which is the price of a population larger than the data. Any
client's rows are a pure function of its id, drawn when the client is used
(``fedsim.learning.data.partition_train`` returns them on demand): a population of 1,000,000 costs
nothing to set up and memory only for the clients a run touches.
"""

from __future__ import annotations

import numpy as np
from datasets import Dataset

from fedsim.errors import ConfigError
from fedsim.learning.flower_partitioners import Partitioner
from fedsim.seeding import numpy_rng

__all__ = ["SampledPartitioner"]


class SampledPartitioner(Partitioner):
    """Each of ``num_partitions`` clients samples ``examples_per_client`` distinct rows.

    Parameters
    ----------
    num_partitions
        Number of clients (may exceed the dataset's rows).
    examples_per_client
        Rows per client, at most the dataset's rows.
    seed
        Seeds every client's draw, named by the client id.

    """

    #: ``fedsim.learning.data.partition_train`` lets this partitioner have more clients than rows.
    allows_more_partitions_than_rows = True

    def __init__(self, num_partitions: int, examples_per_client: int = 16, seed: int = 0) -> None:
        super().__init__()
        for key, value in (
            ("num_partitions", num_partitions),
            ("examples_per_client", examples_per_client),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"partition.{key}", value, "must be an integer >= 1")
        self._num_partitions = num_partitions
        self._examples_per_client = examples_per_client
        self._seed = int(seed)

    @property
    def num_partitions(self) -> int:
        """Number of clients."""
        return self._num_partitions

    def partition_indices(self, partition_id: int) -> np.ndarray:
        """Row numbers of one client's examples (sorted), a function of (seed, client) only."""
        num_rows = len(self.dataset)
        if self._examples_per_client > num_rows:
            raise ConfigError(
                "partition.examples_per_client",
                self._examples_per_client,
                f"must be <= the training rows ({num_rows})",
            )
        if not 0 <= partition_id < self._num_partitions:
            raise KeyError(f"partition {partition_id} of {self._num_partitions}")
        rng = numpy_rng(self._seed, "sampled-partition", partition_id)
        rows = rng.choice(num_rows, size=self._examples_per_client, replace=False)
        return np.sort(rows).astype(np.int64)

    def load_partition(self, partition_id: int) -> Dataset:
        """One client's rows as a Dataset (what flwr-datasets' partitioners return)."""
        return self.dataset.select(self.partition_indices(partition_id))
