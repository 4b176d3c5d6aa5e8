"""A run ended by an exception says so in its folder, and no table counts it as finished.

The exceptions are real (raised inside a real run, where an out-of-memory error or a bug in a
strategy would be); the folders are real run folders.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import strip_wall_time

from fedsim.config import compose_config
from fedsim.engine.simulation import simulate
from fedsim.records import results
from fedsim.records.results import (
    CRASH_FILE,
    CRASHES_FILE,
    METRICS_FILE,
    SUMMARY_FILE,
    read_metrics,
    run_status,
)
from fedsim.records.tables import load_runs
from fedsim.rounds import synchronous
from fedsim.scripts.runs import load_run

SMALL = ["num_clients=6", "num_rounds=4", "runtime.progress=false", "runtime.engine=inline"]
OOM = "CUDA out of memory. Tried to allocate 2.00 GiB"


def _crash_in_round(monkeypatch: pytest.MonkeyPatch, bad_round: int) -> None:
    """Round ``bad_round``'s training raises, as a GPU out of memory would (nothing else moves)."""
    train_round = synchronous.train_round

    def failing(strategy, server_round, *args, **kwargs):
        if server_round == bad_round:
            raise RuntimeError(OOM)
        return train_round(strategy, server_round, *args, **kwargs)

    monkeypatch.setattr(synchronous, "train_round", failing)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("ref") / "run"
    simulate(compose_config(SMALL), run_dir)
    return run_dir


def test_a_crash_is_recorded_kept_through_resumes_and_the_run_ends_as_if_never_stopped(
    reference: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    run_dir = tmp_path / "run"
    cfg = compose_config(SMALL)
    with monkeypatch.context() as patch:
        _crash_in_round(patch, 3)
        with pytest.raises(RuntimeError, match="CUDA out of memory"):
            simulate(cfg, run_dir)
        record = json.loads((run_dir / CRASH_FILE).read_text())
        assert record["status"] == "crashed" and run_status(run_dir) == "crashed"
        assert record["error"] == f"RuntimeError: {OOM}"
        assert record["last_round"] == 2 and record["checkpoint_round"] == 2
        assert record["traceback"].startswith("Traceback (most recent call last):")
        assert "in failing" in record["traceback"]
        assert not (run_dir / SUMMARY_FILE).exists()
        assert [r["round"] for r in read_metrics(run_dir)] == [1, 2]
        err = capsys.readouterr().err
        assert f"[fedsim] crashed after round 2 of 4: RuntimeError: {OOM}" in err
        assert f"[fedsim] to continue after round 2 once fixed: fedsim resume={run_dir}" in err
        log = (run_dir / "run.log").read_text()
        assert "Traceback (most recent call last):" in log and "[fedsim] crashed after" in log

        # The same fault again, in the resume: the first record is history, the second is current.
        with pytest.raises(RuntimeError, match="CUDA out of memory"):
            simulate(cfg, run_dir, resume=True)
        history = [json.loads(line) for line in (run_dir / CRASHES_FILE).read_text().splitlines()]
        assert history == [record]
        assert json.loads((run_dir / CRASH_FILE).read_text())["time"] >= record["time"]

    summary = simulate(cfg, run_dir, resume=True)  # fixed: the run goes on
    assert summary["status"] == "completed" and run_status(run_dir) == "completed"
    assert not (run_dir / CRASH_FILE).exists()
    history = (run_dir / CRASHES_FILE).read_text().splitlines()
    assert len(history) == 2 and all("CUDA out of memory" in line for line in history)
    assert strip_wall_time(read_metrics(run_dir)) == strip_wall_time(read_metrics(reference))


def test_a_crash_after_the_last_round_resumes_to_a_completed_run(
    reference: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The final per-client scores raise: every round is checkpointed, so the resume plays no
    round and writes no row; its summary still supersedes the crash (it used to stay 'crashed')."""
    run_dir = tmp_path / "run"
    cfg = compose_config(SMALL)
    with monkeypatch.context() as patch:

        def scores_fail(*args: object, **kwargs: object) -> None:
            raise RuntimeError(OOM)

        patch.setattr(synchronous, "evaluate_final_clients", scores_fail)
        with pytest.raises(RuntimeError, match="CUDA out of memory"):
            simulate(cfg, run_dir)
    record = json.loads((run_dir / CRASH_FILE).read_text())
    assert record["last_round"] == record["checkpoint_round"] == 4
    assert simulate(cfg, run_dir, resume=True)["status"] == "completed"
    assert run_status(run_dir) == "completed" and not (run_dir / CRASH_FILE).exists()
    assert [json.loads(line) for line in (run_dir / CRASHES_FILE).read_text().splitlines()] == [
        record
    ]
    assert strip_wall_time(read_metrics(run_dir)) == strip_wall_time(read_metrics(reference))


def test_a_crash_before_the_first_checkpoint_says_there_is_nothing_to_resume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _crash_in_round(monkeypatch, 1)
    run_dir = tmp_path / "run"
    with pytest.raises(RuntimeError, match="CUDA out of memory"):
        simulate(compose_config(SMALL), run_dir)
    record = json.loads((run_dir / CRASH_FILE).read_text())
    assert record["last_round"] == 0 and record["checkpoint_round"] is None
    err = capsys.readouterr().err
    assert f"[fedsim] crashed after round 0 of 4: RuntimeError: {OOM}" in err
    nothing = "[fedsim] no checkpoint to continue from: once fixed, run it again in a new folder"
    assert nothing in err
    assert "resume=" not in err


def test_a_crash_that_cannot_be_recorded_still_raises_the_runs_own_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The disk fills in round 3 and training raises: the run's error is what the caller gets
    (not the crash record's OSError), and one line says the record could not be written."""
    train_round = synchronous.train_round

    def disk_full(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    def failing(strategy, server_round, *args, **kwargs):
        if server_round == 3:
            monkeypatch.setattr(results, "atomic_write_text", disk_full)
            raise RuntimeError(OOM)
        return train_round(strategy, server_round, *args, **kwargs)

    monkeypatch.setattr(synchronous, "train_round", failing)
    run_dir = tmp_path / "run"
    with pytest.raises(RuntimeError, match="CUDA out of memory") as raised:
        simulate(compose_config(SMALL), run_dir)
    assert raised.value.__context__ is None  # not raised while handling another error
    assert not (run_dir / CRASH_FILE).exists()
    assert (
        f"[fedsim] the crash could not be recorded in {run_dir}: [Errno 28] No space left on device"
        in capsys.readouterr().err
    )


def test_an_error_after_the_summary_is_not_the_runs_outcome(tmp_path: Path) -> None:
    writer = results.RunWriter(tmp_path / "run")
    writer.start(compose_config(SMALL))
    writer.log_row({"round": 1, "accuracy": 0.5})
    writer.finish({"status": "completed"})
    assert writer.crashed(OSError("the tracker's upload failed"), checkpoint_round=1) is None
    writer.close()
    assert not (tmp_path / "run" / CRASH_FILE).exists()
    assert run_status(tmp_path / "run") == "completed"


def test_a_damaged_crash_record_is_kept_as_text_and_stops_nothing(tmp_path: Path) -> None:
    writer = results.RunWriter(tmp_path / "run")
    writer.start(compose_config(SMALL))
    (tmp_path / "run" / CRASH_FILE).write_text('{"status": "crashed", "err')  # cut short
    writer.finish({"status": "completed"})
    writer.close()
    (line,) = (tmp_path / "run" / CRASHES_FILE).read_text().splitlines()
    assert json.loads(line) == {"status": "crashed", "unreadable": '{"status": "crashed", "err'}
    assert run_status(tmp_path / "run") == "completed"


@pytest.mark.parametrize(
    ("files", "status"),
    [
        ({}, None),  # killed, or still going
        ({SUMMARY_FILE: '{"status": "interrupted"}'}, "interrupted"),
        ({SUMMARY_FILE: '{"final_accuracy": 0.5}'}, "completed"),  # fedsim's first version
        ({SUMMARY_FILE: "{not json"}, None),
        ({SUMMARY_FILE: '{"status": "failed"}', CRASH_FILE: "{}"}, "crashed"),  # crashed later
    ],
)
def test_run_status_reads_what_the_folder_says(
    files: dict[str, str], status: str | None, tmp_path: Path
) -> None:
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    assert run_status(tmp_path) == status


def test_tables_and_comparisons_count_only_runs_that_ended_for_good(
    reference: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A crashed and an interrupted run are in the tables with their status, in no mean."""
    sweep = tmp_path / "sweep"
    shutil.copytree(reference, sweep / "0")
    with monkeypatch.context() as patch:
        _crash_in_round(patch, 3)
        with pytest.raises(RuntimeError):
            simulate(compose_config([*SMALL, "seed=1"]), sweep / "1")
    # seed 2 was stopped by a signal after round 2: what the run writes then (tests/test_interrupt)
    stopped = sweep / "2"
    shutil.copytree(reference, stopped)
    (stopped / "config.yaml").write_text((stopped / "config.yaml").read_text().replace(
        "seed: 0", "seed: 2"
    ))  # fmt: skip
    rows = (stopped / METRICS_FILE).read_text().splitlines()[:2]
    (stopped / METRICS_FILE).write_text("".join(f"{line}\n" for line in rows))
    summary = json.loads((stopped / SUMMARY_FILE).read_text())
    stale = summary["final_accuracy"]
    summary |= {"status": "interrupted", "num_rounds": 2}
    (stopped / SUMMARY_FILE).write_text(json.dumps(summary))

    table = load_runs(sweep).groupby("run").status.first().to_dict()
    assert table == {"0": "completed", "1": "crashed", "2": "interrupted"}
    runs = {run.path.name: run for run in (load_run(sweep / name) for name in "012")}
    assert [runs[n].complete for n in "012"] == [True, False, False]
    last = json.loads(rows[-1])["accuracy"]
    assert runs["2"].final_accuracy == last != stale  # from its rows, not a stale summary

    out = tmp_path / "report"
    proc = subprocess.run(
        [sys.executable, "-m", "fedsim.scripts.compare", str(sweep), "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = (out / "report.md").read_text()
    assert "> Left out: 2 run(s) that did not finish (1 crashed, 1 interrupted;" in report
    assert f"`1` (crashed after round 2: RuntimeError: {OOM})" in report
    assert "`2` (interrupted after round 2)" in report
    assert "1 runs in 1 configurations" in report  # the completed run alone


BUGGY_EFFECT = '''
class BatteryModel:
    """A device effect of one's own with a bug that shows in round 3."""

    def __init__(self, *, capacity_j: float) -> None:
        self.capacity_j = capacity_j

    def check_in(self, seed, partition_id, server_round, now_s, profile):
        if server_round == 3:
            return {"low": "battery"}["low_battery"]  # the bug: a KeyError
        return None
'''


@pytest.mark.slow
def test_a_crash_from_the_command_line_is_recorded_and_the_resume_hint_is_honest(
    tmp_path: Path,
) -> None:
    """From the command line: exit 1, two lines, crash.json. The config names a class of the
    user's own, so the hint says why a resume would be refused instead. (A crash on the Ray
    engine: tests/test_faults.py::test_the_cli_names_the_workers_error_in_one_line.)"""
    (tmp_path / "my_effects.py").write_text(BUGGY_EFFECT)
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "fedsim", "num_clients=6", "num_rounds=5",
         "runtime.progress=false", "runtime.engine=inline", f"hydra.run.dir={run_dir}",
         "+devices.effects=[{_target_: my_effects.BatteryModel, capacity_j: 1.0e4}]"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-3000:]
    crashed = "[fedsim] crashed after round 2 of 5: KeyError: 'low_battery' (traceback: "
    assert crashed in proc.stderr
    assert (
        "[fedsim] a resume would be refused: devices.effects.0._target_=my_effects.BatteryModel:"
        in proc.stderr
    )
    record = json.loads((run_dir / CRASH_FILE).read_text())
    assert record["error"] == "KeyError: 'low_battery'" and record["last_round"] == 2
    assert 'my_effects.py", line 10, in check_in' in record["traceback"]
    assert [r["round"] for r in read_metrics(run_dir)] == [1, 2]
    assert run_status(run_dir) == "crashed"


SEED_CRASH = '''
class CrashOnSeed:
    """Runs out of memory in round 2 of one seed's run (a device effect of one's own)."""

    def __init__(self, *, seed: int) -> None:
        self.seed = seed

    def check_in(self, seed, partition_id, server_round, now_s, profile):
        if seed == self.seed and server_round == 2:
            raise MemoryError("out of memory on this seed")
        return None
'''


@pytest.mark.slow
def test_a_sweep_with_a_crashed_job_runs_the_rest_and_keeps_its_table(tmp_path: Path) -> None:
    """Hydra runs every job, then raises the crashed job's error without its end-of-sweep
    callback: runs.parquet is written after each job from the crash on, with every job in it."""
    import pandas as pd

    (tmp_path / "seed_crash.py").write_text(SEED_CRASH)
    sweep = tmp_path / "sweep"
    proc = subprocess.run(
        [sys.executable, "-m", "fedsim", "--multirun", "seed=0,1,2", "num_clients=6",
         "num_rounds=3", "runtime.engine=inline", "runtime.progress=false",
         f"hydra.sweep.dir={sweep}",
         "+devices.effects=[{_target_: seed_crash.CrashOnSeed, seed: 1}]"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "MemoryError: out of memory on this seed" in proc.stderr
    assert [run_status(sweep / job) for job in "012"] == ["completed", "crashed", "completed"]
    table = pd.read_parquet(sweep / "runs.parquet")
    assert table.groupby("run").status.first().to_dict() == {
        "0": "completed",
        "1": "crashed",
        "2": "completed",
    }
    assert table.groupby("run")["round"].max().to_dict() == {"0": 3, "1": 1, "2": 3}
