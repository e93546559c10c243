"""The privacy ledger: immutable entries, persisted atomically, epsilon from the whole ledger."""

import json
import os
import threading
from pathlib import Path

import pytest
from dp_accounting import dp_event
from dp_accounting.pld.pld_privacy_accountant import PLDAccountant

from fedsilo.common.accounting import DPSGDEvent, SkellamEvent, epsilon_spent
from fedsilo.common.errors import LedgerError
from fedsilo.common.ledger import LedgerEntry, PrivacyLedger, composed_epsilon


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
    assert list(ledger.path.parent.glob(".*.tmp")) == []


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


def skellam_entry(round_: int, *, variance: float = 4.0e7, own_variance: float = 1.0e7) -> LedgerEntry:
    return LedgerEntry(
        "run-d",
        round_,
        1.1,
        0.02,
        1,
        1e-5,
        "2026-11-30T00:00:00+00:00",
        mechanism="skellam",
        variance=variance,
        own_variance=own_variance,
        l2_sensitivity=5974.0,
        l1_sensitivity=1.08e6,
        scale=5793.0,
        min_honest=4,
        counted_honest=4,
        sample=10,
        threshold=7,
    )


def test_a_ledger_written_before_distributed_rounds_reads_as_gaussian_rounds(tmp_path: Path) -> None:
    # Prepare: a file whose entries have only the fields of old
    old = ("run_id", "round", "noise_multiplier", "sample_rate", "steps", "delta", "recorded_at")
    ledger = PrivacyLedger.for_dataset(tmp_path, "abc").append(entry(1)).append(entry(2))
    raw = json.loads(ledger.path.read_text())
    raw["entries"] = [{k: e[k] for k in old} for e in raw["entries"]]
    ledger.path.write_text(json.dumps(raw))
    # Execute
    reopened = PrivacyLedger.for_dataset(tmp_path, "abc")
    # Assert
    assert reopened.entries == ledger.entries
    assert all(e.mechanism == "gaussian" and e.event() == e.worst_case_event() for e in reopened.entries)
    assert reopened.epsilon(delta=1e-5) == epsilon_spent([DPSGDEvent(1.5, 0.2, 20)], delta=1e-5)
    assert reopened.epsilon(delta=1e-5, worst_case=True) == reopened.epsilon(delta=1e-5)


def test_a_distributed_round_round_trips_and_its_worst_case_costs_more(tmp_path: Path) -> None:
    # Prepare
    ledger = PrivacyLedger.for_dataset(tmp_path, "abc").append(entry(1))
    for r in range(1, 6):
        ledger = ledger.append(skellam_entry(r))
    # Execute
    reopened = PrivacyLedger.for_dataset(tmp_path, "abc")
    raw = json.loads(reopened.path.read_text())
    # Assert: every field needed to recompute epsilon is in the file
    assert reopened.entries == ledger.entries
    assert raw["entries"][1]["mechanism"] == "skellam"
    assert raw["entries"][1]["variance"] == 4.0e7 and raw["entries"][1]["own_variance"] == 1.0e7
    guaranteed = [DPSGDEvent(1.5, 0.2, 10)] + [SkellamEvent(0.02, 4.0e7, 5974.0, 1.08e6, 1)] * 5
    alone = [DPSGDEvent(1.5, 0.2, 10)] + [SkellamEvent(0.02, 1.0e7, 5974.0, 1.08e6, 1)] * 5
    assert reopened.epsilon(delta=1e-5) == epsilon_spent(guaranteed, delta=1e-5)
    assert reopened.epsilon(delta=1e-5, worst_case=True) == epsilon_spent(alone, delta=1e-5)
    assert reopened.epsilon(delta=1e-5, worst_case=True) > reopened.epsilon(delta=1e-5)
    assert composed_epsilon([reopened], delta=1e-5, worst_case=True) == reopened.epsilon(delta=1e-5, worst_case=True)
    assert reopened.distributed_rounds == 5


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        (
            "mechanism",
            "gausian",
            "mechanism must be one of 'gaussian', 'skellam', 'secure-evaluation'. Found 'gausian'.",
        ),
        ("variance", -1.0, "a skellam round must record a variance >= 0 (0: no DP). Found -1.0."),
    ],
)
def test_an_unaccountable_entry_is_an_error_naming_the_file_and_the_entry(
    tmp_path: Path, field: str, value: object, message: str
) -> None:
    # Prepare
    ledger = PrivacyLedger.for_dataset(tmp_path, "abc").append(entry(1)).append(skellam_entry(7))
    raw = json.loads(ledger.path.read_text())
    raw["entries"][1][field] = value
    ledger.path.write_text(json.dumps(raw))
    # Execute / Assert
    with pytest.raises(LedgerError) as err:
        PrivacyLedger.for_dataset(tmp_path, "abc")
    assert str(ledger.path) in str(err.value)
    assert f"entry 1 (run 'run-d', round 7): {message}" in str(err.value)
