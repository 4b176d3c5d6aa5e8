"""The sole writer of run folders: ``config.yaml``, ``metrics.jsonl``, ``summary.json``.

A run that ends writes ``summary.json`` (its ``status``: completed, diverged, failed,
interrupted); a run ended by an exception writes ``crash.json`` instead (the error, the rounds
kept, the traceback), and a resume of that folder moves it to ``crashes.jsonl``, the folder's
history of crashes, when it writes its first new row (or its summary). :func:`run_status` reads
what a folder says.

(``run.log``, the console's lines, is appended by :mod:`fedsim.records.progress` once the folder is
claimed here.)

What a run folder promises, whatever happens to the process:

* one writer: a run (or a resume) holds an exclusive lock on its folder for as long as it
  writes; a second process is refused in one line. Claiming a new folder happens under that
  lock, so two runs started on one folder cannot both think it is theirs;
* never reused: starting a run in a folder that already holds ``metrics.jsonl`` is refused;
* nothing lost: rows are appended as they come and made durable (fsync) before every checkpoint
  that counts them, so a resumed run never has a gap; every other file is written to a
  temporary file and renamed over the old one, so a file is always a whole version;
* nothing removed early: a resume rewrites the rows past its checkpoint only when it writes its
  first new row, and replaces ``summary.json`` and ``client_eval.jsonl`` only with new, complete
  versions (a resume that fails to start leaves the folder as it was);
* the user's umask: every file gets the mode a plain ``open`` would give it.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import sys
import tempfile
import traceback
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from omegaconf import DictConfig, OmegaConf

from fedsim.errors import ConfigError
from fedsim.records.progress import RUN_LOG

if TYPE_CHECKING:
    from fedsim.records.tracking import Tracker

__all__ = [
    "CHOICES_FILE",
    "RunWriter",
    "check_folder_free",
    "CONFIG_FILE",
    "METRICS_FILE",
    "SUMMARY_FILE",
    "CRASH_FILE",
    "CRASHES_FILE",
    "FINAL_STATUSES",
    "run_status",
    "CLIENTS_FILE",
    "CLIENT_EVAL_FILE",
    "read_jsonl",
    "read_metrics",
    "atomic_write_text",
    "apply_umask",
]

CONFIG_FILE = "config.yaml"
# Each config group's chosen option and the overrides of the command (fedsim.config.provenance)
CHOICES_FILE = "choices.yaml"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
CRASH_FILE = "crash.json"  # the exception that ended the run's last attempt
CRASHES_FILE = "crashes.jsonl"  # earlier attempts' crash records, moved here by a resume
#: Statuses after which a run has nothing left to do: the only runs a comparison counts.
#: (failed, interrupted and crashed runs resume; a folder without a status is running or killed)
FINAL_STATUSES = ("completed", "diverged")
CLIENTS_FILE = "clients.jsonl"  # one row per client-round: device, outcome, latency, bytes
CLIENT_EVAL_FILE = "client_eval.jsonl"  # one row per client: the final model on its local data


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN/inf; a diverged value is recorded as null
    return value


def apply_umask(path: Path | str) -> None:
    """Give ``path`` the mode ``open`` would have: 0666 less the umask (mkstemp makes 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file in the same folder and a rename."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        apply_umask(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class RunWriter:
    """Writes one run folder, holding its lock from :meth:`start` / :meth:`reopen` to :meth:`close`.

    Parameters
    ----------
    run_dir
        The run's folder (created if missing). It must not already hold a run.
    tracker
        The run's ``logger`` (:mod:`fedsim.records.tracking`): it gets every ``metrics.jsonl``
        row and the summary as they are written here, once :meth:`track` has opened it.

    """

    def __init__(self, run_dir: Path | str, tracker: Tracker | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.tracker = tracker
        self._tracking = False  # track() opened the tracker; close() ends it if finish() did not
        self._lock_fd: int | None = None
        self._resumed_after: int | None = None  # rows past this round go at the first new row
        self._last_round = 0  # the round of the last metrics row written (for a crash record)
        self._finished = False  # finish() wrote the summary: a later error is not the run's

    def _lock(self, key: str = "hydra.run.dir") -> None:
        """Take the folder's exclusive lock (``flock`` on the folder itself: no file to leave).

        ``key``: what a refusal names (the option that named the folder).
        """
        if self._lock_fd is not None:
            return  # this writer holds it already (a run that reopens its own folder)
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise ConfigError(key, self.run_dir, "must be a folder, not a file")
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.run_dir, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as exc:
            raise ConfigError(
                key, self.run_dir, f"cannot be created or opened ({exc.strerror})"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ConfigError(
                key,
                self.run_dir,
                "is being written by another fedsim process; wait for it to end",
            ) from None
        if not os.access(self.run_dir, os.W_OK):
            os.close(fd)
            raise ConfigError(key, self.run_dir, "must be a folder you can write to")
        self._lock_fd = fd

    def _check_new(self) -> None:
        if (self.run_dir / METRICS_FILE).exists():
            raise ConfigError(
                "hydra.run.dir",
                self.run_dir,
                "must be a new folder: it already holds a run, which is never overwritten",
            )

    def close(self) -> None:
        """End the tracked run if it is still open, release the folder's lock (exit does too)."""
        if self._tracking and self.tracker is not None:
            self._tracking = False
            try:
                self.tracker.close()
            except Exception as exc:  # noqa: BLE001 - the run's own error, if any, comes first
                print(f"[fedsim] the tracker could not end its run: {exc}", file=sys.stderr)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def start(self, cfg: DictConfig, made_by: Mapping[str, Any] | None = None) -> None:
        """Claim the folder and save the resolved config (and ``choices.yaml``: what made it)."""
        self._lock()
        try:
            self._check_new()
        except ConfigError:
            self.close()
            raise
        atomic_write_text(self.run_dir / CONFIG_FILE, OmegaConf.to_yaml(cfg, resolve=True))
        if made_by is not None:
            atomic_write_text(self.run_dir / CHOICES_FILE, yaml.safe_dump(dict(made_by)))
        (self.run_dir / METRICS_FILE).touch()

    def track(self, cfg: DictConfig, resumed_after: int | None = None) -> None:
        """Open the tracker once the folder is claimed: the resolved config as its parameters."""
        if self.tracker is None:
            return
        config = OmegaConf.to_container(cfg, resolve=True)
        assert isinstance(config, dict)  # a DictConfig's container is a dict
        self.tracker.start({str(k): v for k, v in config.items()}, self.run_dir, resumed_after)
        self._tracking = True

    def reopen(self, server_round: int) -> None:
        """Continue a run from its checkpoint after ``server_round``.

        Rows of later rounds (written after the checkpoint, before the run died) are dropped
        when the first new row is written: the resumed run computes them again, identically.
        """
        self._lock()
        self._resumed_after = server_round
        self._last_round = server_round

    def _drop_rows_past_checkpoint(self) -> None:
        server_round, self._resumed_after = self._resumed_after, None
        self._archive_crash()  # this attempt goes on: the last one's crash becomes history
        for name in (METRICS_FILE, CLIENTS_FILE):
            path = self.run_dir / name
            if path.exists():
                kept = [
                    line
                    for line in path.read_text().splitlines()
                    if line.strip() and _row_round(line) <= server_round  # type: ignore[operator]
                ]
                atomic_write_text(path, "".join(f"{line}\n" for line in kept))

    def write_rows(self, rows: Iterable[Mapping[str, Any]], file: str) -> None:
        """Write ``file`` as JSON lines, one per row, atomically (replacing any earlier one)."""
        lines = [json.dumps({k: _jsonable(v) for k, v in row.items()}) + "\n" for row in rows]
        atomic_write_text(self.run_dir / file, "".join(lines))

    def log_row(self, row: Mapping[str, Any], file: str = METRICS_FILE) -> None:
        """Append one JSON row to ``file`` (durable at the next :meth:`sync`)."""
        if self._resumed_after is not None:
            self._drop_rows_past_checkpoint()
        line = json.dumps({k: _jsonable(v) for k, v in row.items()})
        with open(self.run_dir / file, "a") as handle:
            handle.write(line + "\n")
        if file == METRICS_FILE and isinstance(row.get("round"), int):
            self._last_round = max(self._last_round, row["round"])
        if self._tracking and file == METRICS_FILE:
            self.tracker.log_row(row)  # type: ignore[union-attr]  # _tracking: a tracker is set

    def sync(self) -> None:
        """Make every row appended so far durable: called before a checkpoint that counts them."""
        for name in (METRICS_FILE, CLIENTS_FILE):
            path = self.run_dir / name
            if path.exists():
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)

    def finish(self, summary: Mapping[str, Any]) -> None:
        """Write ``summary.json`` atomically."""
        text = json.dumps({k: _jsonable(v) for k, v in summary.items()}, indent=2)
        self._archive_crash()  # a resume that wrote no new row (the crash came after the last)
        atomic_write_text(self.run_dir / SUMMARY_FILE, text + "\n")
        self._finished = True
        if self._tracking:
            self._tracking = False
            self.tracker.finish(summary, self.run_dir)  # type: ignore[union-attr]

    def crashed(self, error: BaseException, checkpoint_round: int | None) -> dict[str, Any] | None:
        """Record the exception that ended the run: ``crash.json``, the traceback in ``run.log``.

        Returns the record, or None when the run had already written its summary (an error
        after that, in a tracker's upload say, is not the run's outcome). ``checkpoint_round``:
        the round a resume would continue after (None: no checkpoint).
        """
        if self._finished or self._lock_fd is None:
            return None
        trace = "".join(traceback.format_exception(error))
        message = " ".join(str(error).split())
        record = {
            "status": "crashed",
            "error": f"{type(error).__name__}: {message}" if message else type(error).__name__,
            "last_round": self._last_round,  # rows up to this round are in metrics.jsonl
            "checkpoint_round": checkpoint_round,
            "time": datetime.now(UTC).isoformat(timespec="seconds"),
            "traceback": trace,
        }
        self._archive_crash()  # a resume that crashed before its first row: keep the last one
        atomic_write_text(self.run_dir / CRASH_FILE, json.dumps(record, indent=2) + "\n")
        log = self.run_dir / RUN_LOG
        if log.is_file():
            with open(log, "a") as handle:
                handle.write(trace)
        if self._tracking:  # the tracked run ends as the folder does: crashed, with its files
            self._tracking = False
            ending = {"status": "crashed", "error": record["error"]}  # the rest: crash.json
            try:
                self.tracker.finish(ending, self.run_dir)  # type: ignore[union-attr]
            except Exception as exc:  # noqa: BLE001 - the run's own error comes first
                print(f"[fedsim] the tracker could not record the crash: {exc}", file=sys.stderr)
                self.tracker.close()  # type: ignore[union-attr]
        return record

    def _archive_crash(self) -> None:
        """Move ``crash.json`` to the end of ``crashes.jsonl`` (appended before it is removed)."""
        path = self.run_dir / CRASH_FILE
        if not path.is_file():
            return
        text = path.read_text(errors="replace")
        try:
            line = json.dumps(json.loads(text))
        except ValueError:  # damaged by hand or by a disk: kept as text, never a reason to stop
            line = json.dumps({"status": "crashed", "unreadable": text[:4000]})
        with open(self.run_dir / CRASHES_FILE, "a") as handle:
            handle.write(line + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        path.unlink()


def run_status(run_dir: Path | str) -> str | None:
    """How a run folder says its run ended; None while it runs, or after it was killed.

    ``crashed`` (``crash.json``), else ``summary.json``'s status (completed, diverged, failed,
    interrupted).

    Only :data:`FINAL_STATUSES` mean the run has nothing left to do; every other run resumes.
    An unreadable summary counts as none; one without a status is ``completed`` (fedsim's first
    version wrote the summary only after the last round, and no status).
    """
    path = Path(run_dir)
    if (path / CRASH_FILE).is_file():
        return "crashed"
    try:
        status = json.loads((path / SUMMARY_FILE).read_text()).get("status", "completed")
    except (OSError, ValueError, AttributeError):
        return None
    return str(status)


def check_folder_free(run_dir: Path | str, resume: bool, key: str = "hydra.run.dir") -> None:
    """Refuse before the engine starts what :class:`RunWriter` would refuse when it claims.

    In ``run_dir``: a file, a folder another fedsim process is writing, a folder that holds a run
    (for a new run). Nothing is created or kept: the claim comes later, and refuses whatever
    changed meanwhile.
    """
    path = Path(run_dir)
    if not path.exists():
        return
    probe = RunWriter(path)
    probe._lock(key)  # noqa: SLF001 - the writer's own rules, asked early
    try:
        if not resume:
            probe._check_new()  # noqa: SLF001
    finally:
        probe.close()


def _row_round(line: str) -> float:
    """The round of a JSON row; a torn last line (the run died mid-write) counts as later."""
    try:
        return float(json.loads(line).get("round", 0))
    except json.JSONDecodeError:
        return math.inf


def read_jsonl(path: Path | str) -> list[dict[str, Any]]:
    """The rows of a JSON-lines file fedsim wrote: the one reader of ``metrics.jsonl`` & co.

    A truncated last line (a run killed mid-write) is dropped; a bad line before it is a
    one-line :class:`ConfigError` naming the file and the line.
    """
    path = Path(path)
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    rows: list[dict[str, Any]] = []
    for number, line in enumerate(lines, start=1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            if number == len(lines):
                break
            raise ConfigError(f"{path}:{number}", line[:40], f"is not JSON ({err.msg})") from err
    return rows


def read_metrics(run_dir: Path | str, file: str = METRICS_FILE) -> list[dict[str, Any]]:
    """The rows of a run's JSON-lines file (:func:`read_jsonl`)."""
    return read_jsonl(Path(run_dir) / file)
