"""The privacy ledger: immutable entries, persisted atomically, epsilon from the whole ledger."""

import json
import os
import threading
from pathlib import Path

import pytest
from dp_accounting import dp_event
from dp_accounting.pld.pld_privacy_accountant import PLDAccountant

from fedsilo.common.accounting import DPSGDEvent, epsilon_spent
from fedsilo.common.errors import LedgerError
from fedsilo.common.ledger import LedgerEntry, PrivacyLedger


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


def test_epsilon_is_pld_recomputed_from_the_ledger_file_alone(tmp_path: Path) -> None:
    # Prepare: a mixed ledger (rounds repeating and interleaving, a full-batch round among them)
    rounds = [
        (1.5, 0.2, 10),
        (1.5, 0.2, 10),
        (0.9, 1 / 12, 24),
        (1.5, 0.2, 10),
        (4.0, 1.0, 3),
        (2.2, 0.05, 40),
        (4.0, 1.0, 3),
    ]
    ledger = PrivacyLedger.for_dataset(tmp_path, "abc")
    for r, (sigma, rate, steps) in enumerate(rounds, start=1):
        ledger = ledger.append(LedgerEntry("run-a", r, sigma, rate, steps, 1e-5, "2026-11-26T00:00:00+00:00"))
    # Execute: dp_accounting's PLD accountant, each round composed in turn, as the file says
    raw = json.loads(ledger.path.read_text())
    assert raw["accountant"]["name"] == "pld"
    accountant = PLDAccountant(value_discretization_interval=raw["accountant"]["value-discretization-interval"])
    for e in raw["entries"]:
        gaussian = dp_event.GaussianDpEvent(e["noise_multiplier"])
        step = gaussian if e["sample_rate"] == 1 else dp_event.PoissonSampledDpEvent(e["sample_rate"], gaussian)
        accountant.compose(dp_event.SelfComposedDpEvent(step, e["steps"]))
    # Assert
    assert ledger.epsilon(delta=1e-5) == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-8)


def test_a_ledger_written_before_the_accountant_was_recorded_still_reads(tmp_path: Path) -> None:
    ledger = PrivacyLedger.for_dataset(tmp_path, "abc").append(entry(1)).append(entry(2))
    raw = json.loads(ledger.path.read_text())
    del raw["accountant"]
    ledger.path.write_text(json.dumps(raw))
    reopened = PrivacyLedger.for_dataset(tmp_path, "abc")
    assert reopened.entries == ledger.entries
    assert reopened.epsilon(delta=1e-5) == epsilon_spent([DPSGDEvent(1.5, 0.2, 20)], delta=1e-5)
    assert "accountant" in json.loads(reopened.append(entry(3)).path.read_text())


def test_one_lock_covers_every_ledger_of_a_state_directory(tmp_path: Path) -> None:
    # Prepare: one dataset's round holds the lock
    acquired = threading.Event()

    def other_dataset() -> None:
        with PrivacyLedger.locked(tmp_path, "b" * 24):
            acquired.set()

    with PrivacyLedger.locked(tmp_path, "a" * 24):
        # Execute: another dataset's round in the same state directory asks for its lock
        thread = threading.Thread(target=other_dataset)
        thread.start()
        # Assert: it waits while the budget is being checked and spent
        assert not acquired.wait(0.5)
    thread.join(5)
    assert acquired.is_set()
