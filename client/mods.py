"""Client mods: SecAgg+ when the coordinator asks for it, checked against the policy, with seeded quantization.

Flower's ``secaggplus_mod`` accepts whatever the coordinator's setup says (a
threshold of 1, a sample of 1, a neighbour list of the institution alone, a
node both active and dropped at unmasking). ``check_secagg_stage`` checks every
stage's message against the institution's policy and what earlier stages of the
round said, before Flower's mod sees it; a refused stage raises
``SecAggRefused`` (the coordinator gets an error reply, and the round goes on
without this institution, or halts).
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, NoReturn

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MessageType
from flwr.client.mod import secaggplus_mod

from fedsilo.client.policy import PrivacyPolicy, deployed_policy
from fedsilo.common.errors import FedsiloError
from fedsilo.common.settings import Proposal
from fedsilo.runtime.flower.internals import RECORD_KEY_CONFIGS, ClientAppCallable
from fedsilo.runtime.flower.internals import SecAggKey as Key

FIT_CONFIG = "fitins.config"
# True while a message is handled by Flower's secaggplus_mod: the update that leaves is
# masked. The institution's policy reads it to refuse training for a plain-FedAvg round.
UNDER_SECURE_AGGREGATION: ContextVar[bool] = ContextVar("under_secure_aggregation", default=False)


def secure_aggregation_mod(msg: Message, ctx: Context, call_next: ClientAppCallable) -> Message:
    """Run Flower's ``secaggplus_mod`` on SecAgg+ messages, each checked first; pass plain FedAvg through.

    SecAgg+'s stochastic quantization draws from numpy's global generator. When the
    message carries the run's training config, that generator is seeded from the
    run seed, the round and the institution, so the same seed gives the same model; the
    masks themselves come from fresh key agreement and are never seeded.
    """
    if msg.metadata.message_type != MessageType.TRAIN or RECORD_KEY_CONFIGS not in msg.content.config_records:
        return call_next(msg, ctx)
    guard_secagg_message(msg, ctx)
    token = UNDER_SECURE_AGGREGATION.set(True)
    try:
        fit_config = msg.content.config_records.get(FIT_CONFIG)
        if fit_config is None or "seed" not in fit_config:
            return secaggplus_mod(msg, ctx, call_next)
        if str(fit_config.get("dp-mode", "")) == "distributed":
            saved = ctx.state.config_records.get(GUARD_STATE)
            if problems := distributed_setup_problems(dict(saved or {}), Proposal.from_config(dict(fit_config))):
                logging.getLogger(__name__).warning("%s", "; ".join(problems))
                raise SecAggRefused("the institution refused the distributed-DP round: " + "; ".join(problems))
        who = str(ctx.node_config.get("name", ctx.node_config.get("partition-id", "")))
        seed = quantization_seed(int(str(fit_config["seed"])), int(str(fit_config.get("server-round", 0))), who)
        with seeded_global_numpy(seed):
            return secaggplus_mod(msg, ctx, call_next)
    finally:
        UNDER_SECURE_AGGREGATION.reset(token)


def distributed_setup_problems(guard: Mapping[str, Any], proposal: Proposal) -> list[str]:
    """Why a SecAgg+ setup cannot carry this institution's distributed-DP integers unchanged (empty: it can).

    Its encoding assumed the proposal's clipping range, quantization range and maximum
    weight; a setup with others would quantize each institution's value through a
    non-linear function of it (clipped, rescaled), so the sum would reveal more than the
    sum of signal and noise. The modulus must exceed every contribution's range times
    the sample (nothing wraps).
    """
    secagg = proposal.secagg
    expected = {
        Key.CLIPPING_RANGE: secagg.clipping_range,
        Key.TARGET_RANGE: secagg.quantization_range,
        Key.MAX_WEIGHT: secagg.max_weight,
    }
    problems = [
        f"the SecAgg+ setup's {key} is {guard.get(key)!r}, not the proposal's {value!r}"
        for key, value in expected.items()
        if guard.get(key) is None or float(guard[key]) != float(value)
    ]
    modulus, sample = guard.get(Key.MOD_RANGE), int(guard.get("sample", 0) or 0)
    if modulus is None or float(modulus) <= sample * float(secagg.quantization_range):
        problems.append(
            f"the SecAgg+ modulus {modulus!r} does not exceed {sample} x {secagg.quantization_range} "
            "(the sum of the round's contributions would wrap)"
        )
    return problems


def quantization_seed(run_seed: int, server_round: int, who: str) -> int:
    """The seed of an institution's SecAgg+ stochastic quantization in one round.

    ``who`` is the node's ``name``, else its simulation ``partition-id`` (as text).
    The in-process engine (``simulations/inprocess.py``) seeds the same way.
    """
    entropy = [run_seed, server_round, zlib.crc32(who.encode())]
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])


@contextmanager
def seeded_global_numpy(seed: int) -> Iterator[None]:
    """Seed numpy's global generator (Flower's quantizer draws from it); restore it afterwards."""
    saved = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(saved)


# Flower's SecAgg+ stage names (``secaggplus_constants.Stage``; tests/client/test_mods.py checks them).
SETUP, SHARE_KEYS, COLLECT_MASKED_VECTORS, UNMASK = "setup", "share_keys", "collect_masked_vectors", "unmask"
GUARD_STATE = "fedsilo_secagg_guard"  # what earlier stages of this round said, in the node's context state
_PREVIOUS = {SHARE_KEYS: SETUP, COLLECT_MASKED_VECTORS: SHARE_KEYS, UNMASK: COLLECT_MASKED_VECTORS}


class SecAggRefused(FedsiloError):
    """The institution refused a SecAgg+ stage: it breaks the policy or contradicts the round so far."""


def institution_policy(node_config: Mapping[str, Any]) -> PrivacyPolicy:
    """The policy SecAgg+ messages are checked against: a deployed institution's, else the defaults.

    A simulated institution's policy file is named by the run config, which a SecAgg+
    message does not carry; simulations get the structural checks and the default limits.
    """
    if "data-path" in node_config:
        return deployed_policy(node_config)
    return PrivacyPolicy(source="simulation")


def secure_round(ctx: Context) -> tuple[int, int] | None:
    """The checked SecAgg+ setup of the round this node is in: (sampled institutions, threshold); None: none."""
    saved = ctx.state.config_records.get(GUARD_STATE)
    if saved is None or "sample" not in saved or saved.get("stage") == "refused":
        return None
    return int(str(saved["sample"])), int(str(saved["threshold"]))


def guard_secagg_message(msg: Message, ctx: Context) -> None:
    """Check a SecAgg+ message (``check_secagg_stage``); remember the round; raise ``SecAggRefused`` if refused."""
    configs = dict(msg.content.config_records[RECORD_KEY_CONFIGS])
    saved = ctx.state.config_records.get(GUARD_STATE)
    guard = dict(saved) if saved is not None else {}
    policy = institution_policy(ctx.node_config)
    try:
        guard = check_secagg_stage(configs, guard, node_id=msg.metadata.dst_node_id, policy=policy)
    except SecAggRefused as err:
        ctx.state.config_records[GUARD_STATE] = ConfigRecord({"stage": "refused"})  # the rest of the round too
        logging.getLogger(__name__).warning("%s", err)
        raise
    ctx.state.config_records[GUARD_STATE] = ConfigRecord(guard)


def check_secagg_stage(
    configs: Mapping[str, Any], guard: Mapping[str, Any], *, node_id: int, policy: PrivacyPolicy
) -> dict[str, Any]:
    """Check one SecAgg+ stage message; return what the round has said so far, including it.

    ``configs`` is the message's ``secaggplus_configs``, ``guard`` what earlier stages
    said (empty before the first setup). Every problem is collected and raised at once.

    - setup: the sample, the shares and the threshold against the policy
      (``PrivacyPolicy.secagg_violations``);
    - share keys: the neighbours (whose public keys arrive) include this node and another,
      no more than the setup's sample and shares allow, at least the threshold of them
      and at most ``threshold / min-secagg-threshold-fraction``;
    - masked vectors (before training): shares come once each and from neighbours only;
    - unmask: active and dropped nodes are disjoint, each listed once, all nodes whose shares
      this node holds, this node active, at least the threshold active; once per setup;
    - at every stage, the round (sampled, neighbours, keys shared, active) numbers at least
      the policy's ``min-round-size`` (and never fewer than two).
    """
    stage = configs.get(Key.STAGE)
    problems: list[str] = []
    if stage != SETUP and guard.get("stage") != _PREVIOUS.get(str(stage)):
        done = "its shares were already given out" if guard.get("stage") == UNMASK else "it was not set up"
        problems.append(f"stage {stage!r} arrived after {guard.get('stage', 'nothing')!r} ({done} for this round)")
        _refuse(stage, problems)
    out = dict(guard)
    if stage == SETUP:
        numbers: dict[str, int] = {}
        for key in (Key.SAMPLE_NUMBER, Key.SHARE_NUMBER, Key.THRESHOLD):
            value = configs.get(key)
            if type(value) is not int:
                problems.append(f"'{key}' must be an integer. Found {value!r}")
            else:
                numbers[key] = value
        if not problems:
            sample, shares, threshold = (numbers[k] for k in (Key.SAMPLE_NUMBER, Key.SHARE_NUMBER, Key.THRESHOLD))
            problems += policy.secagg_violations(sample=sample, shares=shares, threshold=threshold)
            out = {"stage": SETUP, "sample": sample, "shares": shares, "threshold": threshold}
            # What the masked values are quantized with: checked against the proposal at fit
            # (``distributed_setup_problems``), where the proposal arrives.
            for key in (Key.CLIPPING_RANGE, Key.TARGET_RANGE, Key.MOD_RANGE, Key.MAX_WEIGHT):
                if isinstance(configs.get(key), int | float) and not isinstance(configs.get(key), bool):
                    out[key] = configs[key]
    elif stage == SHARE_KEYS:
        try:
            neighbours = sorted(int(k) for k in configs if k != Key.STAGE)
        except ValueError:
            _refuse(stage, ["a neighbour is not a node id"])
        count, threshold = len(neighbours), int(guard["threshold"])
        if node_id not in neighbours:
            problems.append(f"its own node {node_id} is not among the neighbours")
        if len(set(neighbours) - {node_id}) < 1:
            problems.append("no other institution is among its neighbours (its update would be masked by nothing)")
        most = min(int(guard["sample"]), int(guard["shares"]) + 1)
        if count > most:
            problems.append(f"{count} neighbours, more than the setup's sample and shares allow ({most})")
        problems += _round_size_problems(count, policy, what="neighbours")
        if count < threshold:
            problems.append(f"{count} neighbours, below the reconstruction threshold {threshold}")
        if threshold < policy.min_secagg_threshold_fraction * count:
            problems.append(
                f"reconstruction threshold {threshold} of {count} shares is below the policy's "
                f"min-secagg-threshold-fraction {policy.min_secagg_threshold_fraction:g}"
            )
        out = {**guard, "stage": SHARE_KEYS, "neighbours": neighbours}
    elif stage == COLLECT_MASKED_VECTORS:
        sources = _node_ids(configs.get(Key.SOURCE_LIST), Key.SOURCE_LIST, problems)
        others = set(_ints(guard["neighbours"])) - {node_id}
        if len(configs.get(Key.CIPHERTEXT_LIST) or []) != len(sources):
            problems.append("as many ciphertexts as sources are expected")
        if stray := sorted(set(sources) - others):
            problems.append(f"shares from nodes {stray}, which are not its neighbours")
        problems += _round_size_problems(1 + len(set(sources)), policy, what="institutions shared keys with it")
        out = {**guard, "stage": COLLECT_MASKED_VECTORS, "sources": sources}
    elif stage == UNMASK:
        active = _node_ids(configs.get(Key.ACTIVE_NODE_ID_LIST), Key.ACTIVE_NODE_ID_LIST, problems)
        dropped = _node_ids(configs.get(Key.DEAD_NODE_ID_LIST), Key.DEAD_NODE_ID_LIST, problems)
        held = set(_ints(guard.get("sources", [])))
        if both := sorted(set(active) & set(dropped)):
            problems.append(f"nodes {both} are listed both active and dropped (both their secrets would leave)")
        if node_id not in active:
            problems.append(f"its own node {node_id} is not listed active, though it sent its masked update")
        if stray := sorted((set(active) - {node_id} | set(dropped)) - held):
            problems.append(f"nodes {stray} are not neighbours that shared keys with it")
        problems += _round_size_problems(len(set(active)), policy, what="active institutions")
        if len(set(active)) < int(guard["threshold"]):
            problems.append(f"{len(set(active))} active institutions, below the threshold {guard['threshold']}")
        out = {**guard, "stage": UNMASK}
    else:
        problems.append(f"unknown stage {stage!r}")
    if problems:
        _refuse(stage, problems)
    return out


def _round_size_problems(count: int, policy: PrivacyPolicy, *, what: str) -> list[str]:
    """Too few institutions at a stage: fewer than two hide nothing, fewer than the policy says hide too little."""
    if count < 2:
        return [f"{count} {what}, below the 2 a secure sum needs"]
    if count < policy.min_round_size:
        return [f"{count} {what}, below the policy's min-round-size {policy.min_round_size}"]
    return []


def _refuse(stage: Any, problems: list[str]) -> NoReturn:
    raise SecAggRefused(f"the institution refused SecAgg+ stage {stage!r}: " + "; ".join(problems))


def _ints(values: Any) -> list[int]:
    return [int(v) for v in values]


def _node_ids(values: Any, key: str, problems: list[str]) -> list[int]:
    """A list of node ids, each once; problems are appended."""
    if not isinstance(values, list) or any(type(v) is not int for v in values):
        problems.append(f"'{key}' must be a list of node ids")
        return []
    if len(set(values)) != len(values):
        twice = sorted({v for v in values if values.count(v) > 1})
        problems.append(f"nodes {twice} are listed more than once in '{key}' (their shares would leave twice)")
    return list(values)
