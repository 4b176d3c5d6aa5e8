"""The Flower ServerApp and the ONE ClientApp.

``client_app`` trains whatever virtual clients a lane message carries (fedsim/engine/worker.py); it
needs no configuration of its own, since each message carries the job. ``make_server_app`` builds
the ServerApp of a run; ``server_app`` is the module-level one that ``flwr run .`` loads (its Hydra
overrides come from the ``overrides`` run-config key in pyproject.toml).
"""

from __future__ import annotations

import datetime as dt
import logging
import shlex
import warnings
from pathlib import Path
from typing import cast

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy
from omegaconf import DictConfig

from fedsim.engine.worker import handle_lane
from fedsim.errors import ConfigError
from fedsim.records.checkpoint import RunState, checkpoint_round
from fedsim.records.progress import StartupLog, say
from fedsim.records.results import CRASH_FILE, RunWriter
from fedsim.records.saved_config import load_saved_config
from fedsim.rounds.interrupt import AbandonableGrid, round_loop
from fedsim.rounds.synchronous import run_rounds

__all__ = ["client_app", "server_app", "make_server_app"]

client_app = ClientApp()


def quiet_flower() -> None:
    """Keep Flower's logs out of the progress display.

    fedsim reports what Flower would log: a failed client or lost lane is counted per round
    (``num_failed``), its reason kept in ``clients.jsonl``; an engine failure raises.
    """
    logging.getLogger("flwr").setLevel(logging.CRITICAL)
    warnings.filterwarnings("ignore", category=DeprecationWarning, module="flwr")


@client_app.train()
def _train(msg: Message, context: Context) -> Message:
    """Train the lane's virtual clients; reply with their packed updates."""
    return Message(handle_lane(msg.content), reply_to=msg)


def make_server_app(
    cfg: DictConfig,
    strategy: Strategy,
    writer: RunWriter,
    summary: dict,
    resume: RunState | None = None,
    startup: StartupLog | None = None,
) -> ServerApp:
    """A ServerApp that runs ``cfg``'s rounds (after ``resume``) and fills ``summary``."""
    app = ServerApp()

    @app.main()
    def _main(grid: Grid, context: Context) -> None:
        # After a signal, the grid stops the round in progress when it must be abandoned.
        grid = cast(Grid, AbandonableGrid(grid))
        with round_loop():
            summary.update(run_rounds(grid, cfg, strategy, writer, resume, startup))

    return app


def record_crash(
    writer: RunWriter, error: Exception, num_rounds: int, announce: bool = True
) -> None:
    """``crash.json`` and two lines: what ended the run, and how to continue it once fixed.

    ``announce=False``: the record only, for an error the command reports in a line of its own.
    """
    try:
        record = writer.crashed(error, checkpoint_round(writer.run_dir))
    except OSError as unwritable:  # a full disk, say: the run's own error still comes next
        say(f"[fedsim] the crash could not be recorded in {writer.run_dir}: {unwritable}")
        return
    if record is None or not announce:  # None: the summary was written before this error
        return
    say(
        f"[fedsim] crashed after round {record['last_round']} of {num_rounds}: "
        f"{record['error']} (traceback: {writer.run_dir / CRASH_FILE})"
    )
    kept = record["checkpoint_round"]
    if not kept:  # before the first checkpoint, or checkpoint_every=0
        say("[fedsim] no checkpoint to continue from: once fixed, run it again in a new folder")
        return
    try:  # a config naming a class of the user's own is not resumable as it stands: say why
        load_saved_config(writer.run_dir)
    except ConfigError as refused:
        say(f"[fedsim] a resume would be refused: {refused.one_line()}")
        return
    say(f"[fedsim] to continue after round {kept} once fixed: fedsim resume={writer.run_dir}")


# --- `flwr run .` -----------------------------------------------------------------------------
server_app = ServerApp()


@server_app.main()
def _flwr_run_main(grid: Grid, context: Context) -> None:
    """Entry point for ``flwr run .``: compose the config from run-config overrides and run."""
    from fedsim.config import build, compose_with_provenance
    from fedsim.records.tracking import tracker_of
    from fedsim.rounds.precheck import validate_run

    quiet_flower()
    overrides = shlex.split(str(context.run_config.get("overrides", "")))
    cfg, made_by = compose_with_provenance(overrides)
    validate_run(cfg)
    stamp = dt.datetime.now().strftime("%Y-%m-%d_%H-%M-%S_%f")
    folder = Path(str(context.run_config.get("results-dir", "results/runs"))) / stamp
    writer = RunWriter(folder, tracker_of(cfg))  # logger=...: as `fedsim` tracks a run
    writer.start(cfg, made_by)
    writer.track(cfg)
    try:
        run_rounds(grid, cfg, build(cfg, "strategy"), writer)
    except Exception as error:  # the folder says how its run ended, as under `fedsim`
        record_crash(writer, error, int(cfg.num_rounds))
        raise
    finally:
        writer.close()
