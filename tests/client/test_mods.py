"""SecAgg+ at the institution: every stage is checked against its policy before Flower's mod sees it."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, Metadata, RecordDict
from flwr.app.message_type import MessageType
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.compat.common import recorddict_compat as compat

from fedsilo.client import mods
from fedsilo.client.mods import SecAggRefused, secure_aggregation_mod

DEPLOYED = {"data-path": "bank.csv", "max-epsilon": 3.0}  # a deployed institution's policy: the defaults
NODES = (11, 22, 33)


def setup(sample: int = 3, shares: int = 3, threshold: int = 2) -> dict[str, Any]:
    return {
        Key.STAGE: Stage.SETUP,
        Key.SAMPLE_NUMBER: sample,
        Key.SHARE_NUMBER: shares,
        Key.THRESHOLD: threshold,
        Key.CLIPPING_RANGE: 8.0,
        Key.TARGET_RANGE: 1 << 22,
        Key.MOD_RANGE: 1 << 32,
        Key.MAX_WEIGHT: 1000.0,
    }


class Institution:
    """One node's ClientApp side: its context state and the real mod."""

    def __init__(self, node_id: int, node_config: dict[str, Any] | None = None) -> None:
        self.node_id = node_id
        self.context = Context(1, node_id, dict(node_config or DEPLOYED), RecordDict(), {})
        self.trained = 0

    def train(self, msg: Message, ctx: Context) -> Message:
        self.trained += 1
        fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters([np.full(3, 0.5)]), 100, {})
        return Message(compat.fitres_to_recorddict(fitres, keep_input=True), reply_to=msg)

    def send(self, configs: dict[str, Any]) -> dict[str, Any]:
        content = RecordDict({RECORD_KEY_CONFIGS: ConfigRecord(configs)})
        meta = Metadata(1, "m", 0, self.node_id, "", "1", time.time(), 600.0, MessageType.TRAIN)
        msg = Message(content=content, metadata=meta)
        reply = secure_aggregation_mod(msg, self.context, self.train)
        return dict(reply.content.config_records[RECORD_KEY_CONFIGS])


def run_until_unmask(nodes: list[Institution]) -> None:
    """An honest coordinator's first three stages for ``nodes`` (every node every other's neighbour)."""
    keys = {n.node_id: n.send(setup(sample=len(nodes), shares=len(nodes), threshold=2)) for n in nodes}
    table = {str(i): [k[Key.PUBLIC_KEY_1], k[Key.PUBLIC_KEY_2]] for i, k in keys.items()}
    inbox: dict[int, list[tuple[int, bytes]]] = {n.node_id: [] for n in nodes}
    for n in nodes:
        out = n.send({Key.STAGE: Stage.SHARE_KEYS, **table})
        for dst, ctxt in zip(out[Key.DESTINATION_LIST], out[Key.CIPHERTEXT_LIST], strict=True):
            inbox[dst].append((n.node_id, ctxt))
    for n in nodes:
        srcs = [s for s, _ in inbox[n.node_id]]
        n.send(
            {
                Key.STAGE: Stage.COLLECT_MASKED_VECTORS,
                Key.SOURCE_LIST: srcs,
                Key.CIPHERTEXT_LIST: [c for _, c in inbox[n.node_id]],
            }
        )


def unmask(active: list[int], dropped: list[int]) -> dict[str, Any]:
    return {Key.STAGE: Stage.UNMASK, Key.ACTIVE_NODE_ID_LIST: active, Key.DEAD_NODE_ID_LIST: dropped}


def test_the_stage_names_are_flowers() -> None:
    stages = (mods.SETUP, mods.SHARE_KEYS, mods.COLLECT_MASKED_VECTORS, mods.UNMASK)
    assert stages == (Stage.SETUP, Stage.SHARE_KEYS, Stage.COLLECT_MASKED_VECTORS, Stage.UNMASK)


def test_an_honest_round_of_three_passes_every_check() -> None:
    nodes = [Institution(i) for i in NODES]
    run_until_unmask(nodes)
    out = nodes[0].send(unmask(list(NODES), []))
    assert sorted(out[Key.NODE_ID_LIST]) == sorted(NODES) and all(n.trained == 1 for n in nodes)


@pytest.mark.parametrize(
    ("sample", "shares", "threshold", "reason"),
    [
        (3, 3, 1, "min-secagg-threshold 2"),  # one share rebuilds the secret: its own is enough
        (1, 1, 1, "min-secagg-threshold 2"),
        (5, 5, 2, "min-secagg-threshold-fraction 0.51"),  # 2 of 5 shares: not a majority
    ],
)
def test_a_setup_that_breaks_the_policy_is_refused(sample: int, shares: int, threshold: int, reason: str) -> None:
    node = Institution(NODES[0])
    with pytest.raises(SecAggRefused, match=reason):
        node.send(setup(sample=sample, shares=shares, threshold=threshold))
    assert node.trained == 0


def test_a_neighbour_list_of_itself_alone_is_refused_even_in_a_simulation() -> None:
    # The attack of issue 13: threshold 1 and itself as its only neighbour would let the
    # coordinator rebuild the institution's mask from its own share and read its update.
    node = Institution(NODES[0], {"partition-id": 0, "num-partitions": 3})  # no policy limits at all
    keys = node.send(setup(threshold=1))
    alone = {Key.STAGE: Stage.SHARE_KEYS, str(node.node_id): [keys[Key.PUBLIC_KEY_1], keys[Key.PUBLIC_KEY_2]]}
    with pytest.raises(SecAggRefused, match="no other institution"):
        node.send(alone)
    with pytest.raises(SecAggRefused, match="after 'refused'"):  # the rest of the round is refused too
        node.send({Key.STAGE: Stage.COLLECT_MASKED_VECTORS, Key.SOURCE_LIST: [], Key.CIPHERTEXT_LIST: []})
    assert node.trained == 0


def test_a_deployed_institution_refuses_threshold_one_and_itself_alone_at_setup() -> None:
    node = Institution(NODES[0])  # deployed: the policy's defaults refuse threshold 1 at once
    with pytest.raises(SecAggRefused, match="min-secagg-threshold 2"):
        node.send(setup(sample=1, shares=1, threshold=1))
    assert node.trained == 0


def test_a_round_of_two_is_refused_by_a_deployed_institution_at_every_stage() -> None:
    # The attack of issue 13 item 3: the coordinator samples the institution with one node of its
    # own (threshold 2 of 2 shares, which the threshold checks accept) and subtracts its own update.
    node = Institution(NODES[0])  # deployed: min-round-size 3
    with pytest.raises(SecAggRefused, match="a round of 2 institutions is below the policy's min-round-size 3"):
        node.send(setup(sample=2, shares=2, threshold=2))
    assert node.trained == 0
    # A setup of three that shrinks to two neighbours after it is refused at the next stage.
    node = Institution(NODES[0])
    keys = {i: Institution(i).send(setup()) for i in NODES[1:2]}
    mine = node.send(setup())
    table = {str(i): [k[Key.PUBLIC_KEY_1], k[Key.PUBLIC_KEY_2]] for i, k in {NODES[0]: mine, **keys}.items()}
    with pytest.raises(SecAggRefused, match="2 neighbours, below the policy's min-round-size 3"):
        node.send({Key.STAGE: Stage.SHARE_KEYS, **table})
    assert node.trained == 0


def test_an_institution_that_accepts_rounds_of_two_takes_part_in_one() -> None:
    nodes = [Institution(i, {**DEPLOYED, "min-round-size": 2}) for i in NODES[:2]]
    run_until_unmask(nodes)
    out = nodes[0].send(unmask(list(NODES[:2]), []))
    assert sorted(out[Key.NODE_ID_LIST]) == sorted(NODES[:2]) and all(n.trained == 1 for n in nodes)


@pytest.mark.parametrize(
    ("active", "dropped", "reason"),
    [
        ([11, 22, 33], [33], r"nodes \[33\] are listed both active and dropped"),
        ([11, 22, 22, 33], [], r"nodes \[22\] are listed more than once"),
        ([22, 33], [11], "its own node 11 is not listed active"),
        ([11, 22, 33, 44], [], r"nodes \[44\] are not neighbours"),
    ],
)
def test_an_unmask_request_that_would_give_out_both_secrets_is_refused(
    active: list[int], dropped: list[int], reason: str
) -> None:
    nodes = [Institution(i) for i in NODES]
    run_until_unmask(nodes)
    with pytest.raises(SecAggRefused, match=reason):
        nodes[0].send(unmask(active, dropped))


def test_shares_are_given_out_once_per_setup() -> None:
    nodes = [Institution(i) for i in NODES]
    run_until_unmask(nodes)
    nodes[0].send(unmask(list(NODES), []))
    with pytest.raises(SecAggRefused, match="already given out"):
        nodes[0].send(unmask([11, 22], [33]))
