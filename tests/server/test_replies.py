"""A malformed reply is named by every key that is missing or out of range; a well-formed one has no problems."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from fedsilo.server.replies import evaluate_problems, fit_problems, vector_problems

TRAINED: dict[str, Any] = {
    "institution": "a",
    "noise-multiplier": 1.1,
    "sample-rate": 0.1,
    "steps": 10,
    "epsilon": 0.5,
    "delta": 1e-5,
}
REFUSED: dict[str, Any] = {"institution": "a", "epsilon": 0.5, "delta": 1e-5, "refused": "a refused"}


def test_well_formed_replies_have_no_problems() -> None:
    assert fit_problems(10, TRAINED) == []
    assert fit_problems(np.int64(10), TRAINED) == []
    assert fit_problems(0, REFUSED) == []
    assert fit_problems(0, {**REFUSED, "epsilon": math.inf}) == []  # spent by an earlier run without DP
    assert fit_problems(10, {**TRAINED, "noise-multiplier": 0.0, "epsilon": math.inf}) == []  # no DP
    assert fit_problems(10, {**TRAINED, "secure-evaluation": "booked", "evaluation-variance": 2.5}) == []
    assert evaluate_problems(0.4, 10, {"accuracy": 0.75, "auc": 1.0}) == []
    assert evaluate_problems(0.0, 0, {"withheld": True}) == []


@pytest.mark.parametrize(
    ("change", "weight", "key"),
    [
        ({"noise-multiplier": None}, 10, "'noise-multiplier' is missing"),
        ({"noise-multiplier": -0.1}, 10, "'noise-multiplier' must be"),
        ({"noise-multiplier": math.nan}, 10, "'noise-multiplier' must be"),
        ({"noise-multiplier": "1.1"}, 10, "'noise-multiplier' must be"),
        ({"sample-rate": 0.0}, 10, "'sample-rate' must be"),
        ({"sample-rate": 1.5}, 10, "'sample-rate' must be"),
        ({"steps": 2.5}, 10, "'steps' must be"),
        ({"steps": -1}, 10, "'steps' must be"),
        ({"steps": True}, 10, "'steps' must be"),
        ({"steps": None}, 10, "'steps' is missing"),
        ({"delta": 1.0}, 10, "'delta' must be"),
        ({"delta": 0.0}, 10, "'delta' must be"),
        ({"delta": None}, 10, "'delta' is missing"),
        ({"epsilon": -1.0}, 10, "'epsilon' must be"),
        ({"epsilon": math.inf}, 10, "'epsilon' must be a finite number"),  # inf although it used DP
        ({"epsilon": None}, 10, "'epsilon' is missing"),
        ({"evaluation-variance": -1.0}, 10, "'evaluation-variance' must be"),  # secure evaluation's noise
        ({"evaluation-variance": math.inf}, 10, "'evaluation-variance' must be"),
        ({"secure-evaluation": 3}, 10, "'secure-evaluation' must be a text status"),
        ({}, -3, "'num_examples' must be"),
        ({}, 2.5, "'num_examples' must be"),
    ],
)
def test_a_malformed_fit_reply_names_the_key(change: dict[str, Any], weight: Any, key: str) -> None:
    metrics = {k: v for k, v in {**TRAINED, **change}.items() if v is not None}
    problems = fit_problems(weight, metrics)
    assert len(problems) == 1 and problems[0].startswith(key), problems


def test_a_refusal_with_weight_or_a_reason_that_is_not_text_is_malformed() -> None:
    assert fit_problems(10, REFUSED) == ["a refusal must have weight 0; found num_examples 10"]
    assert fit_problems(0, {**REFUSED, "refused": 3})[0].startswith("'refused' must be")


def test_every_problem_is_reported_at_once() -> None:
    assert len(fit_problems(10, {"institution": "a"})) == 5


@pytest.mark.parametrize(
    ("loss", "records", "metrics", "key"),
    [
        (math.nan, 10, {"accuracy": 0.5}, "'loss' must be"),
        (-1.0, 10, {"accuracy": 0.5}, "'loss' must be"),
        (0.5, -1, {"accuracy": 0.5}, "'num_examples' must be"),
        (0.5, 10, {"accuracy": 1.5}, "'accuracy' must be"),
        (0.5, 10, {"accuracy": 0.5, "auc": math.inf}, "'auc' must be"),
        (0.5, 10, {"accuracy": 0.5, "balanced_accuracy": "high"}, "'balanced_accuracy' must be"),
    ],
)
def test_a_malformed_evaluate_reply_names_the_key(loss: Any, records: Any, metrics: dict[str, Any], key: str) -> None:
    problems = evaluate_problems(loss, records, metrics)
    assert len(problems) == 1 and problems[0].startswith(key), problems


def test_an_update_must_be_a_finite_model_shaped_as_the_global_one() -> None:
    like = [np.zeros((2, 3)), np.zeros(3)]
    assert vector_problems([np.ones((2, 3)), np.ones(3)], like) == []
    assert vector_problems([np.ones((2, 3))], like) == ["the update has 1 layers; the model has 2"]
    assert vector_problems([np.ones((3, 2)), np.ones(3)], like)[0].startswith("layer 0 has shape")
    assert vector_problems([np.ones((2, 3)), np.array([1.0, np.nan, 0.0])], like) == ["layer 1 holds non-finite values"]
