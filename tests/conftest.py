"""Shared fixtures."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

FEDSIM = [sys.executable, "-m", "fedsim"]

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture
def flower_identity():
    """Outside a running simulation, Flower needs a task identity to construct Messages."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    yield


def refused_in_a_fresh_process(argv: list[str]) -> tuple[object, list[str], str]:
    """``fedsim ARGV`` in a fresh interpreter: its exit code, which of torch, flwr, ray and
    datasets it had imported by then, and its stderr."""
    code = (
        "import sys\n"
        "from fedsim.__main__ import main\n"
        f"sys.argv = ['fedsim', *{argv!r}]\n"
        "try:\n    main()\nexcept SystemExit as stop:\n"
        "    loaded = sorted({'torch', 'flwr', 'ray', 'datasets'} & set(sys.modules))\n"
        "    print(repr((stop.code, loaded)), file=sys.__stdout__)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    assert proc.stdout.strip(), proc.stderr[-2000:]  # it exited (a run that ran would say so)
    exit_code, loaded = eval(proc.stdout.strip().splitlines()[-1])  # noqa: S307 - our own repr
    return exit_code, loaded, proc.stderr


def strip_wall_time(rows: list[dict]) -> list[dict]:
    """Rows without ``wall_time_s``, the one column two identical runs may differ in."""
    return [{k: v for k, v in r.items() if k != "wall_time_s"} for r in rows]


@pytest.fixture
def kill_and_resume(tmp_path: Path):
    """``run(args, rows)``: start ``fedsim ARGS`` in its own process group, SIGKILL the driver,
    its Ray head and workers once metrics.jsonl has ``rows`` rows (no goodbye: no summary, no
    final checkpoint), then ``fedsim resume=`` it to the end. Returns the run folder and how many
    rows it had when killed.
    """

    def run(args: list[str], rows: int, timeout_s: float = 300) -> tuple[Path, int]:
        run_dir = tmp_path / "killed-run"
        metrics = run_dir / "metrics.jsonl"
        with open(tmp_path / "killed.log", "w") as log:
            proc = subprocess.Popen(
                [*FEDSIM, *args, f"hydra.run.dir={run_dir}"],
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
            deadline = time.monotonic() + timeout_s
            while not (metrics.exists() and len(metrics.read_text().splitlines()) >= rows):
                assert proc.poll() is None, "the run ended before it could be killed"
                assert time.monotonic() < deadline, f"{metrics} never reached {rows} rows"
                time.sleep(0.02)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        killed_rows = len(metrics.read_text().splitlines())
        assert not (run_dir / "summary.json").exists()
        resumed = subprocess.run(
            [*FEDSIM, f"resume={run_dir}", "runtime.progress=false"],
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        return run_dir, killed_rows

    return run


def cnn_and_data(seed: int = 0):
    """The digits CNN and 12 random 8x8 samples, both seeded: a tiny real training job."""
    import torch

    from fedsim.learning.models import SmallCNN

    torch.manual_seed(seed)
    model = SmallCNN().build(10)
    gen = torch.Generator().manual_seed(seed)
    data = {
        "x": torch.rand(12, 1, 8, 8, generator=gen),
        "label": torch.randint(0, 10, (12,), generator=gen),
    }
    return model, data
