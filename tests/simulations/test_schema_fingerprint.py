"""A run whose coordinator proposes its schema's fingerprint: an institution with another schema is refused end to end.

Through the in-process engine (``run_inprocess``): the coordinator opens the run as both
engines do (``open_run`` fills ``schema-fingerprint`` in from its schema file), two simulated
banks share its schema, and a third reads the same German-credit table with a schema copy
that lacks a column, as a deployed bank with a stale ``schema.toml`` would. Without the
check the third bank's round raised ``size mismatch`` and the coordinator saw nothing of why.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from fedsilo.client.institution import InstitutionData
from fedsilo.common.datasets import DATA_DIR, builtin_schema_path
from fedsilo.common.errors import ConfigError
from fedsilo.common.schema import Schema
from fedsilo.common.settings import RunSettings
from fedsilo.server.server_app import open_run
from fedsilo.simulations import inprocess
from fedsilo.simulations.baselines import federation_members

FOREIGN_WORKER = '[features.foreign_worker]\ntype = "categorical"\ncategories = ["no", "yes"]\nunknown = "error"\n'


def settings(tmp_path: Path, **overrides: Any) -> RunSettings:
    base = {"dataset": "german-credit", "num-server-rounds": 2, "target-epsilon": 2.0, "out-dir": str(tmp_path / "run")}
    return RunSettings.from_config({**base, **overrides})


def test_the_coordinator_puts_its_schemas_fingerprint_in_every_round_config(tmp_path: Path) -> None:
    run, _, strategy = open_run(settings(tmp_path))
    expected = Schema.load(builtin_schema_path("german-credit")).fingerprint()
    assert run.data.schema_fingerprint == expected
    assert strategy.round_config(1)["schema-fingerprint"] == expected


def test_a_proposal_naming_another_schemas_fingerprint_is_refused_when_the_run_opens(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="has fingerprint"):
        open_run(settings(tmp_path, **{"schema-fingerprint": "0123456789abcdef"}))


def test_a_bank_with_a_stale_schema_is_refused_every_round_and_the_coordinator_books_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: two simulated banks, and a third with the table and a schema that lacks a column
    stale = tmp_path / "stale-schema.toml"
    stale.write_text((DATA_DIR / "german_credit.schema.toml").read_text().replace(FOREIGN_WORKER, ""))
    node = {
        "name": "bank-stale",
        "data-path": str(DATA_DIR / "german_credit.csv"),
        "schema-path": str(stale),
        "state-dir": str(tmp_path / "bank-stale"),
        "max-epsilon": 10.0,
        "share-eval-metrics": True,
    }

    def members(client_settings: RunSettings, institutions: int) -> list[InstitutionData]:
        simulated = federation_members(client_settings, institutions - 1)
        return [*simulated, InstitutionData.from_node_config(node, client_settings)]

    monkeypatch.setattr(inprocess, "federation_members", members)

    # Execute
    report = inprocess.run_inprocess(settings(tmp_path), institutions=3)

    # Assert: the other two trained every round; the stale bank refused each, its reason booked
    by_name = {i["name"]: i for i in report["institutions"]}
    assert report["rounds_completed"] == 2
    assert [(r["institutions_trained"], r["institutions_refused"]) for r in report["rounds"]] == [(2, 1), (2, 1)]
    refused = by_name["bank-stale"]
    assert refused["ledger"] == [] and refused["epsilon"] == 0.0 and refused["rejected"] == []
    assert [r["round"] for r in refused["refusals"]] == [1, 2]
    reason = refused["refusals"][0]["reason"]
    federation = Schema.load(builtin_schema_path("german-credit")).fingerprint()
    assert federation in reason and Schema.load(stale).fingerprint() in reason
    assert "get the federation's schema.toml from the coordinator" in reason
    assert not (tmp_path / "bank-stale" / "ledgers").exists()
