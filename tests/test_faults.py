"""Injected faults: exactly the drawn clients fail, in their round only, and the run never hangs."""

import json
import os
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import FEDSIM, strip_wall_time
from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.app.error import Error

from fedsim import keys
from fedsim.config import compose_config
from fedsim.engine.faults import FaultInjector, InjectedFault, LaneGivenUp
from fedsim.engine.simulation import simulate
from fedsim.errors import ConfigError
from fedsim.records.results import read_metrics
from fedsim.rounds.virtual_grid import (
    LANE_TIMEOUT_CODE,
    VirtualGrid,
    WorkerSetupError,
    lane_settings,
    node_id_of,
    pack_replies,
    unpack_lane,
)

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


def _struck(kind: str, **probs: float) -> tuple[int, int]:
    """(round, client) of the first draw of ``kind`` under ``probs`` for seed 0."""
    faults = FaultInjector(**probs)
    return next(
        (r, p) for r in range(1, 50) for p in range(20) if getattr(faults.draw(0, r, p), kind)
    )


def test_later_attempt_reports_a_kill_instead_of_killing() -> None:
    round_, client = _struck("kill_worker", kill_worker_prob=0.5)
    with pytest.raises(InjectedFault, match=f"worker kill \\(round {round_}, client {client}\\)"):
        FaultInjector(kill_worker_prob=0.5).strike(0, round_, client, first_attempt=False)


def test_hang_past_the_timeout_sleeps_no_longer_than_the_lane_waits() -> None:
    round_, client = _struck("hang", hang_prob=0.5)
    faults = FaultInjector(hang_prob=0.5, hang_s=30.0)
    started = time.monotonic()
    with pytest.raises(LaneGivenUp):  # the first attempt sleeps what is left of the timeout
        faults.strike(0, round_, client, timeout_s=2.0, time_left_s=0.05)
    assert time.monotonic() - started < 1.0  # 0.05 s, never the 30 s of the hang
    started = time.monotonic()
    with pytest.raises(InjectedFault, match="past the lane timeout of 2 s"):  # sent again
        faults.strike(0, round_, client, first_attempt=False, timeout_s=2.0, time_left_s=2.0)
    assert time.monotonic() - started < 0.5  # reported at once


def test_hang_shorter_than_the_timeout_only_delays_the_first_attempt() -> None:
    round_, client = _struck("hang", hang_prob=0.5)
    faults = FaultInjector(hang_prob=0.5, hang_s=0.3)
    started = time.monotonic()
    faults.strike(0, round_, client, timeout_s=5.0, time_left_s=5.0)  # trains after 0.3 s
    assert time.monotonic() - started >= 0.3
    started = time.monotonic()
    faults.strike(0, round_, client, first_attempt=False, timeout_s=5.0, time_left_s=5.0)
    assert time.monotonic() - started < 0.2  # the delay already happened


class ScriptedLanes:
    """A Grid of ``num_lanes`` real nodes whose workers are a function of the lane message.

    ``answer(content, lane_index)`` returns the reply: packed content (``pack_replies``), an
    ``Error``, ``(reply, delay_s)`` for a reply that arrives ``delay_s`` late, or None for none;
    ``lane_index`` counts the lane messages with clients (None: a probe). Every message pushed is
    kept in ``sent``.
    """

    def __init__(self, num_lanes: int, answer: Callable) -> None:
        self.answer, self.sent, self.lane_count = answer, [], 0
        self._nodes = list(range(100, 100 + num_lanes))
        self._replies: dict[str, tuple[float, Message]] = {}

    def get_node_ids(self) -> list[int]:
        return self._nodes

    def push_messages(self, messages) -> list[str]:
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid.uuid4())  # as Flower's InMemoryGrid
            self.sent.append(msg.content)
            has_clients = bool(unpack_lane(msg.content)[1])
            reply = self.answer(msg.content, self.lane_count if has_clients else None)
            self.lane_count += has_clients
            reply, delay_s = reply if isinstance(reply, tuple) else (reply, 0.0)
            if reply is not None:  # else never: a worker that hangs for good
                self._replies[msg.metadata.message_id] = (
                    time.monotonic() + delay_s,
                    Message(reply, reply_to=msg),
                )
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids) -> list[Message]:
        now = time.monotonic()
        ready = [i for i in message_ids if i in self._replies and self._replies[i][0] <= now]
        return [self._replies.pop(i)[1] for i in ready]


def _train(content: RecordDict) -> RecordDict:
    """A worker's reply in which every client of the lane trained."""
    _, clients = unpack_lane(content)
    attempt = lane_settings(content).attempt
    return pack_replies(
        [
            (pid, RecordDict({"metrics": MetricRecord({"attempt": attempt})}))
            for pid, _, _ in clients
        ]
    )


def _grid(lanes: ScriptedLanes, **kwargs) -> VirtualGrid:
    return VirtualGrid(
        lanes,
        num_clients=8,
        job=ConfigRecord({keys.JOB_HASH: "h"}),
        poll_interval_s=0.001,
        probe_hold_s=0.01,
        **kwargs,
    )


def _to(pids: list[int]) -> list[Message]:
    return [
        Message(RecordDict({"config": ConfigRecord({"r": 1})}), node_id_of(p), MessageType.TRAIN)
        for p in pids
    ]


def _lanes_sent(lanes: ScriptedLanes) -> list[tuple[int, list[int]]]:
    """(attempt, clients) of each lane message sent; a probe is (attempt, [])."""
    return [
        (lane_settings(c).attempt, [pid for pid, _, _ in unpack_lane(c)[1]]) for c in lanes.sent
    ]


def test_exchange_of_no_messages_sends_nothing() -> None:
    lanes = ScriptedLanes(2, lambda content, lane_index: pytest.fail("nothing to send"))
    assert _grid(lanes).exchange([], {}) == ([], {})  # unpacked by train_round: two values


@pytest.mark.usefixtures("flower_identity")
def test_crashed_lane_is_sent_again_once_every_worker_answers() -> None:
    probes = []  # the restarting worker refuses one probe of each of the first two bursts

    def answer(content, lane_index):
        if lane_index is None:
            probes.append(content)
            if len(probes) in (1, 3):
                return Error(code=0, reason="ActorUnavailableError: The actor is restarting")
            return _train(content)
        if lane_index == 0:  # the first lane's worker dies
            return Error(code=0, reason="ActorUnavailableError: Socket closed")
        return _train(content)

    lanes = ScriptedLanes(2, answer)
    replies, _ = _grid(lanes, timeout_s=5.0).exchange(_to([0, 1, 2, 3]))
    assert [r.has_error() for r in replies] == [False] * 4
    # LPT over 2 lanes: [0, 2] and [1, 3]; lane [0, 2] crashed; 2 probes per burst, three bursts
    # (the first two not all answered), then 0 and 2 again as attempt 2, spread over the lanes
    assert _lanes_sent(lanes) == [(1, [0, 2]), (1, [1, 3]), *[(1, [])] * 6, (2, [0]), (2, [2])]
    assert [r.content["metrics"]["attempt"] for r in replies] == [2, 1, 2, 1]


@pytest.mark.usefixtures("flower_identity")
def test_late_lane_is_waited_for_before_its_clients_are_sent_again() -> None:
    late_reply_at = []

    def answer(content, lane_index):
        if lane_index == 0:  # a hung worker: answers 0.3 s after the 0.1 s timeout
            late_reply_at.append(time.monotonic() + 0.3)
            return _train(content), 0.3
        if lane_index == 2:  # the resend of 0 (and 2)
            assert time.monotonic() >= late_reply_at[0]  # its worker answered first
        return _train(content)

    lanes = ScriptedLanes(2, answer)
    replies, _ = _grid(lanes, timeout_s=0.1).exchange(_to([0, 1, 2, 3]))
    assert [r.content["metrics"]["attempt"] for r in replies] == [2, 1, 2, 1]
    assert _lanes_sent(lanes) == [(1, [0, 2]), (1, [1, 3]), (1, []), (1, []), (2, [0]), (2, [2])]


@pytest.mark.usefixtures("flower_identity")
def test_lane_failing_every_attempt_fails_its_clients_only() -> None:
    lanes = ScriptedLanes(
        2,
        lambda content, lane_index: (
            _train(content) if lane_index in (None, 1) else Error(code=0, reason="boom")
        ),
    )
    replies, _ = _grid(lanes, timeout_s=5.0).exchange(_to([0, 1, 2, 3]))
    assert [r.has_error() for r in replies] == [True, False, True, False]
    assert replies[0].error.code == LANE_TIMEOUT_CODE
    assert replies[0].error.reason == "lane failed: boom"
    assert [a for a, pids in _lanes_sent(lanes) if pids] == [1, 1, 2, 2]  # max_attempts=2


@pytest.mark.usefixtures("flower_identity")
def test_lane_reply_leaving_clients_out_sends_them_again() -> None:
    def answer(content, lane_index):  # the worker gave the lane up at client 2 (a hang)
        reply = _train(content)
        if lane_index == 0:
            return pack_replies([(0, RecordDict({"metrics": MetricRecord({"attempt": 1})}))])
        return reply

    lanes = ScriptedLanes(2, answer)
    replies, _ = _grid(lanes, timeout_s=5.0).exchange(_to([0, 1, 2, 3]))
    assert [r.content["metrics"]["attempt"] for r in replies] == [1, 1, 2, 1]
    assert _lanes_sent(lanes) == [(1, [0, 2]), (1, [1, 3]), (2, [2])]  # its worker answered


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


def _run_twice(tmp_path: Path, overrides: list[str]) -> list[Path]:
    """Two runs of one config; both complete."""
    runs = [tmp_path / "a", tmp_path / "b"]
    for run in runs:
        summary = simulate(compose_config([*TINY, *overrides]), run)
        assert summary["status"] == "completed"
    return runs


def _assert_faults_stay_in_their_round(
    runs: list[Path], kind: str, faults: FaultInjector, expected: set[tuple[int, int]]
) -> None:
    """The failed client-rounds are exactly the drawn ones; the other clients all train; both
    runs record the same rows (wall time aside)."""
    rows = _outcomes(runs[0])
    drawn = {
        (r["round"], r["partition_id"])
        for r in rows
        if getattr(faults.draw(0, r["round"], r["partition_id"]), kind)
    }
    failed = {(r["round"], r["partition_id"]) for r in rows if r["outcome"] == "failed"}
    assert failed == drawn == expected
    assert all(r["outcome"] == "ok" for r in rows if (r["round"], r["partition_id"]) not in drawn)
    metrics = read_metrics(runs[0])
    assert [(m["num_clients"], m["num_failed"]) for m in metrics] == [(3, 1)] + [(4, 0)] * (
        len(metrics) - 1
    )  # round 1 loses the drawn client only; later rounds train all 4
    assert strip_wall_time(metrics) == strip_wall_time(read_metrics(runs[1]))
    assert rows == _outcomes(runs[1])


@pytest.mark.slow
def test_hang_past_the_timeout_fails_only_the_hung_client_in_its_round(tmp_path: Path) -> None:
    # Seed 0, hang_prob=0.1: of clients 0-7 in rounds 1-3 only client 3 of round 1 draws a hang
    # (u = 0.0085; the smallest of rounds 2-3 is 0.118); round 1 samples 0, 2, 3, 5. Today its
    # lane's other client failed with it and the worker, asleep for 5 s, failed round 2's lanes.
    faults = FaultInjector(hang_prob=0.1, hang_s=5.0)
    runs = _run_twice(
        tmp_path,
        ["num_rounds=3", "faults.hang_prob=0.1", "faults.hang_s=5", "runtime.round_timeout_s=2"],
    )
    _assert_faults_stay_in_their_round(runs, "hang", faults, {(1, 3)})
    error = next(r["error"] for r in _outcomes(runs[0]) if r["outcome"] == "failed")
    assert error.endswith("injected hang of 5 s, past the lane timeout of 2 s (round 1, client 3)")


@pytest.mark.slow
def test_killed_worker_fails_only_its_killer_and_later_rounds_train(tmp_path: Path) -> None:
    # Seed 0, kill_worker_prob=0.25: round 1 samples 0, 2, 3, 5, of which client 3 draws a kill
    # (u = 0.242); round 2 samples 0, 4, 6, 7, none below 0.3. Today its lane's other client
    # failed with it, and round 2's lanes were refused while Ray restarted the worker.
    faults = FaultInjector(kill_worker_prob=0.25)
    runs = _run_twice(tmp_path, ["num_rounds=2", "faults.kill_worker_prob=0.25"])
    _assert_faults_stay_in_their_round(runs, "kill_worker", faults, {(1, 3)})


@pytest.mark.slow
def test_round_where_no_device_can_train_leaves_the_model_unchanged(tmp_path: Path) -> None:
    # 1e-6 GB = 1 kB of memory: no device can hold the CNN's training job, in any round
    summary = simulate(
        compose_config(
            [
                *TINY,
                "num_rounds=2",
                "eval.num_clients_final=0",
                "devices.profiles.0.memory_gb=0.000001",
            ]
        ),
        tmp_path,
    )
    assert summary["status"] == "completed"
    metrics = read_metrics(tmp_path)
    assert [(m["num_sampled"], m["num_infeasible"], m["num_clients"]) for m in metrics] == [
        (4, 4, 0),
        (4, 4, 0),
    ]
    assert metrics[0]["accuracy"] == metrics[1]["accuracy"]  # nothing trained: the same model
    assert {r["outcome"] for r in _outcomes(tmp_path)} == {"infeasible"}


@pytest.mark.slow
def test_a_run_whose_every_client_keeps_failing_stops_as_failed(tmp_path: Path) -> None:
    cfg = compose_config(
        [*TINY, "num_rounds=10", "faults.exception_prob=1.0", "runtime.max_failed_rounds=3"]
    )
    summary = simulate(cfg, tmp_path / "run")
    rows = read_metrics(tmp_path / "run")
    assert summary["status"] == "failed"
    assert len(rows) == 3 and all(r["num_clients"] == 0 for r in rows)  # stopped after 3


@pytest.mark.slow
def test_a_failed_job_of_a_sweep_lets_the_others_run_and_the_sweep_exits_1(tmp_path: Path) -> None:
    """A fault study's harshest setting may fail by design: it used to end the sweep there
    (the job's exit 1), leaving later jobs unrun and no runs.parquet."""
    import pandas as pd

    sweep = tmp_path / "sweep"
    done = subprocess.run(
        [*FEDSIM, "--multirun", "seed=0,1", "faults.exception_prob=1.0,0.0", "num_clients=6",
         "num_rounds=3", "runtime.max_failed_rounds=1", "runtime.engine=inline",
         "runtime.progress=false", f"hydra.sweep.dir={sweep}"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr[-3000:]
    table = pd.read_parquet(sweep / "runs.parquet").groupby("run").status.first().to_dict()
    assert table == {"0": "failed", "1": "completed", "2": "failed", "3": "completed"}
    assert done.stderr.rstrip().endswith(
        f"[fedsim] 2 job(s) of the sweep failed (every client lost for "
        f"runtime.max_failed_rounds rounds): {sweep / '0'}, {sweep / '2'}"
    )


def test_a_run_the_workers_cannot_set_up_fails_at_once_with_their_reason(tmp_path) -> None:
    """The warm-up raised in every worker: the run stops there, naming the worker's error.

    Before, round 1's lanes failed, and each round probed the workers for recovery_timeout_s
    (300 s) before giving the round up: a 3-round stall of 15 minutes.
    """
    cfg = compose_config([*TINY, "faults._target_=worker_faults.MissingOnWorkers"])
    with pytest.raises(WorkerSetupError, match=r"/data/shards: not on this node"):
        simulate(cfg, tmp_path / "run")
    assert read_metrics(tmp_path / "run") == []  # no round was played


def test_the_cli_names_the_workers_error_in_one_line(tmp_path) -> None:
    """`fedsim` says what the workers lack in one line (exit 1), not a traceback."""
    tests = str(Path(__file__).parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [
            *FEDSIM,
            *TINY,
            "faults._target_=worker_faults.MissingOnWorkers",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],  # fmt: skip
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("fedsim: error: the workers could not set up this run: ")
    assert "FileNotFoundError('/data/shards: not on this node')" in last
    assert "Traceback" not in done.stderr
    assert "[fedsim] crashed" not in done.stderr  # the line above says it
    record = json.loads((tmp_path / "run" / "crash.json").read_text())  # a Ray run's crash
    assert (
        record["error"]
        == "WorkerSetupError: " + last.removeprefix("fedsim: error: ").split(" (folder ")[0]
    )
    assert record["last_round"] == 0 and record["checkpoint_round"] is None
