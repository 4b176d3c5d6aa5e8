"""The inline engine (``runtime.engine=inline``): the Ray engine's numbers, without Ray.

Each configuration runs on both engines in this process (Ray's instance is the kept one of the
test session) and must write the same rows. The inline engine's own parts are then checked where
they differ from Ray's: nothing is started, the process-wide state a worker would own is put
back, a ClientApp that cannot set up is reported as a Ray worker's is, what needs separate
processes is refused in one line.
"""

import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FEDSIM, strip_wall_time
from flwr.app import Message, MessageType

from fedsim.config import compose_config
from fedsim.engine.inline import LANE_NODE_ID, InlineGrid, check_inline
from fedsim.engine.simulation import simulate
from fedsim.errors import ConfigError
from fedsim.records.checkpoint import read_checkpoint
from fedsim.records.results import read_metrics
from fedsim.rounds.virtual_grid import VirtualGrid, WorkerSetupError, job_record, pack_lane

BASE = ["num_clients=8", "num_rounds=3", "runtime.progress=false"]
HALF = ["strategy.fraction_train=0.5"]  # a synchronous strategy samples half the clients
TINY = [*BASE, *HALF]
TABLES = ("metrics.jsonl", "clients.jsonl", "client_eval.jsonl")
ENGINES = ("ray", "inline")


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides",
    [
        [*HALF, "faults.exception_prob=0.3"],  # failed clients among the trained ones
        [*HALF, "strategy=scaffold", "devices=phones_failures"],  # client state, failing phones
        ["strategy=fedbuff", "num_rounds=4"],  # asynchronous: events on the simulated clock
        [*HALF, "distillation=dfl"],  # soft targets riding along the lane message
    ],
    ids=["faults", "scaffold-phones", "fedbuff", "dfl"],
)
def test_inline_writes_the_rows_ray_writes(overrides: list[str], tmp_path: Path) -> None:
    for engine in ENGINES:
        cfg = compose_config([*BASE, *overrides, f"runtime.engine={engine}"])
        assert simulate(cfg, tmp_path / engine)["status"] == "completed"
    for table in TABLES:
        ray_rows = strip_wall_time(read_metrics(tmp_path / "ray", table))
        assert ray_rows, table
        assert strip_wall_time(read_metrics(tmp_path / "inline", table)) == ray_rows, table
    # ...and the same models and client state, to the bit (the last checkpoint holds them all)
    (_, ray_tensors), (_, inline_tensors) = (read_checkpoint(tmp_path / e) for e in ENGINES)
    assert ray_tensors.keys() == inline_tensors.keys() and "global/0" in ray_tensors
    for name, tensor in ray_tensors.items():
        np.testing.assert_array_equal(inline_tensors[name], tensor, err_msg=name)


def test_an_inline_run_starts_no_process_and_leaves_no_ray(tmp_path: Path) -> None:
    """In a fresh interpreter: the run completes with no child process ever started, and Ray is
    never imported (its import alone spawns a GPU probe and costs a fraction of a second)."""
    script = f"""
import threading, psutil, sys
children = set()
def watch():
    while not done.is_set():
        children.update(p.pid for p in psutil.Process().children(recursive=True))
        done.wait(0.01)
done = threading.Event(); threading.Thread(target=watch, daemon=True).start()
import fedsim
summary = fedsim.run({[*TINY, "runtime.engine=inline"]!r}, {str(tmp_path / "run")!r})
done.set()
assert summary["status"] == "completed", summary
assert "ray" not in sys.modules, "the inline engine imported Ray"
assert not children, children
print("ok")
"""
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


@pytest.mark.usefixtures("flower_identity")
def test_a_lane_gives_the_server_back_its_threads_and_random_generators() -> None:
    """A client draws from every global generator and sets its threads; the server's return."""
    grid = InlineGrid(run=_run(), client_num_cpus=1)
    torch.set_num_threads(2)
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    before = random.random(), np.random.rand(), torch.rand(1).item()
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    with grid._as_a_worker():
        assert torch.get_num_threads() == 1
        random.seed(7), np.random.seed(7), torch.manual_seed(7)
        random.random(), np.random.rand(), torch.rand(1)
    assert torch.get_num_threads() == 2
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == before


@pytest.mark.usefixtures("flower_identity")
def test_a_client_app_that_cannot_set_up_stops_the_run_with_its_reason() -> None:
    """The lane's warm-up raises in the ClientApp: reported as a Ray worker's, not retried."""
    cfg = compose_config([*TINY, "data=hf", "data.path=/data/shards.csv"])
    grid = VirtualGrid(InlineGrid(run=_run()), num_clients=8, job=job_record(cfg))
    with pytest.raises(WorkerSetupError, match=r"could not set up this run: .*/data/shards\.csv"):
        grid.warm_up()


@pytest.mark.usefixtures("flower_identity")
def test_messages_cross_as_copies_and_replies_name_what_they_answer() -> None:
    cfg = compose_config(TINY)
    grid = InlineGrid(run=_run())
    sent = Message(pack_lane([], job_record(cfg)), LANE_NODE_ID, MessageType.TRAIN, group_id="1")
    (message_id,) = grid.push_messages([sent])
    (reply,) = grid.pull_messages([message_id])
    assert not reply.has_error() and reply.metadata.reply_to_message_id == message_id
    assert grid.pull_messages([message_id]) == []  # answered once
    with pytest.raises(ValueError, match="no node 99"):
        grid.push_messages([Message(sent.content, 99, MessageType.TRAIN, group_id="1")])


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("runtime.ray_address=127.0.0.1:1", "runtime.ray_address"),
        ("faults.kill_worker_prob=0.5", "faults.kill_worker_prob"),
    ],
)
def test_what_needs_separate_processes_is_refused_before_anything_starts(
    override: str, key: str, tmp_path: Path
) -> None:
    cfg = compose_config([*TINY, "runtime.engine=inline", override])
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        simulate(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_gpu_share_is_refused_only_where_there_is_no_gpu(tmp_path: Path) -> None:
    """No GPU: one line naming the key, no folder. A GPU: accepted (the client trains on it)."""
    cfg = compose_config([*TINY, "runtime.engine=inline", "runtime.client_num_gpus=1"])
    if torch.cuda.device_count() > 0:
        check_inline(cfg)  # nothing to refuse
        return
    with pytest.raises(ConfigError, match=r"runtime\.client_num_gpus=1.*needs a GPU \(0 here\)"):
        simulate(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_an_unknown_engine_is_refused_in_one_line(tmp_path: Path) -> None:
    proc = subprocess.run(
        [*FEDSIM, "runtime.engine=threads", f"hydra.run.dir={tmp_path / 'run'}"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "fedsim: error: runtime.engine=threads: must be one of: ray, inline"
    )
    assert not (tmp_path / "run").exists()


def _run():  # noqa: ANN202 - Flower's Run
    from flwr.supercore.run import Run

    return Run.create_empty(run_id=1)
