"""Where a cold ``fedsim`` process spends its time: each start-up phase, round 1, the exit.

Runs ``python -m fedsim OVERRIDES`` as a fresh process ``--runs`` times and reads its stderr as
it comes: the seconds of each ``start-up:`` phase line, and the seconds from process start to
the start-up line, to round 1's line, to the results line and to the process's exit. With
several ``--install NAME=PYTHONPATH`` (a wheel of another commit installed with
``pip install --no-deps --target DIR``), the installs take turns run by run, so that a change in
the machine's load falls on both; the medians come last. Issue 19's cold-start table in
results/README.md was measured this way.

Usage::

    .venv/bin/python -m fedsim.scripts.cold_start --runs 3 num_rounds=2
    .venv/bin/python -m fedsim.scripts.cold_start --install old=/tmp/snap --install new=
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

__all__ = ["cold_run", "main"]

_PHASE = re.compile(r"\[fedsim\] start-up: (.+?) ([\d.]+) s$")


def cold_run(overrides: Sequence[str], pythonpath: str = "", cwd: Path | None = None) -> dict:
    """One cold process: phase seconds, and seconds from its start to each landmark line."""
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    started = time.perf_counter()
    marks: dict[str, float] = {}
    with subprocess.Popen(
        [sys.executable, "-m", "fedsim", *overrides],
        env=env,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    ) as process:
        assert process.stdout is not None  # piped above
        for line in process.stdout:
            now, line = time.perf_counter() - started, line.strip()
            if phase := _PHASE.search(line):
                marks[f"phase: {phase.group(1)}"] = float(phase.group(2))
            if "first round next" in line:
                marks["to start-up line"] = now
            elif "[fedsim] round" in line and "to round 1" not in marks:
                marks["to round 1"] = now
            elif "[fedsim] results:" in line:
                marks["to results line"] = now
        code = process.wait()
    marks["to exit"] = time.perf_counter() - started
    if code != 0:
        raise RuntimeError(f"fedsim {' '.join(overrides)} exited {code}")
    return marks


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, float]]:
    """Alternate the installs ``--runs`` times; print every run, then the medians."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="cold runs of each install")
    parser.add_argument(
        "--install",
        action="append",
        default=[],
        metavar="NAME=PYTHONPATH",
        help="an install to time (empty path: this environment's fedsim); repeat to compare",
    )
    parser.add_argument("overrides", nargs="*", help="fedsim overrides (default: num_rounds=2)")
    args = parser.parse_args(argv)
    installs = dict(item.split("=", 1) for item in args.install) or {"fedsim": ""}
    overrides = [*(args.overrides or ["num_rounds=2"]), "hydra.run.dir=${now:%H-%M-%S_%f}"]
    runs: dict[str, list[dict]] = {name: [] for name in installs}
    with tempfile.TemporaryDirectory(prefix="fedsim-cold-") as work:  # the runs' folders
        for _ in range(args.runs):
            for name, path in installs.items():
                runs[name].append(cold_run(overrides, path, cwd=Path(work)))
                print(name, _line(runs[name][-1]), flush=True)
    medians = {
        name: {key: statistics.median(r[key] for r in rows) for key in rows[0]}
        for name, rows in runs.items()
    }
    for name, median in medians.items():
        print(f"{name} median of {args.runs}:", _line(median))
    return medians


def _line(marks: dict[str, float]) -> str:
    return ", ".join(f"{key} {value:.2f} s" for key, value in marks.items())


if __name__ == "__main__":
    main()
