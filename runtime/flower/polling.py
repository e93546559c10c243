"""Shorter waits in Flower's fixed polling loops (deployment only).

Flower 1.41 polls with fixed sleeps: the SuperNode waits 3 s whenever the
SuperLink has no message for it (``flwr/supernode/start_client_internal.py``), and
the ServerApp waits 3 s between asks for replies (``Grid.send_and_receive`` in
``flwr/superlink/grid/http_grid.py``). A SecAgg+ round is five message exchanges,
so each of those sleeps can cost a round up to 15 s. ``cap_polling`` replaces
the ``time`` module that such a Flower module sees by one whose ``sleep`` waits
at most ``cap`` seconds; everything else is the real ``time``.
"""

from __future__ import annotations

import os
import time
from types import ModuleType
from typing import Any


class CappedSleep:
    """The ``time`` module, except that ``sleep`` waits at most ``cap`` seconds.

    With ``short_cap``, sleeps of under a second (Flower's waits on its own process's
    state, not on the network) wait at most ``short_cap`` seconds instead.
    """

    def __init__(self, cap: float, short_cap: float | None = None) -> None:
        self.cap = cap
        self.short_cap = short_cap

    def sleep(self, seconds: float) -> None:
        cap = self.short_cap if self.short_cap is not None and seconds < 1 else self.cap
        time.sleep(min(seconds, cap))

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def cap_polling(module: ModuleType, cap: float, short_cap: float | None = None) -> None:
    """Make ``module``'s ``time.sleep`` calls wait at most ``cap`` seconds (see ``CappedSleep``)."""
    if getattr(module, "time", None) is not time:
        raise RuntimeError(f"{module.__name__} no longer uses the time module as expected; remove this patch")
    module.time = CappedSleep(cap, short_cap)  # type: ignore[attr-defined]


def poll_seconds(variable: str, default: float) -> float:
    """A poll interval from the environment, checked: seconds in [0.05, 3]."""
    raw = os.environ.get(variable, str(default))
    try:
        cap = float(raw)
    except ValueError:
        cap = -1.0
    if not 0.05 <= cap <= 3:
        raise SystemExit(f"{variable} must be a number of seconds in [0.05, 3]. Found {raw!r}.")
    return cap


def cap_grid_polling() -> None:
    """The ServerApp's wait between asks for replies, at most ``FEDSILO_SERVERAPP_POLL_S`` (0.2 s)."""
    # Imported here: the SuperNode imports this module too and never needs the ServerApp's grid.
    import flwr.superlink.grid.http_grid as http_grid

    if not isinstance(http_grid.time, CappedSleep):  # once per process
        cap_polling(http_grid, poll_seconds("FEDSILO_SERVERAPP_POLL_S", 0.2))
