"""SecAgg+ that never unmasks an aggregate of fewer than two institutions' updates.

Flower's ``SecAggPlusWorkflow`` unmasks whatever sum it collected. An
institution that refuses a round (budget, policy) sends a zero-weight update, so
if all but one refuse, the "aggregate" would be that one institution's model.
This workflow stops after collecting the masked vectors in that case: the sum
stays masked and the global model is unchanged for the round.
"""

from __future__ import annotations

from logging import WARNING

from flwr.common.logger import log
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, Key
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState
from flwr.serverapp import Grid

from server.aggregation import MIN_CONTRIBUTORS, may_unmask
from server.strategy import FedsiloStrategy


class GuardedSecAggPlusWorkflow(SecAggPlusWorkflow):
    """``SecAggPlusWorkflow`` that halts before unmasking fewer than two contributions."""

    def collect_masked_vectors_stage(self, grid: Grid, context: LegacyContext, state: WorkflowState) -> bool:
        if not super().collect_masked_vectors_stage(grid, context, state):
            return False
        if may_unmask(res.num_examples for _, res in state.legacy_results):
            return True
        contributors = sum(1 for _, res in state.legacy_results if res.num_examples > 0)
        log(
            WARNING,
            "SecAgg+ halted before unmasking: %s institution(s) trained this round; an aggregate of fewer "
            "than %s would reveal an individual update. The model is unchanged.",
            contributors,
            MIN_CONTRIBUTORS,
        )
        if isinstance(context.strategy, FedsiloStrategy):
            current_round = int(str(context.state.config_records[MAIN_CONFIGS_RECORD][Key.CURRENT_ROUND]))
            context.strategy.book_fit(current_round, state.legacy_results, list(state.failures))
        return False
