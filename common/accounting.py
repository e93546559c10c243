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

import numpy as np
from opacus.accountants.analysis import rdp as rdp_analysis
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
    # What opacus.accountants.RDPAccountant.get_privacy_spent computes, term for term, with the
    # per-step RDP curve of each (noise, sample rate) memoized: a ledger repeats the same
    # round many times, and recomputing the curve made accounting quadratic in the rounds.
    rdp = sum([np.array(_rdp_per_step(sample_rate, sigma)) * steps for sigma, sample_rate, steps in history])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "optimal order is the largest alpha": bound still valid
        eps, _ = rdp_analysis.get_privacy_spent(orders=ALPHAS, rdp=rdp, delta=delta)
        return float(eps)


@lru_cache(maxsize=1024)
def _rdp_per_step(sample_rate: float, noise_multiplier: float) -> tuple[float, ...]:
    """RDP of one step of the sampled Gaussian mechanism at every order in ``ALPHAS`` (pure)."""
    return tuple(rdp_analysis.compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=ALPHAS))


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
