"""Private federation-wide evaluation: held-out counts summed under SecAgg+ with Skellam noise.

Each fit round that follows an evaluated round (``evaluated_round``) carries, beside the
institution's update, an integer count vector over its held-out records scored by the model
it received: for two classes a ``2 x SCORE_BINS`` histogram (label x bin of the predicted
probability of class 1; a bin edge at 0.5, so accuracy at threshold 0.5 follows), for ``K``
classes the ``K x K`` confusion matrix. One record added or removed changes exactly one
count by 1, so the L1 and L2 sensitivities are 1. The institution adds Skellam noise to its
counts (its share of the evaluation's total variance, ``noise_share`` as distributed DP's;
Agarwal, Kairouz, Liu, NeurIPS 2021), then sends them as floats that Flower's SecAgg+
quantizes back into exactly those integers (``to_secagg_floats``, whatever the institution's
weight ratio); the coordinator recovers the exact noisy sum (``integer_sum``) and derives
the federation-wide accuracy and a binned AUC from it (``estimate``): post-processing.

Calibration uses public facts only: ``EVAL_EPSILON_FRACTION`` of the run's target epsilon
is reserved for the planned evaluations (``evaluation_plan``); training is calibrated so
that it, composed with them, spends the target (``evaluation_events`` passed to the
calibrations).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from fedsilo.common.accounting import SkellamEvent, calibrate_count_noise
from fedsilo.common.errors import ConfigError
from fedsilo.common.settings import Proposal

MECHANISM = "secure-evaluation"  # the ledger's name for one evaluation's release
EVAL_EPSILON_FRACTION = 0.1  # of target-epsilon, reserved for the planned evaluations
MAX_SECURE_EVALUATIONS = 8  # models scored in a run at most (``evaluated_round``), the latest always
# Two classes: bins of the score logit(P(class 1)), their edges public: 0 (P = 0.5, so accuracy
# at threshold 0.5 follows) and +-0.05, 0.2, 0.8, 3.2 (each 4 times the last), so that a model
# whose scores crowd near 0.5 (early, or very noisy) is still ranked across several bins.
SCORE_EDGES = (-3.2, -0.8, -0.2, -0.05, 0.0, 0.05, 0.2, 0.8, 3.2)
SCORE_BINS = len(SCORE_EDGES) + 1
# An institution's noisy counts must stay far inside SecAgg+'s range (+-Q/2): this many noise
# standard deviations plus its held-out records (a Skellam tail this far out is below 1e-100).
TAIL_SDS = 40.0


@dataclass(frozen=True)
class EvaluationPlan:
    """A run's secure evaluations, known to every institution and the coordinator before the run."""

    evaluations: int  # how many fit rounds carry counts
    variance: float  # the Skellam variance each evaluation's sum carries (0: no DP)

    @property
    def event(self) -> SkellamEvent:
        """One evaluation, for the accountant: Skellam, sample rate 1, sensitivities 1."""
        return SkellamEvent(1.0, self.variance, 1.0, 1.0, 1)


def planned_evaluations(settings: Proposal) -> int:
    """How many fit rounds carry counts: round ``r`` evaluates the model of round ``r - 1`` when that is evaluated."""
    if not settings.secure_evaluation:
        return 0
    return sum(1 for r in range(2, settings.rounds + 1) if evaluated_round(settings, r) is not None)


def evaluated_round(settings: Proposal, server_round: int) -> int | None:
    """The round whose model fit round ``server_round``'s counts score (None: it carries none).

    The institution scores the model it receives, the global model after round
    ``server_round - 1``, when ``eval-every`` evaluates that round. The last round's model
    has no later fit round: its figure is not measured (the figures lag one round). At most
    ``MAX_SECURE_EVALUATIONS`` models are scored, the latest one always: the count noise
    grows with the square root of the evaluations (their epsilon share is fixed), so a
    distributed run of 256 rounds scores every 32nd model, the 255th last, not all 255.
    """
    if not settings.secure_evaluation or server_round < 2 or server_round > settings.rounds:
        return None
    previous, every = server_round - 1, settings.eval_every
    if previous % every:
        return None
    candidates = (settings.rounds - 1) // every  # the models eval-every evaluates before the last
    stride = math.ceil(candidates / MAX_SECURE_EVALUATIONS)
    return previous if (candidates - previous // every) % stride == 0 else None


def cells(num_classes: int) -> int:
    """The count vector's length: ``2 * SCORE_BINS`` for two classes, ``K * K`` for ``K``."""
    return 2 * SCORE_BINS if num_classes == 2 else num_classes * num_classes


@lru_cache(maxsize=64)
def evaluation_plan(settings: Proposal) -> EvaluationPlan | None:
    """The run's secure evaluations (None: none planned).

    Their noise spends ``EVAL_EPSILON_FRACTION`` of ``target-epsilon`` over the planned
    evaluations by RDP (``calibrate_count_noise``); without DP (target inf, no noise
    multiplier) they carry none.
    """
    count = planned_evaluations(settings)
    if count == 0:
        return None
    privacy = settings.privacy
    if math.isfinite(privacy.target_epsilon):
        std = calibrate_count_noise(
            target_epsilon=EVAL_EPSILON_FRACTION * privacy.target_epsilon,
            delta=privacy.delta,
            releases=count,
            neighbouring=privacy.neighbouring,
        )
        variance = std * std
    elif privacy.enabled:
        raise ConfigError(
            "'secure-evaluation' calibrates its noise to a share of 'target-epsilon', which is inf here; "
            "set a finite target-epsilon or turn secure-evaluation off"
        )
    else:
        variance = 0.0
    return EvaluationPlan(count, variance)


def evaluation_events(settings: Proposal) -> tuple[SkellamEvent, ...]:
    """The planned evaluations' accounting events, which training's calibration composes with."""
    plan = evaluation_plan(settings)
    if plan is None or plan.variance <= 0:
        return ()
    return (SkellamEvent(1.0, plan.variance, 1.0, 1.0, plan.evaluations),)


def classes_of(size: int) -> int:
    """The classes a count vector of ``size`` cells is for (the inverse of ``cells``)."""
    if size == 2 * SCORE_BINS:
        return 2
    classes = math.isqrt(size)
    if classes * classes != size or classes < 3:
        raise ConfigError(f"a count vector has 2 x {SCORE_BINS} or K x K cells (K >= 3). Found {size}.")
    return classes


def counts(probabilities: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """The held-out records' count vector (int64): the binary histogram or the confusion matrix, flattened.

    Binary: cell ``label * SCORE_BINS + bin``, ``bin`` the score's place among ``SCORE_EDGES``
    (a score on an edge goes above it), the score ``log p1 - log p0``. ``K`` classes: cell
    ``label * K + argmax``.
    """
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    if num_classes == 2:
        with np.errstate(divide="ignore"):
            score = np.log(probabilities[:, 1]) - np.log(probabilities[:, 0])
        bins = np.searchsorted(np.asarray(SCORE_EDGES), np.nan_to_num(score), side="right")
        index = labels * SCORE_BINS + bins
    else:
        index = labels * num_classes + np.argmax(probabilities, axis=1)
    return np.bincount(index, minlength=cells(num_classes)).astype(np.int64)


def noisy(values: np.ndarray, *, variance: float, rng: np.random.Generator) -> np.ndarray:
    """``values`` plus symmetric Skellam noise of ``variance`` per cell (int64)."""
    from fedsilo.common.distributed_dp import skellam_noise

    return np.asarray(values, dtype=np.int64) + skellam_noise(variance, int(np.size(values)), rng)


def range_problem(*, variance: float, records: int, quantization_range: int) -> str | None:
    """Why counts with noise of ``variance`` could leave SecAgg+'s range (None: they cannot, but negligibly).

    ``records`` is 0 to check the noise alone. The reason names no figure of the records.
    """
    reach = TAIL_SDS * math.sqrt(variance) + records
    if reach >= offset(quantization_range):
        what = "its noise share" if records == 0 else "its held-out counts with their noise"
        return (
            f"{what} could leave the +-{offset(quantization_range)} the counts have inside SecAgg+'s range; "
            "raise secagg-quantization-range or target-epsilon"
        )
    return None


def weight_ratio(weight: int, *, max_weight: float, quantization_range: int) -> int:
    """Flower's quantized weight ratio ``round(weight / max_weight * Q)`` (``secaggplus_mod``)."""
    return round(weight / max_weight * quantization_range)


def offset(quantization_range: int) -> int:
    """What each contribution adds to every cell, so that what it sends lies in ``[0, Q/4)``: ``Q/8``."""
    return quantization_range // 8


def to_secagg_floats(
    values: np.ndarray, *, weight: int, clipping_range: float, quantization_range: int, max_weight: float
) -> np.ndarray:
    """Floats that Flower's ``secaggplus_mod`` quantizes into exactly ``Q/2 + Q/8 + values`` (float64).

    It multiplies each array by the institution's quantized ratio ``r = q/Q`` (``weight_ratio``),
    clips to ``+-c`` and quantizes ``(x r + c) Q/(2c)`` stochastically. With ``u = values + Q/8``
    in ``[0, Q/4)``, the grid point ``y = u 2c/Q`` lies in ``[0, c/2)``: each float is ``y / r``,
    moved by a few ulps until ``x r`` is within two ulps of ``y``, which adding ``c`` absorbs
    (``y + c`` is a multiple of ``2c/Q``, even in ``[c, 2c)``, whose half ulp is at least
    ``2 ulp(y)``): so the quantized value is exactly the integer ``Q/2 + u``, and the stochastic
    rounding has nothing to round. Flower's own steps are replayed here to check every cell.
    ``c`` and ``Q`` must be powers of two. A zero ratio (a refusal in local mode) sends zeros:
    nothing of it reaches the sum (it quantizes to ``Q/2``, ``u = 0``).
    """
    from fedsilo.common.distributed_dp import _secagg_problems

    problems = _secagg_problems(clipping_range, quantization_range)
    if problems:
        raise ConfigError("; ".join(problems))
    integers = np.asarray(values, dtype=np.int64).reshape(-1)
    shift = offset(quantization_range)
    if integers.size and int(np.abs(integers).max()) >= shift:
        raise ConfigError(f"SecAgg+ carries counts within +-{shift}. Found {int(np.abs(integers).max())}.")
    q = weight_ratio(weight, max_weight=max_weight, quantization_range=quantization_range)
    if q == 0:
        return np.zeros(integers.size, dtype=np.float64)
    ratio = q / quantization_range
    wanted = (integers + shift + quantization_range // 2).astype(np.float64)
    grid = (integers + shift).astype(np.float64) * (2 * clipping_range / quantization_range)
    start = grid / ratio
    floats = start.copy()
    done = _flower_quantizes(floats, ratio, clipping_range, quantization_range) == wanted
    for ulps in (1, -1, 2, -2, 3, -3, 4, -4):
        if done.all():
            return floats
        trial = start.copy()
        for _ in range(abs(ulps)):
            trial = np.nextafter(trial, np.inf if ulps > 0 else -np.inf)
        hit = ~done & (_flower_quantizes(trial, ratio, clipping_range, quantization_range) == wanted)
        floats[hit], done = trial[hit], done | hit
    if not done.all():
        raise ConfigError(f"no float quantizes exactly into a count under SecAgg+ (weight ratio {ratio!r})")
    return floats


def _flower_quantizes(floats: np.ndarray, ratio: float, clipping_range: float, quantization_range: int) -> np.ndarray:
    """What ``secaggplus_mod`` quantizes before its stochastic rounding: ``(clip(x r) + c) Q/(2c)``."""
    product = floats * ratio
    return (np.clip(product, -clipping_range, clipping_range) + clipping_range) * (
        quantization_range / (2 * clipping_range)
    )


def integer_sum(
    aggregate: np.ndarray, *, total_ratio: int, contributors: int, clipping_range: float, quantization_range: int
) -> np.ndarray:
    """The exact sum of the institutions' noisy counts from what Flower's ``SecAggPlusWorkflow`` recovers.

    Flower returns ``sum(u) 2c/Q * Q/total_ratio`` (``total_ratio`` the summed quantized ratios,
    which the coordinator knows from the replies' weights): multiplied back, rounded, and each
    of the ``contributors``' (weight ratio above 0) offset ``Q/8`` taken off.
    """
    if total_ratio < 1:
        raise ConfigError(f"a secure sum of counts needs a summed weight ratio >= 1. Found {total_ratio}.")
    floats = np.asarray(aggregate, dtype=np.float64)
    total = floats * (total_ratio / (2 * clipping_range))
    rounded = np.rint(total)
    off = float(np.abs(total - rounded).max(initial=0.0))
    if off > 0.25:
        raise ConfigError(f"the secure sum of counts is not a sum of integers (a cell is {off:.3g} away from one)")
    return rounded.astype(np.int64) - contributors * offset(quantization_range)


def estimate(summed: np.ndarray, *, num_classes: int, variance: float) -> dict[str, Any]:
    """Federation-wide accuracy (and for two classes a binned ROC AUC) from the noisy summed counts.

    Accuracy is the noisy correct count over the noisy total, from the raw sums (unbiased
    numerator and denominator; clipping each cell at 0 first would add the noise's positive
    half in every empty cell), kept within [0, 1]; ``accuracy_sd`` is its standard deviation
    to first order (delta method). The AUC is computed from the cells clipped at 0, its ranks
    only as fine as the bins (``SCORE_EDGES``). ``variance`` is the sum's noise variance per
    cell, ``noise_sd`` its root. None where the noisy total is not positive.
    """
    raw = np.asarray(summed, dtype=np.float64)
    if num_classes == 2:
        table = raw.reshape(2, SCORE_BINS)
        above = np.arange(SCORE_BINS) >= SCORE_BINS // 2
        correct_mask = np.stack([~above, above])
    else:
        table = raw.reshape(num_classes, num_classes)
        correct_mask = np.eye(num_classes, dtype=bool)
    right, wrong = float(table[correct_mask].sum()), float(table[~correct_mask].sum())
    records = right + wrong
    result: dict[str, Any] = {"records": records, "noise_sd": math.sqrt(variance)}
    if records <= 0:
        return {**result, "accuracy": None, "accuracy_sd": None, "auc": None}
    var_right, var_wrong = variance * int(correct_mask.sum()), variance * int((~correct_mask).sum())
    result["accuracy"] = min(max(right / records, 0.0), 1.0)
    result["accuracy_sd"] = math.sqrt(wrong**2 * var_right + right**2 * var_wrong) / records**2
    clipped = np.maximum(table, 0.0)
    result["auc"] = binned_auc(clipped[1], clipped[0]) if num_classes == 2 else None
    return result


def binned_auc(positives: np.ndarray, negatives: np.ndarray) -> float | None:
    """ROC AUC from histograms of the positives' and negatives' scores (ties within a bin count half)."""
    pos, neg = np.asarray(positives, dtype=np.float64), np.asarray(negatives, dtype=np.float64)
    total = float(pos.sum()) * float(neg.sum())
    if total <= 0:
        return None
    below = np.concatenate([[0.0], np.cumsum(neg)[:-1]])
    return float(np.sum(pos * (below + 0.5 * neg)) / total)
