"""Whether a finished run trained anything, read from its report.json (light: no torch, for the CLIs)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["untrained_reason"]


def untrained_reason(report: Mapping[str, Any], where: Path) -> str | None:
    """Why a finished run's report (in run directory ``where``) holds no trained model; None: a round was aggregated.

    The one rule by which ``fedsilo-simulate run`` and ``fedsilo-server run`` exit 1.
    """
    if int(report["rounds_completed"]) > 0:
        return None
    rows = report.get("rounds", [])
    refused = sum(int(r["institutions_refused"]) for r in rows)
    asked = refused + sum(int(r["institutions_trained"]) for r in rows)
    if asked == 0:
        return (
            f"no round was aggregated: no institution replied in any of {len(rows)} round(s), so the model is the "
            f"untrained initial one; see each institution's log (one whose schema or settings differ from the "
            f"federation's stops before it replies) and {where / 'report.json'}"
        )
    return (
        f"no round was aggregated ({refused} of {asked} institution-rounds refused): the model is the "
        f"untrained initial one and its metrics are not a trained model's; see the refusals (and any "
        f"rejected replies) in {where / 'report.json'}"
    )
