"""SecAgg+'s arithmetic without its masks (the in-process engine's secure sum), and the clipping warning.

Flower's SecAgg+ (Bell et al., CCS 2020) changes an aggregate's numbers in two
ways that matter to accuracy: each institution scales its update by its weight
ratio (``num_examples / max_weight``, itself quantized), clips it to
``[-clipping_range, clipping_range]`` and quantizes it stochastically to
``quantization_range`` levels; the coordinator sums the vectors modulo
``modulus_range``, dequantizes and divides by the summed weight. An
institution's ``num_examples`` is its aggregation weight,
``SecAggSettings.aggregation_weight``: its training records capped at
``max_weight``, so the ratio never exceeds 1 (no overflow, whatever its size).
What is masked is the whole model, not a change to it, and Flower clips it to
``clipping_range`` silently: so institutions keep their weights inside that range
while they train, and ``clipping_warning`` tells the coordinator when an
aggregate comes near it (the bound binds). The masks
(pairwise masks that cancel in the sum, private masks the coordinator removes
with recovered seeds) change nothing in the recovered sum, so they need no
emulation here: the in-process engine calls these functions, which call the
same Flower functions in the same order as ``secaggplus_mod``'s
``_collect_masked_vectors`` and ``SecAggPlusWorkflow``'s
``collect_masked_vectors_stage`` / ``unmask_stage``, and so gets the numbers the
Flower engine gets. What the coordinator makes of the recovered sum is the
run's ``fedsilo.common.aggregation.AggregationQuery.finish_secure``, in both engines.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np

from fedsilo.common.settings import SecAggSettings
from fedsilo.runtime.flower.internals import (
    dequantize,
    factor_combine,
    factor_extract,
    parameters_addition,
    parameters_mod,
    parameters_multiply,
    quantize,
)

Weights = list[np.ndarray]
# How near SecAgg+'s clipping range an aggregate may come before the coordinator warns. The
# institutions' models scatter around their mean: with 5 institutions of 5,000 German-credit
# records (default training), the largest parameter of any one model was 1.2 to 2.6 times the
# aggregate's largest, so at half the range the bound likely binds some of them already.
CLIPPING_MARGIN = 2.0


def secaggplus_client_vector(weights: Sequence[np.ndarray], num_examples: int, secagg: SecAggSettings) -> Weights:
    """What one institution's ``secaggplus_mod`` masks: its quantized weight, then its quantized, weighted update.

    The stochastic rounding draws from numpy's global generator, as Flower's
    does: seed it first (``fedsilo.client.mods.seeded_global_numpy``).
    """
    q_ratio = round(num_examples / secagg.max_weight * secagg.quantization_range)
    dq_ratio = q_ratio / secagg.quantization_range
    scaled = parameters_multiply(list(weights), dq_ratio)
    quantized = quantize(scaled, secagg.clipping_range, secagg.quantization_range)
    return [np.asarray(a, dtype=np.int64) for a in factor_combine(q_ratio, quantized)]


def secaggplus_unmasked_aggregate(vectors: Sequence[Weights], secagg: SecAggSettings) -> Weights:
    """The weighted mean ``SecAggPlusWorkflow`` recovers from the institutions' vectors once the masks are gone.

    ``vectors`` holds every institution that sent a masked vector, refusals (zero
    weight) included: each adds one ``clipping_range`` offset that is removed here.
    """
    if not vectors:
        raise ValueError("SecAgg+ needs at least one vector to aggregate")
    total = list(vectors[0])
    for vector in vectors[1:]:
        total = parameters_addition(total, list(vector))
    total = parameters_mod(parameters_mod(total, secagg.modulus_range), secagg.modulus_range)
    q_total_ratio, recovered = factor_extract(total)
    inv_dq_total_ratio = secagg.quantization_range / q_total_ratio
    aggregate = dequantize(recovered, secagg.clipping_range, secagg.quantization_range)
    offset = -(len(vectors) - 1) * secagg.clipping_range
    for vec in aggregate:
        vec += offset
        vec *= inv_dq_total_ratio
    return aggregate


def clipping_warning(
    aggregate: Sequence[np.ndarray], weights: Iterable[int], *, max_weight: float, clipping_range: float
) -> str | None:
    """A warning for the run log when SecAgg+'s clipping has likely changed an aggregate, else None.

    Each institution's model, multiplied by its weight ratio ``weight / max_weight``
    (1 for an institution at or above ``max_weight``), is clipped to
    ``[-clipping_range, clipping_range]`` before it is masked; nobody sees the
    individual models, but the aggregate is their weighted mean. The warning fires
    when the aggregate's largest parameter, times the round's largest ratio, reaches
    ``clipping_range / CLIPPING_MARGIN``. ``weights`` are the replies'
    ``num_examples`` (refusals, weight 0, clip nothing).
    """
    ratios = [w / max_weight for w in weights if w > 0]
    if not ratios or not aggregate:
        return None
    largest = max(float(np.abs(a).max(initial=0.0)) for a in aggregate)
    reach = largest * max(ratios)
    if reach < clipping_range / CLIPPING_MARGIN:
        return None
    suggested = 2 ** math.ceil(math.log2(2 * CLIPPING_MARGIN * reach))
    return (
        f"the institutions' weights are near SecAgg+'s range: the aggregate's largest parameter is {largest:.3g}, "
        f"and each institution's parameters, times its weight ratio (up to {max(ratios):.3g} this round), must stay "
        f"within +-{clipping_range:g} (secagg-clipping-range), so the institutions clamp their weights to it while "
        f"they train (Flower would clip them silently). The bound is likely binding; set secagg-clipping-range to "
        f"at least {suggested:g} (precision per institution: 2 x range / secagg-quantization-range)"
    )
