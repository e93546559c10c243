"""``budget_summary``: the worst-case epsilon of distributed rounds beside the epsilon enforced."""

from pathlib import Path

import pytest

from fedsilo.client.budget import budget_summary
from fedsilo.common.ledger import LedgerEntry, PrivacyLedger, composed_epsilon

RECORDED = "2026-11-30T00:00:00+00:00"
RO = "replace-one"


def local_round(round_: int) -> LedgerEntry:
    return LedgerEntry("run-local", round_, 1.5, 0.2, 10, 1e-5, RECORDED)


def distributed_round(round_: int) -> LedgerEntry:
    # Counting on 3 honest others: the guaranteed total is 4x its own share.
    return LedgerEntry(
        "run-ddp",
        round_,
        1.2,
        0.03,
        1,
        1e-5,
        RECORDED,
        mechanism="skellam",
        variance=4 * 1.0e7,
        own_variance=1.0e7,
        l2_sensitivity=5974.0,
        l1_sensitivity=1.08e6,
        scale=5793.0,
        min_honest=4,
        counted_honest=4,
        sample=8,
        threshold=8,
    )


def test_budget_shows_the_worst_case_epsilon_of_distributed_rounds(tmp_path: Path) -> None:
    # Prepare: one dataset trained locally only, another locally and then distributed
    local = PrivacyLedger.for_dataset(tmp_path, "a" * 24).append(local_round(1)).append(local_round(2))
    mixed = PrivacyLedger.for_dataset(tmp_path, "b" * 24).append(local_round(1))
    for r in range(1, 31):
        mixed = mixed.append(distributed_round(r))
    # Execute
    summary = budget_summary(tmp_path)
    # Assert
    ledgers = PrivacyLedger.all(tmp_path)
    assert summary["distributed_rounds"] == 30
    assert summary["neighbouring"] == RO  # no policy: the deployed default
    assert summary["epsilon"] == pytest.approx(composed_epsilon(ledgers, delta=1e-5, neighbouring=RO))
    assert summary["epsilon_worst_case"] == pytest.approx(
        composed_epsilon(ledgers, delta=1e-5, worst_case=True, neighbouring=RO)
    )
    assert summary["epsilon_worst_case"] > summary["epsilon"]
    rows = {row["dataset"]: row for row in summary["datasets"]}
    assert rows["a" * 24]["distributed_rounds"] == 0
    assert (
        rows["a" * 24]["epsilon_worst_case"] == rows["a" * 24]["epsilon"] == local.epsilon(delta=1e-5, neighbouring=RO)
    )
    assert rows["b" * 24]["distributed_rounds"] == 30
    assert rows["b" * 24]["epsilon_worst_case"] == mixed.epsilon(delta=1e-5, worst_case=True, neighbouring=RO)
    assert rows["b" * 24]["epsilon_worst_case"] > rows["b" * 24]["epsilon"]


def test_without_distributed_rounds_the_worst_case_is_the_epsilon(tmp_path: Path) -> None:
    PrivacyLedger.for_dataset(tmp_path, "a" * 24).append(local_round(1))
    summary = budget_summary(tmp_path)
    assert summary["distributed_rounds"] == 0
    assert summary["epsilon_worst_case"] == summary["epsilon"]
