"""The run folder is a safe unit: resuming runs nothing it names, one writer, nothing lost.

Each test attacks or damages a real run folder (made by a real run) and checks that fedsim
refuses in one line (exit 2) or does nothing, and that no file inside or outside is touched.
"""

import hashlib
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import refused_in_a_fresh_process
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from fedsim.config import compose_config
from fedsim.engine.simulation import simulate
from fedsim.errors import ConfigError
from fedsim.records.checkpoint import CHECKPOINT_FILE, tensors_digest
from fedsim.records.results import METRICS_FILE, SUMMARY_FILE, RunWriter, read_metrics
from fedsim.records.saved_config import check_saved_config, shipped_targets

pytestmark = pytest.mark.slow

FEDSIM = [sys.executable, "-m", "fedsim"]
SMALL = ["num_clients=6", "num_rounds=3", "runtime.progress=false", "runtime.engine=inline"]


def _fedsim(*args: str, timeout: float = 180, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*FEDSIM, *args], capture_output=True, text=True, timeout=timeout, **kwargs
    )


def _one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fedsim: error: "), proc.stderr[-2000:]
    for needle in needles:
        assert needle in lines[0]
    return lines[0]


def _snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    """Every file's SHA-256 and mtime (ns): what must not change."""
    return {
        str(p.relative_to(folder)): (
            hashlib.sha256(p.read_bytes()).hexdigest(),
            p.stat().st_mtime_ns,
        )
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A completed 3-round run; tests work on copies of it."""
    run_dir = tmp_path_factory.mktemp("made") / "run"
    simulate(compose_config(SMALL), run_dir)
    return run_dir


@pytest.fixture
def killed_run(finished_run: Path, tmp_path: Path) -> Path:
    """A copy of the run as a SIGKILL after its checkpoint would leave it: no summary."""
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    (run / SUMMARY_FILE).unlink()
    return run


def _edit_config(run: Path, edit) -> None:
    tree = yaml.safe_load((run / "config.yaml").read_text())
    edit(tree)
    (run / "config.yaml").write_text(yaml.safe_dump(tree))


# --- resuming runs nothing the folder names ------------------------------------------------------
def test_shipped_targets_are_fedsims_and_flowers_classes() -> None:
    targets = shipped_targets()
    assert "fedsim.engine.faults.FaultInjector" in targets
    assert "flwr.serverapp.strategy.FedAvg" in targets
    assert all(t.split(".")[0] in ("fedsim", "flwr", "flwr_datasets") for t in targets)


def test_resume_never_calls_a_callable_named_in_the_folder(
    killed_run: Path, tmp_path: Path
) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    _edit_config(
        killed_run,
        lambda t: t.__setitem__(
            "faults", {"_target_": "builtins.open", "_args_": [str(victim), "w"]}
        ),
    )
    before = _snapshot(killed_run)
    line = _one_line_error(_fedsim(f"resume={killed_run}"), "faults._target_=builtins.open")
    assert "not a class fedsim's config tree names" in line
    assert victim.read_text() == "precious\n"  # today's code empties it
    assert _snapshot(killed_run) == before


def test_resume_never_unpickles_a_file_in_the_folder(killed_run: Path, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (killed_run / "payload.pkl").write_bytes(pickle.dumps(Payload()))
    _edit_config(
        killed_run,
        lambda t: t.__setitem__(
            "faults",
            {
                "_target_": "numpy.load",
                "file": str(killed_run / "payload.pkl"),
                "allow_pickle": True,
            },
        ),
    )
    _one_line_error(_fedsim(f"resume={killed_run}"), "faults._target_=numpy.load")
    assert not marker.exists()


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (lambda t: t["faults"].__setitem__("_args_", [0.5]), "faults._args_"),
        (lambda t: t["strategy"].__setitem__("_partial_", True), "strategy._partial_"),
        (lambda t: t.__setitem__("seed", "${oc.env:HOME}"), "a saved config holds no interp"),
        (
            lambda t: t["model"].__setitem__(
                "_target_", "fedsim.records.results.atomic_write_text"
            ),
            "model._target_=fedsim.records.results.atomic_write_text",
        ),
    ],
    ids=["args", "partial", "interpolation", "fedsim-function"],
)
def test_check_saved_config_refuses_what_fedsim_does_not_write(finished_run, edit, needle) -> None:
    tree = yaml.safe_load((finished_run / "config.yaml").read_text())
    check_saved_config(tree)  # the config fedsim wrote passes
    edit(tree)
    with pytest.raises(ConfigError, match=needle.replace("$", r"\$").replace("{", r"\{")):
        check_saved_config(tree)


def test_resume_of_broken_yaml_is_one_line(killed_run: Path) -> None:
    (killed_run / "config.yaml").write_text("data: [unclosed\nseed: 0\n")
    _one_line_error(_fedsim(f"resume={killed_run}"), "is not valid YAML")


def test_a_saved_config_that_is_not_text_is_one_line(tmp_path: Path) -> None:
    # found by mypy: a UnicodeDecodeError has no strerror, so this was an AttributeError
    from fedsim.records.saved_config import load_saved_config

    (tmp_path / "config.yaml").write_bytes(b"seed: \xff\xfe\n")
    with pytest.raises(ConfigError, match="is not UTF-8 text"):
        load_saved_config(tmp_path)


# --- the checkpoint is checked before it is used -------------------------------------------------
def _rewrite_checkpoint(run: Path, edit_meta=None, edit_tensors=None, rehash=True) -> None:
    path = run / CHECKPOINT_FILE
    with safe_open(str(path), framework="numpy") as handle:
        meta = json.loads(handle.metadata()["fedsim"])
    tensors = load_file(str(path))
    if edit_tensors:
        edit_tensors(tensors)
    if edit_meta:
        edit_meta(meta)
    if rehash:
        meta["sha256"] = tensors_digest(tensors)
    save_file(tensors, str(path), metadata={"fedsim": json.dumps(meta)})


def test_a_flipped_bit_in_the_checkpoint_is_refused(killed_run: Path) -> None:
    path = killed_run / CHECKPOINT_FILE
    data = bytearray(path.read_bytes())
    data[-100] ^= 0x10  # inside the last tensor's bytes, past the JSON header
    path.write_bytes(bytes(data))
    _one_line_error(_fedsim(f"resume={killed_run}"), "does not match its checksum")


@pytest.mark.parametrize(
    ("edit_meta", "edit_tensors", "needle"),
    [
        (lambda m: m.pop("config_hash"), None, "lacks a valid 'config_hash'"),
        (lambda m: m["arrays"].__setitem__("kind", "weird"), None, "cannot be decoded"),
        (
            None,
            lambda t: t.__setitem__("global/0", np.zeros((3, 3), np.float32)),
            "checkpoint tensor",
        ),
    ],
    ids=["no-config-hash", "unknown-kind", "wrong-shape"],
)
def test_a_damaged_checkpoint_is_one_line_and_nothing_is_rewritten(
    killed_run: Path, edit_meta, edit_tensors, needle
) -> None:
    _rewrite_checkpoint(killed_run, edit_meta, edit_tensors)
    before = _snapshot(killed_run)
    _one_line_error(_fedsim(f"resume={killed_run}"), needle)
    assert _snapshot(killed_run) == before


# --- a finished run is left as it is -------------------------------------------------------------
def test_resuming_a_finished_run_is_a_no_op(finished_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    before = _snapshot(run)
    proc = _fedsim(f"resume={run}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "already finished (completed, round 3); nothing to resume" in proc.stderr
    assert _snapshot(run) == before


def test_a_run_stopped_by_the_time_budget_plays_no_more_rounds(tmp_path: Path) -> None:
    run = tmp_path / "run"
    simulate(compose_config([*SMALL, "num_rounds=50", "clock.max_sim_time_s=1"]), run)
    rows = read_metrics(run)
    assert len(rows) < 50 and rows[-1]["sim_time_s"] >= 1
    (run / SUMMARY_FILE).unlink()  # killed after its last checkpoint, before the summary
    proc = _fedsim(f"resume={run}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert read_metrics(run) == rows  # today's code plays one more round on every resume
    assert json.loads((run / SUMMARY_FILE).read_text())["status"] == "completed"


# --- one writer; nothing removed early -----------------------------------------------------------
def test_a_folder_has_one_writer(tmp_path: Path) -> None:
    cfg = compose_config(SMALL)
    first, second = RunWriter(tmp_path / "run"), RunWriter(tmp_path / "run")
    first.start(cfg)
    for claim in (lambda: second.start(cfg), lambda: second.reopen(0)):
        with pytest.raises(ConfigError, match="being written by another fedsim process"):
            claim()
    first.close()
    with pytest.raises(ConfigError, match="already holds a run"):
        second.start(cfg)
    second.reopen(0)  # free again: a resume may take it
    second.close()


def test_resuming_a_running_run_is_refused(tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = subprocess.Popen(
        [
            *FEDSIM,
            "num_rounds=500",
            "runtime.progress=false",
            "runtime.engine=inline",
            f"hydra.run.dir={run}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 180
        while not (
            (run / METRICS_FILE).exists()
            and len((run / METRICS_FILE).read_text().splitlines()) >= 2
        ):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        _one_line_error(_fedsim(f"resume={run}"), "being written by another fedsim process")
        again = _fedsim("num_rounds=2", f"hydra.run.dir={run}")
        _one_line_error(again, "being written by another fedsim process")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    rounds = [row["round"] for row in read_metrics(run)]
    assert rounds == list(range(1, len(rounds) + 1))  # one writer's rows, no second copy


@pytest.mark.parametrize("held", [True, False], ids=["being-written", "holding-a-run"])
def test_a_folder_taken_is_refused_before_the_engine_starts(held: bool, tmp_path: Path) -> None:
    """A new run into a folder another process writes, or that holds a run, is refused before
    Ray (or any engine) starts; the folder is left as it was."""
    run = tmp_path / "run"
    run.mkdir()
    (run / METRICS_FILE).write_text('{"round": 1}\n')
    writer = RunWriter(run)
    if held:
        writer.reopen(1)  # holds the folder's lock, as a running fedsim does
    try:
        argv = ["num_rounds=2", "runtime.progress=false", f"hydra.run.dir={run}"]
        code, loaded, stderr = refused_in_a_fresh_process(argv)
    finally:
        writer.close()
    assert code == 2 and "ray" not in loaded, stderr[-2000:]
    why = "is being written by another fedsim process" if held else "never overwritten"
    (line,) = stderr.strip().splitlines()
    assert line.startswith("fedsim: error: hydra.run.dir=") and why in line
    assert sorted(p.name for p in run.iterdir()) == [METRICS_FILE]
    assert (run / METRICS_FILE).read_text() == '{"round": 1}\n'


def test_resuming_a_folder_being_written_never_reads_its_checkpoint(killed_run: Path) -> None:
    """The writer replaces its checkpoint as it goes: a resume that read it mid-write called it
    corrupt (seen once in a suite run). The folder's lock is asked first."""
    (killed_run / CHECKPOINT_FILE).write_bytes(b"\x00" * 40)  # half-written, as seen mid-write
    writer = RunWriter(killed_run)
    writer.reopen(1)  # holds the folder's lock, as the running fedsim does
    try:
        line = _one_line_error(_fedsim(f"resume={killed_run}"), "being written by another")
    finally:
        writer.close()
    assert line.startswith(f"fedsim: error: resume={killed_run}: ")


def test_reopen_removes_nothing_until_new_rows_come(finished_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    before = _snapshot(run)
    writer = RunWriter(run)
    writer.reopen(1)
    writer.close()  # a resume that failed to start: the folder is as it was
    assert _snapshot(run) == before
    writer.reopen(1)
    writer.log_row({"round": 2, "accuracy": 0.5})
    writer.close()
    assert [r["round"] for r in read_metrics(run)] == [1, 2]
    assert read_metrics(run)[-1] == {"round": 2, "accuracy": 0.5}
    assert (run / SUMMARY_FILE).read_bytes() == (finished_run / SUMMARY_FILE).read_bytes()


# --- bad places and modes ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("where", "needle"),
    [
        ("file", "must be a folder, not a file"),
        ("/sys/fs/fedsim-run", "must be inside a folder you can write to"),
        ("/proc/fedsim-run/x", "must be inside a folder you can write to"),
    ],
)
def test_a_run_folder_fedsim_cannot_use_is_one_line(
    tmp_path: Path, where: str, needle: str
) -> None:
    if where == "file":
        where = str(tmp_path / "a_file")
        Path(where).write_text("not a folder\n")
    _one_line_error(_fedsim(f"hydra.run.dir={where}", "num_rounds=1"), needle)


def test_every_file_follows_the_umask(tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = _fedsim(*SMALL, f"hydra.run.dir={run}", preexec_fn=lambda: os.umask(0o027))
    assert proc.returncode == 0, proc.stderr[-2000:]
    modes = {p.name: p.stat().st_mode & 0o777 for p in run.iterdir()}
    assert len(modes) >= 6
    assert set(modes.values()) == {0o640}, modes  # today: 0600 for some, 0644 for others


def test_a_sweep_checks_every_job_before_the_first_starts(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    proc = _fedsim("--multirun", "num_rounds=2,0", f"hydra.sweep.dir={sweep}")
    _one_line_error(proc, "num_rounds=0", "integer >= 1")
    assert not sweep.exists()  # today job 0 runs to the end first


def test_the_sweep_check_builds_groups_as_the_run_does(tmp_path: Path) -> None:
    """The precheck once built the warm start without ``num_clients`` and refused every sweep
    over ``warm_start=none,cyclic`` (results/README.md's CyclicFL commands)."""
    from fedsim.rounds.precheck import check_sweep_jobs

    check_sweep_jobs(
        ["num_clients=12"], [("warm_start", ["none", "cyclic"]), ("distillation", ["none", "dfl"])]
    )
    with pytest.raises(ConfigError) as err:
        check_sweep_jobs(
            ["num_clients=12", "warm_start=cyclic"], [("warm_start.clients_per_cycle", ["3", "13"])]
        )
    assert err.value.key == "warm_start.clients_per_cycle"


def test_a_sweep_launched_again_skips_finished_jobs_and_resumes_killed_ones(
    tmp_path: Path,
) -> None:
    """Issue 16 item 4: job 0 finished, job 1 was SIGKILLed mid-run (checkpointed rounds, no
    summary). The same command again skips job 0, resumes job 1 from its checkpoint, and the
    result equals an uninterrupted run; a different command on that folder is refused."""
    from conftest import strip_wall_time

    sweep = tmp_path / "sweep"
    args = ["--multirun", "seed=0,1", "num_clients=6", "num_rounds=8", "runtime.progress=false",
            "runtime.engine=inline", f"hydra.sweep.dir={sweep}"]  # fmt: skip
    metrics = sweep / "1" / "metrics.jsonl"
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen([*FEDSIM, *args], stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + 300
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert (sweep / "0" / "summary.json").exists() and not (sweep / "1" / "summary.json").exists()
    job0 = (sweep / "0" / "metrics.jsonl").read_bytes()

    again = _fedsim(*args, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"{sweep / '0'}: already finished (completed), skipped" in again.stderr
    assert (sweep / "0" / "metrics.jsonl").read_bytes() == job0  # untouched
    reference = tmp_path / "reference"
    solo = _fedsim("seed=1", "num_clients=6", "num_rounds=8", "runtime.progress=false",
                   "runtime.engine=inline", f"hydra.run.dir={reference}")  # fmt: skip
    assert solo.returncode == 0, solo.stderr[-2000:]
    assert strip_wall_time(read_metrics(sweep / "1")) == strip_wall_time(read_metrics(reference))
    assert json.loads((sweep / "1" / "summary.json").read_text())["status"] == "completed"

    other = _fedsim(*[a for a in args if a != "num_rounds=8"], "num_rounds=9", timeout=300)
    assert other.returncode == 2  # after Hydra's "Launching" lines, one error line, nothing run
    last = other.stderr.strip().splitlines()[-1]
    assert last.startswith(f"fedsim: error: hydra.sweep.dir={sweep / '0'}: holds another run")
    assert (sweep / "0" / "metrics.jsonl").read_bytes() == job0
