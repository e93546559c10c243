"""Fit and evaluate stages that wait at most the run's timeout for replies (Flower's wait for ever)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from typing import Any

from fedsilo.runtime.flower.workflow import ReplyTimeoutGrid


class SilentGrid:
    """A grid whose institutions never reply: it returns what came within the caller's timeout (nothing)."""

    def __init__(self) -> None:
        self.timeouts: list[float | None] = []

    def send_and_receive(self, messages: Iterable[Any], *, timeout: float | None = None) -> list[Any]:
        list(messages)
        self.timeouts.append(timeout)
        if timeout is None:
            threading.Event().wait()  # for ever, as Flower's grid waits for a reply that never comes
        time.sleep(timeout or 0)
        return []

    def get_node_ids(self) -> list[int]:
        return [1, 2, 3]


def test_a_stage_without_a_limit_waits_the_runs_timeout_and_one_with_a_limit_keeps_it() -> None:
    # Flower's default fit and evaluate stages call send_and_receive without a timeout: through
    # ResumableWorkflow's grid (reply_timeout = the run's secagg-timeout) they end after it.
    grid = SilentGrid()
    timed = ReplyTimeoutGrid(grid, 0.05)  # type: ignore[arg-type]
    assert list(timed.send_and_receive([])) == []
    assert list(timed.send_and_receive([], timeout=0.01)) == []
    assert grid.timeouts == [0.05, 0.01]
    assert timed.get_node_ids() == [1, 2, 3]  # everything else is the grid's
