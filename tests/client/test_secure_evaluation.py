"""An institution's side of the secure evaluation: counts booked before they leave, budget, opt-out, noise share.

Every round runs through the real ``fit_round`` on a simulated institution's records.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from fedsilo.client.budget import budget_summary
from fedsilo.client.institution import FitOutcome, InstitutionData, fit_round
from fedsilo.client.policy import PrivacyPolicy
from fedsilo.common import secure_evaluation as seval
from fedsilo.common.accounting import epsilon_spent
from fedsilo.common.ledger import PrivacyLedger
from fedsilo.common.models import build_model, get_weights
from fedsilo.common.settings import RunSettings

BASE = {
    "num-server-rounds": 3,
    "dataset": "breast-cancer",
    "seed": 3,
    "secure-evaluation": True,
    "target-epsilon": 50.0,
}
LOCAL = RunSettings.from_config(BASE)
DISTRIBUTED = RunSettings.from_config({**BASE, "dp-mode": "distributed", "sample-rate": 0.5})


def institution(state: Path, settings: RunSettings, **policy: object) -> InstitutionData:
    node = {"partition-id": 0, "num-partitions": 2, "state-dir": str(state)}
    data = InstitutionData.from_node_config(node, settings)
    return replace(data, policy=PrivacyPolicy(**{"max_epsilon": 1e3, **policy}))  # type: ignore[arg-type]


def rounds(data: InstitutionData, settings: RunSettings, last: int) -> list[FitOutcome]:
    weights = get_weights(build_model(settings.train, data.schema, seed=settings.seed))
    setup = (2, 2) if settings.distributed else None
    return [
        fit_round(data, weights, settings, server_round=r, run_id="run", secure_aggregation=True, secure_round=setup)
        for r in range(1, last + 1)
    ]


def sent_counts(outcome: FitOutcome, settings: RunSettings) -> np.ndarray:
    """What SecAgg+ makes of the institution's count floats alone: ``u = values + Q/8`` back to ``values``."""
    secagg = settings.secagg
    ratio = seval.weight_ratio(
        outcome.num_examples, max_weight=secagg.max_weight, quantization_range=secagg.quantization_range
    )
    floats = np.asarray(outcome.weights[-1])
    units = np.rint(floats * ratio / (2 * secagg.clipping_range)).astype(np.int64)
    return units - seval.offset(secagg.quantization_range)


def test_each_evaluation_is_booked_before_it_leaves_and_composes_with_training(tmp_path: Path) -> None:
    # Prepare
    data = institution(tmp_path, LOCAL)
    model_size = len(get_weights(build_model(LOCAL.train, data.schema, seed=0)))
    # Execute: round 1 scores nothing (no model before it); rounds 2 and 3 score the model they receive.
    first, second, third = rounds(data, LOCAL, 3)
    # Assert
    assert len(first.weights) == model_size and "secure-evaluation" not in first.metrics
    assert len(second.weights) == len(third.weights) == model_size + 1
    assert second.metrics["secure-evaluation"] == third.metrics["secure-evaluation"] == "booked"
    ledger = PrivacyLedger.for_dataset(tmp_path, data.fingerprint)
    plan = seval.evaluation_plan(LOCAL.proposal)
    assert plan is not None
    booked = [(e.round, e.mechanism) for e in ledger.entries]
    assert booked == [
        (1, "gaussian"),
        (2, "gaussian"),
        (2, "secure-evaluation"),
        (3, "gaussian"),
        (3, "secure-evaluation"),
    ]
    evaluation = ledger.entries[2]
    assert (evaluation.sample_rate, evaluation.l2_sensitivity, evaluation.l1_sensitivity) == (1.0, 1.0, 1.0)
    assert evaluation.variance == evaluation.own_variance == plan.variance  # local DP: its own noise alone
    # The epsilon it reports composes training and evaluation, and the run ends within its target.
    assert third.metrics["epsilon"] == epsilon_spent([e.event() for e in ledger.entries], delta=1e-5)
    without = epsilon_spent([e.event() for e in ledger.entries if e.mechanism == "gaussian"], delta=1e-5)
    assert without < third.metrics["epsilon"] <= LOCAL.privacy.target_epsilon
    # What it sent is its held-out counts plus noise: the held-out records' total, within the noise.
    total = float(sent_counts(third, LOCAL).sum())
    assert abs(total - len(data.test_y)) <= 6 * np.sqrt(plan.variance * seval.cells(2))


def test_an_over_budget_evaluation_is_refused_books_nothing_and_still_sends_its_noise(tmp_path: Path) -> None:
    # Prepare: a budget that round 2's training fits and round 2's training plus its evaluation does not.
    probe = institution(tmp_path / "probe", LOCAL)
    rounds(probe, LOCAL, 2)
    events = [e.event() for e in PrivacyLedger.for_dataset(tmp_path / "probe", probe.fingerprint).entries]
    training_only, with_evaluation = epsilon_spent(events[:2], delta=1e-5), epsilon_spent(events, delta=1e-5)
    assert training_only < with_evaluation
    data = institution(tmp_path / "tight", LOCAL, max_epsilon=(training_only + with_evaluation) / 2)
    # Execute
    _, second = rounds(data, LOCAL, 2)
    # Assert: it trained, refused the evaluation, booked only its training.
    assert "refused" not in second.metrics and second.num_examples > 0
    assert str(second.metrics["secure-evaluation"]).startswith("refused")
    ledger = PrivacyLedger.for_dataset(tmp_path / "tight", data.fingerprint)
    assert [e.mechanism for e in ledger.entries] == ["gaussian", "gaussian"]
    assert second.metrics["epsilon"] == training_only
    # Zero counts with its full noise: the sum stays as noisy as planned, and holds no count of it.
    noise = sent_counts(second, LOCAL)
    plan = seval.evaluation_plan(LOCAL.proposal)
    assert plan is not None
    assert np.any(noise != 0)
    assert abs(float(noise.sum())) <= 6 * np.sqrt(plan.variance * seval.cells(2)) < len(data.test_y)


def test_an_institution_that_opts_out_books_nothing_and_still_sends_its_noise_share(tmp_path: Path) -> None:
    data = institution(tmp_path, DISTRIBUTED, secure_evaluation=False, min_honest=2)
    _, second = rounds(data, DISTRIBUTED, 2)
    assert str(second.metrics["secure-evaluation"]).startswith("withheld")
    assert [e.mechanism for e in PrivacyLedger.for_dataset(tmp_path, data.fingerprint).entries] == ["skellam"] * 2
    plan = seval.evaluation_plan(DISTRIBUTED.proposal)
    assert plan is not None
    # Distributed DP: its share of the evaluation's noise (min-honest 2 of 2 with threshold 2: half).
    assert second.metrics["evaluation-variance"] == plan.variance / 2
    noise = sent_counts(second, DISTRIBUTED)
    assert np.any(noise != 0) and abs(float(noise.sum())) < len(data.test_y) / 2


def test_a_refused_distributed_round_sends_zero_counts_with_its_noise_share(tmp_path: Path) -> None:
    data = institution(tmp_path, DISTRIBUTED, min_noise_multiplier=1e6)  # refuses every proposal
    _, second = rounds(data, DISTRIBUTED, 2)
    assert "refused" in second.metrics
    assert PrivacyLedger.for_dataset(tmp_path, data.fingerprint).entries == ()
    noise = sent_counts(second, DISTRIBUTED)
    assert np.any(noise != 0) and abs(float(noise.sum())) < len(data.test_y) / 2


def test_a_large_proposed_target_cannot_buy_a_sharp_evaluation(tmp_path: Path) -> None:
    # A coordinator proposing a large target-epsilon calibrates the counts' noise to a tenth of it; the
    # institution lets a run's evaluations spend at most a tenth of its own budget, whatever the target.
    plan = seval.evaluation_plan(LOCAL.proposal)
    assert plan is not None
    planned = epsilon_spent([replace(plan.event, steps=plan.evaluations)], delta=1e-5)
    # A budget that training fits but whose tenth the planned evaluations exceed; and a larger one.
    modest = institution(tmp_path / "modest", LOCAL, max_epsilon=9 * planned)
    generous = institution(tmp_path / "generous", LOCAL, max_epsilon=11 * planned)
    _, refused = rounds(modest, LOCAL, 2)
    _, booked = rounds(generous, LOCAL, 2)
    assert "planned evaluations" in str(refused.metrics["secure-evaluation"]) and "refused" not in refused.metrics
    assert [e.mechanism for e in PrivacyLedger.for_dataset(tmp_path / "modest", modest.fingerprint).entries] == [
        "gaussian",
        "gaussian",
    ]
    assert np.any(sent_counts(refused, LOCAL) != 0)  # its noise still goes, with zero counts
    assert booked.metrics["secure-evaluation"] == "booked"


def test_no_held_out_size_gates_the_counts(tmp_path: Path) -> None:
    # A threshold on the held-out set's size would let one record switch every count from zero to its
    # value, far past the sensitivity of 1 the ledger books; the noised counts are sent at any size.
    loose = RunSettings.from_config({**BASE, "target-epsilon": 2000.0})  # noise far below one count
    plan = seval.evaluation_plan(loose.proposal)
    assert plan is not None and np.sqrt(plan.variance) < 0.2
    data = institution(tmp_path, loose, min_eval_records=10**6, max_epsilon=1e6)
    _, second = rounds(data, loose, 2)
    assert second.metrics["secure-evaluation"] == "booked"
    assert abs(int(sent_counts(second, loose).sum()) - len(data.test_y)) <= 2 and len(data.test_y) > 20


def test_the_budget_counts_a_round_with_its_evaluation_once(tmp_path: Path) -> None:
    data = institution(tmp_path, LOCAL)
    rounds(data, LOCAL, 3)
    (row,) = budget_summary(tmp_path)["datasets"]
    (run,) = row["runs"]
    assert run["rounds"] == 3  # three trained rounds, two of them with a secure evaluation: five ledger entries
