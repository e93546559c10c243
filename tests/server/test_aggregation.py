"""Institutions of any size in one aggregate: weights capped at secagg-max-weight, SecAgg+'s arithmetic exact.

The institutions hold German credit rows resampled with replacement (the bank
table the federation's schema encodes), from 10 to 1,000,000 records; they train
with ``fedsilo.client.institution.fit_round`` and their updates go through SecAgg+'s
weighting, clipping, quantization and unmasking (``fedsilo.server.aggregation``, Flower's
own functions in ``secaggplus_mod``'s and ``SecAggPlusWorkflow``'s order).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from fedsilo.client.institution import InstitutionData, fit_round, records_fingerprint, split_holdout
from fedsilo.client.mods import seeded_global_numpy
from fedsilo.client.policy import PrivacyPolicy
from fedsilo.common.datasets import DATA_DIR, builtin_schema_path, read_table
from fedsilo.common.ledger import PrivacyLedger
from fedsilo.common.models import build_model, get_weights
from fedsilo.common.schema import Schema
from fedsilo.common.settings import RunSettings, SecAggSettings
from fedsilo.server.aggregation import (
    CLIPPING_MARGIN,
    clipping_warning,
    secaggplus_client_vector,
    secaggplus_unmasked_aggregate,
)

Weights = list[np.ndarray]
SCHEMA = Schema.load(builtin_schema_path("german-credit"))
ENCODED = SCHEMA.transform(read_table(DATA_DIR / "german_credit.csv"), source="german_credit.csv")


def bank(name: str, records: int, state: Path, settings: RunSettings, *, seed: int) -> InstitutionData:
    """An institution holding ``records`` German credit rows drawn with replacement, split as fit_round expects.

    The schema encodes row by row (declared bounds and categories), so resampling
    encoded rows gives the table that encoding resampled rows gives, in less time.
    Up to 100,000 records the ledger is keyed by ``records_fingerprint``; above, by
    a digest of the drawn row numbers (hashing a million rows costs seconds; see
    ``simulations/benchmarks/institution_size.py``).
    """
    rows = np.random.default_rng(seed).integers(0, len(ENCODED[1]), records)
    inputs, labels = ENCODED[0][rows], ENCODED[1][rows]
    train_x, test_x, train_y, test_y = split_holdout(inputs, labels, settings)
    key = records_fingerprint(inputs, labels) if records <= 100_000 else hashlib.sha256(rows.tobytes()).hexdigest()[:24]
    return InstitutionData(name, SCHEMA, train_x, train_y, test_x, test_y, state / name, key, True, PrivacyPolicy())


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    """One intra-op thread, as every ClientApp trains (on shared cores, two threads took 5x longer)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def initial(settings: RunSettings) -> Weights:
    return get_weights(build_model(settings.train, SCHEMA, seed=settings.seed))


def secure_round(updates: list[tuple[Weights, int]], secagg: SecAggSettings, *, seed: int = 0) -> Weights:
    """The aggregate SecAgg+ recovers from the institutions' updates and weights (each seeded as the mod is)."""
    vectors = []
    for i, (weights, weight) in enumerate(updates):
        with seeded_global_numpy(seed + i):
            vectors.append(secaggplus_client_vector(weights, weight, secagg))
    return secaggplus_unmasked_aggregate(vectors, secagg)


def weighted_mean(updates: list[tuple[Weights, int]]) -> Weights:
    total = sum(weight for _, weight in updates)
    return [sum(w[k] * (weight / total) for w, weight in updates) for k in range(len(updates[0][0]))]


def max_gap(a: Weights, b: Weights) -> float:
    return max(float(np.abs(x - y).max()) for x, y in zip(a, b, strict=True))


def quantization_bound(weights: list[int], secagg: SecAggSettings) -> float:
    """One quantization level per institution on the weighted sum, over the summed ratio."""
    level = 2 * secagg.clipping_range / secagg.quantization_range
    return len(weights) * level / (sum(weights) / secagg.max_weight)


def test_a_bank_of_5000_records_trains_with_the_default_settings_and_reaches_the_aggregate(tmp_path: Path) -> None:
    # Prepare: the default run settings, whose secagg-max-weight (1000) once refused such a bank
    settings = RunSettings()
    large = bank("bank-large", 5_000, tmp_path, settings, seed=1)
    small = bank("bank-small", 300, tmp_path, settings, seed=2)
    start = initial(settings)

    # Execute: one round for both, then SecAgg+'s aggregate of their updates
    outcomes = [fit_round(data, start, settings, server_round=1, run_id="r") for data in (large, small)]
    updates = [(o.weights, o.num_examples) for o in outcomes]
    aggregate = secure_round(updates, settings.secagg)

    # Assert: both trained and recorded the round; the large bank weighs the maximum, the small its records
    assert all("refused" not in o.metrics for o in outcomes)
    assert [o.num_examples for o in outcomes] == [1000, len(small.train_y)] and len(large.train_y) == 4000
    for data in (large, small):
        assert [e.round for e in PrivacyLedger.for_dataset(data.state_dir, data.fingerprint).entries] == [1]
    assert max_gap(outcomes[0].weights, start) > 0.01  # it trained
    # The aggregate is the capped-weight mean, to quantization precision: the large bank's update is in it.
    expected = weighted_mean(updates)
    assert max_gap(aggregate, expected) <= quantization_bound([1000, len(small.train_y)], settings.secagg)
    without_large = weighted_mean(updates[1:])
    assert max_gap(aggregate, without_large) > 100 * quantization_bound([1000], settings.secagg)


def test_banks_of_10_and_1000000_records_train_in_one_round_and_aggregate_by_capped_weight(tmp_path: Path) -> None:
    # Prepare: a million records trained in about a hundred large batches (the round's recipe is
    # the coordinator's; the default's tens of thousands of steps would take minutes here)
    settings = RunSettings.from_config({"batch-size": 8192, "local-epochs": 1})
    secagg = settings.secagg
    tiny = bank("bank-tiny", 10, tmp_path, settings, seed=3)
    huge = bank("bank-huge", 1_000_000, tmp_path, settings, seed=4)
    start = initial(settings)

    # Execute: the same round at both banks, then SecAgg+'s vectors and unmasking
    outcomes = [fit_round(data, start, settings, server_round=1, run_id="r") for data in (tiny, huge)]
    updates = [(o.weights, o.num_examples) for o in outcomes]
    aggregate = secure_round(updates, secagg, seed=11)

    # Assert: both trained; the huge bank weighs the maximum (ratio 1), the tiny one its 8 training records
    assert all("refused" not in o.metrics for o in outcomes)
    assert [o.num_examples for o in outcomes] == [len(tiny.train_y), 1000] and len(tiny.train_y) == 8
    assert all(max_gap(o.weights, start) > 0 for o in outcomes)
    assert max(float(np.abs(w).max()) for w in outcomes[1].weights) < secagg.clipping_range  # nothing clipped
    # The recovered aggregate is (8 w_tiny + 1000 w_huge) / 1008 to quantization precision.
    expected = weighted_mean(updates)
    assert max_gap(aggregate, expected) <= quantization_bound([8, 1000], secagg)
    # The tiny bank is masked exactly as before the cap: the same weight, the same quantized vector.
    with seeded_global_numpy(11):
        uncapped = secaggplus_client_vector(outcomes[0].weights, len(tiny.train_y), secagg)
    with seeded_global_numpy(11):
        capped = secaggplus_client_vector(*updates[0], secagg)
    assert all(np.array_equal(a, b) for a, b in zip(capped, uncapped, strict=True))
    # ...so its weight keeps its precision; a maximum raised to the huge bank's size would have cost it.
    assert _weight_error(8, secagg) < 1e-4
    raised = SecAggSettings(max_weight=float(len(huge.train_y)))
    assert _weight_error(8, raised) > 1e-3


def _weight_error(weight: int, secagg: SecAggSettings) -> float:
    """Relative error of the weight SecAgg+ applies (its quantized ratio) against the weight itself."""
    ratio = weight / secagg.max_weight
    return abs(round(ratio * secagg.quantization_range) / secagg.quantization_range - ratio) / ratio


def test_the_weight_is_the_record_count_up_to_the_maximum() -> None:
    secagg = SecAggSettings()
    assert [secagg.aggregation_weight(n) for n in (1, 999, 1000, 1001, 10**7)] == [1, 999, 1000, 1000, 1000]
    assert SecAggSettings(max_weight=2500.7).aggregation_weight(10**6) == 2500  # a ratio never above 1


@pytest.mark.parametrize("largest", [3.9, 4.1, 20.0])
def test_the_coordinator_is_warned_when_an_aggregate_nears_the_clipping_range(largest: float) -> None:
    aggregate = [np.array([[0.5, -largest], [1.0, 0.0]]), np.array([0.1])]
    warning = clipping_warning(aggregate, [0, 1000, 10], max_weight=1000.0, clipping_range=8.0)
    if largest < 8.0 / CLIPPING_MARGIN:
        assert warning is None
    else:
        assert warning is not None and "secagg-clipping-range" in warning and f"{largest:.3g}" in warning
    # Small institutions only: their ratio (0.01) leaves their parameters a range of 800.
    assert clipping_warning(aggregate, [0, 10, 5], max_weight=1000.0, clipping_range=8.0) is None
    assert clipping_warning(aggregate, [0, 0], max_weight=1000.0, clipping_range=8.0) is None


def test_secagg_clips_a_large_institutions_parameters_beyond_the_range_and_the_warning_fires() -> None:
    # Prepare: two institutions at the maximum weight (ratio 1), one with a parameter beyond the range
    secagg = SecAggSettings()
    over = [np.array([11.0, 1.0]), np.array([0.5])]
    under = [np.array([5.0, 1.0]), np.array([0.5])]

    # Execute
    aggregate = secure_round([(over, 1000), (under, 1000)], secagg)

    # Assert: SecAgg+ silently took 11 as 8 (mean 6.5, not 8); the coordinator's warning says so
    assert aggregate[0][0] == pytest.approx(6.5, abs=1e-4)
    warning = clipping_warning(aggregate, [1000, 1000], max_weight=secagg.max_weight, clipping_range=8.0)
    assert warning is not None and "at least 32" in warning
