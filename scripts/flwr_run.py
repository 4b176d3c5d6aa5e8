r"""``make flwr-run``: run fedsim's Flower app with ``flwr run .`` on a SuperLink of its own.

``flwr run`` on its default ``:local:`` connection starts a managed SuperLink on fixed ports
(39091) that any later ``flwr run`` on the machine joins, and nothing stops it afterwards; a
pattern kill of "the" SuperLink then stops every concurrent run's. This script instead starts
a SuperLink of its own on a free port, with its own Flower home (``.flwr/run-*``: config and
logs, removed after a successful run), points ``flwr run`` at it, and stops exactly that
process (by its id, with what it started) when the run ends, fails or is interrupted. The
SuperLink runs in this venv and never builds a per-run environment with ``uv sync`` (which
would download a CUDA build of torch).

Usage::

    .venv/bin/python -m fedsim.scripts.flwr_run --overrides "num_clients=6 num_rounds=2" \
        --results-dir results/runs
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psutil

#: Seconds to wait for the SuperLink's /health (Flower's own managed start waits 15 s; a
#: loaded 2-core machine needs more).
STARTUP_TIMEOUT_S = 60.0
#: Seconds the SuperLink gets to stop (it stops its SuperExec child) before it is killed.
STOP_TIMEOUT_S = 5.0
START_ATTEMPTS = 3  # SuperLink starts tried, each on a new free port
CONNECTION = "fedsim"  # the connection name in the run's own Flower config


class SuperLinkNotStarted(RuntimeError):
    """The SuperLink exited, or did not answer on its port in time."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_flower_config(flwr_home: Path, port: int) -> None:
    """A Flower config whose default connection is the SuperLink on ``port``."""
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n'
        f'[superlink.{CONNECTION}]\naddress = "127.0.0.1:{port}"\ninsecure = true\n'
    )


def _ready(process: psutil.Process, port: int) -> bool:
    """``process`` itself listens on ``port`` (not someone who took it first) and is healthy."""
    try:
        listening = any(
            c.laddr.port == port and c.status == psutil.CONN_LISTEN
            for c in process.net_connections(kind="tcp")
        )
    except psutil.Error:
        return False
    return listening and _healthy(port)


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=0.5) as reply:
            return bool(reply.status == 200)
    except OSError:
        return False


@contextlib.contextmanager
def superlink(flwr_home: Path, port: int, env: dict[str, str]) -> Iterator[psutil.Process]:
    """Start ``flower-superlink`` on ``port``; stop it and everything it started on exit."""
    log_file = flwr_home / "superlink.log"
    command = [
        str(Path(sys.executable).with_name("flower-superlink")),
        "--insecure",
        "--simulation",
        "--isolation",
        "subprocess",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--disable-runtime-dependency-installation",
        "--log-file",
        str(log_file),
    ]
    with open(log_file.with_suffix(".out"), "w") as out:
        # Its own session: a Ctrl-C at the terminal reaches this script, which stops it.
        proc = subprocess.Popen(
            command,
            env=env,
            stdout=out,
            stderr=out,
            cwd=flwr_home.parents[1],
            start_new_session=True,
        )
    process = psutil.Process(proc.pid)
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not _ready(process, port):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SuperLinkNotStarted(f"the SuperLink did not start; see {log_file}")
            time.sleep(0.2)
        yield process
    finally:
        stop(process, proc)


def stop(process: psutil.Process, proc: subprocess.Popen) -> None:
    """SIGTERM the SuperLink, then SIGKILL what is left of it and of what it started."""
    started: list[psutil.Process] = []
    with contextlib.suppress(psutil.Error):
        started = process.children(recursive=True)  # SuperExec, flwr-simulation, Ray, ...
    proc.terminate()
    try:
        proc.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    _gone, alive = psutil.wait_procs(started, timeout=STOP_TIMEOUT_S)
    for child in alive:
        with contextlib.suppress(psutil.Error):
            child.kill()


def main(argv: list[str] | None = None) -> int:
    """Run ``flwr run .`` on a SuperLink of its own; return flwr's exit code."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--overrides", default="", help="Hydra overrides, space separated")
    parser.add_argument("--results-dir", default="results/runs")
    args = parser.parse_args(argv)
    root = Path(__file__).resolve().parents[1]
    (root / ".flwr").mkdir(exist_ok=True)
    flwr_home = Path(tempfile.mkdtemp(prefix="run-", dir=root / ".flwr"))
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "FLWR_HOME": str(flwr_home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
        # A Ray instance of the run's own, never the last cluster started on the machine.
        "RAY_ADDRESS": os.environ.get("RAY_ADDRESS") or "local",
    }
    run_config = f'overrides="{args.overrides}" results-dir="{args.results_dir}"'
    flwr = [
        str(Path(sys.executable).with_name("flwr")),
        "run",
        ".",
        CONNECTION,
        "--stream",
        "--run-config",
        run_config,
    ]
    code = 1
    for attempt in range(START_ATTEMPTS):
        port = free_port()  # another process may bind it first: then the next attempt
        write_flower_config(flwr_home, port)
        try:
            with superlink(flwr_home, port, env):
                code = subprocess.run(flwr, env=env, cwd=root).returncode
            break
        except SuperLinkNotStarted as exc:
            if attempt == START_ATTEMPTS - 1:
                print(f"flwr-run: {exc}", file=sys.stderr)
                return 1
        except KeyboardInterrupt:
            code = 130
            break
    if code == 0:
        shutil.rmtree(flwr_home, ignore_errors=True)
    else:
        print(f"flwr-run: exit {code}; the SuperLink's logs are in {flwr_home}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
