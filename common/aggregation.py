"""How a round's updates become the next global model: an aggregation interface and its weighted mean.

The interface has the shape of tensorflow_privacy's ``DPQuery``
(``dp_query/dp_query.py``): what an institution does to its update before it
leaves (``prepare``), and how the coordinator accumulates the contributions and
finishes the aggregate (``initial_state`` / ``accumulate`` / ``finish``). Both
engines run any implementation the same way. With SecAgg+ the coordinator never
sees a contribution: the secure sum (Flower's, or ``fedsilo.server.aggregation``'s
emulation of its arithmetic in the in-process engine) comes back to it, and
``finish_secure`` turns it into the model. A new aggregation (distributed DP's
encode, noise share and decode: Kairouz, Liu, Steinke, ICML 2021; Agarwal,
Kairouz, Liu, NeurIPS 2021) is one new implementation of ``AggregationQuery``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Generic, TypeVar

import numpy as np

from fedsilo.common import distributed_dp as ddp
from fedsilo.common.errors import ConfigError
from fedsilo.common.settings import Proposal

Weights = list[np.ndarray]
StateT = TypeVar("StateT")

MIN_CONTRIBUTORS = 2
# Every global weight stays within this magnitude: an institution refuses a larger one (a crafted
# model near float32's maximum would make chosen records' gradients overflow), trains inside it,
# and distributed DP's server step projects onto it.
MAX_ABS_WEIGHT = 1e3


@dataclass(frozen=True)
class NoiseInput:
    """An institution's own noise for a round's contribution: its share's variance and its generator."""

    variance: float
    rng: np.random.Generator


@dataclass(frozen=True)
class Contribution:
    """What one institution sends for a round: its vector and its aggregation weight (0: it refused)."""

    vector: Weights
    weight: int


class AggregationQuery(ABC, Generic[StateT]):
    """One aggregation: the institution's side (``prepare``) and the coordinator's (accumulate, finish)."""

    @abstractmethod
    def prepare(
        self,
        weights: Sequence[np.ndarray],
        *,
        records: int,
        server_round: int = 0,
        noise: NoiseInput | None = None,
    ) -> Contribution:
        """What an institution sends: its trained ``weights``, prepared; ``records=0`` for a refusal.

        Parameters
        ----------
        weights
            The institution's model after the round (the received model when it refused);
            for distributed DP, its clipped gradient sum (zeros when it refused).
        records
            Its training records; 0 when it refused the round (a refusal still sends).
        server_round
            The round (distributed DP's public rotation is drawn per round).
        noise
            The institution's own noise share (distributed DP), added inside the encoding.
        """

    @abstractmethod
    def initial_state(self) -> StateT:
        """The coordinator's state before the first contribution of a round."""

    @abstractmethod
    def accumulate(self, state: StateT, contribution: Contribution) -> StateT:
        """The state with one more contribution (in the clear: no secure aggregation)."""

    @abstractmethod
    def finish(self, state: StateT) -> Weights | None:
        """The round's aggregate from the accumulated state; None when nothing was accumulated."""

    @abstractmethod
    def finish_secure(
        self,
        secure_sum: Weights,
        weights: Sequence[int],
        *,
        server_round: int = 0,
        current: Weights | None = None,
        records: int = 0,
    ) -> Weights | None:
        """The round's aggregate from what SecAgg+ recovered, given the contributors' weights.

        ``current`` is the global model the round started from and ``records`` the trained
        institutions' record count (what distributed DP's server step needs); None: unchanged.
        """

    def trained(self, contribution: Contribution, metrics: Any) -> bool:
        """Whether a well-formed reply trained (a refusal names its reason in ``refused``)."""
        return contribution.weight > 0 and "refused" not in metrics


class WeightedMean(AggregationQuery[list[Contribution]]):
    """The weighted mean of the institutions' models (FedAvg: McMahan et al., AISTATS 2017).

    An institution weighs ``weight_of(records)`` (``SecAggSettings.aggregation_weight``:
    its training records, at most ``secagg-max-weight``), with SecAgg+ or without. The mean is
    computed as Flower's ``aggregate_inplace`` computes it (each model scaled by
    its share of the total weight, in its own dtype, then summed in order), so
    models are bit-identical to those of Flower's ``FedAvg``; that needs the total
    weight first, so the state holds the contributions.
    """

    def __init__(self, *, weight_of: Callable[[int], int]) -> None:
        self.weight_of = weight_of

    def prepare(
        self,
        weights: Sequence[np.ndarray],
        *,
        records: int,
        server_round: int = 0,
        noise: NoiseInput | None = None,
    ) -> Contribution:
        return Contribution(list(weights), self.weight_of(records) if records > 0 else 0)

    def initial_state(self) -> list[Contribution]:
        return []

    def accumulate(self, state: list[Contribution], contribution: Contribution) -> list[Contribution]:
        return [*state, contribution] if contribution.weight > 0 else state

    def finish(self, state: list[Contribution]) -> Weights | None:
        if not state:
            return None
        total = sum(c.weight for c in state)
        mean = [_scaled(layer, state[0].weight / total) for layer in state[0].vector]
        for contribution in state[1:]:
            scale = contribution.weight / total
            mean = [
                np.add(acc, _scaled(layer, scale), out=acc)
                for acc, layer in zip(mean, contribution.vector, strict=True)
            ]
        return mean

    def finish_secure(
        self,
        secure_sum: Weights,
        weights: Sequence[int],
        *,
        server_round: int = 0,
        current: Weights | None = None,
        records: int = 0,
    ) -> Weights | None:
        """SecAgg+ recovers the weighted mean itself; it is averaged once more, as every reply carries it.

        Flower hands the mean to every reply, and FedAvg averaged those copies (a
        no-op up to float rounding); both engines keep that, so models stay
        bit-identical to earlier runs.
        """
        state = self.initial_state()
        for weight in weights:
            state = self.accumulate(state, Contribution(secure_sum, weight))
        mean = self.finish(state)
        if mean is None:
            raise ValueError("SecAgg+ recovered a sum without a single trained contribution")
        return mean


@dataclass(frozen=True)
class DistributedPlan:
    """Distributed DP's round, known before it runs: the same numbers at every institution and the coordinator.

    Every number follows from public facts: the proposal and the model's size.
    """

    sample_rate: float
    noise_multiplier: float  # the total noise's standard deviation, in units of max-grad-norm (0: no DP)
    max_grad_norm: float
    scale: float
    dim: int
    dim_padded: int
    bits: int
    l2_sensitivity: float
    l1_sensitivity: float

    @property
    def total_variance(self) -> float:
        """The Skellam variance the sum carries when every share counted on arrives: ``(s * sigma * C)^2``."""
        return (self.scale * self.noise_multiplier * self.max_grad_norm) ** 2


@lru_cache(maxsize=64)
def plan_distributed(settings: Proposal, dim: int) -> DistributedPlan:
    """The round of a distributed-DP run for a model of ``dim`` parameters.

    The noise is the proposal's ``noise-multiplier``, else calibrated so that ``num-server-rounds``
    rounds at the sample rate spend ``target-epsilon`` by the Skellam accountant
    (``fedsilo.common.accounting.calibrate_skellam_noise``); infinite epsilon: none.
    """
    from fedsilo.common.accounting import calibrate_skellam_noise
    from fedsilo.common.secure_evaluation import evaluation_events

    privacy, secagg = settings.privacy, settings.secagg
    if not float(secagg.max_weight).is_integer():
        raise ConfigError(
            f"'secagg-max-weight' must be a whole number with dp-mode distributed. Found {secagg.max_weight!r}."
        )
    bits = ddp.secagg_bits(
        clipping_range=secagg.clipping_range,
        quantization_range=secagg.quantization_range,
        modulus_range=secagg.modulus_range,
    )
    dim_padded = ddp.padded_dimension(dim)
    scale = ddp.scale_for(dim_padded=dim_padded, max_grad_norm=privacy.max_grad_norm)
    l2, l1 = ddp.sensitivities(scale=scale, max_grad_norm=privacy.max_grad_norm, dim_padded=dim_padded)
    sample_rate = settings.sample_rate_for(dim_padded=dim_padded, bits=bits)
    if privacy.noise_multiplier > 0:
        sigma = privacy.noise_multiplier
    elif math.isfinite(privacy.target_epsilon):
        sigma = calibrate_skellam_noise(
            target_epsilon=privacy.target_epsilon,
            delta=privacy.delta,
            sample_rate=sample_rate,
            steps=settings.rounds,
            scale=scale,
            max_grad_norm=privacy.max_grad_norm,
            dim_padded=dim_padded,
            neighbouring=privacy.neighbouring,
            alongside=evaluation_events(settings),
        )
    else:
        sigma = 0.0
    return DistributedPlan(sample_rate, sigma, privacy.max_grad_norm, scale, dim, dim_padded, bits, l2, l1)


class DistributedSkellamSum(AggregationQuery[list[Contribution]]):
    """Distributed DP: one DP-SGD step over the union a round, the noise shared inside the SecAgg+ sum.

    An institution sends its clipped gradient sum rotated, scaled, rounded, bounded and with its
    Skellam noise share and an offset added (``fedsilo.common.distributed_dp.encode``; never wrapped),
    as floats that Flower's SecAgg+ quantizes back into exactly those integers (its weight
    is ``secagg-max-weight``, so its ratio is exactly 1). The coordinator recovers the exact
    integer sum, decodes it into the union's noisy gradient sum, divides by the expected
    batch (sample rate times the trained institutions' records) and steps with SGD and
    momentum (post-processing). Agarwal, Kairouz, Liu, "The Skellam Mechanism", NeurIPS 2021;
    Kairouz, Liu, Steinke, ICML 2021. The momentum lives in this object: a resumed run starts
    it afresh.
    """

    def __init__(self, settings: Proposal) -> None:
        self.settings = settings
        self.velocity: np.ndarray | None = None

    def plan(self, dim: int) -> DistributedPlan:
        """The round's plan for a model of ``dim`` parameters."""
        return plan_distributed(self.settings, dim)

    def prepare(
        self,
        weights: Sequence[np.ndarray],
        *,
        records: int,
        server_round: int = 0,
        noise: NoiseInput | None = None,
    ) -> Contribution:
        vector = np.concatenate([np.asarray(w, dtype=np.float64).reshape(-1) for w in weights])
        if records <= 0:
            vector = np.zeros_like(vector)  # a refusal: its noise share alone
        plan = self.plan(vector.size)
        secagg = self.settings.secagg
        encoded = ddp.encode(
            vector,
            seed=ddp.rotation_seed(self.settings.seed, server_round),
            scale=plan.scale,
            noise_variance=noise.variance if noise is not None else 0.0,
            bits=plan.bits,
            rng=noise.rng if noise is not None else np.random.default_rng(0),
        )
        floats = ddp.to_secagg_floats(
            encoded, clipping_range=secagg.clipping_range, quantization_range=secagg.quantization_range
        )
        return Contribution([floats], math.floor(secagg.max_weight))

    def trained(self, contribution: Contribution, metrics: Any) -> bool:
        return "refused" not in metrics

    def initial_state(self) -> list[Contribution]:
        return []

    def accumulate(self, state: list[Contribution], contribution: Contribution) -> list[Contribution]:
        return [*state, contribution]

    def finish(self, state: list[Contribution]) -> Weights | None:
        raise ConfigError("dp-mode distributed runs only under SecAgg+: its shares of noise protect nothing alone")

    def finish_secure(
        self,
        secure_sum: Weights,
        weights: Sequence[int],
        *,
        server_round: int = 0,
        current: Weights | None = None,
        records: int = 0,
    ) -> Weights | None:
        if current is None:
            raise ValueError("distributed DP's step needs the round's global model")
        if records <= 0:
            return None
        dim = sum(int(np.size(w)) for w in current)
        plan = self.plan(dim)
        secagg = self.settings.secagg
        integers = ddp.integer_sum_from_secagg(
            np.asarray(secure_sum[0], dtype=np.float64),
            contributors=len(weights),
            clipping_range=secagg.clipping_range,
            quantization_range=secagg.quantization_range,
            bits=plan.bits,
        )
        gradient_sum = ddp.decode(
            ddp.remove_offsets(integers, contributors=len(weights), bits=plan.bits),
            seed=ddp.rotation_seed(self.settings.seed, server_round),
            scale=plan.scale,
            dim=dim,
        )
        gradient = gradient_sum / (plan.sample_rate * records)
        train = self.settings.train
        momentum = train.server_momentum
        self.velocity = gradient if self.velocity is None else momentum * self.velocity + gradient
        rate = server_learning_rate(self.settings, plan, records=records)
        flat = np.concatenate([np.asarray(w, dtype=np.float64).reshape(-1) for w in current])
        bound = model_weight_bound(self.settings)
        flat = np.clip(flat - rate * self.velocity, -bound, bound)
        out, start = [], 0
        for w in current:
            size = int(np.size(w))
            out.append(flat[start : start + size].reshape(np.shape(w)).astype(np.asarray(w).dtype))
            start += size
        return out


def model_weight_bound(settings: Proposal) -> float:
    """The largest magnitude any global weight may take: ``secagg-clipping-range``, at most ``MAX_ABS_WEIGHT``.

    Institutions refuse a received model outside it and train inside it; distributed DP's server
    step projects onto it. Public: it follows from the proposal alone.
    """
    return float(min(settings.secagg.clipping_range, MAX_ABS_WEIGHT))


def server_learning_rate(settings: Proposal, plan: DistributedPlan, *, records: int) -> float:
    """Distributed DP's step size: the setting, else the DP-SGD recipe's for the union's expected batch.

    ``fedsilo.common.training.auto_learning_rate``'s travel budget, with the model's size,
    the total noise, the expected batch over the union (sample rate times ``records``) and
    one step a round: public facts only.
    """
    if settings.train.server_learning_rate > 0:
        return settings.train.server_learning_rate
    from fedsilo.common.training import auto_learning_rate

    return auto_learning_rate(
        num_parameters=plan.dim,
        noise_multiplier=plan.noise_multiplier,
        expected_batch=plan.sample_rate * records,
        total_steps=settings.rounds,
        max_grad_norm=plan.max_grad_norm,
        momentum=settings.train.server_momentum,
    )


def aggregation_for(settings: Proposal) -> AggregationQuery[Any]:
    """The run's aggregation, the same at every institution and at the coordinator."""
    if settings.distributed:
        return DistributedSkellamSum(settings)
    return WeightedMean(weight_of=settings.secagg.aggregation_weight)


def _scaled(layer: np.ndarray, scale: float) -> np.ndarray:
    """``layer * scale`` in the layer's own dtype, as Flower's ``aggregate_inplace`` scales (on a copy)."""
    factor = np.float64(scale)
    out = np.array(layer, copy=True)
    if np.can_cast(factor, out.dtype, casting="same_kind"):
        return np.multiply(out, factor, out=out)
    return np.multiply(out, np.array(factor, out.dtype), out=out)


def may_unmask(weights: Iterable[int]) -> bool:
    """Whether a secure sum adds at least ``MIN_CONTRIBUTORS`` contributions that trained (weight > 0).

    An institution that refuses a round sends a zero-weight contribution;
    unmasking a sum with a single trainer would reveal that institution's update.
    """
    return sum(1 for w in weights if w > 0) >= MIN_CONTRIBUTORS
