"""A federation that samples institutions each round (fraction-fit below 1), in Flower's simulation engine."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedsilo.common.ledger import PrivacyLedger
from fedsilo.common.settings import RunSettings
from fedsilo.simulations.runner import run_federation

pytestmark = pytest.mark.simulation


def test_only_the_sampled_institutions_train_and_spend_privacy(tmp_path: Path) -> None:
    # Prepare: 6 hospitals, half of them sampled per round; a SecAgg+ share count (5)
    # above the sample (3), which must mean "every sampled institution", not a halt.
    settings = RunSettings().with_overrides(
        {"num-server-rounds": 2, "seed": 3, "fraction-fit": 0.5, "secagg-num-shares": 5, "out-dir": str(tmp_path)}
    )

    # Execute
    report = run_federation(settings, institutions=6)

    # Assert: each round trained exactly its sample, and only the sampled spent privacy
    assert report["rounds_completed"] == 2
    assert [r["institutions_trained"] for r in report["rounds"]] == [3, 3]
    trained = {1: set(), 2: set()}
    for inst in report["institutions"]:
        for entry in inst["ledger"]:
            trained[entry["round"]].add(inst["name"])
    assert [len(names) for names in trained.values()] == [3, 3]
    spent: dict[str, list[int]] = {}
    for ledger_file in (tmp_path / "state").glob("*/ledgers/*.json"):
        ledger = PrivacyLedger.for_dataset(ledger_file.parent.parent, ledger_file.stem)
        spent[ledger_file.parent.parent.name] = [e.round for e in ledger.entries]
    assert set(spent) == trained[1] | trained[2]
    for name, rounds in spent.items():
        assert rounds == [r for r in (1, 2) if name in trained[r]]
    never = {f"hospital-{i}" for i in range(1, 7)} - set(spent)
    for inst in report["institutions"]:
        if inst["name"] in never:
            assert inst["ledger"] == [] and inst["epsilon"] == 0.0
    assert json.loads((tmp_path / "report.json").read_text())["settings"]["fraction-fit"] == 0.5
