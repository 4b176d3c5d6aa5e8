"""The optional hooks a synchronous strategy may have, declared once.

A strategy is a Flower ``Strategy``; these are what fedsim's run adds to that API. The run checks
for them with ``isinstance`` (structural: a strategy has the method or it has not, nothing to
inherit), so a new strategy finds the hooks here rather than in the run's code. Asynchronous
strategies have their own base class (``fedsim.rounds.asynchronous.AsyncStrategy``).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import nn

from fedsim.clock.server_view import FederationView

__all__ = ["AdaptsToDevices", "ChecksModel"]


@runtime_checkable
class AdaptsToDevices(Protocol):
    """A strategy that decides per device (HeteroFL, WHALE-FL).

    ``bind`` is called once before round 1 (and again on resume) with a read-only view of what
    a real server could know: profiles, what clients reported in earlier rounds, availability at
    check-in (``FederationView``). What ``bind`` sets is listed in the strategy's
    ``REBUILT_ON_RESUME``: it is built again, not checkpointed.
    """

    def bind(self, view: FederationView) -> None:
        """Keep ``view`` for the rounds to come."""


@runtime_checkable
class ChecksModel(Protocol):
    """A strategy that needs something of the model (width slicing needs width axes).

    ``check_model`` is called with the built model before Ray starts, so that a model the
    strategy cannot use is a one-line ``ConfigError`` rather than a failure in round 1.
    """

    def check_model(self, model: nn.Module) -> None:
        """Raise ``fedsim.errors.ConfigError`` if the strategy cannot use ``model``."""
