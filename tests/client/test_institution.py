"""An institution's round: budget check before training, ledger entry before release."""

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from fedsilo.client.institution import InstitutionData, fit_round
from fedsilo.client.policy import PrivacyPolicy
from fedsilo.common.ledger import PrivacyLedger
from fedsilo.common.models import build_model, get_weights
from fedsilo.common.settings import RunSettings

SETTINGS = RunSettings.from_config({"num-server-rounds": 3, "target-epsilon": 2.0})


def institution(state: Path, settings: RunSettings = SETTINGS, max_epsilon: float | None = None) -> InstitutionData:
    node = {"partition-id": 0, "num-partitions": 3, "state-dir": str(state)}
    data = InstitutionData.from_node_config(node, settings)
    return replace(data, policy=PrivacyPolicy(max_epsilon=max_epsilon))


def initial(data: InstitutionData) -> list[np.ndarray]:
    return get_weights(build_model(SETTINGS.train, data.schema, seed=SETTINGS.seed))


def test_each_round_is_recorded_and_epsilon_grows_to_the_target(tmp_path: Path) -> None:
    data = institution(tmp_path)
    weights, epsilons = initial(data), []
    for r in (1, 2, 3):
        out = fit_round(data, weights, SETTINGS, server_round=r, run_id="a")
        assert out.num_examples == len(data.train_y) and "refused" not in out.metrics
        epsilons.append(out.metrics["epsilon"])
        weights = out.weights
    assert epsilons[0] < epsilons[1] < epsilons[2] <= 2.0
    ledger = PrivacyLedger.for_dataset(tmp_path, data.fingerprint)
    assert [e.round for e in ledger.entries] == [1, 2, 3]
    assert ledger.epsilon(delta=SETTINGS.privacy.delta) == epsilons[-1]


def test_clear_text_metrics_carry_nothing_computed_from_records(tmp_path: Path) -> None:
    data = institution(tmp_path)
    out = fit_round(data, initial(data), SETTINGS, server_round=1, run_id="a")
    assert set(out.metrics) == {"institution", "delta", "epsilon", "steps", "noise-multiplier", "sample-rate"}


def test_a_restarted_institution_continues_from_its_ledger(tmp_path: Path) -> None:
    first = institution(tmp_path, max_epsilon=10.0)
    one = fit_round(first, initial(first), SETTINGS, server_round=1, run_id="a")
    restarted = institution(tmp_path, max_epsilon=10.0)  # a new process: nothing kept in memory
    assert restarted.fingerprint == first.fingerprint
    two = fit_round(restarted, one.weights, SETTINGS, server_round=1, run_id="b")
    assert two.metrics["epsilon"] > one.metrics["epsilon"]
    entries = PrivacyLedger.for_dataset(tmp_path, first.fingerprint).entries
    assert [(e.run_id, e.round) for e in entries] == [("a", 1), ("b", 1)]


def test_refusal_at_the_budget_trains_nothing_and_spends_nothing(tmp_path: Path) -> None:
    data = institution(tmp_path)
    weights = initial(data)
    for r in (1, 2, 3):
        weights = fit_round(data, weights, SETTINGS, server_round=r, run_id="a").weights
    ledger_file = PrivacyLedger.for_dataset(tmp_path, data.fingerprint).path
    before = ledger_file.read_text()
    out = fit_round(data, weights, SETTINGS, server_round=4, run_id="a")
    assert out.num_examples == 0
    assert "refused round 4" in str(out.metrics["refused"]) and "budget of 2" in str(out.metrics["refused"])
    assert all((a == b).all() for a, b in zip(out.weights, weights, strict=True))
    assert ledger_file.read_text() == before
    assert len(json.loads(before)["entries"]) == 3


def test_the_ledger_key_ignores_split_and_order_but_not_the_records(tmp_path: Path) -> None:
    base = institution(tmp_path)
    other_split = institution(tmp_path, RunSettings.from_config({"test-fraction": 0.3}))
    assert other_split.fingerprint == base.fingerprint  # the coordinator cannot reset a budget this way
    other = InstitutionData.from_node_config({"partition-id": 1, "num-partitions": 3, "state-dir": "x"}, SETTINGS)
    assert other.fingerprint != base.fingerprint


def test_deployed_institutions_draw_noise_the_run_config_cannot_predict(tmp_path: Path) -> None:
    data = institution(tmp_path, max_epsilon=100.0)
    deployed = replace(data, reproducible=False)
    one = fit_round(deployed, initial(data), SETTINGS, server_round=1, run_id="a")
    two = fit_round(deployed, initial(data), SETTINGS, server_round=1, run_id="a")
    assert any((a != b).any() for a, b in zip(one.weights, two.weights, strict=True))
    sim_one = fit_round(data, initial(data), SETTINGS, server_round=1, run_id="a")
    sim_two = fit_round(data, initial(data), SETTINGS, server_round=1, run_id="a")
    assert all((a == b).all() for a, b in zip(sim_one.weights, sim_two.weights, strict=True))


@pytest.mark.parametrize("secure", [True, False])
def test_more_records_than_secagg_max_weight_train_at_the_largest_weight(tmp_path: Path, secure: bool) -> None:
    # Prepare: about 150 training records against a maximum weight of 10
    data = institution(tmp_path)
    settings = RunSettings.from_config({"secagg-max-weight": 10.0, "secure-aggregation": secure})

    # Execute
    out = fit_round(data, initial(data), settings, server_round=1, run_id="a")

    # Assert: no refusal; it trained, recorded the round and weighs the maximum, with SecAgg+ or without
    assert len(data.train_y) > 100 and "refused" not in out.metrics
    assert out.num_examples == 10
    assert any((a != b).any() for a, b in zip(out.weights, initial(data), strict=True))
    assert [e.round for e in PrivacyLedger.for_dataset(tmp_path, data.fingerprint).entries] == [1]


def test_an_update_under_secagg_stays_inside_its_clipping_range(tmp_path: Path) -> None:
    # A learning rate far too large would push weights past secagg-clipping-range, where SecAgg+
    # would clip them silently; the institution keeps them inside it (plain FedAvg has no such limit).
    loud = SETTINGS.with_overrides({"learning-rate": 200.0, "secagg-clipping-range": 2.0})
    data = institution(tmp_path)
    masked = fit_round(data, initial(data), loud, server_round=1, run_id="a", secure_aggregation=True)
    plain = fit_round(data, initial(data), loud, server_round=1, run_id="b", secure_aggregation=False)
    assert max(float(np.abs(w).max()) for w in masked.weights) <= 2.0
    assert max(float(np.abs(w).max()) for w in plain.weights) > 2.0
