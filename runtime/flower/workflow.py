"""Flower's default workflow, able to start at a later round (to resume a stopped run).

``ResumableWorkflow.__call__`` is a copy of Flower 1.41's ``DefaultWorkflow.__call__``
(``flwr/server/workflow/default_workflows.py``) with four changes: the rounds run
from ``first_round``, the end-of-run summary log is left out (fedsilo's report says
it), the client-manager thread is stopped even when a round raises, and with
``reply_timeout`` the fit and evaluate stages wait at most that long for replies
(Flower's default ones wait for ever: one institution that never answers an
evaluation, say a SuperNode that lost the message, would hang the run).
``FLOWER_CALL_SHA256`` is the hash of the source it was copied from; the tripwire
test fails when Flower's changes, so that the copy is reviewed against it.
"""

from __future__ import annotations

import timeit
from collections.abc import Iterable
from logging import INFO
from typing import Any, cast

from flwr.app import ConfigRecord, Context
from flwr.common import log
from flwr.server import LegacyContext
from flwr.server.compat.app_utils import start_update_client_manager_thread
from flwr.server.workflow import DefaultWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, Key
from flwr.server.workflow.default_workflows import (
    default_centralized_evaluation_workflow,
    default_init_params_workflow,
)
from flwr.serverapp import Grid

# sha256 of inspect.getsource(flwr.server.workflow.DefaultWorkflow.__call__), flwr 1.41.0.
FLOWER_CALL_SHA256 = "866c7974d30c0149fba1ad10dada0641d8f618d81ed74d5b8cfd8b97fdfc9ffa"


class ResumableWorkflow(DefaultWorkflow):
    """``DefaultWorkflow`` whose rounds run from ``first_round`` to ``num_rounds``.

    The body is Flower 1.41's ``DefaultWorkflow.__call__`` with the round range
    changed, so every round keeps its true number (SecAgg+ and the strategy read it
    from the same config record).
    """

    def __init__(self, fit_workflow: object = None, *, first_round: int = 1, reply_timeout: float = 0.0) -> None:
        super().__init__(fit_workflow=fit_workflow)  # type: ignore[arg-type]
        self.first_round = first_round
        self.reply_timeout = reply_timeout

    def __call__(self, grid: Grid, context: Context) -> None:
        if not isinstance(context, LegacyContext):
            raise TypeError(f"Expect a LegacyContext, but get {type(context).__name__}.")
        thread, f_stop, c_done = start_update_client_manager_thread(grid, context.client_manager)
        c_done.wait()
        log(INFO, "[INIT]")
        default_init_params_workflow(grid, context)
        cfg = ConfigRecord()
        cfg[Key.START_TIME] = timeit.default_timer()
        context.state.config_records[MAIN_CONFIGS_RECORD] = cfg
        timed = cast(Grid, ReplyTimeoutGrid(grid, self.reply_timeout)) if self.reply_timeout > 0 else grid
        try:
            for current_round in range(self.first_round, context.config.num_rounds + 1):
                log(INFO, "")
                log(INFO, "[ROUND %s]", current_round)
                cfg[Key.CURRENT_ROUND] = current_round
                self.fit_workflow(timed, context)
                default_centralized_evaluation_workflow(grid, context)
                self.evaluate_workflow(timed, context)
        finally:
            f_stop.set()
            thread.join()


class ReplyTimeoutGrid:
    """A grid whose ``send_and_receive`` waits at most ``timeout`` seconds where its caller set no limit.

    A reply that has not come by then is missing from the answer, as a SecAgg+ stage's
    dropout is: the round goes on with the replies that came. Everything else is the grid's.
    """

    def __init__(self, grid: Grid, timeout: float) -> None:
        self.grid = grid
        self.timeout = timeout

    def send_and_receive(self, messages: Iterable[Any], *, timeout: float | None = None) -> Iterable[Any]:
        return self.grid.send_and_receive(messages, timeout=self.timeout if timeout is None else timeout)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.grid, name)
