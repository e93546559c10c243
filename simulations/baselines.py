"""Baselines on the federation's own splits: pooled training, each institution alone, and a non-private reference.

Every baseline uses exactly the records of the federated run with the same
settings: the institutions are built as the engines build them
(``InstitutionData.from_node_config`` with their ``partition-id``), a pooled
model trains on the union of their training records, and every model is
tested on the union of their held-out records.

``pooled`` and ``alone`` train the federation's model (``fedsilo.common.models.build_model``,
the same initial weights) with the federation's recipe (``fedsilo.common.training.plan_round``
/ ``train_round``), one planned round at a time:

- with DP, central DP-SGD on their records for the federation's number of rounds,
  the noise calibrated by the same accountant to the same epsilon and delta
  (or the level's fixed noise multiplier);
- without DP, to convergence (they are the ceilings a federation is compared
  with, so they must not be under-trained): after each round the loss on all
  their training records is measured; training goes on for at least the
  federation's rounds and stops once the lowest loss so far has fallen by less
  than 5% (or less than 0.001 nats) over the last 10 rounds, or after at most
  10 x the federation's rounds (at least 50). The weights with the lowest
  training loss are kept. Mini-batch SGD makes the loss of single rounds noisy;
  the lowest loss over a window is not.

``reference`` is a different kind of model on purpose: scikit-learn's
``LogisticRegression`` (lbfgs to convergence, default L2 regularisation C = 1) on
the pooled training records as the schema encodes them, no DP. A well-understood
yardstick: a federation that cannot beat a logistic regression on pooled data has
not learned much that a simple model would not.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from torch import nn

from fedsilo.client.institution import InstitutionData
from fedsilo.client.simulated_data import SimulatedTables
from fedsilo.common.accounting import DPSGDEvent, epsilon_spent
from fedsilo.common.models import build_model, get_weights, set_weights
from fedsilo.common.schema import Schema
from fedsilo.common.settings import RunSettings
from fedsilo.common.training import PREDICT_BATCH, plan_round, predict_proba, train_round

BASELINE_SEED_SALT = {"pooled": 101, "alone": 202}
CONVERGENCE_WINDOW = 10  # rounds over which the lowest training loss must keep falling
CONVERGENCE_RELATIVE = 0.05  # by at least 5% of itself ...
CONVERGENCE_ABSOLUTE = 1e-3  # ... and at least 0.001 nats; less: converged
CONVERGENCE_CAP = 10  # at most this many times the federation's rounds ...
CONVERGENCE_MIN_CAP = 50  # ... or this many rounds, whichever is more
REFERENCE_MAX_ITER = 10_000  # lbfgs iterations; far more than the schema-scaled inputs need


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
    """A baseline model, the privacy it spent and how it was trained."""

    model: nn.Module
    epsilon: float
    train_digest: str  # the records it trained on (``records_digest``)
    rounds: int  # planned rounds trained (``train_round`` calls)
    steps: int  # optimizer steps in all
    train_loss: float  # mean cross-entropy on all its training records, at the end
    converged: bool  # without DP: the criterion stopped it before the cap; with DP: always True

    def predict_proba(self, inputs: np.ndarray) -> np.ndarray:
        """Class probabilities, shape (records, classes)."""
        return predict_proba(self.model, inputs)


def training_loss(model: nn.Module, inputs: np.ndarray, labels: np.ndarray) -> float:
    """Mean cross-entropy of ``model`` on all the records (the convergence criterion's measure)."""
    model.eval()
    total = 0.0
    with torch.no_grad():
        for start in range(0, len(labels), PREDICT_BATCH):
            logits = model(torch.as_tensor(inputs[start : start + PREDICT_BATCH], dtype=torch.float32))
            target = torch.tensor(labels[start : start + PREDICT_BATCH])  # a copy: the labels may be read-only
            total += float(nn.functional.cross_entropy(logits, target, reduction="sum"))
    return total / len(labels)


def train_centrally(
    inputs: np.ndarray,
    labels: np.ndarray,
    settings: RunSettings,
    *,
    schema: Schema,
    salt: int,
    min_rounds: int | None = None,
    max_rounds: int | None = None,
) -> Trained:
    """Train the federation's model on one set of records with its recipe, one planned round at a time.

    With DP (a target epsilon or a fixed noise multiplier), exactly the federation's
    rounds, each planned by ``plan_round`` for these records with the noise calibrated
    for all of them; epsilon from the same accountant. Without DP, at least
    ``min_rounds`` (default: the federation's rounds) and then until the training loss
    stops improving (module docstring), at most ``max_rounds`` (default
    ``CONVERGENCE_CAP`` x the federation's rounds, at least ``CONVERGENCE_MIN_CAP``).
    """
    privacy = settings.privacy
    plan = plan_round(num_examples=len(labels), train=settings.train, privacy=privacy, planned_rounds=settings.rounds)
    entropy = [settings.seed, salt, len(labels)]

    def one_round(index: int, start: nn.Module | None) -> nn.Module:
        """A fresh model holding ``start``'s weights, trained one planned round (as an institution trains)."""
        model = build_model(settings.train, schema, seed=settings.seed)  # the federation's initial weights
        if start is not None:
            set_weights(model, get_weights(start))
        seed = int(np.random.SeedSequence([*entropy, index]).generate_state(1)[0])
        train_round(
            model, inputs, labels, plan=plan, train=settings.train, max_grad_norm=privacy.max_grad_norm, seed=seed
        )
        return model

    digest = records_digest(inputs, labels)
    model: nn.Module | None = None
    if plan.noise_multiplier > 0:
        for index in range(settings.rounds):
            model = one_round(index, model)
        assert model is not None
        events = [DPSGDEvent(plan.noise_multiplier, plan.sample_rate, plan.steps)] * settings.rounds
        epsilon = epsilon_spent(events, delta=privacy.delta)
        loss = training_loss(model, inputs, labels)
        return Trained(model, epsilon, digest, settings.rounds, plan.steps * settings.rounds, loss, True)
    least = settings.rounds if min_rounds is None else min_rounds
    most = max(least, max(CONVERGENCE_CAP * settings.rounds, CONVERGENCE_MIN_CAP) if max_rounds is None else max_rounds)
    best_model = build_model(settings.train, schema, seed=settings.seed)
    bests = [training_loss(best_model, inputs, labels)]  # the lowest training loss after 0, 1, 2, ... rounds
    converged = False
    while len(bests) <= most:
        model = one_round(len(bests) - 1, model)
        loss = training_loss(model, inputs, labels)
        if loss < bests[-1]:
            best_model = model
        bests.append(min(loss, bests[-1]))
        done = len(bests) - 1
        if done >= max(least, CONVERGENCE_WINDOW) and not _improving(bests[-1 - CONVERGENCE_WINDOW], bests[-1]):
            converged = True
            break
    done = len(bests) - 1
    return Trained(best_model, math.inf, digest, done, plan.steps * done, bests[-1], converged)


def _improving(before: float, now: float) -> bool:
    """Whether the lowest training loss fell enough over the window to keep training."""
    return before - now >= max(CONVERGENCE_RELATIVE * before, CONVERGENCE_ABSOLUTE)


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


@dataclass(frozen=True)
class Reference:
    """The non-private logistic regression on the pooled training records."""

    model: LogisticRegression | None  # None: the training records hold one class, predicted always
    num_classes: int
    only_class: int
    train_digest: str
    converged: bool

    def predict_proba(self, inputs: np.ndarray) -> np.ndarray:
        """Class probabilities over all the schema's classes (a class absent from training gets 0)."""
        out = np.zeros((len(inputs), self.num_classes))
        if self.model is None:
            out[:, self.only_class] = 1.0
        else:
            out[:, self.model.classes_] = self.model.predict_proba(inputs)
        return out


def reference(members: list[InstitutionData]) -> Reference:
    """Fit the reference: ``LogisticRegression`` (lbfgs, C = 1) on the union of the training records."""
    x = np.concatenate([m.train_x for m in members]).astype(np.float64)
    y = np.concatenate([m.train_y for m in members])
    k = members[0].schema.num_classes
    digest = records_digest(x, y)
    if len(np.unique(y)) < 2:
        return Reference(None, k, int(y[0]), digest, True)
    model = LogisticRegression(max_iter=REFERENCE_MAX_ITER)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        model.fit(x, y)
    converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
    return Reference(model, k, -1, digest, converged)
