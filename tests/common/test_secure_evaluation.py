"""Private federation-wide evaluation: counts through Flower's real SecAgg+ arithmetic, estimates, calibration."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import roc_auc_score

from fedsilo.client.mods import seeded_global_numpy
from fedsilo.common import secure_evaluation as seval
from fedsilo.common.accounting import DPSGDEvent, epsilon_spent, skellam_event
from fedsilo.common.aggregation import plan_distributed
from fedsilo.common.errors import ConfigError
from fedsilo.common.settings import Proposal, RunSettings, SecAggSettings
from fedsilo.common.training import plan_round
from fedsilo.server.aggregation import secaggplus_client_vector, secaggplus_unmasked_aggregate

SECAGG = SecAggSettings()


def through_secagg(counts: list[np.ndarray], weights: list[int], *, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Each institution's model layer and counts through Flower's quantize / sum / dequantize; the coordinator's decode.

    Returns the recovered integer sum of the counts and the recovered (weighted mean) model layer.
    """
    rng = np.random.default_rng(seed)
    layers = [rng.uniform(-1, 1, 7).astype(np.float32) for _ in counts]
    vectors = []
    for i, (values, weight) in enumerate(zip(counts, weights, strict=True)):
        floats = seval.to_secagg_floats(
            values,
            weight=weight,
            clipping_range=SECAGG.clipping_range,
            quantization_range=SECAGG.quantization_range,
            max_weight=SECAGG.max_weight,
        )
        with seeded_global_numpy(seed + i):  # Flower's stochastic rounding draws from numpy's global generator
            vectors.append(secaggplus_client_vector([layers[i], floats], weight, SECAGG))
    layer, aggregate = secaggplus_unmasked_aggregate(vectors, SECAGG)
    ratios = [
        seval.weight_ratio(w, max_weight=SECAGG.max_weight, quantization_range=SECAGG.quantization_range)
        for w in weights
    ]
    summed = seval.integer_sum(
        aggregate,
        total_ratio=sum(ratios),
        contributors=sum(q > 0 for q in ratios),
        clipping_range=SECAGG.clipping_range,
        quantization_range=SECAGG.quantization_range,
    )
    return summed, layer


@pytest.mark.parametrize("institutions", [2, 3, 7, 30, 100])
def test_noisy_counts_pass_through_flowers_secagg_exactly_in_local_mode(institutions: int) -> None:
    # Prepare: any record counts (so any quantized weight ratio), counts with Skellam noise (negative cells too).
    rng = np.random.default_rng(institutions)
    weights = [int(w) for w in rng.integers(1, 1001, institutions)]
    counts = [seval.noisy(rng.integers(0, 500, 20), variance=400.0, rng=rng) for _ in range(institutions)]
    # Execute
    summed, _ = through_secagg(counts, weights, seed=institutions)
    # Assert: the exact integer sum, every cell, whatever each institution's weight.
    np.testing.assert_array_equal(summed, np.sum(counts, axis=0))


@given(
    weights=st.lists(st.integers(1, 1000), min_size=2, max_size=6),
    cell=st.integers(-(1 << 16), 1 << 16),
)
@settings(max_examples=60, deadline=None)
def test_any_count_at_any_weight_is_quantized_without_rounding(weights: list[int], cell: int) -> None:
    counts = [np.array([cell, -cell, 0, 1, -1], dtype=np.int64) + i for i in range(len(weights))]
    summed, _ = through_secagg(counts, weights, seed=len(weights))
    np.testing.assert_array_equal(summed, np.sum(counts, axis=0))


@pytest.mark.parametrize("institutions", [2, 5, 50])
def test_counts_pass_through_exactly_in_distributed_mode_and_refusals_add_only_their_noise(institutions: int) -> None:
    # Distributed DP: every contribution, a refusal too, weighs secagg-max-weight (ratio exactly 1).
    rng = np.random.default_rng(7)
    full = int(SECAGG.max_weight)
    counts = [seval.noisy(np.zeros(16, dtype=np.int64), variance=25.0, rng=rng) for _ in range(institutions)]
    counts[0] = counts[0] + rng.integers(0, 300, 16)
    summed, _ = through_secagg(counts, [full] * institutions, seed=3)
    np.testing.assert_array_equal(summed, np.sum(counts, axis=0))


def test_a_zero_weight_refusal_adds_nothing_and_the_model_part_is_unchanged() -> None:
    rng = np.random.default_rng(1)
    counts = [rng.integers(0, 50, 20) for _ in range(3)]
    summed, layer = through_secagg(counts, [400, 0, 250], seed=11)
    np.testing.assert_array_equal(summed, counts[0] + counts[2])  # local mode: a refusal's counts weigh 0
    _, alone = through_secagg([np.zeros(20, dtype=np.int64)] * 3, [400, 0, 250], seed=11)
    np.testing.assert_array_equal(layer, alone)  # the counts ride beside the model without touching it


def test_counts_have_sensitivity_one_per_record() -> None:
    rng = np.random.default_rng(0)
    probabilities = rng.dirichlet([1.0, 1.0], 200)
    labels = rng.integers(0, 2, 200)
    full = seval.counts(probabilities, labels, 2)
    for i in range(0, 200, 37):
        without = seval.counts(np.delete(probabilities, i, 0), np.delete(labels, i), 2)
        assert np.abs(full - without).sum() == 1  # L1 = L2 = 1
    three = rng.dirichlet([1.0] * 3, 60)
    assert seval.counts(three, rng.integers(0, 3, 60), 3).sum() == 60


def test_estimate_from_exact_counts_is_the_pooled_accuracy_and_a_binned_auc() -> None:
    rng = np.random.default_rng(5)
    labels = rng.integers(0, 2, 2000)
    p1 = 1 / (1 + np.exp(-(labels * 1.5 - 0.75 + rng.normal(0, 1, 2000))))
    probabilities = np.stack([1 - p1, p1], axis=1)
    found = seval.estimate(seval.counts(probabilities, labels, 2), num_classes=2, variance=0.0)
    assert found["accuracy"] == pytest.approx(float(np.mean((p1 >= 0.5) == labels)))
    assert found["auc"] == pytest.approx(roc_auc_score(labels, p1), abs=0.02)  # ten bins: ties count half
    assert found["accuracy_sd"] == 0.0


def test_noisy_estimates_stay_within_their_stated_spread() -> None:
    rng = np.random.default_rng(9)
    labels = rng.integers(0, 2, 3000)
    p1 = labels * 0.3 + rng.uniform(0.05, 0.65, 3000)  # accuracy about 0.75
    exact = seval.counts(np.stack([1 - p1, p1], axis=1), labels, 2)
    truth = seval.estimate(exact, num_classes=2, variance=0.0)["accuracy"]
    errors = []
    for _ in range(200):
        found = seval.estimate(seval.noisy(exact, variance=100.0, rng=rng), num_classes=2, variance=100.0)
        errors.append((found["accuracy"] - truth) / found["accuracy_sd"])
    assert abs(np.mean(errors)) < 0.3 and 0.7 < np.std(errors) < 1.3


def test_evaluations_are_planned_from_public_facts_and_lag_one_round() -> None:
    off = Proposal(rounds=6, eval_every=2)
    assert seval.evaluation_plan(off) is None and seval.planned_evaluations(off) == 0
    on = replace(off, secure_evaluation=True)
    # Fit round r scores the model of round r - 1 when eval-every evaluates it: rounds 3 and 5 (models 2, 4).
    assert [seval.evaluated_round(on, r) for r in range(1, 7)] == [None, None, 2, None, 4, None]
    assert seval.planned_evaluations(on) == 2
    # A long run scores at most MAX_SECURE_EVALUATIONS models, evenly spaced, the latest one always.
    long = Proposal(rounds=256, secure_evaluation=True)
    scored = [m for r in range(1, 257) if (m := seval.evaluated_round(long, r)) is not None]
    assert scored == list(range(255 - 32 * 7, 256, 32)) and seval.planned_evaluations(long) == 8
    assert seval.evaluated_round(long, 256) == 255


def test_calibrated_runs_spend_their_target_with_secure_evaluation_on() -> None:
    # Prepare: local DP-SGD and distributed DP, each with its planned evaluations.
    proposal = Proposal(rounds=5, secure_evaluation=True)
    plan = seval.evaluation_plan(proposal)
    assert plan is not None and plan.evaluations == 4
    delta, target = proposal.privacy.delta, proposal.privacy.target_epsilon
    evaluations = [plan.event] * plan.evaluations
    # The evaluations alone spend the reserved tenth.
    alone = epsilon_spent(evaluations, delta=delta)
    assert 0.97 * seval.EVAL_EPSILON_FRACTION * target <= alone <= seval.EVAL_EPSILON_FRACTION * target
    # Execute: local DP-SGD, calibrated alongside them.
    rounds = plan_round(
        num_examples=400,
        train=proposal.train,
        privacy=proposal.privacy,
        planned_rounds=proposal.rounds,
        alongside=seval.evaluation_events(proposal),
    )
    local = [DPSGDEvent(rounds.noise_multiplier, rounds.sample_rate, rounds.steps)] * proposal.rounds
    spent_local = epsilon_spent([*local, *evaluations], delta=delta)
    # Distributed DP's Skellam rounds, likewise.
    distributed = replace(proposal, privacy=replace(proposal.privacy, mode="distributed"))
    step = plan_distributed(distributed, 100)
    event = skellam_event(
        noise_multiplier=step.noise_multiplier,
        sample_rate=step.sample_rate,
        steps=distributed.rounds,
        scale=step.scale,
        max_grad_norm=step.max_grad_norm,
        dim_padded=step.dim_padded,
    )
    spent_distributed = epsilon_spent([event, *evaluations], delta=delta)
    # Assert: each run ends at or below its target, and not far below it.
    assert 0.97 * target <= spent_local <= target
    assert 0.97 * target <= spent_distributed <= target
    # Without the evaluations' reserve, training alone would have had less noise.
    bare = plan_round(num_examples=400, train=proposal.train, privacy=proposal.privacy, planned_rounds=proposal.rounds)
    assert bare.noise_multiplier < rounds.noise_multiplier


def test_a_proposal_whose_evaluation_could_not_hold_is_refused_before_any_round() -> None:
    # A fixed noise multiplier leaves target-epsilon unused, so the counts' tenth of it would be
    # whatever the coordinator wrote; and counts pass SecAgg+ exactly only with powers of two.
    with pytest.raises(ConfigError, match="noise-multiplier"):
        RunSettings.from_config({"secure-evaluation": True, "noise-multiplier": 5.0, "target-epsilon": 200.0})
    with pytest.raises(ConfigError, match="power of two"):
        RunSettings.from_config({"secure-evaluation": True, "secagg-clipping-range": 3.0})
