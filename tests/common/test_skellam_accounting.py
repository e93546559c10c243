"""Skellam accounting for distributed DP: Cor. 3.6 of Agarwal et al. under the binomial Poisson-subsampling bound.

Checked against an independent mpmath implementation written from the formulas, against
Opacus's sampled-Gaussian RDP (the same bound fed the Gaussian's RDP), against the exact
Renyi divergences of a subsampled Skellam mechanism in both directions (enumerated), against
dp_accounting's zCDP event at sample rate 1, and against the Gaussian with the same variance,
which it must never undercut.
"""

import math
import re
import warnings
from collections.abc import Callable

import mpmath
import numpy as np
import pytest
from dp_accounting import dp_event
from dp_accounting.rdp.rdp_privacy_accountant import RdpAccountant
from hypothesis import given, settings
from hypothesis import strategies as st
from opacus.accountants.analysis import rdp as opacus_rdp
from scipy.special import logsumexp
from scipy.stats import skellam

from fedsilo.common.accounting import (
    SKELLAM_ORDERS,
    DPSGDEvent,
    SkellamEvent,
    calibrate_noise,
    calibrate_skellam_noise,
    epsilon_spent,
    get_accountant,
    skellam_event,
    skellam_rdp,
    skellam_sensitivity,
    subsampled_rdp,
)
from fedsilo.common.errors import ConfigError

mpmath.mp.dps = 60


def reference_skellam_rdp(a: int, lam: float, d2: float, d1: float) -> mpmath.mpf:
    """Agarwal, Kairouz, Liu (NeurIPS 2021) Cor. 3.6, in 60-digit arithmetic."""
    a_, lam_, d2_, d1_ = (mpmath.mpf(x) for x in (a, lam, d2, d1))
    tail = min(((2 * a_ - 1) * d2_**2 + 6 * d1_) / (4 * lam_**2), 3 * d1_ / (2 * lam_))
    return a_ * d2_**2 / (2 * lam_) + tail


def reference_binomial(a: int, q: float, eps: Callable[[int], mpmath.mpf]) -> tuple[mpmath.mpf, mpmath.mpf]:
    """The binomial expansion of the "add" direction, E_P[(1 - q + q Q/P)^a], and the unsampled eps(a)."""
    g = mpmath.mpf(q)
    total = mpmath.mpf(0)
    for ell in range(a + 1):
        moment = mpmath.exp((ell - 1) * eps(ell)) if ell >= 2 else mpmath.mpf(1)  # E_P[(Q/P)^l]; 1 for l = 0, 1
        total += mpmath.binomial(a, ell) * g**ell * (1 - g) ** (a - ell) * moment
    return mpmath.log(total) / (a - 1), eps(a)


def opacus_epsilon(rdp: np.ndarray, delta: float) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        eps, _ = opacus_rdp.get_privacy_spent(orders=list(SKELLAM_ORDERS), rdp=list(rdp), delta=delta)
    return float(eps)


def gaussian_rdp_epsilon(sigma: float, q: float, steps: int, delta: float) -> float:
    """Opacus's RDP of the sampled Gaussian at the Skellam orders: the like-for-like comparison."""
    rdp = opacus_rdp.compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=list(SKELLAM_ORDERS))
    return opacus_epsilon(np.asarray(rdp), delta)


# A Fashion-MNIST-like round: C = 1, d_p = 2^15, s = 32 sqrt(d_p) / C (the design note's).
DIM = 2**15
SCALE = 32 * math.sqrt(DIM)
D2, D1 = skellam_sensitivity(scale=SCALE, max_grad_norm=1.0, dim_padded=DIM)


@pytest.mark.parametrize(
    ("q", "lam", "d2", "d1", "order"),
    [
        (0.004, (SCALE * 0.9) ** 2, D2, D1, 2),
        (0.004, (SCALE * 0.9) ** 2, D2, D1, 7),
        (0.034, (SCALE * 2.6) ** 2, D2, D1, 3),
        (0.034, (SCALE * 2.6) ** 2, D2, D1, 40),
        (0.01, 4.0e4, 150.0, 600.0, 256),  # large order
        (0.2, 50.0, 10.0, 30.0, 64),  # exp((l-1) eps(l)) ~ e^4000: overflows floats, not logs
        (0.5, 9.0, 3.0, 3.0, 12),  # small variance: the 3 D1 / (2 Lam) branch
        (0.05, 1.0e6, 300.0, 300.0 * 17.0, 1024),  # the largest order accounted
        (1.0, 1.0e4, 50.0, 400.0, 9),  # no subsampling
    ],
)
def test_subsampled_skellam_rdp_matches_an_independent_high_precision_implementation(
    q: float, lam: float, d2: float, d1: float, order: int
) -> None:
    # Prepare
    def ours_unsampled(a: int) -> float:
        return skellam_rdp(a, variance=lam, l2_sensitivity=d2, l1_sensitivity=d1)

    def theirs_unsampled(a: int) -> mpmath.mpf:
        return reference_skellam_rdp(a, lam, d2, d1)

    # Execute
    ours = subsampled_rdp([order], ours_unsampled, q)[0]
    sampled, unsampled = (
        reference_binomial(order, q, theirs_unsampled) if q < 1 else (math.inf, theirs_unsampled(order))
    )
    expected = min(sampled, unsampled)
    # Assert
    assert ours == pytest.approx(float(expected), rel=1e-9)
    assert ours_unsampled(order) == pytest.approx(float(unsampled), rel=1e-12)


def test_the_subsampling_bound_is_what_is_checked_not_only_the_unsampled_fallback() -> None:
    # The points above where the subsampling bound, not eps(a), is the answer (else the test proves little).
    cases = [
        (0.004, (SCALE * 0.9) ** 2, D2, D1, 7),
        (0.034, (SCALE * 2.6) ** 2, D2, D1, 40),
        (0.01, 4e4, 150, 600, 256),
    ]
    for q, lam, d2, d1, order in cases:
        sampled, unsampled = reference_binomial(order, q, lambda a, p=(lam, d2, d1): reference_skellam_rdp(a, *p))
        assert sampled < unsampled


@pytest.mark.parametrize(("q", "sigma"), [(0.001, 0.8), (0.034, 2.0), (0.01, 1.1), (0.25, 5.0)])
def test_fed_the_gaussians_rdp_the_bound_is_opacus_sampled_gaussian_rdp(q: float, sigma: float) -> None:
    # Prepare: Mironov, Talwar and Zhang's exact integer-order RDP of the sampled Gaussian, as Opacus computes it
    orders = [2, 3, 8, 32, 100, 256]
    opacus = np.asarray(opacus_rdp.compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=orders))
    # Execute
    ours = np.asarray(subsampled_rdp(orders, lambda a: a / (2 * sigma**2), q))
    # Assert (ours also takes the unsampled a / (2 sigma^2) where that is smaller)
    expected = np.minimum(opacus, np.asarray(orders) / (2 * sigma**2))
    assert ours == pytest.approx(expected, rel=1e-9)
    assert (opacus < np.asarray(orders) / (2 * sigma**2)).any()  # the sampled bound is what was compared


def subsampled_divergences(log_p: np.ndarray, log_q: np.ndarray, q: float, order: int) -> tuple[float, float]:
    """Exact D_a(mix || P) ("add") and D_a(P || mix) ("remove"), mix = (1 - q) P + q Q, on a finite support."""
    log_mix = np.logaddexp(math.log1p(-q) + log_p, math.log(q) + log_q)
    return renyi(log_mix, log_p, order), renyi(log_p, log_mix, order)


def renyi(log_p: np.ndarray, log_q: np.ndarray, order: int) -> float:
    """Exact D_a(P || Q) on a finite support."""
    return float(logsumexp(order * log_p + (1 - order) * log_q)) / (order - 1)


@pytest.mark.parametrize(
    ("variance", "shift", "q"),
    [(4.0, (1,), 0.05), (4.0, (2,), 0.3), (30.0, (3,), 0.01), (9.0, (2, 1), 0.1), (16.0, (3, -2), 0.5)],
)
def test_the_bound_holds_for_the_subsampled_skellam_in_both_directions_by_exact_enumeration(
    variance: float, shift: tuple[int, ...], q: float
) -> None:
    # Prepare: symmetric Skellam noise (variance Lam per coordinate) on a grid holding all but ~1e-30 of its mass,
    # a record that shifts the integer vector by `shift` when Poisson-sampled (probability q)
    mu = variance / 2
    grid = np.arange(-int(20 * math.sqrt(variance)) - 40, int(20 * math.sqrt(variance)) + 41)
    axes = np.meshgrid(*[grid] * len(shift), indexing="ij")
    log_p = sum(skellam.logpmf(z, mu, mu) for z in axes).ravel()
    log_q = sum(skellam.logpmf(z - v, mu, mu) for z, v in zip(axes, shift, strict=True)).ravel()
    l2 = math.sqrt(sum(v * v for v in shift))
    l1 = float(sum(abs(v) for v in shift))
    for order in (2, 3, 6, 16, 40):
        # Execute
        add, remove = subsampled_divergences(log_p, log_q, q, order)
        (bound,) = subsampled_rdp(
            [order], lambda a: skellam_rdp(a, variance=variance, l2_sensitivity=l2, l1_sensitivity=l1), q
        )
        # The expansion itself, fed the exact unsampled divergences D_l(Q || P): the "add" direction exactly
        (expanded,) = subsampled_rdp([order], lambda a: renyi(log_q, log_p, a), q)
        # Assert: "remove" never exceeds "add" (symmetric noise), and the bound covers both
        assert remove <= add * (1 + 1e-9) + 1e-15, (order, add, remove)
        assert max(add, remove) <= bound * (1 + 1e-9)
        assert expanded == pytest.approx(add, rel=1e-6)


def test_without_symmetry_the_remove_direction_can_exceed_the_add_one() -> None:
    # What the proof uses: for a pair that is not a symmetric-noise shift, "remove" can be the larger.
    log_p, log_q = np.log([0.5, 0.5]), np.log([0.99, 0.01])
    add, remove = subsampled_divergences(log_p, log_q, 0.5, 2)
    assert remove > add


@settings(max_examples=200, deadline=None)
@given(r=st.floats(1e-6, 1e6), q=st.floats(1e-4, 0.9999), order=st.integers(2, 300))
def test_the_lemma_behind_the_remove_direction_holds_pointwise(r: float, q: float, order: int) -> None:
    # h(r) = phi(1 - q + q r) + r phi(1 - q + q / r) >= 0, phi(y) = y^a - y^(1-a) (subsampled_rdp's docstring)
    a, one = mpmath.mpf(order), mpmath.mpf(1)

    def phi(y: mpmath.mpf) -> mpmath.mpf:
        return y**a - y ** (one - a)

    rr, g = mpmath.mpf(r), mpmath.mpf(q)
    h = phi(1 - g + g * rr) + rr * phi(1 - g + g / rr)
    assert h >= -(mpmath.mpf(10) ** -40) * (1 + abs(phi(1 - g + g * rr)))


@pytest.mark.parametrize("steps", [1, 20])
def test_at_sample_rate_one_our_bound_is_at_most_dp_accountings_zcdp_and_equal_on_its_branch(steps: int) -> None:
    # Prepare: the zCDP event expressing Cor. 3.6 with the 3 D1 / (2 Lam) branch always taken
    def zcdp_epsilon(lam: float, d2: float, d1: float) -> float:
        accountant = RdpAccountant(orders=[float(a) for a in SKELLAM_ORDERS])
        event = dp_event.ZCDpEvent(rho=d2**2 / (2 * lam), xi=3 * d1 / (2 * lam))
        accountant.compose(dp_event.SelfComposedDpEvent(event, steps))
        return float(accountant.get_epsilon(1e-5))

    realistic = (float((SCALE * 0.5) ** 2), D2, D1)  # the other branch: ours strictly below
    on_branch = (1.5, 1.5, 1.5)  # (2a-1) D2^2 + 6 D1 >= 6 D1 Lam at every order a >= 2: the min is 3 D1 / (2 Lam)
    # Execute
    ours = {p: epsilon_spent([SkellamEvent(1.0, *p, steps)], delta=1e-5) for p in (realistic, on_branch)}
    theirs = {p: zcdp_epsilon(*p) for p in (realistic, on_branch)}
    # Assert
    assert ours[realistic] <= theirs[realistic] * (1 + 1e-6)
    assert ours[realistic] < theirs[realistic]
    assert ours[on_branch] == pytest.approx(theirs[on_branch], rel=1e-9)


@settings(max_examples=20, deadline=None)
@given(
    q=st.sampled_from([0.001, 0.01, 0.05, 0.2, 1.0]),
    sigma=st.floats(0.5, 8.0),
    steps=st.integers(1, 3000),
    d1_factor=st.sampled_from([0.0, 1.0, 64.0]),
)
def test_skellam_is_never_below_the_gaussian_with_the_same_variance(
    q: float, sigma: float, steps: int, d1_factor: float
) -> None:
    # Prepare: scale 100, C = 1: D2 = s C (no rounding slack), any D1 >= 0
    s = 100.0
    event = SkellamEvent(q, (s * sigma) ** 2, s, s * d1_factor, steps)
    # Execute
    skellam = epsilon_spent([event], delta=1e-5)
    gaussian = gaussian_rdp_epsilon(sigma, q, steps, 1e-5)
    # Assert
    assert skellam >= gaussian * (1 - 1e-12)
    if d1_factor == 0.0 and q == 1.0:  # then Cor. 3.6 is the Gaussian's RDP exactly
        assert skellam == pytest.approx(gaussian, rel=1e-12)


def test_local_and_distributed_rounds_compose_by_rdp() -> None:
    # Prepare
    local = DPSGDEvent(1.2, 0.05, 200)
    distributed = skellam_event(
        noise_multiplier=1.5, sample_rate=0.02, steps=300, scale=SCALE, max_grad_norm=1.0, dim_padded=DIM
    )
    # Execute
    both = epsilon_spent([local, distributed], delta=1e-5)
    # Assert: the RDP composition, term for term
    gaussian = np.asarray(opacus_rdp.compute_rdp(q=0.05, noise_multiplier=1.2, steps=200, orders=list(SKELLAM_ORDERS)))

    def unsampled(a: int) -> float:
        return skellam_rdp(
            a,
            variance=distributed.variance,
            l2_sensitivity=distributed.l2_sensitivity,
            l1_sensitivity=distributed.l1_sensitivity,
        )

    skellam = np.asarray(subsampled_rdp(SKELLAM_ORDERS, unsampled, 0.02)) * 300
    assert both == pytest.approx(opacus_epsilon(gaussian + skellam, 1e-5), rel=1e-12)
    for accountant in ("pld", "rdp"):
        assert both > epsilon_spent([local], delta=1e-5, accountant=accountant)
        assert both == epsilon_spent([distributed, local], delta=1e-5, accountant=accountant)
    assert both > epsilon_spent([distributed], delta=1e-5)


def test_no_skellam_noise_costs_everything_and_no_rounds_nothing() -> None:
    assert epsilon_spent([SkellamEvent(0.1, 0.0, 10.0, 10.0, 1), DPSGDEvent(1.0, 0.1, 5)], delta=1e-5) == math.inf
    assert epsilon_spent([SkellamEvent(0.1, 0.0, 10.0, 10.0, 0)], delta=1e-5) == 0.0


@settings(max_examples=10, deadline=None)
@given(sigma=st.floats(0.6, 3.0), steps=st.integers(1, 500), more=st.integers(1, 500))
def test_distributed_epsilon_never_falls_as_rounds_grow(sigma: float, steps: int, more: int) -> None:
    plan = {"noise_multiplier": sigma, "sample_rate": 0.03, "scale": SCALE, "max_grad_norm": 1.0, "dim_padded": DIM}
    before = epsilon_spent([skellam_event(steps=steps, **plan)], delta=1e-5)
    after = epsilon_spent([skellam_event(steps=steps, **plan), skellam_event(steps=more, **plan)], delta=1e-5)
    assert after > before


@pytest.mark.parametrize(("q", "design_note"), [(0.004, 1.04), (0.034, 1.34)])
def test_skellam_costs_a_little_more_noise_than_the_gaussian_and_less_than_the_design_note_estimates(
    q: float, design_note: float
) -> None:
    # Prepare: delta 1e-5, epsilon 3, 40 epochs of one aggregated step a round
    plan = {"target_epsilon": 3.0, "delta": 1e-5, "sample_rate": q, "steps": round(40 / q)}
    # Execute
    skellam = calibrate_skellam_noise(**plan, scale=SCALE, max_grad_norm=1.0, dim_padded=DIM)
    gaussian = calibrate_noise(**plan, accountant="rdp")
    # Assert
    spent = epsilon_spent(
        [
            skellam_event(
                noise_multiplier=skellam,
                sample_rate=q,
                steps=plan["steps"],
                scale=SCALE,
                max_grad_norm=1.0,
                dim_padded=DIM,
            )
        ],
        delta=1e-5,
    )
    assert 0.99 * 3.0 <= spent <= 3.0
    ratio = skellam / gaussian
    print(f"q={q}: Skellam noise {skellam:.4f}, Gaussian (RDP) {gaussian:.4f}: {ratio:.3f}x (note: {design_note}x)")
    # Above the Gaussian; at most the design note's figure (its general subsampling bound's 3x on
    # the terms of order 3 and up), and within the 3% the rounding adds to the sensitivity plus 1%.
    assert 1.0 <= ratio <= min(design_note, 1.04)


def test_calibration_refuses_what_cannot_be_calibrated() -> None:
    plan = {"delta": 1e-5, "sample_rate": 0.01, "steps": 100, "max_grad_norm": 1.0, "dim_padded": DIM}
    with pytest.raises(ConfigError, match=re.escape("target epsilon must be finite and > 0. Found 0.0.")):
        calibrate_skellam_noise(target_epsilon=0.0, scale=SCALE, **plan)
    with pytest.raises(ConfigError, match="scale and max-grad-norm must be > 0"):
        calibrate_skellam_noise(target_epsilon=1.0, scale=0.0, **plan)
    with pytest.raises(ConfigError, match="raise target-epsilon or delta, or lower the rounds"):
        calibrate_skellam_noise(target_epsilon=1e-12, scale=SCALE, **plan)


def test_the_subsampling_bound_takes_integer_orders_only() -> None:
    with pytest.raises(ConfigError, match="integer orders >= 2"):
        subsampled_rdp([1.5], lambda a: 1.0, 0.1)  # type: ignore[list-item]
    with pytest.raises(ConfigError, match="sample rate must be in"):
        subsampled_rdp([2], lambda a: 1.0, 0.0)


def test_every_accountants_record_names_the_orders_distributed_rounds_are_composed_at() -> None:
    assert SKELLAM_ORDERS[:255] == tuple(range(2, 257))
    orders = "integer orders 2 to 256, " + ", ".join(map(str, SKELLAM_ORDERS[255:]))
    assert all(orders in get_accountant(name).record()["with-distributed-rounds"] for name in ("pld", "rdp"))
