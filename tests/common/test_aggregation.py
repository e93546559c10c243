"""The aggregation interface's weighted mean: what an institution sends, and Flower's FedAvg numbers exactly."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from flwr.common import ndarrays_to_parameters
from flwr.server.strategy.aggregate import aggregate_inplace
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsilo.common.aggregation import Contribution, WeightedMean, aggregation_for, may_unmask
from fedsilo.common.settings import Proposal, SecAggSettings


def contributions(draw: st.DrawFn) -> list[Contribution]:
    count = draw(st.integers(min_value=1, max_value=6))
    seed = draw(st.integers(min_value=0, max_value=2**32 - 1))
    rng = np.random.default_rng(seed)
    weights = draw(st.lists(st.integers(min_value=1, max_value=1000), min_size=count, max_size=count))
    return [
        Contribution([rng.normal(size=(3, 4)).astype(np.float32), rng.normal(size=4).astype(np.float32)], w)
        for w in weights
    ]


def run(query: WeightedMean, items: list[Contribution]) -> list[np.ndarray] | None:
    state = query.initial_state()
    for item in items:
        state = query.accumulate(state, item)
    return query.finish(state)


@settings(max_examples=30, deadline=None)
@given(items=st.composite(contributions)())
def test_the_weighted_mean_is_flowers_fedavg_bit_for_bit(items: list[Contribution]) -> None:
    # Prepare
    query = aggregation_for(Proposal())
    results = [
        (None, SimpleNamespace(parameters=ndarrays_to_parameters(c.vector), num_examples=c.weight)) for c in items
    ]
    # Execute
    ours = run(query, items)
    flowers = aggregate_inplace(results)  # type: ignore[arg-type]
    # Assert: the same dtype and the same bits, and nothing contributed was changed
    assert ours is not None
    assert all(a.dtype == b.dtype and np.array_equal(a, b) for a, b in zip(ours, flowers, strict=True))
    again = run(query, items)
    assert again is not None and all(np.array_equal(a, b) for a, b in zip(ours, again, strict=True))


def test_an_institution_sends_its_model_weighted_by_its_records_up_to_the_maximum() -> None:
    query = aggregation_for(Proposal(secagg=SecAggSettings(max_weight=1000.0)))
    model = [np.ones(2, dtype=np.float32)]
    assert [query.prepare(model, records=n).weight for n in (0, 8, 1000, 10**6)] == [0, 8, 1000, 1000]
    assert np.array_equal(query.prepare(model, records=8).vector[0], model[0])


def test_refusals_do_not_move_the_mean_and_a_round_without_trainers_has_none() -> None:
    # Prepare
    query = WeightedMean(weight_of=SecAggSettings().aggregation_weight)
    trained = query.prepare([np.array([2.0, 4.0])], records=10)
    refused = query.prepare([np.array([100.0, 100.0])], records=0)
    # Execute / Assert
    mean = run(query, [refused, trained, refused])
    assert mean is not None and np.array_equal(mean[0], np.array([2.0, 4.0]))
    assert run(query, [refused]) is None
    assert run(query, []) is None


def test_a_secure_sum_is_finished_as_flowers_replies_carrying_it_were() -> None:
    query = aggregation_for(Proposal())
    recovered = [np.array([0.1, -0.3], dtype=np.float32)]
    finished = query.finish_secure(recovered, [0, 300, 700])
    assert finished[0] == pytest.approx(recovered[0], abs=1e-7)
    with pytest.raises(ValueError, match="trained"):
        query.finish_secure(recovered, [0, 0])


@pytest.mark.parametrize(("weights", "expected"), [([], False), ([0, 5], False), ([0, 5, 0], False), ([1, 5], True)])
def test_a_secure_sum_is_unmasked_only_with_two_trainers(weights: list[int], expected: bool) -> None:
    assert may_unmask(weights) is expected
