"""Privacy an institution spent: all ledgers composed as enforced, each dataset and run (``fedsilo-client budget``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedsilo.client.policy import DEPLOYED_DEFAULTS, PrivacyPolicy
from fedsilo.common.accounting import ADD_REMOVE, REPLACE_ONE, epsilon_spent
from fedsilo.common.errors import ConfigError
from fedsilo.common.ledger import PrivacyLedger, composed_epsilon
from fedsilo.common.settings import PrivacySettings


def budget_summary(state_dir: Path, policy: Path | None = None) -> dict[str, Any]:
    """Every ledger under ``state_dir/ledgers`` composed (as ``fit_round`` enforces the budget), and each alone.

    The budget covers every dataset's ledger in the state directory together, so
    ``epsilon`` and ``remaining`` are of the composition; ``datasets`` holds one row
    per dataset (its own epsilon, alone, and its runs). ``policy`` (default:
    ``state_dir/policy.toml`` if present) gives the delta to account at and the budget.

    Distributed-DP rounds (``distributed_rounds`` of them) are accounted, as the budget is
    enforced, with the noise the institution counted on (its own share and the honest
    others'); ``epsilon_worst_case`` composes them with its own share alone, as if no other
    institution were honest (equal to ``epsilon`` without distributed rounds).

    Every figure is accounted for the institution's neighbouring relation (``neighbouring``:
    its policy's, else the deployed default, replace-one), as its budget is enforced;
    ``epsilon_add_remove`` and ``epsilon_replace_one`` are the composition under each
    relation (one of them is ``epsilon``).
    """
    paths = sorted((state_dir / "ledgers").glob("*.json"))
    if not paths:
        raise ConfigError(f"no privacy ledger under {state_dir / 'ledgers'}; check --state-dir")
    if policy is None and (state_dir / "policy.toml").exists():
        policy = state_dir / "policy.toml"
    limits = PrivacyPolicy.load(policy) if policy else None
    ledgers = PrivacyLedger.all(state_dir)
    recorded = max((e.delta for ledger in ledgers for e in ledger.entries), default=PrivacySettings().delta)
    delta = limits.delta if limits is not None and limits.delta is not None else recorded
    own = limits.neighbouring if limits is not None else None
    relation = own if own is not None else str(DEPLOYED_DEFAULTS["neighbouring"])
    by_relation = {r: composed_epsilon(ledgers, delta=delta, neighbouring=r) for r in (ADD_REMOVE, REPLACE_ONE)}
    spent = by_relation[relation]
    max_epsilon = limits.max_epsilon if limits is not None else None
    return {
        "delta": delta,
        "neighbouring": relation,
        "epsilon": spent,
        "epsilon_add_remove": by_relation[ADD_REMOVE],
        "epsilon_replace_one": by_relation[REPLACE_ONE],
        "epsilon_worst_case": composed_epsilon(ledgers, delta=delta, worst_case=True, neighbouring=relation),
        "distributed_rounds": sum(ledger.distributed_rounds for ledger in ledgers),
        "max_epsilon": max_epsilon,
        "remaining": None if max_epsilon is None else max(0.0, max_epsilon - spent),
        "datasets": [_budget_row(ledger, delta, relation) for ledger in ledgers],
    }


def _budget_row(ledger: PrivacyLedger, delta: float, relation: str) -> dict[str, Any]:
    """One dataset's ledger alone, per run (in the order runs first trained)."""
    runs: list[dict[str, Any]] = []
    for run_id in dict.fromkeys(e.run_id for e in ledger.entries):
        own = [e for e in ledger.entries if e.run_id == run_id]
        last = max(i for i, e in enumerate(ledger.entries) if e.run_id == run_id)
        runs.append(
            {
                "run_id": run_id,
                "rounds": len({e.round for e in own}),  # a round with its secure evaluation is one round
                "epsilon": epsilon_spent([e.event() for e in own], delta=delta, neighbouring=relation),
                "epsilon_after": epsilon_spent(
                    [e.event() for e in ledger.entries[: last + 1]], delta=delta, neighbouring=relation
                ),
            }
        )
    return {
        "dataset": ledger.dataset_fingerprint,
        "epsilon": ledger.epsilon(delta=delta, neighbouring=relation),
        "epsilon_worst_case": ledger.epsilon(delta=delta, worst_case=True, neighbouring=relation),
        "distributed_rounds": ledger.distributed_rounds,
        "runs": runs,
    }
