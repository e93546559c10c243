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

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import numpy as np

from fedsilo.common.settings import SecAggSettings

Weights = list[np.ndarray]
StateT = TypeVar("StateT")

MIN_CONTRIBUTORS = 2


@dataclass(frozen=True)
class Contribution:
    """What one institution sends for a round: its vector and its aggregation weight (0: it refused)."""

    vector: Weights
    weight: int


class AggregationQuery(ABC, Generic[StateT]):
    """One aggregation: the institution's side (``prepare``) and the coordinator's (accumulate, finish)."""

    @abstractmethod
    def prepare(self, weights: Sequence[np.ndarray], *, records: int) -> Contribution:
        """What an institution sends: its trained ``weights``, prepared; ``records=0`` for a refusal.

        Parameters
        ----------
        weights
            The institution's model after the round (the received model when it refused).
        records
            Its training records; 0 when it refused the round (a refusal still sends).
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
    def finish_secure(self, secure_sum: Weights, weights: Sequence[int]) -> Weights:
        """The round's aggregate from what SecAgg+ recovered, given the contributors' weights."""


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

    def prepare(self, weights: Sequence[np.ndarray], *, records: int) -> Contribution:
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

    def finish_secure(self, secure_sum: Weights, weights: Sequence[int]) -> Weights:
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


def aggregation_for(secagg: SecAggSettings) -> AggregationQuery[Any]:
    """The run's aggregation, the same at every institution and at the coordinator."""
    return WeightedMean(weight_of=secagg.aggregation_weight)


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
