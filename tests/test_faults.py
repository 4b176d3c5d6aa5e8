"""Injected faults: the round completes with the remaining clients and the run never hangs."""

import time
from pathlib import Path

import pytest

from fedsim.config import compose_config
from fedsim.errors import ConfigError
from fedsim.faults import FaultInjector, InjectedFault
from fedsim.results import read_metrics
from fedsim.simulation import simulate

TINY = ["num_clients=8", "num_rounds=4", "strategy.fraction_train=0.5", "runtime.progress=false"]


def test_draws_are_named_by_seed_round_client() -> None:
    faults = FaultInjector(exception_prob=0.5, hang_prob=0.5, kill_worker_prob=0.5)
    assert faults.draw(0, 3, 5) == faults.draw(0, 3, 5)
    draws = [faults.draw(0, r, p).exception for r in range(1, 50) for p in range(20)]
    assert 0.4 < sum(draws) / len(draws) < 0.6  # 980 Bernoulli(0.5) draws
    assert not any(FaultInjector().draw(0, r, 1).exception for r in range(100))


def test_injected_exception_raises() -> None:
    with pytest.raises(InjectedFault, match="round 2, client 1"):
        FaultInjector(exception_prob=1.0).strike(0, 2, 1)


@pytest.mark.parametrize("key", ["exception_prob", "hang_prob", "kill_worker_prob"])
def test_probabilities_are_checked(key) -> None:
    with pytest.raises(ConfigError, match=f"faults.{key}=1.5"):
        FaultInjector(**{key: 1.5})


def _outcomes(run: Path) -> list[dict]:
    return read_metrics(run, "clients.jsonl")


@pytest.mark.slow
def test_client_exceptions_fail_only_those_clients(tmp_path: Path) -> None:
    faults = FaultInjector(exception_prob=0.3)
    simulate(compose_config([*TINY, "faults.exception_prob=0.3"]), tmp_path / "run")
    rows = _outcomes(tmp_path / "run")
    for row in rows:
        struck = faults.draw(0, row["round"], row["partition_id"]).exception
        assert (row["outcome"] == "failed") == struck, row
    failed = sum(r["outcome"] == "failed" for r in rows)
    assert failed > 0  # the draws above strike some sampled clients for seed 0
    metrics = read_metrics(tmp_path / "run")
    assert len(metrics) == 4 and sum(m["num_failed"] for m in metrics) == failed
    assert all(m["num_clients"] + m["num_failed"] == m["num_sampled"] for m in metrics)


@pytest.mark.slow
def test_hung_clients_time_out_and_the_run_goes_on(tmp_path: Path) -> None:
    faults = FaultInjector(hang_prob=0.2, hang_s=20.0)
    cfg = compose_config([*TINY, "faults.hang_prob=0.2", "faults.hang_s=20",
                          "runtime.round_timeout_s=4"])
    started = time.monotonic()
    simulate(cfg, tmp_path / "run")
    rows = _outcomes(tmp_path / "run")
    hung = [r for r in rows if faults.draw(0, r["round"], r["partition_id"]).hang]
    assert hung and all(r["outcome"] == "failed" for r in hung)  # their lane timed out
    assert len(read_metrics(tmp_path / "run")) == 4
    # 4 rounds, each waiting at most 4 s for a lane (+ start-up); never the 20 s of a hang x 4
    assert time.monotonic() - started < 4 * 20


@pytest.mark.slow
def test_killed_worker_is_restarted_and_later_rounds_train(tmp_path: Path) -> None:
    faults = FaultInjector(kill_worker_prob=0.15)
    simulate(compose_config([*TINY, "faults.kill_worker_prob=0.15"]), tmp_path / "run")
    rows = _outcomes(tmp_path / "run")
    killers = [r for r in rows if faults.draw(0, r["round"], r["partition_id"]).kill_worker]
    assert killers and all(r["outcome"] == "failed" for r in killers)
    metrics = read_metrics(tmp_path / "run")
    assert len(metrics) == 4
    # a round after the first kill still trains clients: the worker came back
    first_kill = min(r["round"] for r in killers)
    assert any(m["num_clients"] > 0 for m in metrics if m["round"] > first_kill)


@pytest.mark.slow
def test_a_run_whose_every_client_keeps_failing_stops_as_failed(tmp_path: Path) -> None:
    cfg = compose_config([*TINY, "num_rounds=10", "faults.exception_prob=1.0",
                          "runtime.max_failed_rounds=3"])
    summary = simulate(cfg, tmp_path / "run")
    rows = read_metrics(tmp_path / "run")
    assert summary["status"] == "failed"
    assert len(rows) == 3 and all(r["num_clients"] == 0 for r in rows)  # stopped after 3
