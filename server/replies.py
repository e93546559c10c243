"""What a well-formed fit or evaluate reply holds: every key, type and range the coordinator relies on.

An institution's reply is untrusted input. Each check here returns every problem
found (empty: well formed), each naming the key, the value found and what was
expected, so the coordinator can drop a malformed reply with a reason a person
can act on instead of failing inside aggregation or the report.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from numbers import Integral, Real
from typing import Any

import numpy as np

from fedsilo.common.accounting import NEIGHBOURING
from fedsilo.common.metrics import MODEL_METRICS

__all__ = ["evaluate_problems", "fit_problems", "vector_problems"]


def _real(value: object) -> float | None:
    """``value`` as a float when it is a real number (not a bool), else None."""
    if isinstance(value, bool | np.bool_) or not isinstance(value, Real):
        return None
    return float(value)


def _count(value: object) -> int | None:
    """``value`` as an int when it is an integer (not a bool), else None."""
    if isinstance(value, bool | np.bool_) or not isinstance(value, Integral):
        return None
    return int(value)


def _number(
    metrics: Mapping[str, Any],
    key: str,
    expected: str,
    ok: Callable[[float], bool],
    problems: list[str],
    *,
    inf_ok: bool = False,
) -> float | None:
    """Check ``metrics[key]`` is a real number with ``ok(value)``; append a problem and return None if not."""
    if key not in metrics:
        problems.append(f"'{key}' is missing (expected {expected})")
        return None
    value = _real(metrics[key])
    if value is None or math.isnan(value) or (math.isinf(value) and not inf_ok) or not ok(value):
        problems.append(f"'{key}' must be {expected}; found {metrics[key]!r}")
        return None
    return value


def _weight(weight: object, key: str, problems: list[str]) -> int | None:
    count = _count(weight)
    if count is None or count < 0:
        problems.append(f"'{key}' must be an integer >= 0; found {weight!r}")
        return None
    return count


def fit_problems(weight: object, metrics: Mapping[str, Any], *, distributed: bool = False) -> list[str]:
    """What is wrong with a fit reply's aggregation weight and clear-text metrics (empty: nothing).

    Every reply carries ``delta`` in (0, 1) and ``epsilon`` >= 0 (this run's share of
    the institution's spend after this round; a refusal reports this run's so far:
    what it spent in other runs and federations stays with it). A refusal carries a text
    ``refused`` and weight 0. A reply that trained carries ``noise-multiplier``
    >= 0, ``sample-rate`` in (0, 1] and an integer ``steps`` >= 0; its epsilon may be
    infinite only when its noise multiplier is 0 (it trained without DP). A
    refusal's epsilon may be infinite: an earlier round of this run trained without DP.
    ``neighbouring``, if present, names the relation the epsilon is for (``NEIGHBOURING``;
    absent: add-remove, what institutions reported before they named it).

    With ``distributed`` (dp-mode distributed), every reply, a refusal too, weighs
    ``secagg-max-weight`` (it sends its noise share), and one that trained carries its
    training ``records`` (an integer >= 1), which the coordinator's step divides by.
    """
    problems: list[str] = []
    count = _weight(weight, "num_examples", problems)
    refused = "refused" in metrics
    if refused:
        if not isinstance(metrics["refused"], str):
            problems.append(f"'refused' must be a text reason; found {metrics['refused']!r}")
        if count and not distributed:
            problems.append(f"a refusal must have weight 0; found num_examples {count}")
    _number(metrics, "delta", "a number in (0, 1)", lambda v: 0 < v < 1, problems)
    noise = None
    if not refused:
        noise = _number(metrics, "noise-multiplier", "a finite number >= 0", lambda v: v >= 0, problems)
        _number(metrics, "sample-rate", "a number in (0, 1]", lambda v: 0 < v <= 1, problems)
        if "steps" not in metrics:
            problems.append("'steps' is missing (expected an integer >= 0)")
        else:
            _weight(metrics["steps"], "steps", problems)
        if distributed and not (_count(metrics.get("records")) or 0) >= 1:
            problems.append(f"'records' must be an integer >= 1; found {metrics.get('records')!r}")
    if "evaluation-variance" in metrics:  # the noise its secure-evaluation counts carry
        _number(metrics, "evaluation-variance", "a finite number >= 0", lambda v: v >= 0, problems)
    if "secure-evaluation" in metrics and not isinstance(metrics["secure-evaluation"], str):
        problems.append(f"'secure-evaluation' must be a text status; found {metrics['secure-evaluation']!r}")
    no_dp = refused or noise == 0
    expected = "a number >= 0 (inf only without DP)" if no_dp else "a finite number >= 0 (the reply used DP)"
    _number(metrics, "epsilon", expected, lambda v: v >= 0, problems, inf_ok=no_dp)
    if "neighbouring" in metrics and metrics["neighbouring"] not in NEIGHBOURING:
        problems.append(f"'neighbouring' must be one of {', '.join(NEIGHBOURING)}; found {metrics['neighbouring']!r}")
    return problems


def evaluate_problems(loss: object, num_examples: object, metrics: Mapping[str, Any]) -> list[str]:
    """What is wrong with an evaluate reply (empty: nothing).

    ``num_examples`` is an integer >= 0, ``loss`` a finite number >= 0, and every
    score it reports (accuracy, AUC, ...) a number in [0, 1].
    """
    problems: list[str] = []
    _weight(num_examples, "num_examples", problems)
    _number({"loss": loss}, "loss", "a finite number >= 0", lambda v: v >= 0, problems)
    if "refused" in metrics and not isinstance(metrics["refused"], str):
        problems.append(f"'refused' must be a text reason; found {metrics['refused']!r}")
    for key in (k for k in MODEL_METRICS if k != "loss" and k in metrics):
        _number(metrics, key, "a number in [0, 1]", lambda v: 0 <= v <= 1, problems)
    return problems


def vector_problems(vector: Sequence[np.ndarray], like: Sequence[np.ndarray]) -> list[str]:
    """What is wrong with a model update next to the global model ``like`` (layers, shapes, finiteness)."""
    if len(vector) != len(like):
        return [f"the update has {len(vector)} layers; the model has {len(like)}"]
    problems = []
    for i, (layer, ref) in enumerate(zip(vector, like, strict=True)):
        if np.shape(layer) != np.shape(ref):
            problems.append(f"layer {i} has shape {np.shape(layer)}; the model's is {np.shape(ref)}")
        elif not np.all(np.isfinite(np.asarray(layer, dtype=np.float64))):
            problems.append(f"layer {i} holds non-finite values")
    return problems
