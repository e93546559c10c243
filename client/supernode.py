"""Flower's SuperNode, polling the SuperLink for messages more often than every 3 s.

Flower 1.41's SuperNode sleeps a fixed 3 s whenever it finds no message waiting
(``flwr/supernode/start_client_internal.py``), and a SecAgg+ round sends every
institution five messages one after the other, so a round waits on that sleep
five times. This entry point caps the SuperNode's sleeps at ``POLL_S`` seconds
(``FEDSILO_SUPERNODE_POLL_S``, default 0.5) and otherwise runs Flower's own
``flower-supernode`` unchanged, with the same command-line options.
"""

from __future__ import annotations

import os
import time
from types import ModuleType
from typing import Any

DEFAULT_POLL_S = 0.5


class _CappedSleep:
    """The ``time`` module, except that ``sleep`` waits at most ``cap`` seconds."""

    def __init__(self, cap: float) -> None:
        self.cap = cap

    def sleep(self, seconds: float) -> None:
        time.sleep(min(seconds, self.cap))

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def cap_polling(module: ModuleType, cap: float) -> None:
    """Make ``module``'s ``time.sleep`` calls wait at most ``cap`` seconds."""
    if getattr(module, "time", None) is not time:
        raise RuntimeError(f"{module.__name__} no longer uses the time module as expected; remove this patch")
    module.time = _CappedSleep(cap)  # type: ignore[attr-defined]


def main() -> None:
    """``flower-supernode`` with capped polling."""
    import flwr.supernode.start_client_internal as internal
    from flwr.supernode.cli.flower_supernode import flower_supernode

    raw = os.environ.get("FEDSILO_SUPERNODE_POLL_S", str(DEFAULT_POLL_S))
    try:
        cap = float(raw)
    except ValueError:
        cap = -1.0
    if not 0.05 <= cap <= 3:
        raise SystemExit(f"FEDSILO_SUPERNODE_POLL_S must be a number of seconds in [0.05, 3]. Found {raw!r}.")
    cap_polling(internal, cap)
    flower_supernode()


if __name__ == "__main__":
    main()
