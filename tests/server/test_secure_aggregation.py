"""SecAgg+ unmasking from exactly threshold shares: the same secrets, fewer shares combined."""

from __future__ import annotations

import os
from collections.abc import Iterable
from types import SimpleNamespace
from typing import Any

from flwr.app import ConfigRecord
from flwr.common.secure_aggregation.crypto.shamir import combine_shares, create_shares
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from hypothesis import given, settings
from hypothesis import strategies as st

from server.secure_aggregation import ThresholdShares


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
