"""fedsim's own partitioners: a population larger than the data."""

import numpy as np
import pytest
from datasets import Dataset

from fedsim.config import compose_config
from fedsim.errors import ConfigError
from fedsim.learning.partitioners import SampledPartitioner
from fedsim.learning.workload import get_workload


def _assigned(num_partitions: int, rows: int, per_client: int, seed: int = 0) -> SampledPartitioner:
    partitioner = SampledPartitioner(num_partitions, examples_per_client=per_client, seed=seed)
    partitioner.dataset = Dataset.from_dict({"row": list(range(rows))})
    return partitioner


def test_sampled_partition_is_distinct_rows_named_by_seed_and_client() -> None:
    partitioner = _assigned(1000, rows=10, per_client=4)
    part = partitioner.partition_indices(7)
    assert len(part) == 4 and len(set(part.tolist())) == 4  # without replacement in a client
    assert part.min() >= 0 and part.max() < 10 and np.all(np.diff(part) > 0)  # sorted
    assert np.array_equal(part, _assigned(5000, rows=10, per_client=4).partition_indices(7))
    assert not np.array_equal(
        part, _assigned(1000, rows=10, per_client=4, seed=1).partition_indices(7)
    )
    # 1000 clients over 10 rows: clients overlap, and every row is used by someone
    used = np.concatenate([partitioner.partition_indices(p) for p in range(1000)])
    assert set(used.tolist()) == set(range(10))
    assert partitioner.load_partition(7)["row"] == part.tolist()


def test_sampled_partition_refuses_more_examples_than_rows() -> None:
    with pytest.raises(ConfigError, match="examples_per_client"):
        _assigned(3, rows=5, per_client=6).partition_indices(0)
    with pytest.raises(ConfigError, match="examples_per_client"):
        SampledPartitioner(3, examples_per_client=0)


def test_ten_thousand_clients_on_digits() -> None:
    workload = get_workload(compose_config(["partition=sampled", "num_clients=10000"]))
    assert len(workload.partitions) == 10_000
    assert all(len(p) == 16 for p in workload.partitions)
    rows = len(workload.splits.train)
    assert max(int(p.max()) for p in workload.partitions) < rows < 10_000
    with pytest.raises(ConfigError, match="num_clients"):  # an ordinary partitioner still refuses
        get_workload(compose_config(["num_clients=10000"]))
