"""Baselines on the federation's own splits: pooled training and each institution alone, with or without DP.

Every baseline uses exactly the records of the federated run with the same
settings: the institutions are built as the engines build them
(``InstitutionData.from_node_config`` with their ``partition-id``), a pooled
model trains on the union of their training records, and every model is
tested on the union of their held-out records. Training is
``common.training.plan_round`` / ``train_round``, one call covering the
federation's rounds x local epochs, its noise calibrated by the same RDP
accountant to the same epsilon and delta; the model starts from the same
initial weights.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace

import numpy as np
from torch import nn

from client.institution import InstitutionData
from client.simulated_data import SimulatedTables
from common.accounting import DPSGDEvent, epsilon_spent
from common.models import build_model
from common.schema import Schema
from common.settings import RunSettings
from common.training import plan_round, train_round

BASELINE_SEED_SALT = {"pooled": 101, "alone": 202}


def federation_members(settings: RunSettings, institutions: int) -> list[InstitutionData]:
    """The simulated institutions of a run, built exactly as both engines build them."""
    tables = SimulatedTables()  # the dataset is loaded and split once, not once per institution
    return [
        InstitutionData.from_node_config({"partition-id": i, "num-partitions": institutions}, settings, tables=tables)
        for i in range(institutions)
    ]


def records_digest(inputs: np.ndarray, labels: np.ndarray) -> str:
    """Identifies a set of records in order (what a baseline trained or was tested on)."""
    rows = np.concatenate([inputs.astype(np.float64), labels[:, None].astype(np.float64)], axis=1)
    return hashlib.sha256(rows.tobytes()).hexdigest()[:16]


@dataclass(frozen=True)
class Trained:
    """A baseline model and the privacy it spent."""

    model: nn.Module
    epsilon: float


def train_centrally(
    inputs: np.ndarray, labels: np.ndarray, settings: RunSettings, *, schema: Schema, salt: int
) -> Trained:
    """Train one model on one set of records for the federation's rounds x local epochs, DP as configured."""
    train = replace(settings.train, local_epochs=settings.train.local_epochs * settings.rounds)
    plan = plan_round(num_examples=len(labels), train=train, privacy=settings.privacy, planned_rounds=1)
    model = build_model(settings.train, schema, seed=settings.seed)
    seed = int(np.random.SeedSequence([settings.seed, salt, len(labels)]).generate_state(1)[0])
    train_round(model, inputs, labels, plan=plan, train=train, max_grad_norm=settings.privacy.max_grad_norm, seed=seed)
    epsilon = epsilon_spent(
        [DPSGDEvent(plan.noise_multiplier, plan.sample_rate, plan.steps)], delta=settings.privacy.delta
    )
    return Trained(model, epsilon)


def pooled(members: list[InstitutionData], settings: RunSettings) -> Trained:
    """One model on every institution's training records (what pooling the data would give)."""
    x = np.concatenate([m.train_x for m in members])
    y = np.concatenate([m.train_y for m in members])
    return train_centrally(x, y, settings, schema=members[0].schema, salt=BASELINE_SEED_SALT["pooled"])


def alone(member: InstitutionData, settings: RunSettings, index: int) -> Trained:
    """Institution ``index``'s model on its own training records only."""
    return train_centrally(
        member.train_x,
        member.train_y,
        settings,
        schema=member.schema,
        salt=BASELINE_SEED_SALT["alone"] * 1000 + index,
    )
