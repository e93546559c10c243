"""Distributed DP's encoding: rotate, scale, round, add a Skellam noise share, and pass integers through SecAgg+.

Each institution adds only a share of the central DP-SGD noise to its clipped
gradient sum; the shares are revealed only inside the SecAgg+ sum, which then
carries the central noise. The pipeline is that of the Skellam mechanism
(Agarwal, Kairouz and Liu, "The Skellam Mechanism for Differentially Private
Federated Learning", NeurIPS 2021, arXiv 2110.04995), as TensorFlow Federated's
``DistributedDpSumFactory`` (with tensorflow_privacy's
``DistributedSkellamSumQuery``) runs it:

1. rotate the flat gradient sum with an orthonormal randomised Walsh-Hadamard
   transform ``H D_rho pad(x) / sqrt(d_p)`` (public per-round seed ``rho``), which
   spreads its norm evenly over the coordinates;
2. scale by ``s``, round with a uniform dither, ``e = floor(s * v + U)``, and clamp
   each coordinate to ``[-2^(b-2), 2^(b-2)]``;
3. add a symmetric Skellam share ``Z_i`` (``Pois(lam/2) - Pois(lam/2)``; sums of
   independent ones are symmetric Skellam with the summed variance) and the offset
   ``2^(b-1)``. TFF reduces mod ``2^b`` here because its secure sum is taken mod
   ``2^b``; Flower's SecAgg+ sums modulo a larger range (which its weight channel needs),
   so a per-institution wrap would show in the sum: no value is wrapped, and one
   the noise pushes out of ``[0, 2^b)`` (``out_of_range_probability``) is clamped;
4. after the secure sum: remove the offsets, divide by ``s``, un-rotate.

For one record (add/remove) with the same dither for both neighbours, the l2
and l1 sensitivities of the integer vector are ``D2 = s*C + sqrt(d_p)`` and
``D1 = D2 * min(sqrt(d_p), D2)`` (Agarwal et al.; tighter bounds with
conditional rounding in Kairouz, Liu and Steinke, "The Distributed Discrete
Gaussian Mechanism", ICML 2021, arXiv 2102.06387).

The integers travel through Flower's SecAgg+ (Bell et al., CCS 2020) unchanged:
with a power-of-two clipping range ``c`` and quantization range ``Q``, the float
``z * 2c/Q - c`` sent at weight exactly 1 (``num_examples == max_weight``) is
quantized back to exactly ``z``, and the coordinator recovers the exact integer sum
(``b = log2(Q)``) from the mean Flower dequantizes.

Who must be honest: SecAgg+ lets at most ``n - t`` of the ``n`` sampled
institutions drop out, so an institution counting on ``h`` honest ones can count
on ``k_i = max(1, h - (n - t))`` shares including its own, and sizes its share
(``noise_share``) so that those reach the central variance ``(s*sigma*C)^2``.

Pure numpy: no torch, no Flower, no files. Randomness is passed in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fedsilo.common.errors import ConfigError

# s * C = SCALE_FACTOR * sqrt(d_p): rounding adds sqrt(d_p) to the l2 sensitivity s*C, about 3%.
SCALE_FACTOR = 32.0

# The widest integer domain encode works in: sums of int64 values must not overflow.
_MAX_BITS = 62

# The largest chance of a noise share leaving SecAgg+'s range that an institution accepts
# (fedsilo.client.institution refuses a round above it; tests/common/test_distributed_settings.py
# checks the two agree). The default sample rate keeps under it. A clamped value is the one
# step that is not a shift of the Skellam sum, so the accounting holds for the mechanism
# without it; the two differ with at most this chance a round, which adds at most
# rounds * MAX_OUT_OF_RANGE * (1 + e^epsilon) to delta (the total-variation argument):
# under 1e-16 for a million rounds at epsilon 18. (At 1e-12, as before, up to 6e-6 for 2,048
# rounds at epsilon 8: not negligible against delta 1e-5.) The headroom it costs is small: the
# Skellam tail falls as exp(-t^2 / (2 Lam)), so 1e-30 needs about 1.6x the standard deviations
# of 1e-12 inside the 2^(b-2) a share has, about two-thirds of a bit.
MAX_OUT_OF_RANGE = 1e-30


def padded_dimension(dim: int) -> int:
    """The smallest power of two at least ``dim``: the length of a rotated vector.

    Parameters
    ----------
    dim
        The flat gradient's length, at least 1.
    """
    if dim < 1:
        raise ConfigError(f"a vector to rotate must have at least 1 coordinate. Found dimension {dim}.")
    return 1 << (dim - 1).bit_length()


def rotation_seed(run_seed: int, server_round: int) -> int:
    """The public seed of a round's rotation: the same at every institution and at the coordinator.

    Parameters
    ----------
    run_seed
        The run's seed (``seed`` in the run config), at least 0.
    server_round
        The round's number, at least 0.
    """
    if run_seed < 0 or server_round < 0:
        raise ConfigError(
            f"a rotation seed needs a run seed and a round number >= 0. Found seed {run_seed}, round {server_round}."
        )
    return int(np.random.SeedSequence([run_seed, server_round]).generate_state(1, dtype=np.uint64)[0])


def rotate(vector: np.ndarray, *, seed: int) -> np.ndarray:
    """The orthonormal randomised Walsh-Hadamard rotation ``H D_rho pad(x) / sqrt(d_p)``.

    ``D_rho`` is a diagonal of random signs drawn from ``np.random.default_rng(seed)``,
    ``pad`` appends zeros up to ``d_p = padded_dimension(d)``, and ``H`` is the
    (Sylvester) Hadamard matrix, applied by the fast transform in ``O(d_p log d_p)``.

    Parameters
    ----------
    vector
        A flat float vector of length ``d``.
    seed
        The round's public seed (``rotation_seed``).

    Returns
    -------
    np.ndarray
        The rotated float64 vector, of length ``d_p``; its l2 norm is the input's.
    """
    flat = _flat_floats(vector, what="a vector to rotate")
    dim_padded = padded_dimension(flat.size)
    padded = np.zeros(dim_padded)
    padded[: flat.size] = flat
    return _hadamard(padded * _signs(seed, dim_padded)) / math.sqrt(dim_padded)


def unrotate(rotated: np.ndarray, *, seed: int, dim: int) -> np.ndarray:
    """The inverse of ``rotate``: ``D_rho H y / sqrt(d_p)``, cut to its first ``dim`` coordinates.

    Parameters
    ----------
    rotated
        A rotated vector of length ``d_p = padded_dimension(dim)``.
    seed
        The seed it was rotated with.
    dim
        The original vector's length.
    """
    flat = _flat_floats(rotated, what="a rotated vector")
    dim_padded = padded_dimension(dim)
    if flat.size != dim_padded:
        raise ConfigError(f"a rotated vector of dimension {dim} must have {dim_padded} coordinates. Found {flat.size}.")
    return (_hadamard(flat) / math.sqrt(dim_padded) * _signs(seed, dim_padded))[:dim]


def scale_for(*, dim_padded: int, max_grad_norm: float) -> float:
    """The scale ``s`` with ``s * C = SCALE_FACTOR * sqrt(d_p)``.

    Rounding adds at most ``sqrt(d_p)`` to the l2 sensitivity ``s * C`` of the scaled
    vector, so this scale keeps that excess at ``1 / SCALE_FACTOR`` (about 3%).

    Parameters
    ----------
    dim_padded
        The rotated vector's length (a power of two).
    max_grad_norm
        The per-record clipping bound ``C`` (> 0).
    """
    _check_padded(dim_padded)
    if not (math.isfinite(max_grad_norm) and max_grad_norm > 0):
        raise ConfigError(f"'max-grad-norm' must be > 0. Found {max_grad_norm!r}.")
    return SCALE_FACTOR * math.sqrt(dim_padded) / max_grad_norm


def sensitivities(*, scale: float, max_grad_norm: float, dim_padded: int) -> tuple[float, float]:
    """The l2 and l1 sensitivities ``(D2, D1)`` of the scaled, rounded vector to one record.

    ``D2 = s*C + sqrt(d_p)`` and ``D1 = D2 * min(sqrt(d_p), D2)``, with the same
    dither for both neighbouring datasets (Agarwal, Kairouz and Liu, NeurIPS 2021).

    Parameters
    ----------
    scale
        The scale ``s`` (``scale_for``).
    max_grad_norm
        The per-record clipping bound ``C``.
    dim_padded
        The rotated vector's length.
    """
    _check_padded(dim_padded)
    if not (math.isfinite(scale) and scale > 0 and math.isfinite(max_grad_norm) and max_grad_norm > 0):
        raise ConfigError(
            f"scale and max-grad-norm must be > 0. Found scale {scale!r}, max-grad-norm {max_grad_norm!r}."
        )
    root = math.sqrt(dim_padded)
    l2 = scale * max_grad_norm + root
    return l2, l2 * min(root, l2)


def skellam_noise(variance: float, size: int, rng: np.random.Generator) -> np.ndarray:
    """Symmetric Skellam noise ``Pois(variance/2) - Pois(variance/2)``, int64, ``size`` draws.

    Parameters
    ----------
    variance
        Each draw's variance (>= 0; 0 gives zeros).
    size
        How many draws.
    rng
        The generator (seeded by ``secrets`` when deployed).
    """
    if not (math.isfinite(variance) and variance >= 0):
        raise ConfigError(f"a Skellam variance must be >= 0. Found {variance!r}.")
    if size < 0:
        raise ConfigError(f"a noise vector's size must be >= 0. Found {size}.")
    if variance == 0:
        return np.zeros(size, dtype=np.int64)
    half = variance / 2
    return (rng.poisson(half, size).astype(np.int64) - rng.poisson(half, size).astype(np.int64)).astype(np.int64)


def secagg_bits(*, clipping_range: float, quantization_range: int, modulus_range: int) -> int:
    """The bits ``b = log2(Q)`` of the integers that pass through Flower's SecAgg+ unchanged.

    Parameters
    ----------
    clipping_range
        ``secagg-clipping-range``: must be a power of two (fractions such as 0.5 included).
    quantization_range
        ``secagg-quantization-range``: must be a power of two dividing ``modulus_range``.
    modulus_range
        ``secagg-modulus-range``.

    Raises
    ------
    ConfigError
        Naming every setting that breaks the pass-through.
    """
    problems = _secagg_problems(clipping_range, quantization_range)
    if not problems and modulus_range % quantization_range != 0:
        problems.append(
            f"'secagg-quantization-range' must divide 'secagg-modulus-range'. Found {quantization_range} "
            f"and {modulus_range}."
        )
    if problems:
        raise ConfigError("distributed DP passes integers through SecAgg+ unchanged only if " + "; ".join(problems))
    bits = quantization_range.bit_length() - 1
    if bits > _MAX_BITS:
        raise ConfigError(f"'secagg-quantization-range' must be at most 2**{_MAX_BITS}. Found {quantization_range}.")
    return bits


def encode(
    gradient_sum: np.ndarray,
    *,
    seed: int,
    scale: float,
    noise_variance: float,
    bits: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """What an institution sends: its gradient sum rotated, scaled, rounded, bounded, noised and offset.

    ``e = floor(s * rotate(G) + U)`` with ``U`` uniform on [0, 1) (an unbiased rounding),
    clamped to ``[-2^(b-2), 2^(b-2)]`` (a box projection: it never moves two vectors
    apart, so the sensitivity stays ``sensitivities``'), plus ``skellam_noise(noise_variance)``,
    plus the offset ``2^(b-1)``, so that the value lies in ``[0, 2^b)``.

    Nothing is reduced modulo anything: SecAgg+ adds the institutions' values as
    integers (its modulus is larger than their sum), so what the coordinator learns must
    be a function of the SUM of signal-plus-noise alone. A per-institution wrap would
    add, per coordinate, how many institutions' values were negative: a fact each
    protected only by its own share. The noise could push a value out of
    ``[0, 2^b)``; it is then clamped, which happens with probability at most
    ``out_of_range_probability`` (an institution refuses rounds where that is not negligible).

    Returns
    -------
    np.ndarray
        int64 of length ``d_p``, each in ``[0, 2^b)``.
    """
    _check_bits(bits)
    if not (math.isfinite(scale) and scale > 0):
        raise ConfigError(f"the scale must be > 0. Found {scale!r}.")
    rotated = rotate(gradient_sum, seed=seed)
    scaled = scale * rotated + rng.random(rotated.size)
    largest = float(np.abs(scaled).max(initial=0.0))
    if largest >= 2.0**_MAX_BITS:
        raise ConfigError(f"a scaled coordinate reaches {largest:.3g}, beyond the integer range; lower the scale.")
    limit = np.int64(1) << (bits - 2)
    rounded = np.clip(np.floor(scaled).astype(np.int64), -limit, limit)
    noised = rounded + skellam_noise(noise_variance, rotated.size, rng) + (np.int64(1) << (bits - 1))
    return np.clip(noised, 0, (np.int64(1) << bits) - 1)


def remove_offsets(integer_sum: np.ndarray, *, contributors: int, bits: int) -> np.ndarray:
    """The sum of the contributions' signal and noise: the secure integer sum less every ``encode`` offset."""
    _check_bits(bits)
    return np.asarray(integer_sum, dtype=np.int64) - np.int64(contributors) * (np.int64(1) << (bits - 1))


def out_of_range_probability(*, variance: float, bits: int, dim_padded: int) -> float:
    """An upper bound on the chance that an institution's noise pushes any coordinate out of ``[0, 2^b)``.

    The signal takes at most ``2^(b-2)`` of the ``2^(b-1)`` on either side of the offset,
    so a coordinate leaves the range only if its Skellam noise exceeds ``t = 2^(b-2) - 1``
    in magnitude: by Chernoff, ``P(|Z| >= t) <= 2 exp(lam (cosh u - 1) - u t)`` at
    ``u = asinh(t / lam)`` (the Skellam moment generating function is
    ``exp(lam (cosh u - 1))``), and a union bound over the ``d_p`` coordinates.
    """
    t = float((1 << (bits - 2)) - 1)
    if variance <= 0:
        return 0.0
    u = math.asinh(t / variance)
    log_tail = variance * (math.cosh(u) - 1) - u * t
    return min(1.0, 2.0 * dim_padded * math.exp(log_tail))


def decode(integer_sum: np.ndarray, *, seed: int, scale: float, dim: int) -> np.ndarray:
    """The float sum from the sum of signal and noise (``remove_offsets``): divided by ``s``, un-rotated.

    Parameters
    ----------
    integer_sum
        The sum of the institutions' rounded signals and noise shares (offsets removed), length ``d_p``.
    seed
        The round's public rotation seed.
    scale
        The scale ``s``.
    dim
        The flat gradient's length ``d``.

    Returns
    -------
    np.ndarray
        float64 of length ``dim``.
    """
    if not (math.isfinite(scale) and scale > 0):
        raise ConfigError(f"the scale must be > 0. Found {scale!r}.")
    return unrotate(np.asarray(integer_sum, dtype=np.int64).astype(np.float64) / scale, seed=seed, dim=dim)


def overflow_margin(integer_sum: np.ndarray, *, bits: int) -> float:
    """How much of the centred range ``2^(b-1)`` the sum's largest coordinate reaches (near 1: it may have wrapped).

    Parameters
    ----------
    integer_sum
        The secure integer sum, centred or not (any integers; taken mod ``2^b``).
    bits
        ``b``.
    """
    centred = _centred(integer_sum, bits=bits)
    return float(np.abs(centred).max(initial=0)) / float(1 << (bits - 1))


def to_secagg_floats(values: np.ndarray, *, clipping_range: float, quantization_range: int) -> np.ndarray:
    """The floats ``z * 2c/Q - c`` that Flower's SecAgg+ quantizes back into exactly the integers ``z``.

    Exact when ``c`` and ``Q`` are powers of two and the institution's weight is
    exactly 1 (``num_examples == max_weight``).

    Parameters
    ----------
    values
        Integers in ``[0, Q)`` (``encode``'s output, in ``[0, 2^b)``).
    clipping_range
        ``c``.
    quantization_range
        ``Q``.
    """
    problems = _secagg_problems(clipping_range, quantization_range)
    if problems:
        raise ConfigError("; ".join(problems))
    integers = np.asarray(values)
    if integers.dtype.kind not in "iu":
        raise ConfigError(f"SecAgg+ pass-through carries integers. Found dtype {integers.dtype}.")
    if integers.size and (int(integers.min()) < 0 or int(integers.max()) >= quantization_range):
        raise ConfigError(
            f"SecAgg+ pass-through carries integers in [0, {quantization_range}). "
            f"Found [{int(integers.min())}, {int(integers.max())}]."
        )
    return integers.astype(np.float64) * (2 * clipping_range / quantization_range) - clipping_range


def integer_sum_from_secagg(
    mean: np.ndarray, *, contributors: int, clipping_range: float, quantization_range: int, bits: int
) -> np.ndarray:
    """The exact integer sum of the contributions from the float mean Flower's ``SecAggPlusWorkflow`` recovers.

    With every weight ``max_weight``, Flower returns ``(T * 2c/Q - n*c) / n`` for
    ``n = contributors`` vectors (refusals included) and ``T`` the sum mod
    ``modulus_range``; this inverts it and rounds to the nearest integer. Flower's
    summed weight ``contributors * Q`` must stay below ``modulus_range`` (with the
    default settings: fewer than 1024 contributors), or its division wraps.

    Parameters
    ----------
    mean
        Flower's recovered mean (one flat array).
    contributors
        How many masked vectors were summed.
    clipping_range
        ``c``.
    quantization_range
        ``Q``.
    bits
        ``b``.

    Returns
    -------
    np.ndarray
        int64: the sum of the contributions' integers (each in ``[0, 2^b)``, ``n * Q`` below the modulus:
        nothing wraps).
    """
    _check_bits(bits)
    if contributors < 1:
        raise ConfigError(f"a secure sum needs at least 1 contributor. Found {contributors}.")
    problems = _secagg_problems(clipping_range, quantization_range)
    if problems:
        raise ConfigError("; ".join(problems))
    floats = np.asarray(mean, dtype=np.float64)
    total = (floats * contributors + contributors * clipping_range) * (quantization_range / (2 * clipping_range))
    rounded = np.rint(total)
    off = float(np.abs(total - rounded).max(initial=0.0))
    if off > 0.25:
        raise ConfigError(
            f"the SecAgg+ mean is not a sum of integers (a coordinate is {off:.3g} away from one): "
            f"every contribution must weigh secagg-max-weight, and 'contributors' ({contributors}) count every vector"
        )
    return rounded.astype(np.int64)


@dataclass(frozen=True)
class NoiseShare:
    """An institution's share of a round's noise, and what it counts on.

    Attributes
    ----------
    total_variance
        ``(s*sigma*C)^2``: what the sum carries when every share counted on arrives.
    share_variance
        ``lam_s = total_variance / sample``.
    own_variance
        ``lam_i``: what this institution adds.
    counted_honest
        ``k_i``: the honest contributions it counts on, its own included.
    sample
        ``n``: institutions sampled this round.
    threshold
        ``t``: SecAgg+'s reconstruction threshold (at most ``n - t`` drop out).
    min_honest
        ``h``: sampled institutions the policy counts on being honest.
    """

    total_variance: float
    share_variance: float
    own_variance: float
    counted_honest: int
    sample: int
    threshold: int
    min_honest: int


def noise_share(*, total_variance: float, sample: int, threshold: int, min_honest: int) -> NoiseShare:
    """How much noise an institution adds so that the honest survivors it counts on reach ``total_variance``.

    ``k_i = max(1, h - (n - t))`` (capped at ``n``), ``lam_s = total / n`` and
    ``lam_i = lam_s * (n - k_i + 1)``: its own share plus ``k_i - 1`` others of
    ``lam_s`` make ``total_variance``. With ``h = 1`` it adds all of it (local DP).

    Parameters
    ----------
    total_variance
        The central variance ``(s*sigma*C)^2`` (>= 0).
    sample
        ``n`` (>= 1).
    threshold
        ``t``, in ``[1, n]``.
    min_honest
        ``h`` (>= 1).
    """
    problems = []
    if not (math.isfinite(total_variance) and total_variance >= 0):
        problems.append(f"the total noise variance must be >= 0 (found {total_variance!r})")
    if sample < 1:
        problems.append(f"a round samples at least 1 institution (found {sample})")
    elif not 1 <= threshold <= sample:
        problems.append(f"the reconstruction threshold must be in [1, {sample}] (found {threshold})")
    if min_honest < 1:
        problems.append(f"'min-honest' must be an integer >= 1 (found {min_honest})")
    if problems:
        raise ConfigError("; ".join(problems) + ".")
    counted = min(max(1, min_honest - (sample - threshold)), sample)
    share = total_variance / sample
    return NoiseShare(
        total_variance=total_variance,
        share_variance=share,
        own_variance=share * (sample - counted + 1),
        counted_honest=counted,
        sample=sample,
        threshold=threshold,
        min_honest=min_honest,
    )


def honest_problem(*, sample: int, threshold: int, min_honest: int) -> str | None:
    """Why a round cannot give the guarantee an institution's policy counts on; None when it can.

    Parameters
    ----------
    sample
        ``n``: institutions the round samples.
    threshold
        ``t``: SecAgg+'s reconstruction threshold.
    min_honest
        ``h``: sampled institutions the policy counts on being honest.
    """
    if min_honest > sample:
        return (
            f"the policy counts on {min_honest} honest institutions, the round samples only {sample}; "
            f"lower min-honest to at most {sample} or sample more institutions"
        )
    return None


def secagg_round_parameters(sample: int, *, num_shares: float, reconstruction_threshold: float) -> tuple[int, int]:
    """The shares and reconstruction threshold that flwr 1.41's ``SecAggPlusWorkflow`` sets up for a round.

    The settings are read as ``SecAggSettings.workflow_kwargs`` passes them (a value
    above 1 and integral is a count, any other a fraction of the round), then as
    Flower's ``setup_stage`` does: a fraction of the sample, rounded, made odd,
    and the whole sample when that leaves 2 or fewer; the threshold a fraction of
    the shares, at least 2; an even count below the sample is made odd.

    Parameters
    ----------
    sample
        Institutions the round samples (Flower needs at least 2).
    num_shares
        ``secagg-num-shares``.
    reconstruction_threshold
        ``secagg-reconstruction-threshold``.
    """
    if sample < 2:
        raise ConfigError(f"SecAgg+ needs a round of at least 2 institutions. Found {sample}.")
    if not (num_shares > 0 and reconstruction_threshold > 0):
        raise ConfigError(
            "'secagg-num-shares' and 'secagg-reconstruction-threshold' must be > 0. "
            f"Found {num_shares!r} and {reconstruction_threshold!r}."
        )
    shares_setting = _count_or_fraction(num_shares)
    threshold_setting = _count_or_fraction(reconstruction_threshold)
    _check_flowers_settings(shares_setting, threshold_setting)
    if isinstance(shares_setting, float):
        shares = round(shares_setting * sample)
        if shares < sample and shares & 1 == 0:
            shares += 1
        if shares <= 2:
            shares = sample
    else:
        shares = shares_setting
    is_fraction = isinstance(threshold_setting, float)
    threshold = max(round(threshold_setting * shares), 2) if is_fraction else int(threshold_setting)
    if sample != shares and shares & 1 == 0:
        shares += 1
    return shares, threshold


def _check_flowers_settings(shares: int | float, threshold: int | float) -> None:
    """What ``SecAggPlusWorkflow`` refuses on construction (``_check_init_params``), as a ``ConfigError``."""
    problems = []
    if isinstance(shares, int) and shares <= 2:
        problems.append(f"'secagg-num-shares' as a count must be at least 3 (found {shares})")
    if isinstance(threshold, float) and threshold > 1:
        problems.append(
            f"'secagg-reconstruction-threshold' must be a fraction in (0, 1] or a whole count (found {threshold!r})"
        )
    if isinstance(threshold, int) and isinstance(shares, int) and threshold >= shares:
        problems.append(
            f"'secagg-reconstruction-threshold' ({threshold}) must be below 'secagg-num-shares' ({shares}) as counts"
        )
    if problems:
        raise ConfigError("Flower's SecAgg+ refuses these settings: " + "; ".join(problems) + ".")


def _count_or_fraction(value: float) -> int | float:
    """As ``SecAggSettings.workflow_kwargs`` passes a setting to Flower: an int is a count, a float a fraction."""
    return int(value) if value > 1 and float(value).is_integer() else float(value)


def _hadamard(vector: np.ndarray) -> np.ndarray:
    """``H x`` for the unnormalised Sylvester Hadamard matrix ``H`` (fast transform; length a power of two)."""
    size = vector.size
    out = vector.reshape(1, 1, size)
    half = 1
    while half < size:
        blocks = out.reshape(-1, 2, half)
        first, second = blocks[:, :1], blocks[:, 1:]
        out = np.concatenate((first + second, first - second), axis=1)
        half *= 2
    return out.reshape(size)


def _signs(seed: int, size: int) -> np.ndarray:
    """The rotation's random signs ``D_rho``: +-1.0 from ``np.random.default_rng(seed)``."""
    return np.random.default_rng(seed).integers(0, 2, size=size).astype(np.float64) * 2.0 - 1.0


def _flat_floats(vector: np.ndarray, *, what: str) -> np.ndarray:
    """``vector`` as a flat float64 array, refusing anything but one finite dimension."""
    array = np.asarray(vector, dtype=np.float64)
    if array.ndim != 1:
        raise ConfigError(f"{what} must be flat (one dimension). Found shape {array.shape}.")
    if not np.isfinite(array).all():
        raise ConfigError(f"{what} must be finite. Found {int((~np.isfinite(array)).sum())} non-finite values.")
    return array


def _centred(integer_sum: np.ndarray, *, bits: int) -> np.ndarray:
    """Integers mod ``2^b``, centred into ``[-2^(b-1), 2^(b-1))`` (int64)."""
    _check_bits(bits)
    array = np.asarray(integer_sum)
    if array.dtype.kind not in "iu":
        raise ConfigError(f"a secure integer sum must hold integers. Found dtype {array.dtype}.")
    modulus = np.int64(1) << bits
    reduced = np.mod(array.astype(np.int64), modulus)
    return np.where(reduced >= modulus // 2, reduced - modulus, reduced)


def _check_padded(dim_padded: int) -> None:
    if dim_padded < 1 or dim_padded & (dim_padded - 1):
        raise ConfigError(f"a padded dimension must be a power of two. Found {dim_padded}.")


def _check_bits(bits: int) -> None:
    if not 1 <= bits <= _MAX_BITS:
        raise ConfigError(f"the integer domain's bits must be in [1, {_MAX_BITS}]. Found {bits}.")


def _secagg_problems(clipping_range: float, quantization_range: int) -> list[str]:
    """What stops ``c`` and ``Q`` from passing integers through SecAgg+ exactly (empty: nothing)."""
    problems = []
    if not (math.isfinite(clipping_range) and clipping_range > 0 and math.frexp(clipping_range)[0] == 0.5):
        problems.append(f"'secagg-clipping-range' must be a power of two (e.g. 8.0). Found {clipping_range!r}")
    if not (
        isinstance(quantization_range, int | np.integer)
        and quantization_range >= 2
        and quantization_range & (quantization_range - 1) == 0
    ):
        problems.append(
            f"'secagg-quantization-range' must be a power of two (e.g. 4194304 = 2**22). Found {quantization_range!r}"
        )
    return problems
