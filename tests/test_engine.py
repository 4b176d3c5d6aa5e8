"""The engine kept between runs of one process: same actors, same results as a fresh process."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import ray

from fedsim.config import compose_config
from fedsim.engine.ray_engine import KeptRayBackend
from fedsim.engine.simulation import release_engine, simulate
from fedsim.records.results import read_metrics

pytestmark = pytest.mark.slow

TINY = ["num_clients=6", "num_rounds=2", "strategy.fraction_train=0.5", "runtime.progress=false"]


def _pool() -> object:
    assert KeptRayBackend._kept is not None  # noqa: SLF001
    return KeptRayBackend._kept[1]  # noqa: SLF001


def _actor_ids(pool: object) -> set[str]:
    return {actor._actor_id.hex() for actor in pool.pool}  # type: ignore[attr-defined]  # noqa: SLF001


def _strip(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "wall_time_s"} for row in rows]


def test_later_runs_reuse_the_actors_and_compute_what_a_fresh_process_does(
    tmp_path: Path,
) -> None:
    release_engine()
    first = simulate(compose_config([*TINY, "seed=1"]), tmp_path / "first")
    pool = _pool()
    actors = _actor_ids(pool)
    second = simulate(compose_config([*TINY, "seed=2"]), tmp_path / "second")
    assert _pool() is pool and _actor_ids(pool) == actors  # the same actors (in any order)
    assert ray.is_initialized()
    # A run in a kept engine pays less before its first round than the one that started it.
    assert second["startup_s"] < first["startup_s"]
    fresh = tmp_path / "fresh"
    proc = subprocess.run(
        [sys.executable, "-m", "fedsim", *TINY, "seed=2", f"hydra.run.dir={fresh}"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert _strip(read_metrics(tmp_path / "second")) == _strip(read_metrics(fresh))
    clients = [(tmp_path / "second" / "clients.jsonl"), (fresh / "clients.jsonl")]
    assert clients[0].read_text() == clients[1].read_text()
    assert json.loads((fresh / "summary.json").read_text())["startup_s"] > 0


def test_other_resources_get_a_new_pool_and_release_ends_ray(tmp_path: Path) -> None:
    simulate(compose_config(TINY), tmp_path / "one")
    pool = _pool()
    simulate(compose_config([*TINY, "runtime.client_num_cpus=2"]), tmp_path / "two")
    assert _pool() is not pool
    assert _pool().num_actors == 1  # type: ignore[attr-defined] # 2 CPUs here, 2 per actor
    release_engine()
    assert KeptRayBackend._kept is None and not ray.is_initialized()  # noqa: SLF001
    # and a run after a release starts the engine again
    assert simulate(compose_config(TINY), tmp_path / "three")["status"] == "completed"
    release_engine()
