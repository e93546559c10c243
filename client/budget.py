"""An institution's privacy spent, per dataset and per run, read from its ledgers (``fedsilo-client budget``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedsilo.client.policy import PrivacyPolicy
from fedsilo.common.accounting import epsilon_spent
from fedsilo.common.errors import ConfigError
from fedsilo.common.ledger import PrivacyLedger
from fedsilo.common.settings import PrivacySettings


def budget_rows(state_dir: Path, policy: Path | None = None) -> list[dict[str, Any]]:
    """One row per dataset with a ledger under ``state_dir/ledgers``, each with its runs.

    ``policy`` (default: ``state_dir/policy.toml`` if present) gives the delta to
    account at and the budget that remains.
    """
    paths = sorted((state_dir / "ledgers").glob("*.json"))
    if not paths:
        raise ConfigError(f"no privacy ledger under {state_dir / 'ledgers'}; check --state-dir")
    if policy is None and (state_dir / "policy.toml").exists():
        policy = state_dir / "policy.toml"
    limits = PrivacyPolicy.load(policy) if policy else None
    return [_budget_row(state_dir, path.stem, limits) for path in paths]


def _budget_row(state_dir: Path, fingerprint: str, limits: PrivacyPolicy | None) -> dict[str, Any]:
    """One dataset's ledger, per run (in the order runs first trained), at the policy's delta."""
    ledger = PrivacyLedger.for_dataset(state_dir, fingerprint)
    recorded = max((e.delta for e in ledger.entries), default=PrivacySettings().delta)
    delta = limits.delta if limits is not None and limits.delta is not None else recorded
    runs: list[dict[str, Any]] = []
    for run_id in dict.fromkeys(e.run_id for e in ledger.entries):
        own = [e for e in ledger.entries if e.run_id == run_id]
        last = max(i for i, e in enumerate(ledger.entries) if e.run_id == run_id)
        runs.append(
            {
                "run_id": run_id,
                "rounds": len(own),
                "epsilon": epsilon_spent([e.event() for e in own], delta=delta),
                "epsilon_after": epsilon_spent([e.event() for e in ledger.entries[: last + 1]], delta=delta),
            }
        )
    spent = ledger.epsilon(delta=delta)
    max_epsilon = limits.max_epsilon if limits is not None else None
    return {
        "dataset": fingerprint,
        "delta": delta,
        "epsilon": spent,
        "max_epsilon": max_epsilon,
        "remaining": None if max_epsilon is None else max(0.0, max_epsilon - spent),
        "runs": runs,
    }
