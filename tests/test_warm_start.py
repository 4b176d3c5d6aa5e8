"""CyclicFL warm start (fedsim/rounds/warm_start.py): order, costs on the clock, rows, resume."""

from pathlib import Path

import pytest
from conftest import strip_wall_time

from fedsim.config import compose_config
from fedsim.engine.simulation import simulate
from fedsim.errors import ConfigError
from fedsim.records.results import read_metrics
from fedsim.rounds.warm_start import CyclicWarmStart, cyclic_visit_order


def test_cyclic_visit_order_is_seeded_distinct_and_per_cycle() -> None:
    order = cyclic_visit_order(0, 1, 10, 4)
    assert order == cyclic_visit_order(0, 1, 10, 4)  # named seed: same draw every time
    assert len(set(order)) == 4 and all(0 <= p < 10 for p in order)
    assert order != cyclic_visit_order(0, 2, 10, 4)  # each cycle its own order
    assert sorted(cyclic_visit_order(3, 1, 5, 5)) == [0, 1, 2, 3, 4]  # all clients, shuffled


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"num_cycles": 0}, "warm_start.num_cycles"),
        ({"clients_per_cycle": 11}, "warm_start.clients_per_cycle"),
        ({"passes_per_visit": 1.5}, "warm_start.passes_per_visit"),
    ],
)
def test_bad_cyclic_knobs_raise_config_error(kwargs, key) -> None:
    with pytest.raises(ConfigError) as err:
        CyclicWarmStart(num_clients=10, **kwargs)
    assert err.value.key == key


ARGS = [
    "num_clients=6",
    "num_rounds=3",
    "strategy.fraction_train=0.5",
    "warm_start=cyclic",
    "warm_start.num_cycles=2",
    "warm_start.clients_per_cycle=3",
    "distillation=dfl",  # soft targets in client state must survive the resume too
    "devices=phones_mixed",
    "runtime.progress=false",
    "runtime.engine=inline",  # the stage's state is the point; test_resume.py kills Ray runs
]


@pytest.mark.slow
def test_cyclic_stage_rows_clock_and_totals(tmp_path: Path) -> None:
    summary = simulate(compose_config(ARGS), tmp_path / "run")
    rows = read_metrics(tmp_path / "run")
    clients = read_metrics(tmp_path / "run", "clients.jsonl")
    stage = [r for r in rows if r["phase"] == "warm_start"]
    train = [r for r in rows if r["phase"] == "train"]
    assert [(r["round"], r["cycle"]) for r in stage] == [(0, 1), (0, 2)]
    assert [r["round"] for r in train] == [1, 2, 3]
    visits = [c for c in clients if c.get("phase") == "warm_start"]
    assert len(visits) == 6 and [c["round"] for c in visits] == [-1, -2, -3, -4, -5, -6]
    assert [c["partition_id"] for c in visits[:3]] == cyclic_visit_order(0, 1, 6, 3)
    # Sequential: the stage lasts the sum of its visits' latencies, not their max.
    for cycle, row in enumerate(stage, start=1):
        latencies = [c.get("latency_s", 0.0) for c in visits if c["cycle"] == cycle]
        assert row["round_time_s"] == pytest.approx(sum(latencies))
        assert row["bytes_up"] == sum(c.get("bytes_up", 0) for c in visits if c["cycle"] == cycle)
    assert train[0]["sim_time_s"] == pytest.approx(
        stage[-1]["sim_time_s"] + train[0]["round_time_s"]
    )
    assert summary["bytes_up_total"] == sum(r["bytes_up"] for r in rows)  # stage bytes charged
    assert summary["warm_start_cycles"] == 2
    assert summary["best_accuracy"] == max(r["accuracy"] for r in train)  # the rounds' only


@pytest.mark.slow
def test_killed_run_resumes_without_redoing_the_stage(tmp_path: Path, kill_and_resume) -> None:
    simulate(compose_config(ARGS), tmp_path / "reference")
    reference = read_metrics(tmp_path / "reference")
    run, killed_at = kill_and_resume(ARGS, rows=3)  # the stage's 2 rows + round 1
    assert 3 <= killed_at < len(reference)
    rows = read_metrics(run)
    assert sum(r["phase"] == "warm_start" for r in rows) == 2  # not redone
    assert strip_wall_time(rows) == strip_wall_time(reference)
    assert strip_wall_time(read_metrics(run, "clients.jsonl")) == strip_wall_time(
        read_metrics(tmp_path / "reference", "clients.jsonl")
    )
