"""The privacy ledger: immutable entries, persisted atomically, epsilon from the whole ledger."""

import json
import os
from pathlib import Path

import pytest

from common.accounting import DPSGDEvent, epsilon_spent
from common.errors import LedgerError
from common.ledger import LedgerEntry, PrivacyLedger


def entry(round_: int, run: str = "run-a") -> LedgerEntry:
    return LedgerEntry(run, round_, 1.5, 0.2, 10, 1e-5, "2026-11-26T00:00:00+00:00")


def test_epsilon_accumulates_and_survives_reopening(tmp_path: Path) -> None:
    ledger = PrivacyLedger.for_dataset(tmp_path, "abc")
    epsilons = []
    for r in range(1, 4):
        ledger = ledger.append(entry(r))
        epsilons.append(ledger.epsilon(delta=1e-5))
    assert epsilons[0] < epsilons[1] < epsilons[2]
    reopened = PrivacyLedger.for_dataset(tmp_path, "abc")
    assert reopened.entries == ledger.entries
    assert reopened.epsilon(delta=1e-5) == epsilon_spent([DPSGDEvent(1.5, 0.2, 10)] * 3, delta=1e-5)


def test_a_crash_mid_write_leaves_the_previous_ledger_intact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ledger = PrivacyLedger.for_dataset(tmp_path, "abc").append(entry(1))
    before = ledger.path.read_bytes()

    def crash(*_: object) -> None:
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        ledger.append(entry(2))
    assert ledger.path.read_bytes() == before
    assert list(ledger.path.parent.glob(".ledger-*")) == []


def test_a_corrupt_ledger_is_an_error_not_a_fresh_budget(tmp_path: Path) -> None:
    path = PrivacyLedger.for_dataset(tmp_path, "abc").append(entry(1)).path
    path.write_text("{ not json")
    with pytest.raises(LedgerError, match="cannot be read"):
        PrivacyLedger.for_dataset(tmp_path, "abc")


def test_a_ledger_of_another_dataset_is_refused(tmp_path: Path) -> None:
    path = PrivacyLedger.for_dataset(tmp_path, "abc").append(entry(1)).path
    raw = json.loads(path.read_text())
    raw["dataset_fingerprint"] = "xyz"
    path.write_text(json.dumps(raw))
    with pytest.raises(LedgerError, match="belongs to dataset"):
        PrivacyLedger.for_dataset(tmp_path, "abc")
