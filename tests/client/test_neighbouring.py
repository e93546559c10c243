"""The institution's neighbouring relation: its policy chooses it, its budget, replies and `budget` use it."""

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from fedsilo.client.cli import app
from fedsilo.client.institution import InstitutionData, fit_round
from fedsilo.client.policy import PrivacyPolicy, deployed_policy
from fedsilo.common.accounting import ADD_REMOVE, CALIBRATION_TOLERANCE, REPLACE_ONE, epsilon_spent
from fedsilo.common.errors import ConfigError
from fedsilo.common.ledger import PrivacyLedger, composed_epsilon
from fedsilo.common.models import build_model, get_weights
from fedsilo.common.settings import RunSettings

# Calibrated by the coordinator for add/remove neighbours (the simulation default).
SETTINGS = RunSettings.from_config({"num-server-rounds": 3, "target-epsilon": 2.0})
DELTA = SETTINGS.privacy.delta


def institution(state: Path, policy: PrivacyPolicy, settings: RunSettings = SETTINGS) -> InstitutionData:
    data = InstitutionData.from_node_config({"partition-id": 0, "num-partitions": 3, "state-dir": str(state)}, settings)
    return replace(data, policy=policy)


def initial(data: InstitutionData, settings: RunSettings = SETTINGS) -> list[np.ndarray]:
    return get_weights(build_model(settings.train, data.schema, seed=settings.seed))


def run_rounds(data: InstitutionData, settings: RunSettings = SETTINGS) -> list[dict]:
    weights, replies = initial(data, settings), []
    for r in range(1, settings.rounds + 1):
        out = fit_round(data, weights, settings, server_round=r, run_id="run")
        replies.append(out.metrics)
        weights = out.weights
    return replies


def test_a_replace_one_institution_refuses_a_round_add_remove_accounting_would_allow(tmp_path: Path) -> None:
    # Prepare: the same records and budget, one institution accounting add/remove, one replace-one;
    # the coordinator proposes noise calibrated for add/remove (it cannot make the second weaken)
    lenient = institution(tmp_path / "a", PrivacyPolicy(max_epsilon=2.0, neighbouring=ADD_REMOVE))
    strict = institution(tmp_path / "b", PrivacyPolicy(max_epsilon=2.0, neighbouring=REPLACE_ONE))
    # Execute
    allowed, checked = run_rounds(lenient), run_rounds(strict)
    # Assert: add/remove trains every round, inside the budget
    assert not any("refused" in m for m in allowed) and allowed[-1]["epsilon"] <= 2.0
    assert {m["neighbouring"] for m in allowed} == {ADD_REMOVE}
    # ... replace-one refuses the first round that would take its replace-one epsilon past 2
    refused = [i + 1 for i, m in enumerate(checked) if "refused" in m]
    assert refused, "a replace-one institution trained a run calibrated for add/remove to the same budget"
    first = refused[0]
    assert "past its privacy budget" in str(checked[first - 1]["refused"])
    assert {m["neighbouring"] for m in checked} == {REPLACE_ONE}
    ledger = PrivacyLedger.for_dataset(tmp_path / "b", strict.fingerprint)
    assert [e.round for e in ledger.entries] == list(range(1, first))
    # ... because that round costs more than 2 under replace-one, while the add/remove figure allowed it
    same_rounds = PrivacyLedger.for_dataset(tmp_path / "a", lenient.fingerprint).entries[:first]
    events = [e.event() for e in same_rounds]
    assert epsilon_spent(events, delta=DELTA) <= 2.0 < epsilon_spent(events, delta=DELTA, neighbouring=REPLACE_ONE)
    # ... and every epsilon it sent is its replace-one figure of this run's rounds
    for m in checked[: first - 1]:
        assert m["epsilon"] <= 2.0
    if first > 1:
        assert checked[first - 2]["epsilon"] == pytest.approx(ledger.epsilon(delta=DELTA, neighbouring=REPLACE_ONE))


def test_a_run_calibrated_for_replace_one_ends_at_its_target_under_replace_one(tmp_path: Path) -> None:
    # Prepare: the proposal calibrates for replace-one; the simulated policy names no relation (the proposal's)
    settings = RunSettings.from_config({"num-server-rounds": 3, "target-epsilon": 2.0, "neighbouring": REPLACE_ONE})
    data = institution(tmp_path, PrivacyPolicy(max_epsilon=2.0), settings)
    # Execute
    replies = run_rounds(data, settings)
    # Assert: every round trained, and the run spent its target under replace-one
    assert not any("refused" in m for m in replies)
    assert {m["neighbouring"] for m in replies} == {REPLACE_ONE}
    assert 2.0 * (1 - CALIBRATION_TOLERANCE) <= replies[-1]["epsilon"] <= 2.0
    ledger = PrivacyLedger.for_dataset(tmp_path, data.fingerprint)
    assert replies[-1]["epsilon"] == pytest.approx(ledger.epsilon(delta=DELTA, neighbouring=REPLACE_ONE))
    assert ledger.epsilon(delta=DELTA) < replies[-1]["epsilon"]  # the add/remove figure of the same rounds


def test_a_deployed_institution_accounts_for_replace_one_unless_its_policy_says_otherwise() -> None:
    assert deployed_policy({"max-epsilon": 3.0}).neighbouring == REPLACE_ONE
    assert deployed_policy({"max-epsilon": 3.0, "neighbouring": "add-remove"}).neighbouring == ADD_REMOVE
    proposal_says_add_remove = RunSettings()
    assert deployed_policy({"max-epsilon": 3.0}).accounting_relation(proposal_says_add_remove) == REPLACE_ONE
    assert (
        PrivacyPolicy().accounting_relation(
            replace(SETTINGS, privacy=replace(SETTINGS.privacy, neighbouring=REPLACE_ONE))
        )
        == REPLACE_ONE
    )
    with pytest.raises(ConfigError, match=r"'neighbouring' must be 'add-remove' or 'replace-one'\. Found 'swap'"):
        PrivacyPolicy.from_mapping({"neighbouring": "swap"}, "policy.toml")


def test_budget_json_shows_both_figures_and_enforces_the_policys(tmp_path: Path) -> None:
    # Prepare: two rounds in the ledger; the policy file names no relation (deployed default: replace-one)
    data = institution(tmp_path, PrivacyPolicy(max_epsilon=10.0))
    weights = initial(data)
    for r in (1, 2):
        weights = fit_round(data, weights, SETTINGS, server_round=r, run_id="run").weights
    (tmp_path / "policy.toml").write_text("max-epsilon = 10.0\n")
    ledgers = PrivacyLedger.all(tmp_path)
    add_remove = composed_epsilon(ledgers, delta=DELTA)
    replace_one = composed_epsilon(ledgers, delta=DELTA, neighbouring=REPLACE_ONE)
    # Execute
    result = CliRunner().invoke(app, ["budget", "--state-dir", str(tmp_path), "--json"])
    text = CliRunner().invoke(app, ["budget", "--state-dir", str(tmp_path)])
    # Assert
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["neighbouring"] == REPLACE_ONE
    assert summary["epsilon_add_remove"] == pytest.approx(add_remove)
    assert summary["epsilon_replace_one"] == pytest.approx(replace_one)
    assert summary["epsilon"] == summary["epsilon_replace_one"] > summary["epsilon_add_remove"]
    assert summary["remaining"] == pytest.approx(10.0 - replace_one)
    assert summary["datasets"][0]["epsilon"] == pytest.approx(replace_one)
    assert text.exit_code == 0
    assert f"add-remove epsilon {add_remove:.3f}" in text.output
    assert f"replace-one epsilon {replace_one:.3f}" in text.output
    # ... and a policy of add-remove makes that the enforced figure
    (tmp_path / "policy.toml").write_text('max-epsilon = 10.0\nneighbouring = "add-remove"\n')
    summary = json.loads(CliRunner().invoke(app, ["budget", "--state-dir", str(tmp_path), "--json"]).output)
    assert summary["neighbouring"] == ADD_REMOVE and summary["epsilon"] == pytest.approx(add_remove)


def test_a_distributed_round_is_accounted_and_reported_under_the_policys_relation(tmp_path: Path) -> None:
    # Prepare: distributed DP, calibrated by the coordinator for add/remove; the policy says replace-one
    settings = RunSettings.from_config(
        {"num-server-rounds": 4, "dp-mode": "distributed", "target-epsilon": 2.0, "sample-rate": 0.5, "seed": 3}
    )
    data = institution(tmp_path, PrivacyPolicy(max_epsilon=50.0, neighbouring=REPLACE_ONE), settings)
    # Execute
    out = fit_round(data, initial(data, settings), settings, server_round=1, run_id="run", secure_round=(3, 3))
    # Assert: the reply's epsilon and worst case are the ledger's replace-one figures, above add/remove
    assert "refused" not in out.metrics and out.metrics["neighbouring"] == REPLACE_ONE
    ledger = PrivacyLedger.for_dataset(tmp_path, data.fingerprint)
    assert ledger.distributed_rounds == 1
    assert out.metrics["epsilon"] == pytest.approx(ledger.epsilon(delta=DELTA, neighbouring=REPLACE_ONE))
    worst = ledger.epsilon(delta=DELTA, worst_case=True, neighbouring=REPLACE_ONE)
    assert out.metrics["epsilon-worst-case"] == pytest.approx(worst)
    assert out.metrics["epsilon"] > ledger.epsilon(delta=DELTA)
