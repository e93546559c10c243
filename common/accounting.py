"""Privacy accounting: epsilon of a sequence of DP-SGD rounds, and noise calibration.

Uses the Renyi-DP accountant of Opacus (Mironov, "Renyi Differential Privacy",
CSF 2017; Mironov, Talwar and Zhang, "Renyi Differential Privacy of the Sampled
Gaussian Mechanism", 2019). The PRV accountant, Opacus's default, has known
failures when calibrating noise, so fedsilo uses RDP throughout.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache

from opacus.accountants import RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

from common.errors import ConfigError

# Opacus's default RDP orders, extended: small epsilons over few steps need high orders.
ALPHAS = [1 + x / 10.0 for x in range(1, 100)] + list(range(11, 64)) + [2**k for k in range(6, 13)]


@dataclass(frozen=True)
class DPSGDEvent:
    """One stretch of DP-SGD: ``steps`` Poisson-sampled steps at one noise level."""

    noise_multiplier: float
    sample_rate: float
    steps: int


def epsilon_spent(events: Iterable[DPSGDEvent], *, delta: float) -> float:
    """Epsilon at ``delta`` of all ``events`` composed (RDP accountant).

    A stretch without noise (``noise_multiplier == 0``) has no DP guarantee, so
    any such event makes the result ``inf``. No events cost nothing: 0.0.
    """
    if not 0 < delta < 1:
        raise ConfigError(f"delta must be in (0, 1). Found {delta}.")
    history = [(e.noise_multiplier, e.sample_rate, e.steps) for e in events if e.steps > 0]
    if not history:
        return 0.0
    if any(sigma <= 0 for sigma, _, _ in history):
        return math.inf
    accountant = RDPAccountant()
    accountant.history = history
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "optimal order is the largest alpha": bound still valid
        return float(accountant.get_epsilon(delta=delta, alphas=ALPHAS))


@lru_cache(maxsize=256)
def calibrate_noise(*, target_epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """Smallest noise multiplier (to 0.01 in epsilon) spending ``target_epsilon`` in ``steps``.

    Pure, and memoized because a round recomputes it for every institution.
    """
    if not math.isfinite(target_epsilon) or target_epsilon <= 0:
        raise ConfigError(f"target epsilon must be finite and > 0. Found {target_epsilon}.")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return float(
                get_noise_multiplier(
                    target_epsilon=target_epsilon,
                    target_delta=delta,
                    sample_rate=sample_rate,
                    steps=steps,
                    accountant="rdp",
                    alphas=ALPHAS,
                )
            )
    except ValueError as err:
        raise ConfigError(
            f"no noise multiplier reaches epsilon {target_epsilon} at delta {delta} "
            f"with sample rate {sample_rate:.4g} over {steps} steps ({err}); "
            "raise target-epsilon or delta, or lower the rounds or local epochs"
        ) from err
