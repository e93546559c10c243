"""What an institution does in a round, apart from Flower: its data, its budget, its ledger.

``InstitutionData.from_node_config`` finds the institution's records (a file in
deployment, a partition of a built-in dataset in simulation);
``fit_round`` plans the round, refuses it if the coordinator's proposal breaks
the institution's privacy policy or would exceed its budget, trains with DP-SGD
and records the round in the ledger before the update leaves.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import math
import os
import secrets
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.model_selection import train_test_split
from torch import nn

from fedsilo.client.evaluations import claim_evaluation
from fedsilo.client.policy import PrivacyPolicy, deployed_policy
from fedsilo.client.simulated_data import SimulatedTables
from fedsilo.common import distributed_dp as ddp
from fedsilo.common import secure_evaluation as seval
from fedsilo.common.accounting import ADD_REMOVE, DPSGDEvent, SkellamEvent, epsilon_spent
from fedsilo.common.aggregation import (
    MAX_ABS_WEIGHT,
    DistributedSkellamSum,
    NoiseInput,
    aggregation_for,
    model_weight_bound,
)
from fedsilo.common.datasets import read_table
from fedsilo.common.errors import ConfigError
from fedsilo.common.ledger import LedgerEntry, PrivacyLedger
from fedsilo.common.models import build_model, get_weights, set_weights
from fedsilo.common.schema import Schema
from fedsilo.common.settings import RunSettings
from fedsilo.common.training import (
    RoundPlan,
    clipped_gradient_sum,
    evaluate,
    plan_round,
    predict_proba,
    train_round,
)

Weights = list[np.ndarray]

# Incoming global weights must be finite and no larger than MAX_ABS_WEIGHT in magnitude, and every
# parameter stays inside it while the institution trains (projected SGD). Trained models sit
# far below it (under SecAgg+ every weight stays inside secagg-clipping-range, 8 by default).
# A crafted model near float32's maximum would make the per-record gradient of chosen records
# overflow, and Opacus's clipping would turn the whole update into NaN that no noise hides.
# Distributed DP: a round is refused when the institution's own noise share could push a value out
# of SecAgg+'s range (where it would be clamped, a non-linear step the sum would show) with a
# larger chance than ``fedsilo.common.distributed_dp.MAX_OUT_OF_RANGE`` (``out_of_range_probability``).
# With every weight at MAX_ABS_WEIGHT and inputs in [0, 1] (what a schema encodes), the
# worst-case per-record squared gradient norm (``worst_case_gradient``) must stay below this,
# far under float32's maximum (3.4e38): Opacus sums squares, ghost clipping products of them.
MAX_WORST_CASE_GRADIENT = 1e30


@dataclass(frozen=True)
class InstitutionData:
    """One institution's records, encoded by the federation schema and split."""

    name: str
    schema: Schema
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    state_dir: Path
    fingerprint: str
    reproducible: bool
    policy: PrivacyPolicy = field(default_factory=PrivacyPolicy)

    @classmethod
    def from_node_config(
        cls, node_config: Mapping[str, Any], settings: RunSettings, *, tables: SimulatedTables | None = None
    ) -> InstitutionData:
        """Load from ``data-path``/``schema-path`` (deployment) or a simulated partition.

        ``tables`` keeps the encoded dataset and its split between calls in one
        process (a simulation worker serves many institutions); without it every
        call loads and encodes the whole dataset again.
        """
        if "data-path" in node_config:
            path = Path(str(node_config["data-path"]))
            schema = Schema.load(str(node_config["schema-path"]))
            inputs, labels = schema.transform(read_table(path), source=str(path))
            name = str(node_config.get("name", path.stem))
            state_dir = Path(str(node_config["state-dir"]))
            reproducible = str(node_config.get("reproducible-noise", "false")).lower() == "true"
            policy = deployed_policy(node_config)
        else:
            if "partition-id" not in node_config:
                raise ConfigError(
                    "node config needs data-path, schema-path and state-dir (or a simulation partition-id)"
                )
            pid, count = int(node_config["partition-id"]), int(node_config["num-partitions"])
            table = (tables or SimulatedTables()).partition(settings, count)
            schema = table.schema
            rows = table.rows[pid]
            inputs, labels = table.inputs[rows], table.labels[rows]
            name = table.name(pid)
            state_dir = Path(settings.state_root) / name
            reproducible = True  # a simulation: the researcher holds every record and every seed
            # The researcher plays every institution, so the run config may carry their policies.
            policy = (
                PrivacyPolicy.load(settings.simulation_policy, institution=name)
                if settings.simulation_policy
                else PrivacyPolicy(source="simulation")
            )
        if "state-dir" in node_config:
            state_dir = Path(str(node_config["state-dir"]))
        # Deployed: the institution's secret key and its own held-out fraction (its policy's
        # test-fraction; the coordinator's is ignored). Simulations keep the seeded split (split_holdout).
        key = holdout_key(state_dir) if "data-path" in node_config else None
        fraction = policy.holdout_fraction(settings)
        train_x, test_x, train_y, test_y = split_holdout(inputs, labels, settings, key=key, fraction=fraction)
        fingerprint = records_fingerprint(inputs, labels)
        return cls(name, schema, train_x, train_y, test_x, test_y, state_dir, fingerprint, reproducible, policy)


def records_fingerprint(inputs: np.ndarray, labels: np.ndarray) -> str:
    """Identifies a set of records, whatever their order and however they are split.

    The privacy ledger is keyed by it, so settings the coordinator chooses (the
    seed, the held-out fraction) cannot give the same records a fresh budget.
    """
    rows = np.concatenate([inputs.astype(np.float64), labels[:, None].astype(np.float64)], axis=1)
    row_digests = sorted(hashlib.sha256(row.tobytes()).digest() for row in rows)
    return hashlib.sha256(f"{rows.shape}".encode() + b"".join(row_digests)).hexdigest()[:24]


HOLDOUT_KEY_FILE = "holdout.key"  # a deployed institution's secret split key, in its state directory


def split_holdout(
    inputs: np.ndarray,
    labels: np.ndarray,
    settings: RunSettings,
    *,
    key: bytes | None = None,
    fraction: float | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """An institution's own train / held-out split: each record by a keyed hash of itself.

    A record is held out when ``HMAC-SHA256(key, record)``, read as a number in [0, 1),
    falls below ``fraction``: whether it is held out depends on the record and the
    key alone, never on the table's size or order, so adding or removing one record moves
    no other record between training and held-out (two neighbouring datasets differ by one
    training record at most). ``InstitutionData.from_node_config`` passes a deployed
    institution's secret (``holdout_key``) and its policy's own ``test-fraction``, neither
    of which the coordinator can steer. Identical records fall on the same side. When
    every record would be held out, all train (the held-out set is then empty and
    evaluation reports nothing).

    Without ``key``: the seeded, stratified split (scikit-learn) that simulations, their
    baselines and sweeps still use, so that every engine agrees; it moves many records
    when one is added, so no deployed institution uses it.
    ``fraction`` defaults to the run's ``test-fraction`` (what a simulation uses).
    Returns ``train_x, test_x, train_y, test_y``.
    """
    share = settings.data.test_fraction if fraction is None else fraction
    if key is None:
        return _seeded_split(inputs, labels, share, seed=settings.seed)
    held = holdout_mask(inputs, labels, fraction=share, key=key)
    if held.all():
        held[:] = False
    return inputs[~held], inputs[held], labels[~held], labels[held]


def _seeded_split(
    inputs: np.ndarray, labels: np.ndarray, fraction: float, *, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The simulations' split: seeded, stratified where every class has two records and room on both sides."""
    present = np.bincount(labels)
    present = present[present > 0]
    held_out = math.ceil(fraction * len(labels))  # as scikit-learn counts it
    room = min(held_out, len(labels) - held_out) >= len(present)
    stratify = labels if present.min() >= 2 and room else None
    parts = train_test_split(inputs, labels, test_size=fraction, random_state=seed, stratify=stratify)
    return parts[0], parts[1], parts[2], parts[3]


def holdout_mask(inputs: np.ndarray, labels: np.ndarray, *, fraction: float, key: bytes) -> np.ndarray:
    """True for each record held out: its keyed hash (HMAC-SHA256 of the encoded row and label) below ``fraction``."""
    rows = np.ascontiguousarray(np.concatenate([inputs.astype(np.float64), labels[:, None].astype(np.float64)], axis=1))
    draws = [int.from_bytes(hmac.new(key, row.tobytes(), hashlib.sha256).digest()[:8], "big") for row in rows]
    return np.asarray(draws, dtype=np.float64).reshape(-1) / 2.0**64 < fraction


def holdout_key(state_dir: Path) -> bytes:
    """A deployed institution's secret split key: ``STATE_DIR/holdout.key``, made once (mode 0600).

    The coordinator cannot steer which records are held out: the key never leaves the institution.
    """
    path = Path(state_dir) / HOLDOUT_KEY_FILE
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".holdout-", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(secrets.token_bytes(32))
                fh.flush()
                os.fsync(fh.fileno())
            os.chmod(tmp, 0o600)
            with contextlib.suppress(FileExistsError):  # another process's key, made first, wins
                os.link(tmp, path)  # atomic: the key appears whole or not at all
        finally:
            Path(tmp).unlink(missing_ok=True)
    key = path.read_bytes()
    if len(key) < 16:
        raise ConfigError(f"{path}: the held-out split key is damaged ({len(key)} bytes); restore it from a backup")
    return key


def worst_case_gradient(settings: RunSettings, schema: Schema, bound: float = MAX_ABS_WEIGHT) -> float:
    """An upper bound on any record's squared gradient norm (and squared logit), weights within ``bound``.

    The run's model is built in float64 with ReLU (``|tanh z| <= |z|`` and its slope is at most
    1, so ReLU bounds tanh) and every parameter at ``+bound``; on an all-ones input (the schema
    encodes every input into [0, 1]) every activation is then as large as any input and any
    weights within the bound can make it, and the gradient of the sum of the logits bounds every
    back-propagated value (the loss's gradient in each logit lies in [-1, 1]). A max-pooling layer
    can route up to four windows' gradients to one input: a factor of 16 in the square each.
    """
    model = build_model(replace(settings.train, activation="relu"), schema, seed=0).double()
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(bound)
    logits = model(torch.ones(1, schema.num_inputs, dtype=torch.float64))
    logits.sum().backward()
    squared = sum(float((p.grad**2).sum()) for p in model.parameters() if p.grad is not None)
    pools = sum(isinstance(m, nn.MaxPool2d) for m in model.modules())
    return max(squared, float(logits.detach().max()) ** 2) * 16.0**pools


def weight_bound(settings: RunSettings, *, secure_aggregation: bool) -> float:
    """How large a parameter may be, received or while training: ``model_weight_bound``, in every mode.

    SecAgg+ clips every masked value to ``secagg-clipping-range``, so a model aggregated under it
    never leaves that range; training projects onto it so that nothing is clipped silently, and
    distributed DP's server step projects onto it too. The same bound without SecAgg+ keeps one
    rule, and keeps a convolutional network's worst-case gradient far from overflow (with every
    weight at 1000 a four-layer CNN's reaches 1.9e43).
    """
    return model_weight_bound(settings)


def weights_problem(
    weights: Sequence[np.ndarray], settings: RunSettings, schema: Schema, *, bound: float
) -> str | None:
    """Why these incoming weights must not be trained or evaluated on (None: they may).

    Every value must be finite and within ``bound`` (``weight_bound``), and the run's model
    with weights within ``bound`` must keep every record's gradient far from float32's
    overflow (``worst_case_gradient``). Checked before any record is touched: the answer
    depends on the weights and the run's model only, never on the records, so a refusal
    cannot reveal whether a record is present.
    """
    for i, w in enumerate(weights):
        array = np.asarray(w)
        if not np.issubdtype(array.dtype, np.number):
            return f"weight tensor {i} is not numeric (dtype {array.dtype})"
        bad = int(array.size - np.count_nonzero(np.isfinite(array)))
        if bad:
            return f"weight tensor {i} has {bad} non-finite values (NaN or infinite)"
        largest = float(np.abs(array).max()) if array.size else 0.0
        if largest > bound:
            return (
                f"weight tensor {i} has a value of magnitude {largest:.3g}, above the {bound:g} "
                "an institution accepts (a crafted model can make chosen records' gradients overflow)"
            )
    worst = worst_case_gradient(settings, schema, bound)
    if not worst <= MAX_WORST_CASE_GRADIENT:
        return (
            f"model {settings.train.model!r} (hidden layers {settings.train.hidden_layers!r}) could make a record's "
            f"squared gradient norm reach {worst:.3g} with weights within {bound:g}, above the "
            f"{MAX_WORST_CASE_GRADIENT:g} that keeps float32 from overflowing; use a smaller model"
        )
    return None


@dataclass(frozen=True)
class FitOutcome:
    """What an institution releases after a round: the update and clear-text metrics."""

    weights: Weights
    num_examples: int
    metrics: dict[str, bool | int | float | str] = field(default_factory=dict)


def schema_problem(data: InstitutionData, settings: RunSettings) -> str | None:
    """Why this institution's schema is not the federation's (None: it is, or the proposal does not say).

    The coordinator fills ``schema-fingerprint`` in from its schema file when it opens a run
    (``fedsilo.server.server_app.open_run``). An institution whose own schema file encodes
    differently would build a model of another size (or feed it differently scaled inputs),
    so it refuses before any model is built, any record is trained on or its ledger is locked.
    """
    expected = settings.data.schema_fingerprint
    own = data.schema.fingerprint()
    if not expected or own == expected:
        return None
    return (
        f"this institution's schema file differs from the federation's (this institution's fingerprint {own}, "
        f"the federation's {expected}): get the federation's schema.toml from the coordinator"
    )


def run_epsilon(
    ledgers: Sequence[PrivacyLedger],
    run_id: str,
    *,
    delta: float,
    then: LedgerEntry | None = None,
    worst_case: bool = False,
    neighbouring: str = ADD_REMOVE,
) -> float:
    """This run's share of the institution's spend: its rounds of run ``run_id`` (and ``then``), composed.

    What an institution reports in the clear. Its budget is enforced over every ledger in
    its state directory, every run and federation it took part in; reporting that figure
    would tell this coordinator what the institution spent elsewhere. The rounds of this
    run are the ones this coordinator received (it mirrors them from the clear metrics),
    so their composition tells it nothing new. ``neighbouring``: the relation accounted for
    (the institution's, ``PrivacyPolicy.accounting_relation``), which the reply names.
    """
    entries = [e for ledger in ledgers for e in ledger.entries if e.run_id == run_id]
    entries += [then] if then is not None else []
    events = [e.worst_case_event() if worst_case else e.event() for e in entries]
    return epsilon_spent(events, delta=delta, neighbouring=neighbouring)


def fit_round(
    data: InstitutionData,
    weights: Sequence[np.ndarray],
    settings: RunSettings,
    *,
    server_round: int,
    run_id: str,
    secure_aggregation: bool | None = None,
    secure_round: tuple[int, int] | None = None,
) -> FitOutcome:
    """Plan, check the policy and the budget, train with DP-SGD, record in the ledger, release.

    With ``dp-mode = "distributed"``, ``fit_distributed_round`` runs the round instead;
    ``secure_round`` is then the SecAgg+ setup's (sampled institutions, threshold).

    What leaves is prepared by the run's aggregation (``fedsilo.common.aggregation``). A
    refused round trains nothing, records nothing and releases the received
    weights with zero weight (``num_examples = 0``), so it does not move the
    aggregate, and the reason travels in the clear metrics. ``secure_aggregation``
    says whether the update leaves masked by SecAgg+ (the ClientApp knows it from
    the message; None: as the run settings say). The budget covers every ledger in
    the institution's state directory: records re-encoded by a changed schema (a
    new fingerprint) do not start a fresh budget; the epsilon it reports is this run's
    share alone (``run_epsilon``), so the coordinator does not learn what it spent
    elsewhere. A schema other than the federation's (``schema_problem``) is refused
    before anything else. A trained round weighs
    ``min(training records, secagg-max-weight)``, with SecAgg+ or without, so an
    institution of any size takes part.
    """
    secure = settings.secagg.enabled if secure_aggregation is None else secure_aggregation
    if settings.distributed:
        return fit_distributed_round(
            data,
            weights,
            settings,
            server_round=server_round,
            run_id=run_id,
            secure_aggregation=secure,
            secure_round=secure_round,
        )
    privacy, policy = settings.privacy, data.policy
    budget, delta = policy.budget(settings), policy.accounting_delta(settings)
    relation = policy.accounting_relation(settings)  # the institution's; a coordinator cannot weaken it
    base: dict[str, bool | int | float | str] = {"institution": data.name, "delta": delta, "neighbouring": relation}
    if (mismatch := schema_problem(data, settings)) is not None:  # before any model is built
        zeros = [np.zeros(np.shape(w), dtype=np.float32) for w in weights]  # nothing received goes back
        refusal = aggregation_for(settings).prepare(zeros, records=0)
        spent_here = run_epsilon(PrivacyLedger.all(data.state_dir), run_id, delta=delta, neighbouring=relation)
        why = f"{data.name} refused round {server_round}: {mismatch}"
        vector = [*refusal.vector, *_no_counts(data, settings, server_round)]
        return FitOutcome(vector, refusal.weight, {**base, "epsilon": spent_here, "refused": why})
    with PrivacyLedger.locked(data.state_dir, data.fingerprint) as ledger:  # check, train, record
        plan = plan_round(
            num_examples=len(data.train_y),
            train=settings.train,
            privacy=privacy,
            planned_rounds=settings.rounds,
            alongside=seval.evaluation_events(settings.proposal),
        )
        entry = LedgerEntry(
            run_id=run_id,
            round=server_round,
            noise_multiplier=plan.noise_multiplier,
            sample_rate=plan.sample_rate,
            steps=plan.steps,
            delta=delta,
            recorded_at=datetime.now(UTC).isoformat(timespec="seconds"),
        )
        ledgers = [*PrivacyLedger.others(data.state_dir, data.fingerprint), ledger]
        # The budget is enforced over every ledger (every run and federation); only this run's share is reported.
        events = [*(e.event() for other in ledgers for e in other.entries), entry.event()]
        after = epsilon_spent(events, delta=delta, neighbouring=relation)
        reason = None
        violations = policy.violations(settings, plan, secure_aggregation=secure)
        bound = weight_bound(settings, secure_aggregation=secure)
        if (problem := weights_problem(weights, settings, data.schema, bound=bound)) is not None:
            reason = f"{data.name} refused round {server_round}: the received global model is unsafe: {problem}"
            # Nothing non-finite goes back: under SecAgg+ even a zero weight times NaN is NaN.
            weights = [np.zeros(np.shape(w), dtype=np.float32) for w in weights]
        else:
            reason = policy_or_budget_reason(data.name, server_round, violations, after=after, budget=budget)
        if reason is not None:
            refusal = aggregation_for(settings).prepare(weights, records=0)
            spent_here = run_epsilon(ledgers, run_id, delta=delta, neighbouring=relation)
            vector = [*refusal.vector, *_no_counts(data, settings, server_round)]  # weight 0: nothing of it counts
            return FitOutcome(vector, refusal.weight, {**base, "epsilon": spent_here, "refused": reason})
        evaluated = _received_model(data, settings, weights, server_round)  # scored before training changes it
        model = _model_with(data, settings, weights)
        seed = _round_seed(data, settings, server_round)
        train_round(
            model,
            data.train_x,
            data.train_y,
            plan=plan,
            train=settings.train,
            max_grad_norm=privacy.max_grad_norm,
            seed=seed,
            # Weights stay where no record's gradient can overflow (MAX_ABS_WEIGHT) and, under
            # SecAgg+, inside the clipping range that SecAgg+ would otherwise clip silently.
            weight_bound=bound,
        )
        ledger = ledger.append(entry)  # before the update leaves: a released update is spent privacy
        # Its aggregation weight is sent in the clear: the record count, capped at secagg-max-weight.
        update = aggregation_for(settings).prepare(get_weights(model), records=len(data.train_y))
        release = secure_counts(
            data,
            evaluated,
            settings,
            server_round=server_round,
            run_id=run_id,
            spent=[e.event() for other in [*ledgers[:-1], ledger] for e in other.entries],
            weight=update.weight,
            secure_aggregation=secure,
            secure_round=None,  # local DP: its own noise alone (a refusal's weight 0 sends none)
        )
        if release is not None and release.entry is not None:
            ledger = ledger.append(release.entry)  # before the counts leave
        ledgers = [*ledgers[:-1], ledger]
        metrics = {
            **base,
            "epsilon": run_epsilon(ledgers, run_id, delta=delta, neighbouring=relation),
            "steps": plan.steps,
            "noise-multiplier": plan.noise_multiplier,
            "sample-rate": plan.sample_rate,
            **(release.metrics if release is not None else {}),
        }
        vector = [*update.vector, *([release.floats] if release is not None else [])]
        return FitOutcome(vector, update.weight, metrics)


def policy_or_budget_reason(
    name: str, server_round: int, violations: Sequence[str], *, after: float, budget: float
) -> str | None:
    """The refusal for a proposal that breaks the policy, or for a round past the budget; None: neither."""
    if violations:
        return f"{name} refused round {server_round}: the proposed training breaks its privacy policy: " + "; ".join(
            violations
        )
    if after > budget * (1 + 1e-9):
        return over_budget(name, server_round)
    return None


def _round_seed(data: InstitutionData, settings: RunSettings, server_round: int) -> int:
    """The round's training randomness: seeded from the run in simulation, secret when deployed."""
    if data.reproducible:
        entropy = [settings.seed, server_round, int(data.fingerprint[:8], 16)]
        return int(np.random.SeedSequence(entropy).generate_state(1)[0])
    return secrets.randbits(63)  # DP noise an observer cannot predict from the run config


def over_budget(name: str, server_round: int) -> str:
    """A budget refusal's reason, without a figure: what is spent counts other federations' rounds too."""
    return (
        f"{name} refused round {server_round}: training it would take the institution past its privacy budget "
        "(its policy's max-epsilon, spent over every federation it takes part in)"
    )


def fit_distributed_round(
    data: InstitutionData,
    weights: Sequence[np.ndarray],
    settings: RunSettings,
    *,
    server_round: int,
    run_id: str,
    secure_aggregation: bool,
    secure_round: tuple[int, int] | None,
) -> FitOutcome:
    """Distributed DP's round: one clipped gradient sum over a Poisson sample, encoded with a noise share.

    The institution's share of the noise follows from its policy's ``min-honest`` and the
    round's SecAgg+ setup (``secure_round``: sampled institutions ``n``, threshold ``t``), so
    that the shares it counts on carry the full noise even if ``n - t`` drop out
    (``fedsilo.common.distributed_dp.noise_share``); the coordinator cannot lower it. The
    ledger records the round with what it assumed, and its worst case (own share alone).
    A refused round records nothing and still sends its noise share, with zero signal.
    Records, noise and the sample are drawn from secret randomness when deployed.
    """
    privacy, policy = settings.privacy, data.policy
    budget, delta = policy.budget(settings), policy.accounting_delta(settings)
    relation = policy.accounting_relation(settings)  # the institution's; a coordinator cannot weaken it
    query = aggregation_for(settings)
    assert isinstance(query, DistributedSkellamSum)
    plan = query.plan(sum(int(np.size(w)) for w in weights))
    sample, threshold = secure_round if secure_round is not None else (1, 1)
    share = ddp.noise_share(
        total_variance=plan.total_variance, sample=sample, threshold=threshold, min_honest=policy.min_honest
    )
    rng = np.random.default_rng(_round_seed(data, settings, server_round))
    base: dict[str, bool | int | float | str] = {"institution": data.name, "delta": delta, "neighbouring": relation}

    def refusal(reason: str, ledgers: Sequence[PrivacyLedger]) -> FitOutcome:
        """A refused round still sends its noise shares, with zero signal and zero counts.

        The sum's noise must not depend on who refused.
        """
        zeros = [np.zeros(np.shape(w), dtype=np.float64) for w in weights]
        share_only = query.prepare(
            zeros, records=0, server_round=server_round, noise=NoiseInput(share.own_variance, rng)
        )
        counts_only = secure_counts(
            data,
            None,
            settings,
            server_round=server_round,
            run_id=run_id,
            spent=[],
            weight=share_only.weight,
            secure_aggregation=secure_aggregation,
            secure_round=(sample, threshold),
        )
        vector = [*share_only.vector, *([counts_only.floats] if counts_only is not None else [])]
        extra = counts_only.metrics if counts_only is not None else {}
        spent_here = run_epsilon(ledgers, run_id, delta=delta, neighbouring=relation)
        return FitOutcome(vector, share_only.weight, {**base, **extra, "epsilon": spent_here, "refused": reason})

    if (mismatch := schema_problem(data, settings)) is not None:  # before any model is built
        return refusal(f"{data.name} refused round {server_round}: {mismatch}", PrivacyLedger.all(data.state_dir))
    with PrivacyLedger.locked(data.state_dir, data.fingerprint) as ledger:  # check, train, record
        entry = LedgerEntry(
            run_id=run_id,
            round=server_round,
            noise_multiplier=plan.noise_multiplier,
            sample_rate=plan.sample_rate,
            steps=1,
            delta=delta,
            recorded_at=datetime.now(UTC).isoformat(timespec="seconds"),
            mechanism="skellam",
            variance=share.total_variance,
            own_variance=share.own_variance,
            l2_sensitivity=plan.l2_sensitivity,
            l1_sensitivity=plan.l1_sensitivity,
            scale=plan.scale,
            min_honest=policy.min_honest,
            counted_honest=share.counted_honest,
            sample=sample,
            threshold=threshold,
        )
        ledgers = [*PrivacyLedger.others(data.state_dir, data.fingerprint), ledger]
        # The budget is enforced over every ledger (every run and federation); only this run's share is reported.
        events = [*(e.event() for other in ledgers for e in other.entries), entry.event()]
        after = epsilon_spent(events, delta=delta, neighbouring=relation)
        reason = None
        round_plan = RoundPlan(sample_rate=plan.sample_rate, steps=1, noise_multiplier=plan.noise_multiplier)
        violations = policy.violations(settings, round_plan, secure_aggregation=secure_aggregation)
        bound = weight_bound(settings, secure_aggregation=secure_aggregation)
        if (problem := weights_problem(weights, settings, data.schema, bound=bound)) is not None:
            reason = f"{data.name} refused round {server_round}: the received global model is unsafe: {problem}"
        elif not secure_aggregation:
            reason = (
                f"{data.name} refused round {server_round}: dp-mode distributed sends only a share of the noise, "
                "which protects its records only inside a SecAgg+ sum, and this round has none"
            )
        elif trust := ddp.honest_problem(sample=sample, threshold=threshold, min_honest=policy.min_honest):
            reason = f"{data.name} refused round {server_round}: {trust}"
        elif (
            chance := ddp.out_of_range_probability(
                variance=share.own_variance, bits=plan.bits, dim_padded=plan.dim_padded
            )
        ) > ddp.MAX_OUT_OF_RANGE:
            reason = (
                f"{data.name} refused round {server_round}: its noise share could leave SecAgg+'s range "
                f"(2^{plan.bits}) with probability {chance:.2g}, above {ddp.MAX_OUT_OF_RANGE:g}; raise "
                "secagg-quantization-range or lower the noise"
            )
        else:
            reason = policy_or_budget_reason(data.name, server_round, violations, after=after, budget=budget)
        if reason is not None:
            return refusal(reason, ledgers)
        noise = NoiseInput(share.own_variance, rng)
        evaluated = _received_model(data, settings, weights, server_round)  # the received model, scored before the step
        model = _model_with(data, settings, weights)
        gradient_sum, _ = clipped_gradient_sum(
            model,
            data.train_x,
            data.train_y,
            sample_rate=plan.sample_rate,
            max_grad_norm=privacy.max_grad_norm,
            rng=rng,
        )
        ledger = ledger.append(entry)  # before the update leaves: a released update is spent privacy
        update = query.prepare([gradient_sum], records=len(data.train_y), server_round=server_round, noise=noise)
        release = secure_counts(
            data,
            evaluated,
            settings,
            server_round=server_round,
            run_id=run_id,
            spent=[e.event() for other in [*ledgers[:-1], ledger] for e in other.entries],
            weight=update.weight,
            secure_aggregation=secure_aggregation,
            secure_round=(sample, threshold),
        )
        if release is not None and release.entry is not None:
            ledger = ledger.append(release.entry)  # before the counts leave
        ledgers = [*ledgers[:-1], ledger]
        metrics = {
            **base,
            **(release.metrics if release is not None else {}),
            "epsilon": run_epsilon(ledgers, run_id, delta=delta, neighbouring=relation),
            "epsilon-worst-case": run_epsilon(ledgers, run_id, delta=delta, worst_case=True, neighbouring=relation),
            "steps": 1,
            "noise-multiplier": plan.noise_multiplier,
            "sample-rate": plan.sample_rate,
            "records": len(data.train_y),
            "counted-honest": share.counted_honest,
        }
        vector = [*update.vector, *([release.floats] if release is not None else [])]
        return FitOutcome(vector, update.weight, metrics)


@dataclass(frozen=True)
class CountRelease:
    """A round's secure-evaluation vector: floats SecAgg+ turns into the noisy counts, and what it books."""

    floats: np.ndarray
    entry: LedgerEntry | None  # the evaluation's ledger entry (None: it released no counts)
    metrics: dict[str, bool | int | float | str]


def secure_counts(
    data: InstitutionData,
    model: nn.Module | None,
    settings: RunSettings,
    *,
    server_round: int,
    run_id: str,
    spent: Sequence[DPSGDEvent | SkellamEvent],
    weight: int,
    secure_aggregation: bool,
    secure_round: tuple[int, int] | None,
) -> CountRelease | None:
    """This round's noisy held-out counts for the secure evaluation (None: the round carries none).

    ``model`` is the received global model (None: the round was refused; zero counts).
    The noise is the institution's share of the evaluation's variance: with
    ``secure_round`` (distributed DP: sampled ``n``, threshold ``t``) as its policy's
    ``min-honest`` counts on (``noise_share``), without it (local DP) the whole variance,
    because a refusal there weighs 0 and adds nothing to the sum. Its counts enter only if
    its policy's ``secure-evaluation`` allows, the evaluation fits its budget composed with
    ``spent`` (the ledgers' events, this round's training included) and the run's planned
    evaluations at this noise spend at most ``EVAL_EPSILON_FRACTION`` of its budget;
    otherwise zero counts with the same noise (``min-eval-records`` does not apply: the
    counts are noised and booked). The evaluation is
    booked (the returned ``entry``, to append before the vector leaves) whenever its policy
    takes part and the budget allows, so whether it booked shows nothing about its records.
    Nothing is added outside SecAgg+, and a zero weight ratio (a local-DP refusal) sends zeros.
    """
    if seval.evaluated_round(settings, server_round) is None:
        return None
    plan = seval.evaluation_plan(settings.proposal)
    assert plan is not None
    policy, secagg = data.policy, settings.secagg
    size = seval.cells(data.schema.num_classes)
    sample, threshold = secure_round if secure_round is not None else (1, 1)
    share = ddp.noise_share(
        total_variance=plan.variance,
        sample=sample,
        threshold=threshold,
        min_honest=policy.min_honest if secure_round is not None else 1,
    )
    zeros = np.zeros(size, dtype=np.float64)
    if not secure_aggregation or weight <= 0:
        return CountRelease(zeros, None, {})
    if problem := seval.range_problem(variance=plan.variance, records=0, quantization_range=secagg.quantization_range):
        # The whole planned noise would not fit: a public condition, the same at every institution,
        # so all send zeros and none counts on a share that another could not send.
        return CountRelease(zeros, None, {"secure-evaluation": f"withheld: {problem}"})
    delta = policy.accounting_delta(settings)
    relation = policy.accounting_relation(settings)
    entry = LedgerEntry(
        run_id=run_id,
        round=server_round,
        noise_multiplier=math.sqrt(plan.variance),
        sample_rate=1.0,
        steps=1,
        delta=delta,
        recorded_at=datetime.now(UTC).isoformat(timespec="seconds"),
        mechanism=seval.MECHANISM,
        variance=share.total_variance,
        own_variance=share.own_variance,
        l2_sensitivity=1.0,
        l1_sensitivity=1.0,
        scale=1.0,
        min_honest=policy.min_honest,
        counted_honest=share.counted_honest,
        sample=sample,
        threshold=threshold,
    )
    # The run's evaluations together may spend at most EVAL_EPSILON_FRACTION of the institution's own
    # budget, whatever target-epsilon the coordinator proposed to calibrate their noise.
    planned = replace(entry.event(), steps=plan.evaluations)
    status = "booked"
    if model is None:
        status, booked = "withheld: the round was refused", None
    elif not policy.secure_evaluation:
        status, booked = "withheld: its policy's secure-evaluation is false", None
    elif epsilon_spent([planned], delta=delta, neighbouring=relation) > seval.EVAL_EPSILON_FRACTION * policy.budget(
        settings
    ) * (1 + 1e-9):
        status = (
            f"refused: the run's {plan.evaluations} planned evaluations at this noise would spend more than "
            f"{seval.EVAL_EPSILON_FRACTION:g} of its privacy budget"
        )
        booked = None
    elif epsilon_spent([*spent, entry.event()], delta=delta, neighbouring=relation) > policy.budget(settings) * (
        1 + 1e-9
    ):
        status, booked = "refused: it would take the institution past its privacy budget", None
    else:
        booked = entry
    values = np.zeros(size, dtype=np.int64)
    # The counts are noised and booked: no held-out size gates them (a threshold on it would make one
    # record's presence switch every count, far past the sensitivity of 1 booked).
    if booked is not None and model is not None:
        values = seval.counts(predict_proba(model, data.test_x), data.test_y, data.schema.num_classes)
        if seval.range_problem(
            variance=share.own_variance, records=len(data.test_y), quantization_range=secagg.quantization_range
        ):
            values = np.zeros(size, dtype=np.int64)  # counts that could not pass unclamped: zero, the noise still goes
            status = "withheld: its held-out counts with their noise could leave SecAgg+'s range"
    seed = np.random.SeedSequence([_round_seed(data, settings, server_round), 0x5EC])  # apart from training's
    noisy = seval.noisy(values, variance=share.own_variance, rng=np.random.default_rng(seed))
    floats = seval.to_secagg_floats(
        noisy,
        weight=weight,
        clipping_range=secagg.clipping_range,
        quantization_range=secagg.quantization_range,
        max_weight=secagg.max_weight,
    )
    return CountRelease(floats, booked, {"secure-evaluation": status, "evaluation-variance": share.own_variance})


def _no_counts(data: InstitutionData, settings: RunSettings, server_round: int) -> list[np.ndarray]:
    """A local-DP refusal's place for the counts (it weighs 0: nothing of it reaches the sum)."""
    if seval.evaluated_round(settings, server_round) is None:
        return []
    return [np.zeros(seval.cells(data.schema.num_classes), dtype=np.float64)]


def _received_model(
    data: InstitutionData, settings: RunSettings, weights: Sequence[np.ndarray], server_round: int
) -> nn.Module | None:
    """The received global model, when this round's secure evaluation scores it (None: it scores none)."""
    if seval.evaluated_round(settings, server_round) is None:
        return None
    return _model_with(data, settings, weights)


def _model_with(data: InstitutionData, settings: RunSettings, weights: Sequence[np.ndarray]) -> nn.Module:
    model = build_model(settings.train, data.schema, seed=settings.seed)
    set_weights(model, weights)
    return model


def evaluate_round(
    data: InstitutionData,
    weights: Sequence[np.ndarray],
    settings: RunSettings,
    *,
    server_round: int | None = None,
    run_id: str | None = None,
) -> tuple[float, int, dict[str, Any]]:
    """The global model's loss and metrics on this institution's held-out records.

    An institution whose policy does not share evaluation metrics reports nothing
    (zero weight, no metrics but its name). Nor does one whose held-out set is smaller
    than its policy's ``min-eval-records`` (a score over a handful of records is a fact
    about them), nor, with ``one-evaluation-per-trained-round``, one asked again for a
    round it has evaluated or for a round (``run_id``, ``server_round``) its ledger shows
    it did not train in (``fedsilo.client.evaluations``): each of these replies with zero
    weight and a ``refused`` reason. The round is claimed before any score is computed.
    """
    policy, name = data.policy, data.name
    if (mismatch := schema_problem(data, settings)) is not None:  # before any model is built
        return 0.0, 0, {"institution": name, "refused": f"{name} refused to evaluate: {mismatch}"}
    if not policy.share_eval_metrics:
        return 0.0, 0, {"institution": name, "withheld": True}
    bound = weight_bound(settings, secure_aggregation=settings.secagg.enabled)
    refused = None
    if (problem := weights_problem(weights, settings, data.schema, bound=bound)) is not None:
        refused = problem
    elif len(data.test_y) < policy.min_eval_records:  # the count itself stays with the institution
        refused = f"its held-out set is smaller than its policy's min-eval-records {policy.min_eval_records}"
    elif policy.one_evaluation_per_trained_round:
        if server_round is None or run_id is None:
            refused = "the request names no run and round, and it evaluates each round it trained in once"
        else:
            refused = claim_evaluation(
                data.state_dir,
                data.fingerprint,
                run_id=run_id,
                server_round=server_round,
                recorded_at=datetime.now(UTC).isoformat(timespec="seconds"),
            )
    if refused is not None:
        when = "" if server_round is None else f" round {server_round}"
        return 0.0, 0, {"institution": name, "refused": f"{name} refused to evaluate{when}: {refused}"}
    model = _model_with(data, settings, weights)
    metrics = evaluate(model, data.test_x, data.test_y)
    loss = metrics.pop("loss")
    return (loss if math.isfinite(loss) else 0.0), len(data.test_y), {"institution": name, **metrics}
