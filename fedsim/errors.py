"""The one error type for bad input: it names the key, the bad value and what is accepted.

The command line turns it into a single line on stderr and exit code 2, e.g.::

    fedsim: error: partition.alpha=0: must be a number > 0
"""

from __future__ import annotations

from typing import Any

__all__ = ["ConfigError", "EXIT_BAD_INPUT"]

EXIT_BAD_INPUT = 2


class ConfigError(ValueError):
    """Bad input, reported as ``<key>=<value>: <what is accepted>`` on one line.

    Parameters
    ----------
    key
        Dotted config key (``partition.alpha``) or another name the user typed.
    value
        The value received.
    accepted
        What would have been accepted, phrased to complete "must be ..." or as a sentence.

    """

    def __init__(self, key: str, value: Any, accepted: str) -> None:
        self.key = key
        self.value = value
        self.accepted = accepted
        super().__init__(self.one_line())

    def one_line(self) -> str:
        """The message, guaranteed to be a single line."""
        text = f"{self.key}={self.value!s}: {self.accepted}"
        return " ".join(text.split())
