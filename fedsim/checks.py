"""Argument checks every config reader shares: the predicates and their one-line errors.

YAML and the command line give ``bool`` for ``true`` and ``int`` for ``1``, and ``bool`` is a
subclass of ``int`` in Python, so "is this an integer" needs more than ``isinstance``. Every
class that checks its own arguments (clients, strategies, data, devices, the warm start) asks
here, and a refusal reads the same everywhere: ``<key>=<value>: must be ...``
(:class:`fedsim.errors.ConfigError`).
"""

from __future__ import annotations

import math
from typing import Any

from fedsim.errors import ConfigError

__all__ = ["is_int", "is_number", "require_int", "require_number"]


def is_number(value: Any) -> bool:
    """An int or a float, not a bool (NaN and infinities included: see :func:`require_number`)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def is_int(value: Any, minimum: int = 1, maximum: float = math.inf) -> bool:
    """An int (not a bool) in ``[minimum, maximum]``."""
    return isinstance(value, int) and not isinstance(value, bool) and minimum <= value <= maximum


def require_int(key: str, value: Any, minimum: int, maximum: int | None = None) -> int:
    """``value`` if it is an integer in range, else a ConfigError naming ``key``."""
    if is_int(value, minimum, math.inf if maximum is None else maximum):
        return int(value)
    accepted = f"must be an integer >= {minimum}"
    if maximum is not None:
        accepted += f" and <= {maximum}"
    raise ConfigError(key, value, accepted)


def require_number(
    key: str,
    value: Any,
    *,
    low: float,
    low_inclusive: bool = True,
    high: float | None = None,
    high_inclusive: bool = True,
) -> float:
    """``value`` as a float if it is a finite number in range, else a ConfigError naming ``key``."""
    lo = ">=" if low_inclusive else ">"
    accepted = f"must be a number {lo} {low:g}"
    if high is not None:
        accepted += f" and {'<=' if high_inclusive else '<'} {high:g}"
    if not is_number(value) or not math.isfinite(value):
        raise ConfigError(key, value, accepted)
    ok = value >= low if low_inclusive else value > low
    if high is not None:
        ok = ok and (value <= high if high_inclusive else value < high)
    if not ok:
        raise ConfigError(key, value, accepted)
    return float(value)
