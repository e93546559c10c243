"""Accounting: epsilon of composed DP-SGD rounds, and noise calibration."""

import math

from hypothesis import given, settings
from hypothesis import strategies as st
from opacus.accountants import RDPAccountant

from common.accounting import ALPHAS, DPSGDEvent, calibrate_noise, epsilon_spent


def test_epsilon_matches_opacus_rdp_accountant_step_by_step() -> None:
    accountant = RDPAccountant()
    for _ in range(10):
        accountant.step(noise_multiplier=1.3, sample_rate=0.1)
    expected = accountant.get_epsilon(delta=1e-5, alphas=ALPHAS)
    assert math.isclose(epsilon_spent([DPSGDEvent(1.3, 0.1, 4), DPSGDEvent(1.3, 0.1, 6)], delta=1e-5), expected)


def test_no_events_cost_nothing_and_no_noise_costs_everything() -> None:
    assert epsilon_spent([], delta=1e-5) == 0.0
    assert epsilon_spent([DPSGDEvent(1.0, 0.1, 5), DPSGDEvent(0.0, 0.1, 5)], delta=1e-5) == math.inf


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


def test_calibrated_noise_spends_at_most_the_target_and_close_to_it() -> None:
    sigma = calibrate_noise(target_epsilon=2.0, delta=1e-5, sample_rate=0.2, steps=50)
    spent = epsilon_spent([DPSGDEvent(sigma, 0.2, 50)], delta=1e-5)
    assert 1.95 <= spent <= 2.0


def test_epsilon_is_exactly_opacuss_rdp_accountant_over_a_mixed_ledger() -> None:
    import warnings

    from opacus.accountants import RDPAccountant

    from common.accounting import ALPHAS

    history = [(1.3, 1 / 3, 6)] * 20 + [(0.9, 1 / 12, 24)] * 3 + [(1.3, 1 / 3, 6)]
    accountant = RDPAccountant()
    accountant.history = list(history)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = accountant.get_epsilon(delta=1e-5, alphas=ALPHAS)
    assert epsilon_spent([DPSGDEvent(*e) for e in history], delta=1e-5) == expected
