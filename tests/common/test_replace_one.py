"""Replace-one accounting: against dp_accounting, closed forms and numerical integration; never below add/remove."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import integrate, optimize, stats

from fedsilo.common.accounting import (
    ADD_REMOVE,
    CALIBRATION_TOLERANCE,
    PLD_VALUE_DISCRETIZATION_INTERVAL,
    REPLACE_ONE,
    SKELLAM_ORDERS,
    DPSGDEvent,
    _rdp_per_step,
    _rdp_per_step_replace_one,
    calibrate_noise,
    calibrate_skellam_noise,
    epsilon_spent,
    skellam_event,
    skellam_rdp,
)
from fedsilo.common.errors import ConfigError

DELTA = 1e-5
RO = REPLACE_ONE


def dp_accounting_replace_one(sigma: float, q: float, steps: int) -> float:
    """dp_accounting's PLD accountant under REPLACE_ONE, built here independently of fedsilo's path."""
    from dp_accounting import dp_event
    from dp_accounting.pld.pld_privacy_accountant import NeighborRel, PLDAccountant

    accountant = PLDAccountant(NeighborRel.REPLACE_ONE, value_discretization_interval=PLD_VALUE_DISCRETIZATION_INTERVAL)
    event = dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma))
    accountant.compose(dp_event.SelfComposedDpEvent(event, steps))
    return float(accountant.get_epsilon(DELTA))


def gaussian_epsilon(mu: float, delta: float) -> float:
    """Exact epsilon of a Gaussian with sensitivity/noise ratio ``mu`` (Balle and Wang, ICML 2018, Thm. 8)."""

    def excess(eps: float) -> float:
        return stats.norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * stats.norm.cdf(-eps / mu - mu / 2) - delta

    return float(optimize.brentq(excess, 0.0, 200.0, xtol=1e-12))


@pytest.mark.parametrize(("sigma", "q", "steps"), [(1.0, 0.01, 1000), (2.0, 0.1, 50), (1.2, 0.3, 16)])
def test_sampled_gaussian_under_replace_one_is_dp_accountings_replace_one_pld(
    sigma: float, q: float, steps: int
) -> None:
    # Execute
    ours = epsilon_spent([DPSGDEvent(sigma, q, steps)], delta=DELTA, neighbouring=RO)
    # Assert: the same number as dp_accounting's own REPLACE_ONE accountant, and more than add/remove
    assert ours == pytest.approx(dp_accounting_replace_one(sigma, q, steps), rel=1e-9)
    assert ours > epsilon_spent([DPSGDEvent(sigma, q, steps)], delta=DELTA)


@pytest.mark.parametrize(("sigma", "steps"), [(3.0, 10), (8.0, 4), (20.0, 100)])
def test_an_unsampled_gaussian_under_replace_one_is_add_remove_with_twice_the_sensitivity(
    sigma: float, steps: int
) -> None:
    # Prepare: n releases of sensitivity 2 and noise sigma are one Gaussian with mu = 2 sqrt(n) / sigma
    exact = gaussian_epsilon(2 * math.sqrt(steps) / sigma, DELTA)
    # Execute
    pld = epsilon_spent([DPSGDEvent(sigma, 1.0, steps)], delta=DELTA, neighbouring=RO)
    halved = epsilon_spent([DPSGDEvent(sigma / 2, 1.0, steps)], delta=DELTA)
    rdp = epsilon_spent([DPSGDEvent(sigma, 1.0, steps)], delta=DELTA, accountant="rdp", neighbouring=RO)
    rdp_halved = epsilon_spent([DPSGDEvent(sigma / 2, 1.0, steps)], delta=DELTA, accountant="rdp")
    # Assert: PLD is the exact figure from above (pessimistic, within its discretization); RDP's
    # replace-one curve is exactly the add/remove curve at half the noise (a * 2^2 / (2 sigma^2))
    assert exact <= pld <= exact * 1.005 + 1e-3
    assert pld == pytest.approx(halved, rel=2e-3)
    assert rdp == pytest.approx(rdp_halved, rel=1e-12)


def replace_one_rdp_by_integration(sigma: float, q: float, order: float) -> float:
    """D_a(P || R), P = q N(-1, s^2) + (1-q) N(0, s^2), R = q N(1, s^2) + (1-q) N(0, s^2), numerically."""

    def log_density(x: float, shift: float) -> float:
        return float(
            np.logaddexp(
                math.log(q) + stats.norm.logpdf(x, shift, sigma), math.log1p(-q) + stats.norm.logpdf(x, 0, sigma)
            )
        )

    def integrand(x: float) -> float:
        return math.exp(order * log_density(x, -1.0) + (1 - order) * log_density(x, 1.0))

    # The mass sits near 0 and, for large orders, near -(2 order - 1) (where q N(-1) dominates P)
    peak = 2 * order - 1
    value, _ = integrate.quad(
        integrand,
        -peak - 40 * sigma,
        peak + 40 * sigma,
        points=[-peak, -1.0, 0.0, 1.0],
        limit=1000,
        epsabs=0,
        epsrel=1e-10,
    )
    return math.log(value) / (order - 1)


@pytest.mark.parametrize(("sigma", "q"), [(1.0, 0.01), (0.8, 0.1), (2.0, 0.3), (1.5, 0.9)])
def test_the_rdp_route_bounds_the_exact_replace_one_rdp_of_the_sampled_gaussian(sigma: float, q: float) -> None:
    # Prepare
    orders = (1.5, 2.0, 3.0, 5.0, 8.0, 16.0)
    # Execute
    bound = _rdp_per_step_replace_one(q, sigma, orders)
    add_remove = _rdp_per_step(q, sigma, orders)
    # Assert: above the exact value (numerical integration of the worst pair), and at least add/remove
    for order, ours, floor in zip(orders, bound, add_remove, strict=True):
        exact = replace_one_rdp_by_integration(sigma, q, order)
        assert ours >= exact * (1 - 1e-6)
        assert ours >= floor
        assert ours <= 2 * order / sigma**2 + 1e-12  # never above the unsampled mechanism's


def test_an_unsampled_skellam_round_under_replace_one_is_at_most_cor_3_6_with_doubled_sensitivities() -> None:
    # Prepare: q = 1, so the replace-one bound is at most Cor. 3.6 with 2 D2 and 2 D1, which
    # dp_accounting's zCDP event with rho = (2 D2)^2 / (2 Lam), xi = 3 (2 D1) / (2 Lam) also bounds
    from dp_accounting import dp_event
    from dp_accounting.rdp.rdp_privacy_accountant import RdpAccountant

    event = skellam_event(
        noise_multiplier=3.0, sample_rate=1.0, steps=10, scale=256.0, max_grad_norm=1.0, dim_padded=64
    )
    lam, d2, d1 = event.variance, 2 * event.l2_sensitivity, 2 * event.l1_sensitivity
    zcdp = RdpAccountant(orders=[float(a) for a in SKELLAM_ORDERS])
    zcdp.compose(dp_event.SelfComposedDpEvent(dp_event.ZCDpEvent(d2**2 / (2 * lam), 3 * d1 / (2 * lam)), 10))
    # Execute
    ours = epsilon_spent([event], delta=DELTA, neighbouring=RO)
    # Assert
    assert epsilon_spent([event], delta=DELTA) < ours <= zcdp.get_epsilon(DELTA) + 1e-9
    # ... and each order's RDP is at most Cor. 3.6 with the doubled sensitivities
    from fedsilo.common.accounting import _skellam_rdp_per_step_replace_one

    per_step = _skellam_rdp_per_step_replace_one(1.0, lam, event.l2_sensitivity, event.l1_sensitivity, (2, 8, 32))
    for order, value in zip((2, 8, 32), per_step, strict=True):
        assert value <= skellam_rdp(order, variance=lam, l2_sensitivity=d2, l1_sensitivity=d1)


@settings(max_examples=12, deadline=None)
@given(
    sigma=st.floats(0.6, 6.0),
    q=st.floats(0.001, 1.0),
    steps=st.integers(1, 400),
    accountant=st.sampled_from(["pld", "rdp"]),
)
def test_replace_one_is_never_below_add_remove_for_dp_sgd(sigma: float, q: float, steps: int, accountant: str) -> None:
    events = [DPSGDEvent(sigma, q, steps)]
    add_remove = epsilon_spent(events, delta=DELTA, accountant=accountant)
    assert epsilon_spent(events, delta=DELTA, accountant=accountant, neighbouring=RO) >= add_remove


@settings(max_examples=10, deadline=None)
@given(
    sigma=st.floats(0.5, 5.0),
    q=st.floats(0.001, 1.0),
    steps=st.integers(1, 300),
    local=st.booleans(),
)
def test_replace_one_is_never_below_add_remove_for_distributed_rounds(
    sigma: float, q: float, steps: int, local: bool
) -> None:
    events: list = [
        skellam_event(noise_multiplier=sigma, sample_rate=q, steps=steps, scale=256.0, max_grad_norm=1.0, dim_padded=64)
    ]
    events += [DPSGDEvent(1.0, 0.05, 20)] if local else []
    assert epsilon_spent(events, delta=DELTA, neighbouring=RO) >= epsilon_spent(events, delta=DELTA)


@pytest.mark.parametrize("accountant", ["pld", "rdp"])
def test_noise_calibrated_for_replace_one_lands_at_the_target_under_replace_one(accountant: str) -> None:
    # Execute
    sigma = calibrate_noise(
        target_epsilon=2.0, delta=DELTA, sample_rate=0.05, steps=200, accountant=accountant, neighbouring=RO
    )
    add_remove_sigma = calibrate_noise(
        target_epsilon=2.0, delta=DELTA, sample_rate=0.05, steps=200, accountant=accountant
    )
    # Assert
    spent = epsilon_spent([DPSGDEvent(sigma, 0.05, 200)], delta=DELTA, accountant=accountant, neighbouring=RO)
    assert 2.0 * (1 - CALIBRATION_TOLERANCE) <= spent <= 2.0
    assert sigma > add_remove_sigma  # the same target needs more noise
    assert epsilon_spent([DPSGDEvent(sigma, 0.05, 200)], delta=DELTA, accountant=accountant) < 2.0


def test_skellam_noise_calibrated_for_replace_one_lands_at_the_target_under_replace_one() -> None:
    shape = {"sample_rate": 0.02, "steps": 100, "scale": 256.0, "max_grad_norm": 1.0, "dim_padded": 64}
    sigma = calibrate_skellam_noise(target_epsilon=3.0, delta=DELTA, neighbouring=RO, **shape)
    spent = epsilon_spent([skellam_event(noise_multiplier=sigma, **shape)], delta=DELTA, neighbouring=RO)
    assert 3.0 * (1 - CALIBRATION_TOLERANCE) <= spent <= 3.0
    assert sigma > calibrate_skellam_noise(target_epsilon=3.0, delta=DELTA, **shape)


def test_an_unknown_relation_is_refused_with_the_choices() -> None:
    with pytest.raises(ConfigError, match=r"neighbouring must be one of 'add-remove', 'replace-one'\. Found 'swap'"):
        epsilon_spent([DPSGDEvent(1.0, 0.1, 1)], delta=DELTA, neighbouring="swap")
    assert ADD_REMOVE == "add-remove" and np.isfinite(epsilon_spent([DPSGDEvent(1.0, 0.1, 1)], delta=DELTA))
