"""Privacy accounting: epsilon of a sequence of DP-SGD rounds, and noise calibration.

Two accountants, registered by name in ``ACCOUNTANTS``:

``"pld"``, the accountant of record (the ledger's epsilon, budgets, and by default the
    noise calibration): Google's dp_accounting privacy loss distribution accountant. It
    composes the rounds' discretized privacy loss distributions by FFT (Koskela, Jalko and
    Honkela, "Computing Tight Differential Privacy Guarantees Using FFT", AISTATS 2020) and
    discretizes the sampled Gaussian mechanism by "connect the dots" (Doroshenko, Ghazi,
    Kamath, Kumar and Manurangsi, "Connect the Dots: Tighter Discrete Approximations of
    Privacy Loss Distributions", PoPETs 2022). Its pessimistic estimate is an upper bound on
    the exact epsilon, and at ``PLD_VALUE_DISCRETIZATION_INTERVAL`` within 0.2% of it
    wherever epsilon >= 0.5. Where RDP's epsilon passes ``PLD_MAX_EPSILON``, it reports that.
``"rdp"``: Opacus's Renyi-DP accountant (Mironov, "Renyi Differential Privacy", CSF 2017;
    Mironov, Talwar and Zhang, "Renyi Differential Privacy of the Sampled Gaussian
    Mechanism", 2019): a looser upper bound, about 5-15% above PLD for DP-SGD.

Opacus's PRV accountant has known failures when calibrating noise and is not offered. The
accounting libraries (and numpy) are imported on first use, so that reading the settings,
which validate against ``ACCOUNTANTS``, loads neither them nor torch.

Distributed DP (``SkellamEvent``): a round whose noise is a sum of Skellam shares inside
SecAgg+ (Agarwal, Kairouz and Liu, "The Skellam Mechanism for Differentially Private
Federated Learning", NeurIPS 2021) has no PLD here (no library offers one). Its RDP is
Corollary 3.6 of that paper (``skellam_rdp``), amplified by Poisson subsampling with the
binomial bound that holds for symmetric-noise shift mechanisms (``subsampled_rdp``, where
it is proved; Mironov, Talwar and Zhang's for the sampled Gaussian). A history holding any such round is
composed by RDP at the integer orders ``SKELLAM_ORDERS``, its Gaussian rounds by Opacus's
RDP of the sampled Gaussian at the same orders, and converted to epsilon as Opacus's
``get_privacy_spent`` does, whichever accountant is named: a valid upper bound, looser
than PLD for the Gaussian rounds. A history without one is accounted as before.

Neighbouring relation (``NEIGHBOURING``): every function that turns events into epsilon
takes ``neighbouring``, ``"add-remove"`` (the default: one record added or removed, the
figure Opacus and TensorFlow Privacy report) or ``"replace-one"`` (one record replaced by
another: what holds when the record count is public, as it is in fedsilo). The events are
the same under both (a ledger records mechanisms, not the relation); only how they are
accounted differs:

- sampled Gaussian rounds under PLD: dp_accounting's own ``NeighborRel.REPLACE_ONE``,
  the exact dominating pair ``q N(-1, s^2) + (1-q) N(0, s^2)`` against
  ``q N(1, s^2) + (1-q) N(0, s^2)`` (tight; at ``q = 1`` the Gaussian with sensitivity 2);
- every RDP route (Opacus's accountant, PLD's switch above ``PLD_MAX_EPSILON``, and a
  history with Skellam rounds): ``replace_one_rdp``, RDP group privacy for the two
  add/remove steps a replacement is (remove, then add), taken at each order with the
  smaller of that and the unsampled mechanism's replace-one RDP (sensitivity 2C for the
  Gaussian, ``skellam_sensitivity(..., replace_one=True)`` for Skellam), and never below
  the add/remove RDP at that order. dp_accounting's RDP accountant refuses
  ``PoissonSampledDpEvent`` under ``REPLACE_ONE`` (and gives an unsampled
  ``GaussianDpEvent`` its add/remove figure there, reading the noise as relative to the
  replace-one sensitivity), and no subsampling theorem for the Skellam mechanism under
  replace-one is implemented here.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Protocol

from fedsilo.common.errors import ConfigError

# Opacus's default RDP orders, extended: small epsilons over few steps need high orders.
ALPHAS = [1 + x / 10.0 for x in range(1, 100)] + list(range(11, 64)) + [2**k for k in range(6, 13)]

# The integer orders at which a history with distributed-DP (Skellam) rounds is composed by
# RDP: the subsampling bound (``subsampled_rdp``) holds at integer orders, and the bound at order
# a needs the unsampled RDP at every order 2..a, so its cost grows with the largest order.
SKELLAM_ORDERS: tuple[int, ...] = (*range(2, 257), 320, 384, 512, 768, 1024)

# Width of the privacy-loss buckets of the PLD accountant: part of what makes a ledger's
# epsilon reproducible from the ledger alone (the ledger file records it). Finer is tighter
# and slower: time and memory grow as its inverse. Measured against a reference at 2e-5 over
# noise multipliers 0.5-20, sample rates 0.001-1 and 10-20,000 steps (delta 1e-5), the
# excess is worst at small sample rates over many steps, where every step's rounding adds
# up (sample rate 0.001, 20,000 steps): at epsilon 0.69 (noise 1) and 0.25 (noise 2) it is
# 5.1% and 29% at 1e-3, 1.3% and 7.5% at 5e-4, 0.20% and 1.2% at 2e-4, 0.05% and 0.3% at
# 1e-4; at sample rates >= 0.01 and epsilon >= 0.5, under 0.1% at 2e-4. 2e-4 keeps PLD's
# gain over RDP (8-30%) whole at half the time of 1e-4 (dp_accounting's default): on a loaded
# 2-core machine, one epsilon <= 10 in 10-850 ms (mostly under 400 ms), up to 3 s at noise 0.5.
PLD_VALUE_DISCRETIZATION_INTERVAL = 2e-4
# Where RDP's epsilon at the integer orders ``_SWITCH_ORDERS`` (cheap to compute, and never
# below RDP's at ``ALPHAS``) exceeds this, the PLD accountant reports RDP's epsilon instead:
# a looser but valid upper bound, where no meaningful privacy is left, and where a PLD would
# be costly: its support, so its time and memory, grows with epsilon (at 1e-3, a full-batch
# ledger took 0.6 s at epsilon 92 and 13 s at epsilon 2,270; five times that at 2e-4).
PLD_MAX_EPSILON = 32.0
_SWITCH_ORDERS = (2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 32, 48, 64)
# The search of the noise is done first at this many times the interval (cheap), then
# finished at the interval itself.
_COARSE_FACTOR = 10

# Calibrated noise spends between (1 - CALIBRATION_TOLERANCE) x target and the target.
CALIBRATION_TOLERANCE = 0.01
# Noise beyond this is no model update at all (Opacus's own limit, opacus.accountants.utils).
MAX_NOISE_MULTIPLIER = 1e6

# The neighbouring relations epsilon can be accounted for (see the module docstring).
ADD_REMOVE = "add-remove"
REPLACE_ONE = "replace-one"
NEIGHBOURING: tuple[str, ...] = (ADD_REMOVE, REPLACE_ONE)

# (noise multiplier, sample rate, steps) of each event, in order; every noise and step count > 0.
History = tuple[tuple[float, float, int], ...]


@dataclass(frozen=True)
class DPSGDEvent:
    """One stretch of DP-SGD: ``steps`` Poisson-sampled steps at one noise level."""

    noise_multiplier: float
    sample_rate: float
    steps: int


@dataclass(frozen=True)
class SkellamEvent:
    """``steps`` rounds of the Poisson-subsampled Skellam mechanism (distributed DP).

    Each round is one aggregated DP-SGD step. All in the integer domain the noise is added
    in (the signal scaled by ``scale`` and rounded): ``variance`` is the summed Skellam
    variance the round is accounted with, and the sensitivities are those of one record's
    clipped, scaled and rounded gradient.
    """

    sample_rate: float
    variance: float  # Lam: the summed Skellam variance the round is accounted with (integer domain)
    l2_sensitivity: float  # D2
    l1_sensitivity: float  # D1
    steps: int


class EpsilonOf(Protocol):
    """How an accountant turns a history into epsilon at ``delta``, under a neighbouring relation."""

    def __call__(self, history: History, delta: float, *, neighbouring: str = ADD_REMOVE) -> float: ...


@dataclass(frozen=True)
class Accountant:
    """One way of turning composed DP-SGD events into epsilon, by name.

    ``epsilon(history, delta, neighbouring=...)`` is pure. ``parameters`` are whatever else
    fixes its numbers. ``coarse``, if any, is a cheaper approximation of ``epsilon`` (not
    necessarily an upper bound) that calibration searches first.
    """

    name: str
    epsilon: EpsilonOf
    parameters: Mapping[str, float | str] = field(default_factory=dict)
    coarse: EpsilonOf | None = None

    def record(self) -> dict[str, float | str]:
        """What identifies this accountant's numbers wherever they are kept (the ledger file)."""
        return {"name": self.name, **self.parameters}


def _pld_epsilon(
    history: History,
    delta: float,
    *,
    interval: float = PLD_VALUE_DISCRETIZATION_INTERVAL,
    neighbouring: str = ADD_REMOVE,
) -> float:
    """PLD epsilon of ``history`` (RDP's above ``PLD_MAX_EPSILON``) under ``neighbouring``.

    The events of one (noise, sample rate) are composed as one: the same epsilon as
    composing them one by one, in one self-composition.
    """
    if _rdp_epsilon(history, delta, orders=_SWITCH_ORDERS, neighbouring=neighbouring) > PLD_MAX_EPSILON:
        return _rdp_epsilon(history, delta, neighbouring=neighbouring)
    steps: dict[tuple[float, float], int] = {}
    for sigma, sample_rate, n in history:
        steps[sigma, sample_rate] = steps.get((sigma, sample_rate), 0) + n
    groups = tuple(sorted((sigma, sample_rate, n) for (sigma, sample_rate), n in steps.items()))
    return _pld_composed(groups, delta, interval, neighbouring)


@lru_cache(maxsize=1024)
def _pld_composed(groups: History, delta: float, interval: float, neighbouring: str = ADD_REMOVE) -> float:
    """Epsilon of ``groups`` (each a self-composed sampled Gaussian) by dp_accounting's PLD (pure).

    ``"replace-one"``: dp_accounting's ``NeighborRel.REPLACE_ONE``, whose sampled Gaussian is
    the pair ``q N(-1, s^2) + (1-q) N(0, s^2)`` against ``q N(1, s^2) + (1-q) N(0, s^2)``
    (``privacy_loss_mechanism.AdditiveNoisePrivacyLoss``, REPLACE adjacency), and whose
    unsampled Gaussian has sensitivity 2.
    """
    from dp_accounting import dp_event
    from dp_accounting.pld.pld_privacy_accountant import NeighborRel, PLDAccountant

    def step(sigma: float, sample_rate: float) -> dp_event.DpEvent:
        gaussian = dp_event.GaussianDpEvent(sigma)
        return gaussian if sample_rate >= 1 else dp_event.PoissonSampledDpEvent(sample_rate, gaussian)

    relation = NeighborRel.REPLACE_ONE if neighbouring == REPLACE_ONE else NeighborRel.ADD_OR_REMOVE_ONE
    accountant = PLDAccountant(relation, value_discretization_interval=interval)  # pessimistic estimate
    accountant.compose(dp_event.ComposedDpEvent([dp_event.SelfComposedDpEvent(step(s, q), n) for s, q, n in groups]))
    return float(accountant.get_epsilon(delta))


def _pld_coarse(history: History, delta: float, *, neighbouring: str = ADD_REMOVE) -> float:
    """The PLD epsilon at a coarser discretization: cheaper, and a little higher."""
    return _pld_epsilon(
        history, delta, interval=_COARSE_FACTOR * PLD_VALUE_DISCRETIZATION_INTERVAL, neighbouring=neighbouring
    )


def _rdp_epsilon(
    history: History, delta: float, *, orders: tuple[float, ...] = tuple(ALPHAS), neighbouring: str = ADD_REMOVE
) -> float:
    """RDP epsilon of ``history``: add/remove, what opacus.accountants.RDPAccountant computes, term for term.

    ``"replace-one"``: each step's RDP by ``replace_one_rdp`` (see ``_rdp_per_step_replace_one``).
    """
    import numpy as np
    from opacus.accountants.analysis import rdp as rdp_analysis

    # The per-step RDP curve of each (noise, sample rate) is memoized: a ledger repeats the
    # same round many times, and recomputing it made accounting quadratic in the rounds.
    per_step = _rdp_per_step_replace_one if neighbouring == REPLACE_ONE else _rdp_per_step
    rdp = sum([np.array(per_step(sample_rate, sigma, orders)) * steps for sigma, sample_rate, steps in history])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "optimal order is the largest alpha": bound still valid
        eps, _ = rdp_analysis.get_privacy_spent(orders=list(orders), rdp=rdp, delta=delta)
        return float(eps)


@lru_cache(maxsize=1024)
def _rdp_per_step(sample_rate: float, noise_multiplier: float, orders: tuple[float, ...]) -> tuple[float, ...]:
    """RDP of one step of the sampled Gaussian mechanism at every order in ``orders`` (pure)."""
    from opacus.accountants.analysis import rdp as rdp_analysis

    return tuple(
        rdp_analysis.compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=list(orders))
    )


@lru_cache(maxsize=1024)
def _rdp_per_step_replace_one(
    sample_rate: float, noise_multiplier: float, orders: tuple[float, ...]
) -> tuple[float, ...]:
    """Replace-one RDP of one step of the sampled Gaussian mechanism at every order in ``orders`` (pure).

    ``replace_one_rdp`` of Opacus's add/remove RDP (Mironov, Talwar and Zhang 2019), with
    the unsampled Gaussian's replace-one RDP ``a * 2^2 / (2 sigma^2)`` (sensitivity 2C).
    """
    needed = tuple(sorted({*orders, *(2 * a for a in orders), *(2 * a - 1 for a in orders)}))
    add_remove = dict(zip(needed, _rdp_per_step(sample_rate, noise_multiplier, needed), strict=True))
    return tuple(
        replace_one_rdp(
            orders,
            add_remove.__getitem__,
            unsampled=lambda a: 2 * a / noise_multiplier**2,
        )
    )


def replace_one_rdp(
    orders: Iterable[float], add_remove: Callable[[float], float], *, unsampled: Callable[[float], float]
) -> list[float]:
    """Replace-one RDP at each order ``a > 1`` from a mechanism's add/remove RDP, for one release.

    A replacement of record x by x' in D is two add/remove steps through D'' = D without
    x: P = M(D), Q = M(D''), R = M(D'). Hoelder's inequality with exponents 2 and 2 on
    ``E_R[(P/R)^a] = E_Q[(P/Q)^a (Q/R)^(a-1)]`` gives the weak triangle inequality of Renyi
    divergence (Mironov, "Renyi Differential Privacy", CSF 2017, arXiv 1702.07476: the weak
    triangle inequality with p = q = 2 behind its group privacy for 2-stable
    transformations, ``(a/2, 3 eps(a))``, which is this bound loosened)::

        D_a(P || R) <= (a - 1/2) / (a - 1) * D_2a(P || Q) + D_(2a-1)(Q || R)
                    <= (a - 1/2) / (a - 1) * eps(2a) + eps(2a - 1)

    with ``eps = add_remove`` (an add/remove RDP bound holds for removal and addition
    alike). Each order takes the smaller of that and ``unsampled(a)``, the replace-one RDP
    of the mechanism run on all records (Poisson subsampling never costs more under
    replace-one: the replaced record's coin is the same in D and D', and Renyi divergence
    is quasi-convex), and never less than ``add_remove(a)`` (a larger upper bound is still
    one; so the replace-one epsilon is never below the add/remove one at the same orders).

    How loose: for the unsampled Gaussian the triangle gives ``(2a-1)^2 / (2 (a-1) s^2)``
    against the exact ``2a / s^2``, a factor ``1 + 1/(4a(a-1))``; at small sample rates,
    where the sampled Gaussian's RDP is about linear in the order, it is about 4 times the
    add/remove RDP, as the exact replace-one RDP is (its chi-square divergence is 4 times
    the add/remove one as q goes to 0). Pure.
    """
    out = []
    for a in orders:
        if not a > 1:
            raise ConfigError(f"RDP order must be > 1. Found {a}.")
        triangle = (a - 0.5) / (a - 1) * add_remove(2 * a) + add_remove(2 * a - 1)
        out.append(max(min(triangle, unsampled(a)), add_remove(a)))
    return out


ACCOUNTANT_OF_RECORD = "pld"
# How a history with distributed-DP rounds is accounted, whichever accountant is named: part
# of each accountant's record (the ledger file's), so its epsilon can be recomputed from it.
_DISTRIBUTED = (
    "RDP: Skellam by Agarwal et al. Cor. 3.6 under the binomial Poisson subsampling bound of symmetric-noise "
    "shift mechanisms (Mironov-Talwar-Zhang's for the sampled Gaussian), "
    "composed with Opacus's sampled-Gaussian RDP at integer orders 2 to 256, 320, 384, 512, 768, 1024"
)
# How a history is accounted under replace-one neighbours (the relation is chosen when the
# ledger is composed, not recorded in it).
_REPLACE_ONE = (
    "PLD: dp_accounting NeighborRel.REPLACE_ONE; RDP: Mironov's weak triangle inequality (p = q = 2) over the "
    "add/remove RDP at orders 2a and 2a-1, at most the unsampled mechanism's with doubled sensitivity"
)
ACCOUNTANTS: dict[str, Accountant] = {
    "pld": Accountant(
        "pld",
        _pld_epsilon,
        {
            "value-discretization-interval": PLD_VALUE_DISCRETIZATION_INTERVAL,
            "estimate": "pessimistic",
            "rdp-above-epsilon": PLD_MAX_EPSILON,
            "rdp-switch-orders": ", ".join(map(str, _SWITCH_ORDERS)),
            "with-distributed-rounds": _DISTRIBUTED,
            "replace-one": _REPLACE_ONE,
        },
        coarse=_pld_coarse,
    ),
    "rdp": Accountant(
        "rdp",
        _rdp_epsilon,
        {
            "orders": "1.1 to 10.9 by 0.1, 11 to 63, 64 to 4096 by powers of 2",
            "with-distributed-rounds": _DISTRIBUTED,
            "replace-one": _REPLACE_ONE,
        },
    ),
}


def get_accountant(name: str) -> Accountant:
    """The accountant registered as ``name``."""
    if name not in ACCOUNTANTS:
        raise ConfigError(f"accountant must be one of {', '.join(map(repr, ACCOUNTANTS))}. Found {name!r}.")
    return ACCOUNTANTS[name]


def check_neighbouring(neighbouring: str) -> str:
    """``neighbouring`` if it is one of ``NEIGHBOURING``; else a ``ConfigError`` naming it."""
    if neighbouring not in NEIGHBOURING:
        raise ConfigError(f"neighbouring must be one of {', '.join(map(repr, NEIGHBOURING))}. Found {neighbouring!r}.")
    return neighbouring


def epsilon_spent(
    events: Iterable[DPSGDEvent | SkellamEvent],
    *,
    delta: float,
    accountant: str = ACCOUNTANT_OF_RECORD,
    neighbouring: str = ADD_REMOVE,
) -> float:
    """Epsilon at ``delta`` of all ``events`` composed.

    Parameters
    ----------
    events
        The DP-SGD stretches (``DPSGDEvent``) and distributed-DP rounds (``SkellamEvent``),
        in any order.
    delta
        The delta of the (epsilon, delta) guarantee, in (0, 1).
    accountant
        ``"pld"`` (the accountant of record, tight) or ``"rdp"`` (Opacus's Renyi DP). With
        any ``SkellamEvent``, either composes everything by RDP at ``SKELLAM_ORDERS``
        (see the module docstring).
    neighbouring
        ``"add-remove"`` (default) or ``"replace-one"`` (see the module docstring). The
        replace-one figure of the same events is never below the add/remove one: by
        construction on the RDP routes, and for PLD's sampled Gaussian because its
        replace-one pair is the wider (``tests/common/test_replace_one.py`` checks both).

    Returns
    -------
    float
        Epsilon; ``inf`` if any event has no noise (``noise_multiplier == 0`` or
        ``variance == 0``: no DP guarantee), 0.0 if there are no events (or none with a step).
    """
    method = get_accountant(accountant)
    check_neighbouring(neighbouring)
    if not 0 < delta < 1:
        raise ConfigError(f"delta must be in (0, 1). Found {delta}.")
    taken = [e for e in events if e.steps > 0]
    history = tuple((e.noise_multiplier, e.sample_rate, e.steps) for e in taken if isinstance(e, DPSGDEvent))
    skellam = tuple(
        (e.sample_rate, e.variance, e.l2_sensitivity, e.l1_sensitivity, e.steps)
        for e in taken
        if isinstance(e, SkellamEvent)
    )
    if not taken:
        return 0.0
    if any(sigma <= 0 for sigma, _, _ in history) or any(variance <= 0 for _, variance, _, _, _ in skellam):
        return math.inf
    if skellam:
        return _rdp_composed_epsilon(history, skellam, delta, neighbouring)
    return method.epsilon(history, delta, neighbouring=neighbouring)


def skellam_rdp(order: int, *, variance: float, l2_sensitivity: float, l1_sensitivity: float) -> float:
    """RDP at ``order`` of one release of the symmetric Skellam mechanism with total ``variance``.

    Agarwal, Kairouz and Liu, "The Skellam Mechanism for Differentially Private Federated
    Learning", NeurIPS 2021, Corollary 3.6: with ``Lam`` the variance, ``D2`` and ``D1``
    the L2 and L1 sensitivities (integer domain), at order ``a > 1``::

        a * D2^2 / (2 Lam) + min(((2a - 1) * D2^2 + 6 * D1) / (4 * Lam^2), 3 * D1 / (2 * Lam))

    ``inf`` where ``variance <= 0`` (no noise).
    """
    if order <= 1:
        raise ConfigError(f"RDP order must be > 1. Found {order}.")
    if variance <= 0:
        return math.inf
    a, lam, d2, d1 = order, variance, l2_sensitivity, l1_sensitivity
    return a * d2**2 / (2 * lam) + min(((2 * a - 1) * d2**2 + 6 * d1) / (4 * lam**2), 3 * d1 / (2 * lam))


def subsampled_rdp(orders: Iterable[int], rdp_of: Callable[[int], float], sample_rate: float) -> list[float]:
    """RDP at each integer order of a symmetric-noise shift mechanism run on a Poisson sample of the records.

    With ``eps(l) = rdp_of(l)`` the unsampled mechanism's RDP and ``g`` the sample rate, at
    integer ``a >= 2``::

        1/(a-1) * log( (1-g)^(a-1) * (a*g - g + 1)
                       + sum_{l=2..a} C(a,l) * g^l * (1-g)^(a-l) * exp((l-1) * eps(l)) )

    and the smaller of that and ``eps(a)`` (subsampling never costs more). At
    ``sample_rate == 1``, ``eps(a)`` itself. Computed in log space (``gammaln``,
    ``logsumexp``), so large orders and large ``eps`` do not overflow. Pure.

    Why it holds (add/remove neighbours; the mechanisms fedsilo accounts with it are the
    Skellam sum of distributed DP and the Skellam count vectors of secure evaluation).
    Condition on everything but the one record's inclusion (the other records' sample,
    the dithers): then ``M(D) = P``, the integer vector ``x`` plus symmetric noise, and
    ``M(D + record) = (1-g) P + g Q`` with ``Q`` the same noise around ``x + v``, ``v`` an
    integer vector within the sensitivities; Renyi divergence is jointly quasi-convex, so
    the mixture over the conditions keeps the bound. Let ``r = Q/P`` and
    ``u = 1 - g + g r``. The "add" direction is
    ``E_P[u^a] = sum_l C(a,l) (1-g)^(a-l) g^l E_P[r^l]`` exactly, with
    ``E_P[r^l] = exp((l-1) D_l(Q||P)) <= exp((l-1) eps(l))``: the bound above. The
    "remove" direction is ``E_P[u^(1-a)]``, and it is never larger: the reflection
    ``z -> 2x + v - z`` maps the integer lattice onto itself and swaps ``P`` and ``Q``
    (symmetric noise), so ``E_P[f(r)] = E_P[r f(1/r)]`` for every ``f``, and with
    ``phi(y) = y^a - y^(1-a)``, ``E_P[u^a] - E_P[u^(1-a)] = E_P[h(r)] / 2`` where
    ``h(r) = phi(1-g+g r) + r phi(1-g+g/r)``. ``h(r) = r h(1/r)``, and for ``r >= 1``,
    ``X = 1-g+g r >= 1``, ``Y = 1-g+g/r <= 1`` with ``X Y >= 1`` and ``X + r Y = 1 + r``:
    ``h`` is ``1 + r`` times the mean of ``phi`` over the two points ``X``, ``Y`` with
    mean 1, which is ``((1-Y) phi(X) + (X-1) phi(Y)) / (X-Y)``; that numerator is concave
    in ``Y`` on ``(0, 1)`` (``phi`` is), and zero at ``Y = 1`` and at ``Y = 1/X``
    (``phi(1/X) = -phi(X)/X``), so it is ``>= 0`` on ``[1/X, 1]``. The same argument as
    Mironov, Talwar and Zhang's for the sampled Gaussian ("Renyi Differential Privacy of
    the Sampled Gaussian Mechanism", 2019, whose integer-order formula this is when
    ``eps(l) = l / (2 sigma^2)``; tested against Opacus's). Zhu and Wang ("Poisson
    Subsampled Renyi Differential Privacy", ICML 2019) give this formula as a lower bound
    for any mechanism, exact for the Gaussian and Laplace mechanisms and tight under the
    conditions of their Thm. 8; their general upper bound, for any mechanism, multiplies
    the terms ``l >= 3`` by 3 (what fedsilo used before: 1.3x the Gaussian's noise at
    ``q = 0.034``), which the argument above makes unnecessary here. Tested by exact
    enumeration of the subsampled Skellam in both directions. The argument covers the
    Skellam sum as ``fedsilo.common.distributed_dp.encode`` builds it except for a share
    clamped at SecAgg+'s range, which ``MAX_OUT_OF_RANGE`` makes negligible (see there).
    """
    import numpy as np
    from scipy.special import gammaln, logsumexp

    given = list(orders)
    wanted = [int(a) for a in given]
    if any(a < 2 or a != b for a, b in zip(wanted, given, strict=True)):
        raise ConfigError(f"the subsampling bound needs integer orders >= 2. Found {given}.")
    if not 0 < sample_rate <= 1:
        raise ConfigError(f"sample rate must be in (0, 1]. Found {sample_rate}.")
    if not wanted:
        return []
    eps = np.array([float(rdp_of(ell)) for ell in range(2, max(wanted) + 1)])  # eps[l - 2]
    if sample_rate == 1:
        return [float(eps[a - 2]) for a in wanted]
    log_q, log_1mq = math.log(sample_rate), math.log1p(-sample_rate)
    ells = np.arange(2, max(wanted) + 1, dtype=float)
    bound = []
    for a in wanted:
        ell, e = ells[: a - 1], eps[: a - 1]  # l = 2..a
        with np.errstate(invalid="ignore"):  # (l - 1) * inf is inf; no nan can arise (l >= 2)
            terms = gammaln(a + 1) - gammaln(ell + 1) - gammaln(a - ell + 1) + ell * log_q + (a - ell) * log_1mq
            terms = terms + (ell - 1) * e
        first = (a - 1) * log_1mq + math.log1p((a - 1) * sample_rate)
        total = float(logsumexp(np.append(terms, first))) / (a - 1)
        bound.append(min(total, float(eps[a - 2])))
    return bound


@lru_cache(maxsize=1024)
def _skellam_rdp_per_step(
    sample_rate: float, variance: float, l2: float, l1: float, orders: tuple[int, ...]
) -> tuple[float, ...]:
    """RDP of one round of the subsampled Skellam mechanism at every order in ``orders`` (pure)."""

    def rdp_of(order: int) -> float:
        return skellam_rdp(order, variance=variance, l2_sensitivity=l2, l1_sensitivity=l1)

    return tuple(subsampled_rdp(orders, rdp_of, sample_rate))


@lru_cache(maxsize=1024)
def _skellam_rdp_per_step_replace_one(
    sample_rate: float, variance: float, l2: float, l1: float, orders: tuple[int, ...]
) -> tuple[float, ...]:
    """Replace-one RDP of one round of the subsampled Skellam mechanism at every order in ``orders`` (pure).

    ``replace_one_rdp`` of the add/remove bound (``subsampled_rdp`` over Cor. 3.6) at the integer
    orders ``2a`` and ``2a - 1``, and, unsampled, Cor. 3.6 with both sensitivities doubled:
    with the same dither, the encoding with x' differs from the one with x by at most the
    sum of the two add/remove differences through the encoding without either (triangle
    inequality, in L2 and in L1), so ``2 D2`` and ``2 D1`` bound one replacement.
    """
    needed = tuple(sorted({*orders, *(2 * a for a in orders), *(2 * a - 1 for a in orders)}))
    add_remove = dict(zip(needed, _skellam_rdp_per_step(sample_rate, variance, l2, l1, needed), strict=True))

    def unsampled(order: float) -> float:
        return skellam_rdp(int(order), variance=variance, l2_sensitivity=2 * l2, l1_sensitivity=2 * l1)

    return tuple(replace_one_rdp(orders, lambda a: add_remove[int(a)], unsampled=unsampled))


def _rdp_composed_epsilon(
    history: History,
    skellam: tuple[tuple[float, float, float, float, int], ...],
    delta: float,
    neighbouring: str = ADD_REMOVE,
) -> float:
    """RDP epsilon of Gaussian ``history`` and Skellam rounds together at ``SKELLAM_ORDERS``, under ``neighbouring``."""
    import numpy as np
    from opacus.accountants.analysis import rdp as rdp_analysis

    # Identical rounds (a distributed run repeats one round many times) are counted, then composed once.
    gaussian: Counter[tuple[float, float]] = Counter()
    for sigma, sample_rate, steps in history:
        gaussian[sigma, sample_rate] += steps
    shared: Counter[tuple[float, float, float, float]] = Counter()
    for sample_rate, variance, l2, l1, steps in skellam:
        shared[sample_rate, variance, l2, l1] += steps
    replace_one = neighbouring == REPLACE_ONE
    gaussian_step = _rdp_per_step_replace_one if replace_one else _rdp_per_step
    skellam_step = _skellam_rdp_per_step_replace_one if replace_one else _skellam_rdp_per_step
    rdp = np.zeros(len(SKELLAM_ORDERS))
    for (sigma, sample_rate), steps in gaussian.items():
        rdp += np.array(gaussian_step(sample_rate, sigma, SKELLAM_ORDERS)) * steps
    for (sample_rate, variance, l2, l1), steps in shared.items():
        rdp += np.array(skellam_step(sample_rate, variance, l2, l1, SKELLAM_ORDERS)) * steps
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "optimal order is the largest alpha": bound still valid
        eps, _ = rdp_analysis.get_privacy_spent(orders=list(SKELLAM_ORDERS), rdp=list(rdp), delta=delta)
        return float(eps)


def skellam_sensitivity(*, scale: float, max_grad_norm: float, dim_padded: int) -> tuple[float, float]:
    """L2 and L1 sensitivity ``(D2, D1)`` of one record after scaling by ``scale`` and stochastic rounding.

    ``D2 = scale * C + sqrt(d_p)`` (rounding moves each of the ``d_p`` coordinates by less
    than 1) and ``D1 = D2 * min(sqrt(d_p), D2)`` (L1 <= sqrt(d) L2, and <= L2^2 on
    integers): Kairouz, Liu and Steinke, ICML 2021, Thm. 1 with beta = 0, as Agarwal et al. use.
    """
    d2 = scale * max_grad_norm + math.sqrt(dim_padded)
    return d2, d2 * min(math.sqrt(dim_padded), d2)


def skellam_event(
    *, noise_multiplier: float, sample_rate: float, steps: int, scale: float, max_grad_norm: float, dim_padded: int
) -> SkellamEvent:
    """The ``SkellamEvent`` of total noise ``noise_multiplier * max_grad_norm`` (gradient units).

    Variance ``(scale * noise_multiplier * max_grad_norm)^2`` in the integer domain, and the
    sensitivities of ``skellam_sensitivity``.
    """
    d2, d1 = skellam_sensitivity(scale=scale, max_grad_norm=max_grad_norm, dim_padded=dim_padded)
    return SkellamEvent(sample_rate, (scale * noise_multiplier * max_grad_norm) ** 2, d2, d1, steps)


@lru_cache(maxsize=256)
def calibrate_noise(
    *,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = ACCOUNTANT_OF_RECORD,
    neighbouring: str = ADD_REMOVE,
    alongside: tuple[SkellamEvent, ...] = (),
) -> float:
    """Smallest noise multiplier whose ``steps`` steps spend at most ``target_epsilon``.

    The noise returned spends between ``(1 - CALIBRATION_TOLERANCE) * target_epsilon``
    and ``target_epsilon``, by the ``accountant`` named under the ``neighbouring`` relation
    (see ``epsilon_spent``). Pure, and memoized because a round recomputes it for every
    institution. With ``alongside`` (secure evaluations' events,
    ``fedsilo.common.secure_evaluation``), the steps composed with them spend the target (by
    RDP, as ``epsilon_spent`` composes them).
    """
    if alongside:
        return _calibrate_alongside(
            lambda sigma: [DPSGDEvent(sigma, sample_rate, steps), *alongside],
            target_epsilon=target_epsilon,
            delta=delta,
            neighbouring=neighbouring,
            what=f"sample rate {sample_rate:.4g} over {steps} steps with the planned secure evaluations",
        )
    method = get_accountant(accountant)
    check_neighbouring(neighbouring)
    if not math.isfinite(target_epsilon) or target_epsilon <= 0:
        raise ConfigError(f"target epsilon must be finite and > 0. Found {target_epsilon}.")
    if not 0 < delta < 1:
        raise ConfigError(f"delta must be in (0, 1). Found {delta}.")
    if not 0 < sample_rate <= 1 or steps < 1:
        raise ConfigError(f"sample rate must be in (0, 1] and steps >= 1. Found {sample_rate:.4g} and {steps}.")

    def by(epsilon: EpsilonOf) -> Callable[[float], float]:
        return lambda sigma: epsilon(((sigma, sample_rate, steps),), delta, neighbouring=neighbouring)

    # A coarse approximation is searched to half the tolerance: if it is as close to the
    # accountant as that, its noise is the answer, and one evaluation of the accountant confirms it.
    sigma: float | None = 1.0
    if method.coarse is not None:
        sigma = _search(by(method.coarse), target_epsilon, start=1.0, tolerance=CALIBRATION_TOLERANCE / 2)
    if sigma is not None:
        sigma = _search(by(method.epsilon), target_epsilon, start=sigma, tolerance=CALIBRATION_TOLERANCE)
    if sigma is None:
        raise ConfigError(
            f"no noise multiplier up to {MAX_NOISE_MULTIPLIER:g} reaches epsilon {target_epsilon} at delta {delta} "
            f"with sample rate {sample_rate:.4g} over {steps} steps ({accountant} accountant, {neighbouring}); "
            "raise target-epsilon or delta, or lower the rounds or local epochs"
        )
    return sigma


@lru_cache(maxsize=256)
def calibrate_skellam_noise(
    *,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    scale: float,
    max_grad_norm: float,
    dim_padded: int,
    neighbouring: str = ADD_REMOVE,
    alongside: tuple[SkellamEvent, ...] = (),
) -> float:
    """Smallest noise multiplier whose ``steps`` distributed-DP rounds spend at most ``target_epsilon``.

    With ``alongside`` (secure evaluations' events), the rounds composed with them spend it.

    The total Skellam noise is ``sigma * max_grad_norm`` in gradient units (variance
    ``(scale * sigma * max_grad_norm)^2`` in the integer domain; see ``skellam_event``).
    The noise returned spends between ``(1 - CALIBRATION_TOLERANCE) * target_epsilon`` and
    ``target_epsilon`` by RDP (Cor. 3.6 of Agarwal et al. under ``subsampled_rdp``'s
    subsampling bound; under ``"replace-one"`` neighbours, ``replace_one_rdp`` of it). Pure, and memoized.
    """
    problems = []
    if neighbouring not in NEIGHBOURING:
        problems.append(f"neighbouring must be one of {', '.join(map(repr, NEIGHBOURING))}. Found {neighbouring!r}.")
    if not math.isfinite(target_epsilon) or target_epsilon <= 0:
        problems.append(f"target epsilon must be finite and > 0. Found {target_epsilon}.")
    if not 0 < delta < 1:
        problems.append(f"delta must be in (0, 1). Found {delta}.")
    if not 0 < sample_rate <= 1 or steps < 1:
        problems.append(f"sample rate must be in (0, 1] and steps >= 1. Found {sample_rate:.4g} and {steps}.")
    if not scale > 0 or not max_grad_norm > 0 or dim_padded < 1:
        problems.append(
            f"scale and max-grad-norm must be > 0 and dim_padded >= 1. Found {scale}, {max_grad_norm} and {dim_padded}."
        )
    if problems:
        raise ConfigError(" ".join(problems))

    def event_of(sigma: float) -> SkellamEvent:
        return skellam_event(
            noise_multiplier=sigma,
            sample_rate=sample_rate,
            steps=steps,
            scale=scale,
            max_grad_norm=max_grad_norm,
            dim_padded=dim_padded,
        )

    def epsilon_of(sigma: float) -> float:
        return epsilon_spent([event_of(sigma)], delta=delta, neighbouring=neighbouring)

    if alongside:
        return _calibrate_alongside(
            lambda sigma: [event_of(sigma), *alongside],
            target_epsilon=target_epsilon,
            delta=delta,
            neighbouring=neighbouring,
            what=f"sample rate {sample_rate:.4g} over {steps} distributed rounds with the planned secure evaluations",
        )
    sigma = _search(epsilon_of, target_epsilon, start=1.0, tolerance=CALIBRATION_TOLERANCE)
    if sigma is None:
        raise ConfigError(
            f"no noise multiplier up to {MAX_NOISE_MULTIPLIER:g} reaches epsilon {target_epsilon} at delta {delta} "
            f"with sample rate {sample_rate:.4g} over {steps} distributed rounds (Skellam, RDP, {neighbouring}); "
            "raise target-epsilon or delta, or lower the rounds"
        )
    return sigma


def _calibrate_alongside(
    events_of: Callable[[float], list[DPSGDEvent | SkellamEvent]],
    *,
    target_epsilon: float,
    delta: float,
    what: str,
    neighbouring: str = ADD_REMOVE,
) -> float:
    """Training noise whose events (``events_of(sigma)``, other events included) spend ``target_epsilon``."""
    if not math.isfinite(target_epsilon) or target_epsilon <= 0 or not 0 < delta < 1:
        raise ConfigError(
            f"target epsilon must be finite and > 0 and delta in (0, 1). Found {target_epsilon} and {delta}."
        )
    sigma = _search(
        lambda s: epsilon_spent(events_of(s), delta=delta, neighbouring=neighbouring),
        target_epsilon,
        start=1.0,
        tolerance=CALIBRATION_TOLERANCE,
    )
    if sigma is None:
        raise ConfigError(
            f"no noise multiplier up to {MAX_NOISE_MULTIPLIER:g} reaches epsilon {target_epsilon} at delta {delta} "
            f"with {what}; raise target-epsilon or delta, or lower the rounds"
        )
    return sigma


@lru_cache(maxsize=256)
def calibrate_count_noise(
    *, target_epsilon: float, delta: float, releases: int, neighbouring: str = ADD_REMOVE
) -> float:
    """Skellam standard deviation for ``releases`` count vectors of sensitivity 1 spending ``target_epsilon``.

    Each release is one Skellam mechanism on integer counts (sample rate 1), composed by RDP
    (Agarwal et al. Cor. 3.6); used by private federation-wide evaluation
    (``fedsilo.common.secure_evaluation``). Pure, and memoized.
    """
    if not math.isfinite(target_epsilon) or target_epsilon <= 0 or not 0 < delta < 1 or releases < 1:
        raise ConfigError(
            f"target epsilon must be finite and > 0, delta in (0, 1) and releases >= 1. "
            f"Found {target_epsilon}, {delta} and {releases}."
        )

    def epsilon_of(std: float) -> float:
        return epsilon_spent([SkellamEvent(1.0, std * std, 1.0, 1.0, releases)], delta=delta, neighbouring=neighbouring)

    std = _search(epsilon_of, target_epsilon, start=10.0, tolerance=CALIBRATION_TOLERANCE)
    if std is None:
        raise ConfigError(f"no count noise reaches epsilon {target_epsilon} over {releases} evaluations")
    return std


def _search(epsilon_of: Callable[[float], float], target: float, *, start: float, tolerance: float) -> float | None:
    """Noise with ``epsilon_of(noise)`` in [(1 - tolerance) x target, target], from ``start``.

    Secant steps on f = log(epsilon / aim), aim mid-window, against log noise, where f is
    close to a straight line; the first step assumes slope -1 (a Gaussian's epsilon is
    about proportional to 1 / noise), and once the root is bracketed, a step leaving the
    bracket bisects it instead. If epsilon is not exactly monotone (a discretized
    accountant), the bracket may shrink to nothing: the noise found to spend at most the
    target is returned. None: the target needs more than ``MAX_NOISE_MULTIPLIER``.
    """
    aim = target * (1 - tolerance / 2)
    below, above = math.log((1 - tolerance) * target / aim), math.log(target / aim)
    top = math.log(MAX_NOISE_MULTIPLIER)
    low: float | None = None  # the most noise seen spending too much (log)
    high: float | None = None  # the least noise seen spending at most the target (log)
    previous: tuple[float, float] | None = None
    x = math.log(start)
    for _ in range(100):
        fx = math.log(max(epsilon_of(math.exp(x)), 1e-300) / aim)
        if below <= fx <= above:
            return math.exp(x)
        if fx > 0:
            low = x if low is None else max(low, x)
        else:
            high = x if high is None else min(high, x)
        # A secant step through the previous value; with none (or the same), slope -1.
        step = fx if previous is None or previous[1] == fx else -fx * (x - previous[0]) / (fx - previous[1])
        previous, x = (x, fx), x + min(max(step, -7.0), 7.0)
        if low is not None and high is not None:
            if high - low < 1e-9:
                break
            if not low < x < high:
                x = (low + high) / 2
        elif x > top:
            if previous[0] >= top:
                return None
            x = top
    return None if high is None else math.exp(high)
