"""Accounting: epsilon of composed DP-SGD rounds, and noise calibration, by PLD (of record) and RDP."""

import math
import re
import warnings

import pytest
from dp_accounting import dp_event
from dp_accounting.gaussian_mechanism import get_epsilon_gaussian
from dp_accounting.pld.pld_privacy_accountant import PLDAccountant
from hypothesis import given, settings
from hypothesis import strategies as st
from opacus.accountants import RDPAccountant

from fedsilo.common.accounting import (
    ALPHAS,
    PLD_MAX_EPSILON,
    PLD_VALUE_DISCRETIZATION_INTERVAL,
    DPSGDEvent,
    calibrate_noise,
    epsilon_spent,
)
from fedsilo.common.errors import ConfigError


def pld_reference(events: list[DPSGDEvent], *, delta: float, interval: float) -> float:
    """dp_accounting's PLD, one event after another, at a given discretization interval."""
    accountant = PLDAccountant(value_discretization_interval=interval)
    for e in events:
        gaussian = dp_event.GaussianDpEvent(e.noise_multiplier)
        step = gaussian if e.sample_rate == 1 else dp_event.PoissonSampledDpEvent(e.sample_rate, gaussian)
        accountant.compose(dp_event.SelfComposedDpEvent(step, e.steps))
    return accountant.get_epsilon(delta)


def test_epsilon_matches_opacus_rdp_accountant_step_by_step() -> None:
    accountant = RDPAccountant()
    for _ in range(10):
        accountant.step(noise_multiplier=1.3, sample_rate=0.1)
    expected = accountant.get_epsilon(delta=1e-5, alphas=ALPHAS)
    events = [DPSGDEvent(1.3, 0.1, 4), DPSGDEvent(1.3, 0.1, 6)]
    assert math.isclose(epsilon_spent(events, delta=1e-5, accountant="rdp"), expected)


@pytest.mark.parametrize("accountant", ["pld", "rdp"])
def test_no_events_cost_nothing_and_no_noise_costs_everything(accountant: str) -> None:
    assert epsilon_spent([], delta=1e-5, accountant=accountant) == 0.0
    assert epsilon_spent([DPSGDEvent(1.0, 0.1, 0)], delta=1e-5, accountant=accountant) == 0.0
    noiseless = [DPSGDEvent(1.0, 0.1, 5), DPSGDEvent(0.0, 0.1, 5)]
    assert epsilon_spent(noiseless, delta=1e-5, accountant=accountant) == math.inf


def test_the_default_accountant_is_pld_and_an_unknown_one_is_refused() -> None:
    events = [DPSGDEvent(1.0, 0.1, 20)]
    assert epsilon_spent(events, delta=1e-5) == epsilon_spent(events, delta=1e-5, accountant="pld")
    assert epsilon_spent(events, delta=1e-5) != epsilon_spent(events, delta=1e-5, accountant="rdp")
    with pytest.raises(ConfigError, match=re.escape("accountant must be one of 'pld', 'rdp'. Found 'prv'.")):
        epsilon_spent(events, delta=1e-5, accountant="prv")


@settings(max_examples=25, deadline=None)
@given(
    sigma=st.floats(0.5, 5.0),
    rate=st.floats(0.01, 0.5),
    steps=st.integers(1, 200),
    more=st.integers(1, 200),
)
def test_epsilon_never_falls_as_steps_grow(sigma: float, rate: float, steps: int, more: int) -> None:
    before = epsilon_spent([DPSGDEvent(sigma, rate, steps)], delta=1e-5)
    after = epsilon_spent([DPSGDEvent(sigma, rate, steps), DPSGDEvent(sigma, rate, more)], delta=1e-5)
    assert after > before


@pytest.mark.parametrize(
    ("sigma", "rate", "steps"),
    [(5.0, 0.1, 100), (5.0, 1 / 3, 10), (1.0, 0.001, 20000)],
)
def test_pld_is_an_upper_bound_within_reach_of_the_tight_value_and_below_rdp(
    sigma: float, rate: float, steps: int
) -> None:
    events = [DPSGDEvent(sigma, rate, steps)]
    pld = epsilon_spent(events, delta=1e-5)
    finer = pld_reference(events, delta=1e-5, interval=PLD_VALUE_DISCRETIZATION_INTERVAL / 10)
    assert finer * (1 - 1e-9) <= pld <= finer * 1.005
    assert pld < epsilon_spent(events, delta=1e-5, accountant="rdp")


def test_full_batch_steps_are_a_plain_gaussian_within_reach_of_its_exact_epsilon() -> None:
    # Sample rate 1: no subsampling; 40 steps at noise 5 are one Gaussian at noise 5 / sqrt(40).
    pld = epsilon_spent([DPSGDEvent(5.0, 1.0, 40)], delta=1e-5)
    exact = get_epsilon_gaussian(5.0 / math.sqrt(40), 1e-5)
    assert exact <= pld <= exact + 2 * PLD_VALUE_DISCRETIZATION_INTERVAL
    assert pld < epsilon_spent([DPSGDEvent(5.0, 1.0, 40)], delta=1e-5, accountant="rdp")


def test_past_its_limit_the_pld_accountant_reports_rdps_epsilon_quickly_and_still_rising() -> None:
    # A PLD's support grows with epsilon: this one, at epsilon 2,300, would take minutes and gigabytes.
    hopeless = [DPSGDEvent(0.5, 1.0, 1000)]
    assert epsilon_spent(hopeless, delta=1e-5) == epsilon_spent(hopeless, delta=1e-5, accountant="rdp")
    below, above = (epsilon_spent([DPSGDEvent(2.0, 0.5, n)], delta=1e-5) for n in (160, 400))
    assert below < PLD_MAX_EPSILON < above


@pytest.mark.parametrize("accountant", ["pld", "rdp"])
@pytest.mark.parametrize(
    ("target", "rate", "steps"),
    [(2.0, 0.2, 50), (1.0, 1 / 12, 336), (8.0, 1 / 8, 128), (3.0, 1.0, 40), (0.5, 0.01, 2000)],
)
def test_calibrated_noise_spends_at_most_the_target_and_within_one_percent(
    accountant: str, target: float, rate: float, steps: int
) -> None:
    sigma = calibrate_noise(target_epsilon=target, delta=1e-5, sample_rate=rate, steps=steps, accountant=accountant)
    spent = epsilon_spent([DPSGDEvent(sigma, rate, steps)], delta=1e-5, accountant=accountant)
    assert 0.99 * target <= spent <= target


def test_pld_calibrates_less_noise_than_rdp_for_the_same_target() -> None:
    plan = {"target_epsilon": 2.0, "delta": 1e-5, "sample_rate": 0.2, "steps": 50}
    assert calibrate_noise(**plan) < calibrate_noise(**plan, accountant="rdp")


def test_an_unreachable_target_names_the_values_and_the_fix() -> None:
    with pytest.raises(ConfigError, match="raise target-epsilon or delta, or lower the rounds"):
        calibrate_noise(target_epsilon=1e-9, delta=1e-5, sample_rate=1.0, steps=10, accountant="rdp")
    with pytest.raises(ConfigError, match=re.escape("target epsilon must be finite and > 0. Found inf.")):
        calibrate_noise(target_epsilon=math.inf, delta=1e-5, sample_rate=0.1, steps=10)


def test_epsilon_is_exactly_opacuss_rdp_accountant_over_a_mixed_ledger() -> None:
    history = [(1.3, 1 / 3, 6)] * 20 + [(0.9, 1 / 12, 24)] * 3 + [(1.3, 1 / 3, 6)]
    accountant = RDPAccountant()
    accountant.history = list(history)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = accountant.get_epsilon(delta=1e-5, alphas=ALPHAS)
    assert epsilon_spent([DPSGDEvent(*e) for e in history], delta=1e-5, accountant="rdp") == expected
