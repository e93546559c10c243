"""The institution's privacy policy: loaded strictly, enforced before training, never clamped."""

import json
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from fedsilo.client.cli import app
from fedsilo.client.institution import InstitutionData, evaluate_round, fit_round
from fedsilo.client.policy import PrivacyPolicy, deployed_policy
from fedsilo.common.errors import ConfigError
from fedsilo.common.ledger import PrivacyLedger, composed_epsilon
from fedsilo.common.models import build_model, get_weights
from fedsilo.common.settings import RunSettings
from fedsilo.common.training import RoundPlan, plan_round

SETTINGS = RunSettings.from_config({"num-server-rounds": 3, "target-epsilon": 2.0})
POLICY = """\
max-epsilon = 3.0
delta = 1e-5
min-noise-multiplier = 0.5
max-grad-norm = 1.0
max-local-epochs = 2

[institutions.hospital-2]
max-epsilon = 1.0
share-eval-metrics = false
"""


def institution(state: Path, policy: PrivacyPolicy) -> InstitutionData:
    data = InstitutionData.from_node_config({"partition-id": 0, "num-partitions": 3, "state-dir": str(state)}, SETTINGS)
    return replace(data, policy=policy)


def initial(data: InstitutionData) -> list[np.ndarray]:
    return get_weights(build_model(SETTINGS.train, data.schema, seed=SETTINGS.seed))


def test_a_policy_file_with_a_table_for_one_institution(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(POLICY)
    common = PrivacyPolicy.load(path, institution="hospital-1")
    assert (common.max_epsilon, common.min_noise_multiplier, common.max_local_epochs) == (3.0, 0.5, 2)
    assert common.share_eval_metrics is True
    own = PrivacyPolicy.load(path, institution="hospital-2")
    assert own.max_epsilon == 1.0 and own.share_eval_metrics is False and own.max_grad_norm == 1.0


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("max-epsilon = 0\n", ["'max-epsilon'", "> 0", "Found 0"]),
        ("max-epsilon = 'lots'\n", ["'max-epsilon'", "a number", "lots"]),
        ("delta = 2.0\n", ["'delta'", "(0, 1)"]),
        ("min-noise-multiplier = -1\n", ["'min-noise-multiplier'", ">= 0"]),
        ("max-grad-norm = 0\n", ["'max-grad-norm'", "> 0"]),
        ("max-local-epochs = 1.5\n", ["'max-local-epochs'", "1.5"]),
        ("share-eval-metrics = 'maybe'\n", ["'share-eval-metrics'", "true or false"]),
        ("max-epsilon = 1\nmax-epsilno = 2\n", ["unknown policy key", "max-epsilno", "known keys"]),
        ("max-epsilon = [\n", ["not valid TOML"]),
        ("max-epsilon = 1\n[institutions.bank-1]\ndelta = 0\n", ["[institutions.bank-1]", "'delta'"]),
    ],
)
def test_a_malformed_policy_is_an_error_naming_file_and_key(tmp_path: Path, text: str, words: list[str]) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        PrivacyPolicy.load(path)
    assert str(path) in str(err.value)
    for word in words:
        assert word in str(err.value)


def test_a_missing_policy_file_says_so(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="policy file not found"):
        PrivacyPolicy.load(tmp_path / "nope.toml")


@pytest.mark.parametrize(
    ("proposal", "words"),
    [
        ({"noise-multiplier": 0.3}, ["noise multiplier 0.3", "min-noise-multiplier 0.5"]),
        ({"target-epsilon": float("inf")}, ["no noise (no DP)", "min-noise-multiplier"]),
        ({"local-epochs": 5}, ["local-epochs 5", "max-local-epochs 2"]),
        ({"max-grad-norm": 4.0}, ["max-grad-norm 4", "ceiling 1"]),
        ({"delta": 1e-3}, ["delta 0.001", "policy's delta 1e-05"]),
    ],
)
def test_a_proposal_that_breaks_the_policy_is_refused_before_training(
    tmp_path: Path, proposal: dict[str, float], words: list[str]
) -> None:
    policy = PrivacyPolicy(
        max_epsilon=10.0, delta=1e-5, min_noise_multiplier=0.5, max_grad_norm=1.0, max_local_epochs=2
    )
    data = institution(tmp_path, policy)
    weights = initial(data)
    out = fit_round(data, weights, SETTINGS.with_overrides(proposal), server_round=1, run_id="a")
    assert out.num_examples == 0
    reason = str(out.metrics["refused"])
    assert "hospital-1 refused round 1" in reason and "privacy policy" in reason
    for word in words:
        assert word in reason
    assert all(np.array_equal(a, b) for a, b in zip(out.weights, weights, strict=True))  # nothing trained
    assert PrivacyLedger.for_dataset(tmp_path, data.fingerprint).entries == ()  # nothing spent
    # The same institution accepts the coordinator's default proposal.
    assert fit_round(data, weights, SETTINGS, server_round=1, run_id="a").num_examples == len(data.train_y)


def test_a_round_whose_update_would_leave_unmasked_is_refused_when_the_policy_requires_secagg(
    tmp_path: Path,
) -> None:
    data = institution(tmp_path, PrivacyPolicy(max_epsilon=10.0, require_secure_aggregation=True))
    # The run config may claim SecAgg+; what counts is how the message actually arrived.
    out = fit_round(data, initial(data), SETTINGS, server_round=1, run_id="a", secure_aggregation=False)
    assert out.num_examples == 0 and "without secure aggregation" in str(out.metrics["refused"])
    assert PrivacyLedger.for_dataset(tmp_path, data.fingerprint).entries == ()
    masked = fit_round(data, initial(data), SETTINGS, server_round=1, run_id="a", secure_aggregation=True)
    assert masked.num_examples == len(data.train_y)


def test_re_encoded_records_do_not_start_a_fresh_budget(tmp_path: Path) -> None:
    data = institution(tmp_path, PrivacyPolicy(max_epsilon=1.4))
    assert fit_round(data, initial(data), SETTINGS, server_round=1, run_id="a").num_examples > 0  # spends 1.18
    # The same records under another schema have another fingerprint, but the same state directory.
    renamed = replace(data, fingerprint="0" * 24)
    out = fit_round(renamed, initial(data), SETTINGS, server_round=1, run_id="b")
    assert out.num_examples == 0 and "past its privacy budget" in str(out.metrics["refused"])
    # Enforced over both ledgers, reported for this run only: run "b" spent nothing, and says no figure of "a".
    assert out.metrics["epsilon"] == 0.0 and "1.1" not in str(out.metrics["refused"])


def test_epsilon_is_accounted_at_the_institutions_own_delta(tmp_path: Path) -> None:
    data = institution(tmp_path, PrivacyPolicy(max_epsilon=10.0, delta=1e-3))
    out = fit_round(data, initial(data), SETTINGS.with_overrides({"delta": 1e-6}), server_round=1, run_id="a")
    (entry,) = PrivacyLedger.for_dataset(tmp_path, data.fingerprint).entries
    assert entry.delta == out.metrics["delta"] == 1e-3
    ledger = PrivacyLedger.for_dataset(tmp_path, data.fingerprint)
    assert out.metrics["epsilon"] == pytest.approx(ledger.epsilon(delta=1e-3))
    assert ledger.epsilon(delta=1e-3) < ledger.epsilon(delta=1e-6)


def test_the_institutions_budget_not_the_coordinators_decides(tmp_path: Path) -> None:
    data = institution(tmp_path, PrivacyPolicy(max_epsilon=1.4))  # one round of three costs 1.18
    generous = SETTINGS.with_overrides({"max-epsilon": 50.0})  # the coordinator offers more
    weights, outcomes = initial(data), []
    for r in (1, 2, 3):
        out = fit_round(data, weights, generous, server_round=r, run_id="a")
        outcomes.append(out)
        weights = out.weights
    trained = [o for o in outcomes if o.num_examples > 0]
    refused = [o for o in outcomes if o.num_examples == 0]
    assert trained and refused and outcomes.index(refused[0]) == len(trained)  # stops, then stays stopped
    assert "past its privacy budget" in str(refused[0].metrics["refused"])
    assert PrivacyLedger.for_dataset(tmp_path, data.fingerprint).epsilon(delta=1e-5) <= 1.4


def test_withheld_evaluation_metrics_report_nothing(tmp_path: Path) -> None:
    data = institution(tmp_path, PrivacyPolicy(share_eval_metrics=False))
    assert evaluate_round(data, initial(data), SETTINGS) == (0.0, 0, {"institution": "hospital-1", "withheld": True})
    shared = evaluate_round(replace(data, policy=PrivacyPolicy()), initial(data), SETTINGS)
    assert shared[1] == len(data.test_y) and "accuracy" in shared[2]


def test_a_deployed_institution_must_set_its_own_budget(tmp_path: Path) -> None:
    policy_path = tmp_path / "policy.toml"
    policy_path.write_text("min-noise-multiplier = 0.7\n")
    with pytest.raises(ConfigError, match="must set max-epsilon"):
        deployed_policy({"policy-path": str(policy_path)})
    merged = deployed_policy({"policy-path": str(policy_path), "max-epsilon": "4"})  # inline keys win
    assert (merged.max_epsilon, merged.min_noise_multiplier) == (4.0, 0.7)
    # Without a delta of its own, it accounts at 1e-5, whatever delta the coordinator proposes.
    assert merged.delta == 1e-5
    generous = SETTINGS.with_overrides({"delta": 0.5})  # a larger delta would make epsilon look small
    plan = _plan(generous)
    assert "above the policy's delta 1e-05" in " ".join(merged.violations(generous, plan, secure_aggregation=True))
    # Unless the policy says otherwise, a deployed institution wants SecAgg+ and keeps its metrics.
    assert merged.require_secure_aggregation and not merged.share_eval_metrics
    policy_path.write_text("max-epsilon = 4\nshare-eval-metrics = true\nrequire-secure-aggregation = false\n")
    relaxed = deployed_policy({"policy-path": str(policy_path)})
    assert relaxed.share_eval_metrics and not relaxed.require_secure_aggregation


def _plan(settings: RunSettings) -> RoundPlan:
    return plan_round(num_examples=200, train=settings.train, privacy=settings.privacy, planned_rounds=settings.rounds)


def test_budget_shows_each_run_the_total_and_what_remains(tmp_path: Path) -> None:
    data = institution(tmp_path, PrivacyPolicy(max_epsilon=5.0))
    weights = initial(data)
    for run_id, rounds in (("run-a", (1, 2)), ("run-b", (1,))):
        for r in rounds:
            weights = fit_round(data, weights, SETTINGS, server_round=r, run_id=run_id).weights
    # The policy's relation is the one the simulated rounds were checked under (the proposal's default)
    (tmp_path / "policy.toml").write_text('max-epsilon = 5.0\nneighbouring = "add-remove"\n')
    result = CliRunner().invoke(app, ["budget", "--state-dir", str(tmp_path), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    (row,) = summary["datasets"]
    ledger = PrivacyLedger.for_dataset(tmp_path, data.fingerprint)
    assert row["dataset"] == data.fingerprint
    assert [(r["run_id"], r["rounds"]) for r in row["runs"]] == [("run-a", 2), ("run-b", 1)]
    assert row["runs"][-1]["epsilon_after"] == pytest.approx(ledger.epsilon(delta=1e-5))
    assert row["runs"][0]["epsilon"] < row["runs"][-1]["epsilon_after"]
    assert row["epsilon"] == pytest.approx(ledger.epsilon(delta=1e-5))
    assert summary["epsilon"] == pytest.approx(row["epsilon"])  # one dataset: the composition is its own
    assert summary["remaining"] == pytest.approx(5.0 - row["epsilon"])
    text = CliRunner().invoke(app, ["budget", "--state-dir", str(tmp_path)])
    assert text.exit_code == 0 and "run-b" in text.output and "of max-epsilon 5 remains" in text.output
    missing = CliRunner().invoke(app, ["budget", "--state-dir", str(tmp_path / "elsewhere")])
    assert missing.exit_code == 2 and "no privacy ledger" in missing.output


def test_two_rounds_racing_on_one_state_directory_cannot_overspend(tmp_path: Path) -> None:
    # Prepare: two datasets of one institution (the same records re-encoded: another fingerprint)
    # in one state directory, as two SuperNodes sharing it would run them; one round costs 1.18.
    data = institution(tmp_path, PrivacyPolicy(max_epsilon=1.4))
    other = replace(data, fingerprint="0" * 24)
    start = threading.Barrier(2)
    outcomes: dict[str, Any] = {}

    def round_of(d: InstitutionData) -> None:
        start.wait()
        outcomes[d.fingerprint] = fit_round(d, initial(d), SETTINGS, server_round=1, run_id=d.fingerprint)

    # Execute: both rounds start together
    threads = [threading.Thread(target=round_of, args=(d,)) for d in (data, other)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    # Assert: one trained, the other saw its entry and refused; the budget holds over both ledgers
    trained = [o for o in outcomes.values() if o.num_examples > 0]
    assert len(outcomes) == 2 and len(trained) == 1
    assert composed_epsilon(PrivacyLedger.all(tmp_path), delta=1e-5) <= 1.4


def test_budget_shows_every_ledger_composed_as_enforced(tmp_path: Path) -> None:
    data = institution(tmp_path, PrivacyPolicy(max_epsilon=5.0))
    for d in (data, replace(data, fingerprint="0" * 24)):
        fit_round(d, initial(d), SETTINGS, server_round=1, run_id="a")
    (tmp_path / "policy.toml").write_text('max-epsilon = 5.0\nneighbouring = "add-remove"\n')
    summary = json.loads(CliRunner().invoke(app, ["budget", "--state-dir", str(tmp_path), "--json"]).output)
    composed = composed_epsilon(PrivacyLedger.all(tmp_path), delta=1e-5)
    assert len(summary["datasets"]) == 2 and all(row["epsilon"] < composed for row in summary["datasets"])
    assert summary["epsilon"] == pytest.approx(composed)
    assert summary["remaining"] == pytest.approx(5.0 - composed)
    text = CliRunner().invoke(app, ["budget", "--state-dir", str(tmp_path)]).output
    assert f"epsilon {composed:.3f}" in text and "every ledger composed" in text


def test_a_deployed_institution_requires_a_majority_secagg_threshold_of_at_least_two() -> None:
    policy = deployed_policy({"max-epsilon": 3.0})
    assert (policy.min_secagg_threshold, policy.min_secagg_threshold_fraction) == (2, 0.51)
    assert policy.secagg_violations(sample=3, shares=3, threshold=2) == []
    assert "min-secagg-threshold 2" in policy.secagg_violations(sample=3, shares=3, threshold=1)[0]
    assert "fraction 0.51" in policy.secagg_violations(sample=5, shares=5, threshold=2)[0]
    assert deployed_policy({"max-epsilon": 3.0, "min-secagg-threshold": 3}).min_secagg_threshold == 3
    with pytest.raises(ConfigError, match="'min-secagg-threshold-fraction' must be in"):
        deployed_policy({"max-epsilon": 3.0, "min-secagg-threshold-fraction": 1.5})
