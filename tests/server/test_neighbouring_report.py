"""The coordinator's side of the neighbouring relation: replies name it, reports name it, init proposes it."""

from pathlib import Path

import pytest

from fedsilo.common.accounting import REPLACE_ONE, DPSGDEvent, epsilon_spent
from fedsilo.server.federation import Federation
from fedsilo.server.replies import fit_problems
from fedsilo.server.run_directory import InstitutionRecord

TRAINED = {"delta": 1e-5, "epsilon": 1.0, "noise-multiplier": 1.2, "sample-rate": 0.1, "steps": 20}


def test_a_reply_names_one_of_the_relations() -> None:
    assert fit_problems(10, {**TRAINED, "neighbouring": REPLACE_ONE}) == []
    assert fit_problems(10, TRAINED) == []  # an institution from before the relation was named
    (problem,) = fit_problems(10, {**TRAINED, "neighbouring": "swap"})
    assert "'neighbouring' must be one of add-remove, replace-one; found 'swap'" in problem


def test_the_report_names_each_institutions_relation_and_composes_its_rounds_under_it() -> None:
    # Prepare: what the coordinator booked from two trained replies of a replace-one institution
    row = {"round": 1, "noise_multiplier": 1.2, "sample_rate": 0.1, "steps": 20}
    record = InstitutionRecord("bank", delta=1e-5, neighbouring=REPLACE_ONE, ledger=[row, {**row, "round": 2}])
    # Execute
    report = record.as_report()
    # Assert
    events = [DPSGDEvent(1.2, 0.1, 20)] * 2
    assert report["neighbouring"] == REPLACE_ONE
    assert report["epsilon_this_run"] == pytest.approx(epsilon_spent(events, delta=1e-5, neighbouring=REPLACE_ONE))
    assert report["epsilon_this_run"] > epsilon_spent(events, delta=1e-5)


def test_a_new_federation_proposes_noise_calibrated_for_replace_one(tmp_path: Path) -> None:
    fed = Federation.init(tmp_path / "fed")
    assert 'neighbouring = "replace-one"' in fed.config_path.read_text()
    assert fed.load().proposal.privacy.neighbouring == REPLACE_ONE
    assert fed.new_run().privacy.neighbouring == REPLACE_ONE


def test_fedsilo_server_report_shows_the_relation_beside_the_epsilon() -> None:
    from rich.console import Console

    from fedsilo.common.cli import institutions_table

    report = {"institutions": [InstitutionRecord("bank", delta=1e-5, neighbouring=REPLACE_ONE).as_report()]}
    console = Console(width=200, record=True)
    console.print(institutions_table(report))
    assert "replace-one" in console.export_text()
