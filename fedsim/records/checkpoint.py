"""Checkpoints that resume a run bit for bit: one safetensors file, written atomically.

A checkpoint holds everything the round loop cannot recompute: the global model, the strategy's
state (server momentum, optimizer moments, control variates: any attribute that is an array, a
list or dict of arrays, an ArrayRecord, or a plain scalar), every client's persistent state, the
simulated clock and the running totals. Everything else is a pure function of the config and the
seed (data, partitions, device conditions, sampling, batch order) and is rebuilt. Random draws are
named by (seed, round, client), so no generator state needs saving.

The file is ``checkpoint.safetensors`` in the run folder: tensors in the body, the rest as JSON in
the safetensors header. It is written to a temporary file and renamed over the previous one, and
loaded with ``safetensors`` only (no pickle: loading never executes code). The header keeps a
SHA-256 of every tensor's name, dtype, shape and bytes: a flipped bit in the body is found before
the run resumes, not after it has drifted (a checksum finds corruption; it is no signature).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from safetensors import SafetensorError
from safetensors.numpy import load as load_safetensors
from safetensors.numpy import save_file

from fedsim.errors import ConfigError
from fedsim.records.results import apply_umask

__all__ = [
    "RunState",
    "save_checkpoint",
    "load_checkpoint",
    "read_checkpoint",
    "verify_checkpoint",
    "tensors_digest",
    "CHECKPOINT_FILE",
    "FORMAT",
    "REBUILT",
    "UnsavableState",
]

CHECKPOINT_FILE = "checkpoint.safetensors"
FORMAT = "fedsim-checkpoint/1"
#: Header fields a checkpoint must have, with their JSON types.
_REQUIRED: dict[str, type | tuple[type, ...]] = {
    "format": str,
    "config_hash": str,
    "server_round": int,
    "sim_time_s": (int, float),
    "totals": dict,
    "arrays": dict,
    "strategy": dict,
    "clients": dict,
}
_SCALARS = (bool, int, float, str)


@dataclass
class RunState:
    """The round loop's state after ``server_round`` rounds."""

    server_round: int
    arrays: ArrayRecord
    client_states: dict[int, RecordDict]
    sim_time_s: float
    totals: dict[str, float] = field(default_factory=dict)  # bytes, energy, best accuracy, ...
    # The asynchronous loop's clients in flight, timers and counters
    # (fedsim/rounds/asynchronous.py).
    extra: dict[str, Any] = field(default_factory=dict)


# --- generic (de)serialisation -------------------------------------------------------------------
def _encode(value: Any, prefix: str, tensors: dict[str, np.ndarray]) -> Any:
    """JSON description of ``value``; its arrays go to ``tensors`` under ``prefix``."""
    if value is None or isinstance(value, _SCALARS):
        return {"kind": "scalar", "value": value}
    if isinstance(value, np.ndarray):
        tensors[prefix] = np.ascontiguousarray(value)
        return {"kind": "ndarray"}
    if isinstance(value, ArrayRecord):
        names = list(value.keys())
        for i, name in enumerate(names):
            tensors[f"{prefix}/{i}"] = np.ascontiguousarray(value[name].numpy())
        return {"kind": "arrayrecord", "keys": names}
    if isinstance(value, dict) and all(isinstance(v, np.ndarray) for v in value.values()):
        names = [str(k) for k in value]
        for i, name in enumerate(names):
            tensors[f"{prefix}/{i}"] = np.ascontiguousarray(value[name])
        return {"kind": "ndarray_dict", "keys": names}
    if isinstance(value, list | tuple) and all(isinstance(v, np.ndarray) for v in value):
        for i, array in enumerate(value):
            tensors[f"{prefix}/{i}"] = np.ascontiguousarray(array)
        return {"kind": "ndarray_list", "length": len(value)}
    if isinstance(value, ConfigRecord | MetricRecord):
        return {"kind": type(value).__name__, "items": _plain(dict(value))}
    if isinstance(value, RecordDict):
        return _encode_items("recorddict", list(value.items()), prefix, tensors)
    if isinstance(value, dict) and all(isinstance(k, _SCALARS) for k in value):
        return _encode_items("dict", list(value.items()), prefix, tensors)
    if isinstance(value, list | tuple):
        return _encode_items("list", list(enumerate(value)), prefix, tensors)
    return None  # not state we know how to keep (callables, helpers): rebuilt from the config


def _encode_items(
    kind: str, items: list[tuple[Any, Any]], prefix: str, tensors: dict[str, np.ndarray]
) -> dict[str, Any] | None:
    """A container of state (an async loop's event queue, a scheduler's groups), or None.

    Keys keep their type (a dict keyed by partition id comes back keyed by int). A container
    with anything that is not state (a callable) is not state either: nothing is kept.
    """
    described: list[list[Any]] = []
    added: list[str] = []
    for i, (key, item) in enumerate(items):
        before = set(tensors)
        desc = _encode(item, f"{prefix}/{i}", tensors)
        added.extend(set(tensors) - before)
        if desc is None:
            for name in added:
                del tensors[name]
            return None
        described.append([key, desc])
    return {"kind": kind, "items": described}


def _decode(desc: dict[str, Any], prefix: str, tensors: dict[str, np.ndarray]) -> Any:
    kind = desc["kind"]
    if kind == "scalar":
        return desc["value"]
    if kind == "ndarray":
        return tensors[prefix]
    if kind == "arrayrecord":
        return ArrayRecord({k: Array(tensors[f"{prefix}/{i}"]) for i, k in enumerate(desc["keys"])})
    if kind == "ndarray_dict":
        return {k: tensors[f"{prefix}/{i}"] for i, k in enumerate(desc["keys"])}
    if kind == "ndarray_list":
        return [tensors[f"{prefix}/{i}"] for i in range(desc["length"])]
    if kind in ("ConfigRecord", "MetricRecord"):
        record = ConfigRecord if kind == "ConfigRecord" else MetricRecord
        return record(_unplain(desc["items"]))
    if kind in ("recorddict", "dict", "list"):
        items = [
            (key, _decode(sub, f"{prefix}/{i}", tensors))
            for i, (key, sub) in enumerate(desc["items"])
        ]
        if kind == "list":
            return [item for _, item in items]
        return RecordDict(dict(items)) if kind == "recorddict" else dict(items)
    raise ValueError(f"unknown state kind {kind!r}")


def _plain(value: Any) -> Any:
    """JSON-safe copy (bytes as base64)."""
    if isinstance(value, bytes):
        return {"__bytes__": base64.b64encode(value).decode()}
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _unplain(value: Any) -> Any:
    if isinstance(value, dict) and set(value) == {"__bytes__"}:
        return base64.b64decode(value["__bytes__"])
    if isinstance(value, dict):
        return {k: _unplain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_unplain(v) for v in value]
    return value


class UnsavableState(TypeError):
    """State the checkpoint cannot keep: refused, where dropping it would break resume."""


#: The class attribute where a strategy names the attributes it builds again on resume (what
#: ``bind(view)`` sets), which the checkpoint leaves out.
REBUILT = "REBUILT_ON_RESUME"


def _encode_state(value: Any, prefix: str, tensors: dict[str, np.ndarray]) -> Any:
    """``_encode``, refusing what it cannot keep (an asynchronous loop's ``extra``)."""
    desc = _encode(value, prefix, tensors)
    if desc is None:
        raise UnsavableState(f"{prefix} holds state a checkpoint cannot keep: {value!r:.200}")
    return desc


def capture_object_state(obj: object, prefix: str, tensors: dict[str, np.ndarray]) -> dict:
    """The state of ``obj`` (a strategy): every attribute, arrays into ``tensors``.

    Callables (Flower's metric aggregators) and the attributes ``obj`` names in
    ``REBUILT_ON_RESUME`` are built again from the config; any other attribute the checkpoint
    cannot encode raises :class:`UnsavableState` (a resumed run would silently differ).
    """
    rebuilt = frozenset(getattr(type(obj), REBUILT, ()))
    described = {}
    for name, value in vars(obj).items():
        desc = _encode(value, f"{prefix}/{name}", tensors)
        if desc is not None:
            described[name] = desc
        elif not (callable(value) or name in rebuilt):
            raise UnsavableState(
                f"{type(obj).__name__}.{name} is a {type(value).__name__}, which a checkpoint "
                "cannot keep: hold state as arrays, scalars, records or plain containers of "
                f"them, or name the attribute in {type(obj).__name__}.{REBUILT} if the "
                "strategy builds it again on resume"
            )
    return described


def restore_object_state(
    obj: object, described: dict, prefix: str, tensors: dict[str, np.ndarray]
) -> None:
    """Set back the attributes :func:`capture_object_state` saved."""
    for name, desc in described.items():
        setattr(obj, name, _decode(desc, f"{prefix}/{name}", tensors))


# --- the checkpoint file -------------------------------------------------------------------------
def save_checkpoint(
    run_dir: Path | str, state: RunState, strategy: object, config_hash: str
) -> Path:
    """Write ``checkpoint.safetensors`` for ``state`` atomically; return its path."""
    tensors: dict[str, np.ndarray] = {}
    meta: dict[str, Any] = {
        "format": FORMAT,
        "config_hash": config_hash,
        "server_round": state.server_round,
        "sim_time_s": state.sim_time_s,
        "totals": state.totals,
        "arrays": _encode(state.arrays, "global", tensors),
        "strategy": capture_object_state(strategy, "strategy", tensors),
        "extra": _encode_state(state.extra, "extra", tensors),
        "clients": {
            str(pid): {
                name: _encode(record, f"client/{pid}/{name}", tensors)
                for name, record in client.items()
            }
            for pid, client in sorted(state.client_states.items())
        },
    }
    meta["sha256"] = tensors_digest(tensors)
    path = Path(run_dir) / CHECKPOINT_FILE
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"fedsim": json.dumps(meta)})
        apply_umask(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def tensors_digest(tensors: dict[str, np.ndarray]) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        array = np.ascontiguousarray(tensors[name])
        digest.update(f"{name}|{array.dtype.str}|{array.shape}|".encode())
        digest.update(array.data.cast("B"))  # the bytes, as memoryview(array) gives them
    return digest.hexdigest()


def read_checkpoint(run_dir: Path | str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The checked metadata and tensors of a run's checkpoint, or a one-line ConfigError.

    Checked: the file parses, its header has every field of the format with the right type,
    and its tensors match the header's checksum (checkpoints written before the checksum
    existed have none and are taken as they are).
    """
    path = Path(run_dir) / CHECKPOINT_FILE
    if not path.is_file():
        raise ConfigError("resume", run_dir, f"has no {CHECKPOINT_FILE}; nothing to resume")
    try:  # one read: a run writing the folder replaces the file, never changes it in place
        data = path.read_bytes()
        tensors = load_safetensors(data)
        size = int.from_bytes(data[:8], "little")  # the format: u64 header length, JSON header
        header = json.loads(data[8 : 8 + size]).get("__metadata__") or {}
        meta = json.loads(header["fedsim"])
    except (SafetensorError, OSError, KeyError, ValueError, AttributeError) as exc:
        reason = " ".join(str(exc).split())[:120]
        raise ConfigError(
            "resume", path, f"checkpoint is corrupt or unreadable ({reason})"
        ) from None
    if not isinstance(meta, dict):
        raise ConfigError("resume", path, "checkpoint header is not a fedsim header")
    if meta.get("format") != FORMAT:
        raise ConfigError(
            "resume", path, f"checkpoint format {meta.get('format')!r}, expected {FORMAT}"
        )
    for name, kind in _REQUIRED.items():
        if not isinstance(meta.get(name), kind) or isinstance(meta.get(name), bool):
            raise ConfigError("resume", path, f"checkpoint header lacks a valid {name!r}")
    if "sha256" in meta and meta["sha256"] != tensors_digest(tensors):
        raise ConfigError(
            "resume", path, "checkpoint data does not match its checksum: the file is corrupt"
        )
    return meta, tensors


def checkpoint_round(run_dir: Path | str) -> int | None:
    """The round a run's checkpoint was taken after, from its header alone; None if none is read.

    For reports (a crash record), not for resuming: nothing is checked beyond the header.
    """
    try:
        with open(Path(run_dir) / CHECKPOINT_FILE, "rb") as handle:
            size = int.from_bytes(handle.read(8), "little")
            header = json.loads(handle.read(size)).get("__metadata__") or {}
        server_round = json.loads(header["fedsim"])["server_round"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return server_round if isinstance(server_round, int) else None


def verify_checkpoint(run_dir: Path | str, config_hash: str) -> dict[str, Any]:
    """The checkpoint's header once it is known to be intact and of this config (builds nothing)."""
    meta, _ = read_checkpoint(run_dir)
    _check_config(meta, config_hash, Path(run_dir) / CHECKPOINT_FILE)
    return meta


def _check_config(meta: dict[str, Any], config_hash: str, path: Path) -> None:
    if meta["config_hash"] != config_hash:
        raise ConfigError("resume", path, "checkpoint was written by another config of this run")


def load_checkpoint(
    run_dir: Path | str, strategy: object, config_hash: str, like: ArrayRecord | None = None
) -> RunState:
    """Read a run's checkpoint, restore ``strategy``'s state in place, return the loop state.

    ``like`` (the freshly built model's arrays) is what the global model must look like: the
    same names, shapes and dtypes, checked before anything starts.

    Raises
    ------
    ConfigError
        When the file is missing, corrupt, of another format, or of another config.

    """
    path = Path(run_dir) / CHECKPOINT_FILE
    meta, tensors = read_checkpoint(run_dir)
    _check_config(meta, config_hash, path)
    try:
        restore_object_state(strategy, meta["strategy"], "strategy", tensors)
        clients = {
            int(pid): RecordDict(
                {
                    name: _decode(desc, f"client/{pid}/{name}", tensors)
                    for name, desc in records.items()
                }
            )
            for pid, records in meta["clients"].items()
        }
        state = RunState(
            server_round=int(meta["server_round"]),
            arrays=_decode(meta["arrays"], "global", tensors),
            client_states=clients,
            sim_time_s=float(meta["sim_time_s"]),
            totals=dict(meta["totals"]),
            extra=_decode(meta["extra"], "extra", tensors) if meta.get("extra") else {},
        )
        if like is not None:
            _check_like(state.arrays, like, path)
        return state
    except ConfigError:
        raise
    except (KeyError, ValueError, TypeError, AttributeError) as exc:  # a tampered or foreign file
        reason = " ".join(str(exc).split())[:120]
        raise ConfigError(
            "resume", path, f"checkpoint state cannot be decoded ({reason})"
        ) from None


def _check_like(arrays: ArrayRecord, like: ArrayRecord, path: Path) -> None:
    """The checkpoint's global model has the model's tensors: names, shapes and dtypes."""
    if list(arrays.keys()) != list(like.keys()):
        raise ConfigError("resume", path, "checkpoint's model has other tensors than this model")
    for name in like:
        got, want = arrays[name], like[name]
        if tuple(got.shape) != tuple(want.shape) or got.dtype != want.dtype:
            raise ConfigError(
                "resume",
                path,
                f"checkpoint tensor {name} is {got.dtype}{list(got.shape)}, the model's "
                f"{want.dtype}{list(want.shape)}",
            )
