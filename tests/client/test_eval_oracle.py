"""Evaluation is no oracle: the institution's own held-out split, a minimum size, one answer per trained round."""

from __future__ import annotations

import re
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Context, RecordDict

from fedsilo.client.client_app import InstitutionClient
from fedsilo.client.evaluations import evaluations
from fedsilo.client.institution import InstitutionData, evaluate_round
from fedsilo.client.policy import PrivacyPolicy, deployed_policy
from fedsilo.client.processes import node_config
from fedsilo.client.simulated_data import SimulatedTables
from fedsilo.client.trainer import Trainer
from fedsilo.common.datasets import builtin_schema_path, load_builtin
from fedsilo.common.errors import ConfigError
from fedsilo.common.models import build_model, get_weights
from fedsilo.common.settings import RunSettings

SETTINGS = RunSettings.from_config({"num-server-rounds": 2, "target-epsilon": 2.0, "secure-aggregation": False})
# What a coordinator that wants one chosen record held out proposes: 0.2 % of the records.
SHRUNK = SETTINGS.with_overrides({"test-fraction": 0.002})


def bank(root: Path, rows: int, policy: str = "") -> dict[str, str]:
    """A deployed bank holding the first ``rows`` German-credit records; it shares evaluation metrics."""
    root.mkdir(parents=True, exist_ok=True)
    load_builtin("german-credit").frame.iloc[:rows].to_csv(root / "records.csv", index=False)
    text = "max-epsilon = 10.0\nrequire-secure-aggregation = false\nshare-eval-metrics = true\n" + policy
    (root / "policy.toml").write_text(text)
    return node_config(
        name="bank",
        data=root / "records.csv",
        schema=builtin_schema_path("german-credit"),
        policy=root / "policy.toml",
        state_dir=root / "state",
    )


def client(config: dict[str, str]) -> InstitutionClient:
    """The real ClientApp's client for this node (no warm trainer: it runs the round itself)."""
    return InstitutionClient(Context(1, 1, dict(config), RecordDict(), {}), SimulatedTables())


def message(settings: RunSettings, server_round: int, run: str = "r") -> dict[str, Any]:
    return {**settings.to_config(), "server-round": server_round, "run-name": run}


def initial() -> list[np.ndarray]:
    return get_weights(build_model(SETTINGS.train, load_builtin("german-credit").schema, seed=SETTINGS.seed))


def crafted() -> list[np.ndarray]:
    """Another model the coordinator wants scored on the same held-out records."""
    return [w + 0.5 for w in initial()]


def test_a_coordinators_test_fraction_does_not_shrink_a_deployed_institutions_held_out_set(tmp_path: Path) -> None:
    # Prepare: 500 records; the coordinator proposes test-fraction 0.002 (one record expected)
    config = bank(tmp_path / "bank", rows=500)
    own = InstitutionData.from_node_config(config, SETTINGS)

    # Execute: the institution loads its records under the shrunk proposal, and answers it
    # through the ClientApp (it trains round 1, then evaluates round 1)
    shrunk = InstitutionData.from_node_config(config, SHRUNK)
    app = client(config)
    _, trained, _ = app.fit(initial(), message(SHRUNK, 1))
    _, count, metrics = app.evaluate(initial(), message(SHRUNK, 1))

    # Assert: its own split (deployed default 0.2), record for record; scores over all of them
    assert trained > 0 and "refused" not in metrics
    assert np.array_equal(shrunk.test_x, own.test_x) and np.array_equal(shrunk.test_y, own.test_y)
    assert 75 <= len(own.test_y) <= 125 and count == len(own.test_y)
    # Its policy's test-fraction decides, not the coordinator's
    wider = InstitutionData.from_node_config({**config, "test-fraction": 0.4}, SHRUNK)
    assert 170 <= len(wider.test_y) <= 230


def test_a_held_out_set_below_the_minimum_shares_nothing(tmp_path: Path) -> None:
    # Prepare: a bank of 150 records holds out about 30, below the deployed min-eval-records 50
    config = bank(tmp_path / "bank", rows=150)
    data = InstitutionData.from_node_config(config, SETTINGS)
    assert 0 < len(data.test_y) < 50
    app = client(config)
    _, trained, _ = app.fit(initial(), message(SETTINGS, 1))

    # Execute: the coordinator asks for its scores, of an honest and of a crafted model
    answers = [app.evaluate(weights, message(SETTINGS, 1)) for weights in (crafted(), initial())]

    # Assert: nothing computed over those few records (zero weight, no score, the count kept back)
    assert trained > 0
    reason = "bank refused to evaluate round 1: its held-out set is smaller than its policy's min-eval-records 50"
    assert answers == [(0.0, 0, {"institution": "bank", "refused": reason})] * 2
    assert evaluations(data.state_dir, data.fingerprint) == []  # a refusal does not use up the round
    # An institution that accepts smaller held-out sets says so in its policy
    accepting = client({**config, "min-eval-records": 10})
    _, count, metrics = accepting.evaluate(initial(), message(SETTINGS, 1))
    assert count == len(data.test_y) and 0 <= float(metrics["accuracy"]) <= 1


def test_an_empty_held_out_set_shares_nothing_instead_of_failing(tmp_path: Path) -> None:
    # Prepare: a simulated institution (default policy) whose held-out set is empty
    node = {"partition-id": 0, "num-partitions": 3, "state-dir": str(tmp_path)}
    data = InstitutionData.from_node_config(node, SETTINGS)
    empty = replace(data, test_x=data.test_x[:0], test_y=data.test_y[:0])

    # Execute
    weights = get_weights(build_model(SETTINGS.train, data.schema, seed=SETTINGS.seed))
    loss, count, metrics = evaluate_round(empty, weights, SETTINGS)

    # Assert
    assert (loss, count) == (0.0, 0) and "min-eval-records 1" in str(metrics["refused"])


def test_a_second_evaluation_of_the_same_round_is_refused(tmp_path: Path) -> None:
    # Prepare: the bank trains round 1 of run "r" and shares its scores of that round once
    config = bank(tmp_path / "bank", rows=400)
    app = client(config)
    _, trained, _ = app.fit(initial(), message(SETTINGS, 1))
    _, first, _ = app.evaluate(initial(), message(SETTINGS, 1))

    # Execute: the coordinator asks again with a crafted model (through the ClientApp and the
    # warm trainer), for a round the bank did not train in, and under a fresh run name
    again = app.evaluate(crafted(), message(SETTINGS, 1))
    header = {"op": "evaluate", "config": message(SETTINGS, 1), "server-round": 1, "run-id": "r"}
    trainer, _ = Trainer(config).handle(header, crafted())
    untrained = app.evaluate(crafted(), message(SETTINGS, 2))
    fresh_run = app.evaluate(crafted(), message(SETTINGS, 1, run="another"))

    # Assert: one answer only; each later request has zero weight and a reason
    assert trained > 0 and first > 0
    assert again[:2] == (0.0, 0) and "already evaluated round 1 of run 'r'" in str(again[2]["refused"])
    assert trainer["num-examples"] == 0 and "already evaluated" in trainer["metrics"]["refused"]
    for loss, count, metrics in (untrained, fresh_run):
        assert (loss, count) == (0.0, 0) and "did not train in round" in str(metrics["refused"])
        assert "accuracy" not in metrics
    data = InstitutionData.from_node_config(config, SETTINGS)
    assert [(e.run_id, e.round) for e in evaluations(data.state_dir, data.fingerprint)] == [("r", 1)]


def test_concurrent_evaluations_of_one_round_answer_once(tmp_path: Path) -> None:
    # Prepare: a trained round, and four requests for its scores at once (two processes of one
    # institution, the ClientApp and its warm trainer, share the state directory)
    config = bank(tmp_path / "bank", rows=400)
    client(config).fit(initial(), message(SETTINGS, 1))
    data = InstitutionData.from_node_config(config, SETTINGS)
    apps = [client(config) for _ in range(4)]
    counts: list[int] = []
    start = threading.Barrier(4)

    def ask(app: InstitutionClient) -> None:
        start.wait()
        counts.append(app.evaluate(crafted(), message(SETTINGS, 1))[1])

    # Execute
    threads = [threading.Thread(target=ask, args=(app,)) for app in apps]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    # Assert
    assert sorted(counts) == [0, 0, 0, len(data.test_y)]


def test_an_evaluation_that_names_no_round_is_refused_when_deployed(tmp_path: Path) -> None:
    config = bank(tmp_path / "bank", rows=400)
    data = InstitutionData.from_node_config(config, SETTINGS)
    loss, count, metrics = evaluate_round(data, initial(), SETTINGS)
    assert (loss, count) == (0.0, 0) and "names no run and round" in str(metrics["refused"])


def test_the_evaluation_keys_deployed_defaults_and_simulation_defaults() -> None:
    deployed = deployed_policy({"data-path": "bank.csv", "max-epsilon": 3.0})
    assert (deployed.test_fraction, deployed.min_eval_records, deployed.one_evaluation_per_trained_round) == (
        0.2,
        50,
        True,
    )
    assert deployed.holdout_fraction(SHRUNK) == 0.2  # the coordinator's proposal is ignored
    simulated = PrivacyPolicy(source="simulation")  # the researcher plays every institution
    assert simulated.holdout_fraction(SHRUNK) == 0.002
    assert (simulated.min_eval_records, simulated.one_evaluation_per_trained_round) == (1, False)
    own = PrivacyPolicy.from_mapping({"test-fraction": 0.3, "min-eval-records": 100}, "policy.toml")
    assert own.holdout_fraction(SHRUNK) == 0.3 and own.to_mapping()["min-eval-records"] == 100


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({"test-fraction": 0.0}, "'test-fraction' must be in (0, 1)"),
        ({"test-fraction": 1.0}, "'test-fraction' must be in (0, 1)"),
        ({"min-eval-records": 0}, "'min-eval-records' must be an integer >= 1"),
        ({"min-eval-records": 2.5}, "'min-eval-records' must be an integer"),
        ({"one-evaluation-per-trained-round": "sometimes"}, "must be true or false"),
    ],
)
def test_bad_evaluation_keys_are_refused_with_the_value_found(values: dict[str, Any], expected: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(expected)):
        PrivacyPolicy.from_mapping(values, "policy.toml")
