"""Guarded SecAgg+: a lone trainer halts the round; unmasking from threshold shares recovers the same secrets."""

from __future__ import annotations

import os
from collections.abc import Iterable
from types import SimpleNamespace
from typing import Any

import pytest
from flwr.app import ConfigRecord
from flwr.common.secure_aggregation.crypto.shamir import combine_shares, create_shares
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsilo.server.secure_aggregation import GuardedSecAggPlusWorkflow, ThresholdShares


class FakeGrid:
    """Answers the unmask request with prepared replies, as Flower's grid would."""

    def __init__(self, replies: list[Any]) -> None:
        self.replies = replies

    def send_and_receive(self, messages: Iterable[Any], *, timeout: float | None = None) -> list[Any]:
        return self.replies

    def get_node_ids(self) -> list[int]:
        return [1, 2]


def reply(owners: list[int], shares: list[bytes], *, error: bool = False) -> Any:
    record = ConfigRecord({Key.NODE_ID_LIST: owners, Key.SHARE_LIST: shares})
    content = SimpleNamespace(config_records={RECORD_KEY_CONFIGS: record})
    return SimpleNamespace(has_error=lambda: error, content=content)


@settings(max_examples=10, deadline=None)
@given(num=st.integers(min_value=3, max_value=9), data=st.data())
def test_trimmed_replies_keep_threshold_shares_that_recover_each_secret(num: int, data: st.DataObject) -> None:
    # Prepare: two owners' secrets, each split into `num` shares, one share per neighbour's reply
    threshold = data.draw(st.integers(min_value=2, max_value=num))
    secrets = {7: os.urandom(32), 8: os.urandom(32)}
    split = {owner: create_shares(secret, threshold, num) for owner, secret in secrets.items()}
    replies = [reply([7, 8], [split[7][i], split[8][i]]) for i in range(num)]
    replies.append(reply([], [], error=True))  # a failed neighbour carries nothing

    # Execute
    kept = list(ThresholdShares(FakeGrid(replies), threshold).send_and_receive([]))  # type: ignore[arg-type]

    # Assert: every reply is still there, each owner's shares are cut to the threshold, and they suffice
    assert len(kept) == num + 1
    collected: dict[int, list[bytes]] = {7: [], 8: []}
    for message in kept[:-1]:
        record = message.content.config_records[RECORD_KEY_CONFIGS]
        for owner, share in zip(record[Key.NODE_ID_LIST], record[Key.SHARE_LIST], strict=True):
            collected[owner].append(share)
    assert {owner: len(shares) for owner, shares in collected.items()} == {7: threshold, 8: threshold}
    assert {owner: combine_shares(shares) for owner, shares in collected.items()} == secrets


def test_too_few_shares_stay_too_few() -> None:
    shares = create_shares(os.urandom(32), 3, 5)
    kept = ThresholdShares(FakeGrid([reply([7], [shares[0]]), reply([7], [shares[1]])]), 3)  # type: ignore[arg-type]
    owners = [m.content.config_records[RECORD_KEY_CONFIGS][Key.NODE_ID_LIST] for m in kept.send_and_receive([])]
    assert owners == [[7], [7]]  # Flower's unmask_stage then halts: fewer than threshold
    assert kept.get_node_ids() == [1, 2]  # everything else is the grid's


def workflow(halted: list[tuple[int, int]], sample: int = 3) -> GuardedSecAggPlusWorkflow:
    return GuardedSecAggPlusWorkflow(
        sample_size=lambda: sample,
        on_halt=lambda rnd, results, failures: halted.append((rnd, len(results))),
        num_shares=5,
        reconstruction_threshold=2,
    )


def round_context(current_round: int) -> Any:
    record = ConfigRecord({WorkflowKey.CURRENT_ROUND: current_round})
    return SimpleNamespace(state=SimpleNamespace(config_records={MAIN_CONFIGS_RECORD: record}))


@pytest.mark.parametrize(("weights", "halts"), [([0, 10, 0], True), ([5, 10, 0], False)])
def test_a_round_with_a_lone_trainer_halts_and_is_handed_to_the_callback(
    monkeypatch: pytest.MonkeyPatch, weights: list[int], halts: bool
) -> None:
    # Prepare: Flower's stage has collected one masked vector per reply
    monkeypatch.setattr(SecAggPlusWorkflow, "collect_masked_vectors_stage", lambda *_: True)
    halted: list[tuple[int, int]] = []
    state = WorkflowState()
    state.legacy_results = [(None, SimpleNamespace(num_examples=w)) for w in weights]  # type: ignore[misc]
    # Execute
    went_on = workflow(halted).collect_masked_vectors_stage(None, round_context(4), state)  # type: ignore[arg-type]
    # Assert
    assert went_on is not halts
    assert halted == ([(4, 3)] if halts else [])


@pytest.mark.parametrize(("sample", "seen"), [(3, 1.0), (9, 5)])
def test_num_shares_covering_the_sample_makes_every_institution_a_neighbour(
    monkeypatch: pytest.MonkeyPatch, sample: int, seen: float
) -> None:
    used: list[float] = []
    monkeypatch.setattr(SecAggPlusWorkflow, "setup_stage", lambda self, *_: used.append(self.num_shares) or True)
    flow = workflow([], sample=sample)
    assert flow.setup_stage(None, None, WorkflowState())  # type: ignore[arg-type]
    assert used == [seen] and flow.num_shares == 5
