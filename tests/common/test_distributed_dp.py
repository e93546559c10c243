"""Distributed DP's encoding: the rotation, Skellam shares, and integers through Flower's real SecAgg+ arithmetic."""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from flwr.common import ArrayRecord, ConfigRecord, FitIns, Parameters
from flwr.server.workflow import SecAggPlusWorkflow
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from fedsilo.client.mods import seeded_global_numpy
from fedsilo.common.distributed_dp import (
    SCALE_FACTOR,
    decode,
    encode,
    honest_problem,
    integer_sum_from_secagg,
    noise_share,
    out_of_range_probability,
    overflow_margin,
    padded_dimension,
    remove_offsets,
    rotate,
    rotation_seed,
    scale_for,
    secagg_bits,
    secagg_round_parameters,
    sensitivities,
    skellam_noise,
    to_secagg_floats,
    unrotate,
)
from fedsilo.common.errors import ConfigError
from fedsilo.common.settings import SecAggSettings
from fedsilo.runtime.flower.internals import MAIN_CONFIGS_RECORD, WorkflowKey, WorkflowState
from fedsilo.server.aggregation import secaggplus_client_vector, secaggplus_unmasked_aggregate

DEFAULTS = SecAggSettings()
BITS = secagg_bits(
    clipping_range=DEFAULTS.clipping_range,
    quantization_range=DEFAULTS.quantization_range,
    modulus_range=DEFAULTS.modulus_range,
)


def through_secagg(vectors: list[np.ndarray], *, seed: int) -> np.ndarray:
    """The integer sum the coordinator recovers when each institution sends ``vectors[i]`` through SecAgg+."""
    with seeded_global_numpy(seed):
        sent = [
            secaggplus_client_vector(
                [
                    to_secagg_floats(
                        v, clipping_range=DEFAULTS.clipping_range, quantization_range=DEFAULTS.quantization_range
                    )
                ],
                num_examples=int(DEFAULTS.max_weight),
                secagg=DEFAULTS,
            )
            for v in vectors
        ]
    (mean,) = secaggplus_unmasked_aggregate(sent, DEFAULTS)
    return integer_sum_from_secagg(
        mean,
        contributors=len(vectors),
        clipping_range=DEFAULTS.clipping_range,
        quantization_range=DEFAULTS.quantization_range,
        bits=BITS,
    )


def centred(integers: np.ndarray) -> np.ndarray:
    half = 1 << (BITS - 1)
    return (np.asarray(integers, dtype=np.int64) + half) % (1 << BITS) - half


def clipped_sum(rng: np.random.Generator, *, records: int, dim: int, bound: float) -> np.ndarray:
    """A sum of ``records`` per-record gradients, each clipped to l2 norm ``bound``."""
    grads = rng.normal(size=(records, dim)) * rng.uniform(0.1, 3.0, size=(records, 1))
    norms = np.linalg.norm(grads, axis=1, keepdims=True)
    return (grads * np.minimum(1.0, bound / norms)).sum(axis=0)


def flowers_round_parameters(sample: int, *, num_shares: float, reconstruction_threshold: float) -> tuple[int, int]:
    """Shares and threshold as Flower's own ``setup_stage`` sets them, stopped before it sends anything."""

    class Stop(Exception):
        pass

    class Watched(WorkflowState):
        armed = False

        def __setattr__(self, name: str, value: Any) -> None:
            if self.armed and name == "nid_to_neighbours":  # set just after the shares and threshold
                raise Stop
            super().__setattr__(name, value)

    flow = SecAggPlusWorkflow(
        **SecAggSettings(num_shares=num_shares, reconstruction_threshold=reconstruction_threshold).workflow_kwargs()
    )
    fits = [(SimpleNamespace(node_id=i), FitIns(Parameters([], ""), {})) for i in range(1, sample + 1)]
    context = SimpleNamespace(
        state=SimpleNamespace(
            config_records={MAIN_CONFIGS_RECORD: ConfigRecord({WorkflowKey.CURRENT_ROUND: 1})},
            array_records=defaultdict(ArrayRecord),
        ),
        strategy=SimpleNamespace(configure_fit=lambda *_: fits),
        client_manager=SimpleNamespace(num_available=lambda: sample),
    )
    state = Watched()
    state.armed = True
    with pytest.raises(Stop):
        flow.setup_stage(None, context, state)  # type: ignore[arg-type]
    return state.num_shares, state.threshold


# --- the rotation -------------------------------------------------------------------------


@pytest.mark.parametrize("dim", [1, 2, 5, 64, 1000])
def test_the_rotation_preserves_the_norm_and_inverts(dim: int) -> None:
    # Prepare
    x = np.random.default_rng(dim).normal(size=dim) * 10
    seed = rotation_seed(7, 3)
    # Execute
    rotated = rotate(x, seed=seed)
    back = unrotate(rotated, seed=seed, dim=dim)
    # Assert
    assert rotated.shape == (padded_dimension(dim),)
    assert math.isclose(np.linalg.norm(rotated), np.linalg.norm(x), rel_tol=1e-12)
    assert np.allclose(back, x, rtol=0, atol=1e-12 * np.abs(x).max())


def test_the_rotation_is_an_orthonormal_matrix_and_spreads_a_spike() -> None:
    # Prepare: the rotation of each basis vector, as the columns of a matrix
    dim, seed = 16, rotation_seed(1, 1)
    matrix = np.column_stack([rotate(np.eye(dim)[i], seed=seed) for i in range(dim)])
    # Assert: orthonormal, and every coordinate of a rotated spike has magnitude 1/sqrt(d_p)
    assert np.allclose(matrix.T @ matrix, np.eye(dim), atol=1e-12)
    assert np.allclose(np.abs(matrix), 1 / math.sqrt(dim))


def test_the_rotation_seed_is_public_per_round_and_the_signs_follow_it() -> None:
    x = np.arange(1.0, 9.0)
    assert rotation_seed(42, 1) == rotation_seed(42, 1)
    assert len({rotation_seed(42, r) for r in range(50)} | {rotation_seed(43, 1)}) == 51
    assert np.array_equal(rotate(x, seed=5), rotate(x, seed=5))
    assert not np.allclose(rotate(x, seed=5), rotate(x, seed=6))


@pytest.mark.parametrize(("dim", "padded"), [(1, 1), (2, 2), (3, 4), (64, 64), (65, 128), (1000, 1024)])
def test_padding_is_to_the_next_power_of_two(dim: int, padded: int) -> None:
    assert padded_dimension(dim) == padded


# --- integers through Flower's SecAgg+ ------------------------------------------------------


def test_default_settings_carry_22_bits() -> None:
    assert BITS == 22


@pytest.mark.parametrize("institutions", [2, 3, 10, 100])
def test_integers_pass_through_flowers_secagg_exactly(institutions: int) -> None:
    # Prepare: random integers over the whole range, its two ends included
    rng = np.random.default_rng(institutions)
    vectors = [rng.integers(0, 1 << BITS, size=257) for _ in range(institutions)]
    for v in vectors:
        v[:2] = (0, (1 << BITS) - 1)
    # Execute
    recovered = through_secagg(vectors, seed=institutions)
    # Assert
    assert recovered.dtype == np.int64
    assert np.array_equal(recovered, np.sum(vectors, axis=0))  # exactly the sum: nothing wraps


def test_a_sent_integer_is_quantized_to_itself_without_rounding() -> None:
    # Prepare: every float lies exactly on Flower's quantization grid, so its stochastic rounding draws nothing
    z = np.arange(0, 1 << BITS, 4099)
    # Execute: two different global seeds
    with seeded_global_numpy(0):
        first = secaggplus_client_vector(
            [to_secagg_floats(z, clipping_range=8.0, quantization_range=1 << 22)], 1000, DEFAULTS
        )
    with seeded_global_numpy(1):
        second = secaggplus_client_vector(
            [to_secagg_floats(z, clipping_range=8.0, quantization_range=1 << 22)], 1000, DEFAULTS
        )
    # Assert: the weight is exactly 1 (Q levels) and the vector is z itself
    assert first[0][0] == DEFAULTS.quantization_range
    assert np.array_equal(first[1], z) and np.array_equal(second[1], z)


def test_a_mean_that_is_not_a_sum_of_integers_is_refused() -> None:
    # Prepare: one institution sends at half weight, so Flower's mean is no longer a sum of integers
    z = np.full(8, 12345)
    floats = to_secagg_floats(z, clipping_range=8.0, quantization_range=1 << 22)
    with seeded_global_numpy(0):
        sent = [secaggplus_client_vector([floats], n, DEFAULTS) for n in (1000, 500)]
    (mean,) = secaggplus_unmasked_aggregate(sent, DEFAULTS)
    # Execute / Assert
    with pytest.raises(ConfigError, match="secagg-max-weight"):
        integer_sum_from_secagg(mean, contributors=2, clipping_range=8.0, quantization_range=1 << 22, bits=BITS)


@pytest.mark.parametrize(
    ("clipping", "quantization", "modulus", "key"),
    [
        (10.0, 1 << 22, 1 << 32, "secagg-clipping-range"),
        (8.0, 4_000_000, 1 << 32, "secagg-quantization-range"),
        (8.0, 1 << 22, 1 << 20, "secagg-modulus-range"),
    ],
)
def test_secagg_bits_refuses_settings_that_would_reround(
    clipping: float, quantization: int, modulus: int, key: str
) -> None:
    with pytest.raises(ConfigError, match=key):
        secagg_bits(clipping_range=clipping, quantization_range=quantization, modulus_range=modulus)


def test_secagg_bits_accepts_fractional_powers_of_two() -> None:
    assert secagg_bits(clipping_range=0.5, quantization_range=1 << 16, modulus_range=1 << 32) == 16


def test_only_integers_in_range_are_sent() -> None:
    with pytest.raises(ConfigError, match=r"\[0, 4194304\)"):
        to_secagg_floats(np.array([-1, 3]), clipping_range=8.0, quantization_range=1 << 22)
    with pytest.raises(ConfigError, match="integers"):
        to_secagg_floats(np.array([0.5]), clipping_range=8.0, quantization_range=1 << 22)


# --- Skellam noise and its shares -----------------------------------------------------------


def test_skellam_noise_fits_scipys_skellam() -> None:
    # Prepare
    lam, draws = 2.0, 20_000
    noise = skellam_noise(lam, draws, np.random.default_rng(11))
    support = np.arange(-6, 7)
    observed = np.array([np.sum(noise <= -6), *[np.sum(noise == k) for k in support[1:-1]], np.sum(noise >= 6)])

    def expected(mu: float) -> np.ndarray:
        law = stats.skellam(mu1=mu, mu2=mu)
        probabilities = np.array([law.cdf(-6), *law.pmf(support[1:-1]), law.sf(5)])
        return draws * probabilities

    # Execute
    fits = stats.chisquare(observed, expected(lam / 2)).pvalue
    wrong = stats.chisquare(observed, expected(lam)).pvalue  # Pois(lam) - Pois(lam): twice the variance
    # Assert
    assert noise.dtype == np.int64
    assert fits > 0.001
    assert wrong < 1e-6


def test_zero_variance_noise_is_zero() -> None:
    assert np.array_equal(skellam_noise(0.0, 5, np.random.default_rng(0)), np.zeros(5, dtype=np.int64))
    with pytest.raises(ConfigError, match="-1"):
        skellam_noise(-1.0, 5, np.random.default_rng(0))


LAMBDAS = (3.0, 10.0, 0.5, 20.0, 7.0)


def zero_signal_shares(dim: int, *, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [encode(np.zeros(dim), seed=1, scale=100.0, noise_variance=lam, bits=BITS, rng=rng) for lam in LAMBDAS]


def test_a_zero_signal_sum_carries_the_summed_noise_variance() -> None:
    # Prepare
    dim = 1 << 17
    shares = zero_signal_shares(dim, seed=3)
    # Execute
    noise = remove_offsets(np.sum(shares, axis=0), contributors=len(shares), bits=BITS)
    decoded = decode(
        remove_offsets(np.sum(shares, axis=0), contributors=len(shares), bits=BITS), seed=1, scale=1.0, dim=dim
    )
    # Assert: mean 0 and variance sum(lam_j), in the integers and after un-rotating (orthonormal)
    total = sum(LAMBDAS)
    for values in (noise, decoded):
        assert abs(values.mean()) < 5 * math.sqrt(total / dim)
        assert values.var() == pytest.approx(total, rel=0.02)


def test_dropping_a_share_lowers_the_variance_by_its_share() -> None:
    # Prepare
    dim = 1 << 17
    shares = zero_signal_shares(dim, seed=4)
    dropped = LAMBDAS.index(20.0)
    # Execute
    kept = [s for i, s in enumerate(shares) if i != dropped]
    survivors = remove_offsets(np.sum(kept, axis=0), contributors=len(kept), bits=BITS)
    # Assert
    assert survivors.var() == pytest.approx(sum(LAMBDAS) - 20.0, rel=0.02)


# --- encode and decode ---------------------------------------------------------------------


@pytest.mark.parametrize(("institutions", "dim"), [(2, 10), (5, 1000), (10, 129)])
def test_without_noise_the_decoded_sum_is_the_gradient_sum_within_rounding(institutions: int, dim: int) -> None:
    # Prepare: each institution's sum of clipped per-record gradients
    rng = np.random.default_rng(dim)
    bound = 1.5
    dim_padded = padded_dimension(dim)
    scale = scale_for(dim_padded=dim_padded, max_grad_norm=bound)
    gradients = [clipped_sum(rng, records=50, dim=dim, bound=bound) for _ in range(institutions)]
    seed = rotation_seed(42, 2)
    # Execute
    sent = [encode(g, seed=seed, scale=scale, noise_variance=0.0, bits=BITS, rng=rng) for g in gradients]
    summed = remove_offsets(np.sum(sent, axis=0), contributors=institutions, bits=BITS)
    decoded = decode(summed, seed=seed, scale=scale, dim=dim)
    # Assert
    assert all(s.dtype == np.int64 and s.min() >= 0 and s.max() < 1 << BITS for s in sent)
    assert np.linalg.norm(decoded - np.sum(gradients, axis=0)) <= institutions * math.sqrt(dim_padded) / scale


def test_the_whole_pipeline_through_flowers_secagg_decodes_what_the_integer_sum_decodes() -> None:
    # Prepare: noised shares, so the integers use the whole range and wrap
    rng = np.random.default_rng(8)
    dim, bound, institutions = 300, 1.0, 6
    scale = scale_for(dim_padded=padded_dimension(dim), max_grad_norm=bound)
    share = noise_share(total_variance=(scale * 1.1 * bound) ** 2, sample=institutions, threshold=4, min_honest=5)
    gradients = [clipped_sum(rng, records=20, dim=dim, bound=bound) for _ in range(institutions)]
    sent = [encode(g, seed=9, scale=scale, noise_variance=share.own_variance, bits=BITS, rng=rng) for g in gradients]
    # Execute
    recovered = through_secagg(sent, seed=1)
    # Assert: bit for bit the integer sum, and a decoded sum near the gradient sum (noise std ~ 1.1 * C)
    assert np.array_equal(recovered, np.sum(sent, axis=0))  # the exact sum: nothing wraps
    decoded = decode(remove_offsets(recovered, contributors=institutions, bits=BITS), seed=9, scale=scale, dim=dim)
    error = decoded - np.sum(gradients, axis=0)
    assert np.std(error) == pytest.approx(math.sqrt(institutions * share.own_variance) / scale, rel=0.2)


def test_a_negative_heavy_vector_comes_back_without_wrapping() -> None:
    # Prepare: every coordinate negative, so most scaled coordinates are below 0
    rng = np.random.default_rng(5)
    dim = 77
    gradient = -np.abs(rng.normal(size=dim)) * 3
    scale = scale_for(dim_padded=padded_dimension(dim), max_grad_norm=1.0)
    # Execute
    sent = encode(gradient, seed=2, scale=scale, noise_variance=0.0, bits=BITS, rng=rng)
    decoded = decode(remove_offsets(sent, contributors=1, bits=BITS), seed=2, scale=scale, dim=dim)
    # Assert: below the offset, never wrapped to the top of the range
    assert np.sum(sent < 1 << (BITS - 1)) > 0 and sent.max() < (1 << (BITS - 1)) + (1 << (BITS - 2))
    assert np.linalg.norm(decoded - gradient) <= math.sqrt(padded_dimension(dim)) / scale


def test_the_sum_shows_only_the_sum_of_signal_and_noise_never_how_many_were_negative() -> None:
    # Prepare: two sets of two contributions with the same sum of signal plus noise per coordinate,
    # one with both values small and positive, one with one large negative and one large positive
    # value (a per-institution wrap mod 2^b would make their secure sums differ by 2^b).
    rng = np.random.default_rng(0)
    dim, scale = 64, 1.0
    base = rng.normal(size=dim) * 100
    pair_a = [base / 2, base / 2]
    pair_b = [base - 5000.0, np.full(dim, 5000.0)]
    seed = 3
    # Execute: no noise, the same dither stream for both pairs
    sums = []
    for pair in (pair_a, pair_b):
        stream = np.random.default_rng(11)
        sums.append(
            np.sum([encode(g, seed=seed, scale=scale, noise_variance=0.0, bits=BITS, rng=stream) for g in pair], axis=0)
        )
    # Assert: the secure sums differ by no multiple of 2^b: within the two roundings of each coordinate
    assert np.abs(sums[0] - sums[1]).max() <= 2 * 64


def test_the_chance_of_leaving_the_range_is_negligible_for_central_noise_and_large_for_huge_noise() -> None:
    # sigma 13 at C = 1 on a 2^15-coordinate model: s*sigma*C = 32*181*13, far inside 2^20.
    variance = (32 * math.sqrt(1 << 15) * 13) ** 2
    assert out_of_range_probability(variance=variance, bits=BITS, dim_padded=1 << 15) < 1e-30
    assert out_of_range_probability(variance=(1 << 20) ** 2, bits=BITS, dim_padded=1 << 15) == 1.0
    assert out_of_range_probability(variance=0.0, bits=BITS, dim_padded=8) == 0.0


def test_the_overflow_margin_is_the_largest_centred_coordinate() -> None:
    half = 1 << (BITS - 1)
    assert overflow_margin(np.array([3, (1 << BITS) - half // 2]), bits=BITS) == 0.5
    assert overflow_margin(np.array([0, 0]), bits=BITS) == 0.0


def test_the_scale_adds_one_thirty_second_to_the_sensitivity() -> None:
    # Prepare
    dim_padded, bound = 1024, 0.7
    # Execute
    scale = scale_for(dim_padded=dim_padded, max_grad_norm=bound)
    l2, l1 = sensitivities(scale=scale, max_grad_norm=bound, dim_padded=dim_padded)
    # Assert
    assert scale * bound == pytest.approx(SCALE_FACTOR * 32)
    assert l2 == pytest.approx(scale * bound * (1 + 1 / SCALE_FACTOR))
    assert l1 == pytest.approx(l2 * 32)
    assert sensitivities(scale=0.5, max_grad_norm=1.0, dim_padded=4)[1] == pytest.approx(2.5 * 2)
    assert sensitivities(scale=0.1, max_grad_norm=1.0, dim_padded=1)[1] == pytest.approx(1.1 * 1)


def test_decode_refuses_a_sum_of_the_wrong_length() -> None:
    with pytest.raises(ConfigError, match="1024"):
        decode(np.zeros(512, dtype=np.int64), seed=1, scale=1.0, dim=1000)


# --- who must be honest ----------------------------------------------------------------------


def test_counting_on_one_honest_institution_adds_all_the_noise() -> None:
    share = noise_share(total_variance=90.0, sample=9, threshold=6, min_honest=1)
    assert share.own_variance == 90.0 and share.counted_honest == 1


def test_counting_on_everyone_without_dropouts_adds_an_equal_share() -> None:
    share = noise_share(total_variance=90.0, sample=9, threshold=9, min_honest=9)
    assert share.own_variance == pytest.approx(10.0) and share.counted_honest == 9


def test_dropouts_the_threshold_allows_are_made_up_for() -> None:
    # 10 sampled, 3 may drop out, 6 honest counted on: at least 3 honest survive, own included
    share = noise_share(total_variance=100.0, sample=10, threshold=7, min_honest=6)
    assert share.counted_honest == 3
    assert share.own_variance == pytest.approx(80.0)


@settings(max_examples=200, deadline=None)
@given(
    sample=st.integers(min_value=1, max_value=60),
    data=st.data(),
    total=st.floats(min_value=0.0, max_value=1e9, allow_nan=False),
)
def test_own_share_and_the_honest_others_make_the_total(sample: int, data: st.DataObject, total: float) -> None:
    # Prepare
    threshold = data.draw(st.integers(min_value=1, max_value=sample))
    min_honest = data.draw(st.integers(min_value=1, max_value=80))
    # Execute
    share = noise_share(total_variance=total, sample=sample, threshold=threshold, min_honest=min_honest)
    problem = honest_problem(sample=sample, threshold=threshold, min_honest=min_honest)
    # Assert
    k = share.counted_honest
    assert 1 <= k <= sample
    assert k == min(max(1, min_honest - (sample - threshold)), sample)
    assert share.own_variance + (k - 1) * share.share_variance == pytest.approx(total, rel=1e-12, abs=1e-9)
    assert share.share_variance <= share.own_variance <= total * (1 + 1e-12) + 1e-300  # subnormal totals round
    assert (problem is None) == (min_honest <= sample)


def test_the_honest_problem_says_what_to_change() -> None:
    problem = honest_problem(sample=3, threshold=2, min_honest=5)
    assert problem is not None and "5 honest" in problem and "only 3" in problem and "min-honest" in problem


@pytest.mark.parametrize(
    ("sample", "threshold", "min_honest", "found"),
    [(0, 1, 1, "found 0"), (5, 6, 1, "found 6"), (5, 0, 1, "found 0"), (5, 3, 0, "min-honest")],
)
def test_a_noise_share_refuses_impossible_rounds(sample: int, threshold: int, min_honest: int, found: str) -> None:
    with pytest.raises(ConfigError, match=found):
        noise_share(total_variance=1.0, sample=sample, threshold=threshold, min_honest=min_honest)


# --- SecAgg+'s shares and threshold ----------------------------------------------------------

SETTINGS = [(1.0, 0.67), (0.5, 0.67), (0.3, 0.5), (1.5, 1.0), (3.0, 2.0), (4.0, 0.67), (5.0, 3.0), (10.0, 0.1)]


@pytest.mark.parametrize(("num_shares", "threshold"), SETTINGS)
def test_round_parameters_are_flowers_own(num_shares: float, threshold: float) -> None:
    for sample in range(2, 21):
        assert secagg_round_parameters(
            sample, num_shares=num_shares, reconstruction_threshold=threshold
        ) == flowers_round_parameters(sample, num_shares=num_shares, reconstruction_threshold=threshold), sample


@pytest.mark.parametrize(
    ("sample", "expected"),
    [(2, (2, 2)), (3, (3, 2)), (4, (4, 3)), (5, (5, 3)), (10, (10, 7)), (20, (20, 13))],
)
def test_the_default_settings_give_two_thirds_of_the_round(sample: int, expected: tuple[int, int]) -> None:
    assert secagg_round_parameters(sample, num_shares=1.0, reconstruction_threshold=0.67) == expected


@pytest.mark.parametrize(("num_shares", "threshold", "key"), [(2.0, 0.5, "num-shares"), (4.0, 4.0, "threshold")])
def test_round_parameters_refuse_what_flower_refuses(num_shares: float, threshold: float, key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        secagg_round_parameters(5, num_shares=num_shares, reconstruction_threshold=threshold)
