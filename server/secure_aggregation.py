"""SecAgg+ that never unmasks an aggregate of fewer than two institutions' updates.

Flower's ``SecAggPlusWorkflow`` unmasks whatever sum it collected. An
institution that refuses a round (budget, policy) sends a zero-weight update, so
if all but one refuse, the "aggregate" would be that one institution's model.
This workflow stops after collecting the masked vectors in that case: the sum
stays masked and the global model is unchanged for the round.

It also recovers each secret from exactly ``threshold`` of its Shamir shares
(Shamir, CACM 1979). Flower hands PyCryptodome's ``Shamir.combine`` every share
it collected, up to ``num_shares`` of them, while any ``threshold`` shares
determine the same secret and the interpolation costs the square of the number
of shares; with every institution a neighbour (``secagg-num-shares = 1.0``) that
was the coordinator's largest cost (about 10 s a round at 50 institutions). The
coordinator receives the same shares as before and recovers the same secrets:
nothing about what it learns changes.

A node that drops out or refuses before sharing its keys leaves the round to the others
(Flower would halt the round at unmasking; ``share_keys_stage``).

After unmasking it warns in the run log when the aggregate comes near SecAgg+'s
clipping range (``fedsilo.server.aggregation.clipping_warning``): the institutions keep
their weights inside it, which Flower would otherwise clip without a word.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from logging import WARNING
from typing import Any, cast

from flwr.app import Message
from flwr.common import FitRes, log, parameters_to_ndarrays
from flwr.server import LegacyContext
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.serverapp import Grid

from fedsilo.common.aggregation import MIN_CONTRIBUTORS, may_unmask
from fedsilo.runtime.flower.internals import (
    MAIN_CONFIGS_RECORD,
    RECORD_KEY_CONFIGS,
    ClientProxy,
    SecAggKey,
    WorkflowState,
)
from fedsilo.runtime.flower.internals import WorkflowKey as Key
from fedsilo.server.aggregation import clipping_warning

HaltCallback = Callable[[int, list[tuple[ClientProxy, FitRes]], list[Any]], None]


class GuardedSecAggPlusWorkflow(SecAggPlusWorkflow):
    """``SecAggPlusWorkflow`` that halts before unmasking fewer than two contributions.

    A ``num_shares`` count at least as large as a round's sample makes every
    sampled institution a neighbour (as ``num_shares = 1.0`` does); Flower would
    instead ask for more shares than there are neighbours and halt the round.

    Parameters
    ----------
    sample_size
        How many institutions the round about to start will sample.
    on_halt
        Receives a halted round's number, its replies and failures (the model is unchanged).
    warn_clipping
        Whether to warn when the aggregate nears the clipping range (not for distributed DP,
        whose encoded integers fill the range by design).
    **kwargs
        ``SecAggPlusWorkflow``'s arguments (``SecAggSettings.workflow_kwargs``).
    """

    def __init__(
        self, *, sample_size: Callable[[], int], on_halt: HaltCallback, warn_clipping: bool = True, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.sample_size = sample_size
        self.on_halt = on_halt
        self.warn_clipping = warn_clipping

    def setup_stage(self, grid: Grid, context: LegacyContext, state: WorkflowState) -> bool:
        configured = self.num_shares
        if isinstance(configured, int) and configured >= self.sample_size():
            self.num_shares = 1.0
        try:
            return super().setup_stage(grid, context, state)
        finally:
            self.num_shares = configured

    def share_keys_stage(self, grid: Grid, context: LegacyContext, state: WorkflowState) -> bool:
        if not super().share_keys_stage(grid, context, state):
            return False
        # Flower 1.41 keeps every node it sent the setup to in ``sampled_node_ids``, and its
        # unmask stage then asks for the secrets of each one not active by then, also of a node
        # that dropped out (or refused) before sharing its keys: no one holds shares of it, so
        # the round halted ("Not enough shares to recover secret"), and every institution would
        # refuse to reveal secrets of a node that never shared keys with it. From here on the
        # round is the nodes that shared their keys; one that drops out later is recovered as
        # SecAgg+ intends.
        state.sampled_node_ids = set(state.active_node_ids)
        return True

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
        current_round = int(str(context.state.config_records[MAIN_CONFIGS_RECORD][Key.CURRENT_ROUND]))
        self.on_halt(current_round, state.legacy_results, list(state.failures))
        return False

    def unmask_stage(self, grid: Grid, context: LegacyContext, state: WorkflowState) -> bool:
        if not super().unmask_stage(cast(Grid, ThresholdShares(grid, state.threshold)), context, state):
            return False
        if state.legacy_results and self.warn_clipping:  # every reply now carries the aggregate
            warning = clipping_warning(
                parameters_to_ndarrays(state.legacy_results[0][1].parameters),
                (res.num_examples for _, res in state.legacy_results),
                max_weight=self.max_weight,
                clipping_range=self.clipping_range,
            )
            if warning is not None:
                log(WARNING, "%s", warning)
        return True


class ThresholdShares:
    """A grid whose unmask replies carry, in all, at most ``threshold`` shares of each secret.

    Flower's ``unmask_stage`` is the only user: it combines, for every sampled
    institution, the shares the replies carry, and halts when fewer than
    ``threshold`` arrived. Shares past the threshold are dropped in reply order,
    so a secret with enough shares is still recovered and one without still halts.
    """

    def __init__(self, grid: Grid, threshold: int) -> None:
        self.grid = grid
        self.threshold = threshold

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        kept: Counter[int] = Counter()
        for reply in replies:
            if reply.has_error():
                continue
            record = reply.content.config_records[RECORD_KEY_CONFIGS]
            all_owners = cast(list[int], record[SecAggKey.NODE_ID_LIST])
            all_shares = cast(list[bytes], record[SecAggKey.SHARE_LIST])
            owners: list[int] = []
            shares: list[bytes] = []
            for owner, share in zip(all_owners, all_shares, strict=True):
                if kept[owner] < self.threshold:
                    kept[owner] += 1
                    owners.append(owner)
                    shares.append(share)
            record[SecAggKey.NODE_ID_LIST] = owners
            record[SecAggKey.SHARE_LIST] = shares
        return replies

    def __getattr__(self, name: str) -> Any:
        return getattr(self.grid, name)
