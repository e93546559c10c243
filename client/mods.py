"""Client mods: SecAgg+ when the coordinator asks for it, with seeded quantization."""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import numpy as np
from flwr.app import Context, Message, MessageType
from flwr.client.mod import secaggplus_mod

from fedsilo.runtime.flower.internals import RECORD_KEY_CONFIGS, ClientAppCallable

FIT_CONFIG = "fitins.config"
# True while a message is handled by Flower's secaggplus_mod: the update that leaves is
# masked. The institution's policy reads it to refuse training for a plain-FedAvg round.
UNDER_SECURE_AGGREGATION: ContextVar[bool] = ContextVar("under_secure_aggregation", default=False)


def secure_aggregation_mod(msg: Message, ctx: Context, call_next: ClientAppCallable) -> Message:
    """Run Flower's ``secaggplus_mod`` on SecAgg+ messages; pass plain FedAvg through.

    SecAgg+'s stochastic quantization draws from numpy's global generator. When the
    message carries the run's training config, that generator is seeded from the
    run seed, the round and the institution, so the same seed gives the same model; the
    masks themselves come from fresh key agreement and are never seeded.
    """
    if msg.metadata.message_type != MessageType.TRAIN or RECORD_KEY_CONFIGS not in msg.content.config_records:
        return call_next(msg, ctx)
    token = UNDER_SECURE_AGGREGATION.set(True)
    try:
        fit_config = msg.content.config_records.get(FIT_CONFIG)
        if fit_config is None or "seed" not in fit_config:
            return secaggplus_mod(msg, ctx, call_next)
        who = str(ctx.node_config.get("name", ctx.node_config.get("partition-id", "")))
        seed = quantization_seed(int(str(fit_config["seed"])), int(str(fit_config.get("server-round", 0))), who)
        with seeded_global_numpy(seed):
            return secaggplus_mod(msg, ctx, call_next)
    finally:
        UNDER_SECURE_AGGREGATION.reset(token)


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
