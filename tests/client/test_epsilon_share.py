"""The epsilon an institution reports in the clear is this run's share; its budget still counts every run.

The attack: an institution takes part in two federations (or two runs) from one state
directory, as its budget requires. Before, every fit reply and refusal carried the epsilon
of every ledger composed, and a budget refusal said "already spent X": the second
coordinator read off what the institution had spent in the first. Now the clear figure is
the composition of this run's rounds alone (which the coordinator books itself from the
replies), and a refusal names no figure; enforcement is unchanged.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import pytest

from fedsilo.client.institution import InstitutionData, fit_round
from fedsilo.client.policy import PrivacyPolicy
from fedsilo.common.accounting import epsilon_spent
from fedsilo.common.ledger import PrivacyLedger, composed_epsilon
from fedsilo.common.models import build_model, get_weights
from fedsilo.common.settings import RunSettings
from fedsilo.simulations.inprocess import run_inprocess

SETTINGS = RunSettings.from_config({"num-server-rounds": 3, "target-epsilon": 2.0})
DISTRIBUTED = RunSettings.from_config(
    {"num-server-rounds": 4, "dp-mode": "distributed", "target-epsilon": 2.0, "sample-rate": 0.5, "seed": 3}
)


def institution(state: Path, settings: RunSettings, max_epsilon: float) -> InstitutionData:
    data = InstitutionData.from_node_config({"partition-id": 0, "num-partitions": 3, "state-dir": str(state)}, settings)
    return replace(data, policy=PrivacyPolicy(max_epsilon=max_epsilon))


def weights(data: InstitutionData, settings: RunSettings) -> list:
    return get_weights(build_model(settings.train, data.schema, seed=settings.seed))


def test_a_second_federation_is_told_only_what_its_own_rounds_spent(tmp_path: Path) -> None:
    # Prepare: two rounds for federation A
    data = institution(tmp_path, SETTINGS, max_epsilon=10.0)
    for r in (1, 2):
        fit_round(data, weights(data, SETTINGS), SETTINGS, server_round=r, run_id="federation-a")

    # Execute: federation B's first round
    out = fit_round(data, weights(data, SETTINGS), SETTINGS, server_round=1, run_id="federation-b")

    # Assert: B hears the epsilon of its one round, not of all three; the ledger keeps all three
    ledger = PrivacyLedger.for_dataset(tmp_path, data.fingerprint)
    b_round = [e.event() for e in ledger.entries if e.run_id == "federation-b"]
    assert len(ledger.entries) == 3 and len(b_round) == 1
    assert out.metrics["epsilon"] == pytest.approx(epsilon_spent(b_round, delta=1e-5), rel=1e-12)
    assert out.metrics["epsilon"] < ledger.epsilon(delta=1e-5)


def test_a_budget_refusal_names_no_figure_and_the_budget_still_counts_every_ledger(tmp_path: Path) -> None:
    # Prepare: federation A spends most of the budget (one round of three costs 1.18), on another dataset too
    data = institution(tmp_path, SETTINGS, max_epsilon=1.4)
    assert fit_round(data, weights(data, SETTINGS), SETTINGS, server_round=1, run_id="federation-a").num_examples > 0
    elsewhere = replace(data, fingerprint="f" * 24)  # the same institution's records under another schema

    # Execute: federation B asks for a round
    out = fit_round(elsewhere, weights(data, SETTINGS), SETTINGS, server_round=1, run_id="federation-b")

    # Assert: refused, as enforcement over both ledgers requires, reporting B's spend (none) and no number
    reason = str(out.metrics["refused"])
    assert out.num_examples == 0 and "past its privacy budget" in reason
    assert out.metrics["epsilon"] == 0.0
    assert re.findall(r"\d+\.\d+", reason) == []
    assert composed_epsilon(PrivacyLedger.all(tmp_path), delta=1e-5) == pytest.approx(1.176, abs=1e-3)


def test_a_distributed_round_reports_this_runs_share_and_its_worst_case(tmp_path: Path) -> None:
    data = institution(tmp_path, DISTRIBUTED, max_epsilon=50.0)
    start = weights(data, DISTRIBUTED)
    fit_round(data, start, DISTRIBUTED, server_round=1, run_id="a", secure_round=(3, 2))
    out = fit_round(data, start, DISTRIBUTED, server_round=1, run_id="b", secure_round=(3, 2))

    ledger = PrivacyLedger.for_dataset(tmp_path, data.fingerprint)
    (own,) = [e for e in ledger.entries if e.run_id == "b"]
    assert out.metrics["epsilon"] == pytest.approx(epsilon_spent([own.event()], delta=1e-5), rel=1e-12)
    assert out.metrics["epsilon-worst-case"] == pytest.approx(
        epsilon_spent([own.worst_case_event()], delta=1e-5), rel=1e-12
    )
    assert out.metrics["epsilon"] < ledger.epsilon(delta=1e-5)


def test_the_coordinators_report_shows_each_institutions_share_of_this_run(tmp_path: Path) -> None:
    # Prepare: two runs over the same institutions' state, as two federations of the same banks would be
    base = {"num-server-rounds": 2, "target-epsilon": 2.0, "max-epsilon": 10.0, "state-root": str(tmp_path / "state")}
    run_inprocess(RunSettings.from_config({**base, "out-dir": str(tmp_path / "first")}), institutions=3)

    # Execute
    second = run_inprocess(RunSettings.from_config({**base, "out-dir": str(tmp_path / "second")}), institutions=3)

    # Assert: what each institution reported is the coordinator's own figure for this run, not its ledger's
    for inst in second["institutions"]:
        (ledger_file,) = (tmp_path / "state" / inst["name"] / "ledgers").glob("*.json")
        ledger = PrivacyLedger.for_dataset(ledger_file.parent.parent, ledger_file.stem)
        assert len(ledger.entries) == 4 and len(inst["ledger"]) == 2
        assert inst["epsilon"] == pytest.approx(inst["epsilon_this_run"], rel=1e-9)
        assert inst["epsilon"] < ledger.epsilon(delta=inst["delta"])


def test_the_replace_one_figure_readme_gives_for_a_public_count_is_dp_accountings() -> None:
    # README, "What the accounting assumes": with the record count public, replace-one neighbours
    # are what holds; the same noise costs more under them (dp-accounting's own REPLACE_ONE figure,
    # which epsilon_spent(..., neighbouring="replace-one") gives: tests/common/test_replace_one.py).
    from dp_accounting import dp_event
    from dp_accounting.pld.pld_privacy_accountant import NeighborRel, PLDAccountant

    from fedsilo.common.accounting import PLD_VALUE_DISCRETIZATION_INTERVAL, DPSGDEvent

    add_remove = epsilon_spent([DPSGDEvent(1.0, 0.01, 1000)], delta=1e-5)
    accountant = PLDAccountant(NeighborRel.REPLACE_ONE, value_discretization_interval=PLD_VALUE_DISCRETIZATION_INTERVAL)
    accountant.compose(
        dp_event.SelfComposedDpEvent(dp_event.PoissonSampledDpEvent(0.01, dp_event.GaussianDpEvent(1.0)), 1000)
    )
    replace_one = accountant.get_epsilon(1e-5)
    assert (round(add_remove, 2), round(replace_one, 2)) == (1.83, 2.84)
    assert add_remove < replace_one <= 2 * add_remove
