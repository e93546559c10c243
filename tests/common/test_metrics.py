"""Classification metrics: a model that ignores its inputs cannot score well, and the numbers are scikit-learn's."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import average_precision_score, balanced_accuracy_score, log_loss, roc_auc_score
from torch import nn

from fedsilo.common.metrics import MODEL_METRICS, REFERENCE_METRICS, classification_metrics, lead_metric
from fedsilo.common.training import evaluate


def test_predicting_the_majority_class_for_everyone_scores_the_majority_rate_and_nothing_else() -> None:
    # Prepare: 5% positives, a model that says "negative, 90% sure" to everyone
    labels = np.array([1] * 5 + [0] * 95)
    probabilities = np.tile([0.9, 0.1], (100, 1))
    # Execute
    metrics = classification_metrics(labels, probabilities)
    # Assert
    assert metrics["accuracy"] == pytest.approx(0.95) == metrics["majority_rate"]
    assert metrics["balanced_accuracy"] == pytest.approx(0.5)
    assert metrics["auc"] == pytest.approx(0.5)
    assert metrics["average_precision"] == pytest.approx(0.05) == metrics["positive_rate"]
    assert metrics["loss"] == pytest.approx(-(0.95 * np.log(0.9) + 0.05 * np.log(0.1)))


def test_a_perfect_ranking_scores_one_whatever_the_threshold() -> None:
    labels = np.array([0, 0, 0, 1, 1])
    probabilities = np.array([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.6, 0.4], [0.55, 0.45]])  # all predicted 0
    metrics = classification_metrics(labels, probabilities)
    assert metrics["auc"] == 1.0 and metrics["average_precision"] == 1.0
    assert metrics["accuracy"] == pytest.approx(0.6) and metrics["balanced_accuracy"] == pytest.approx(0.5)


def test_one_class_present_gives_no_auc_no_average_precision_no_balanced_accuracy() -> None:
    metrics = classification_metrics(np.array([1, 1, 1]), np.array([[0.2, 0.8], [0.6, 0.4], [0.1, 0.9]]))
    assert set(metrics) == {"accuracy", "loss", "majority_rate", "positive_rate"}
    assert metrics["majority_rate"] == 1.0 and metrics["positive_rate"] == 1.0
    assert metrics["accuracy"] == pytest.approx(2 / 3)


def test_multi_class_has_balanced_accuracy_and_no_binary_scores() -> None:
    labels = np.array([0, 0, 0, 0, 1, 2])
    probabilities = np.tile([0.6, 0.3, 0.1], (6, 1))  # always class 0
    metrics = classification_metrics(labels, probabilities)
    assert set(metrics) == {"accuracy", "loss", "majority_rate", "balanced_accuracy"}
    assert metrics["accuracy"] == pytest.approx(4 / 6) == metrics["majority_rate"]
    assert metrics["balanced_accuracy"] == pytest.approx(1 / 3)


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    records=st.integers(2, 60),
    classes=st.integers(2, 5),
)
def test_every_score_equals_scikit_learns(seed: int, records: int, classes: int) -> None:
    # Prepare
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, records)
    probabilities = rng.dirichlet(np.ones(classes), records)
    # Execute
    metrics = classification_metrics(labels, probabilities)
    # Assert
    assert metrics["accuracy"] == pytest.approx(float((probabilities.argmax(1) == labels).mean()))
    assert metrics["loss"] == pytest.approx(log_loss(labels, probabilities, labels=list(range(classes))))
    assert metrics["majority_rate"] == pytest.approx(np.bincount(labels).max() / records)
    if len(np.unique(labels)) >= 2:
        with warnings.catch_warnings():  # scikit-learn warns of predicted classes absent from the labels
            warnings.simplefilter("ignore")
            expected = balanced_accuracy_score(labels, probabilities.argmax(1))
        assert metrics["balanced_accuracy"] == pytest.approx(expected)
    if classes == 2 and len(np.unique(labels)) == 2:
        assert metrics["auc"] == pytest.approx(roc_auc_score(labels, probabilities[:, 1]))
        assert metrics["average_precision"] == pytest.approx(average_precision_score(labels, probabilities[:, 1]))


@pytest.mark.parametrize(
    ("labels", "probabilities", "words"),
    [
        (np.array([], dtype=np.int64), np.zeros((0, 2)), "at least one record"),
        (np.array([0, 1]), np.full((3, 2), 0.5), "one per row"),
        (np.array([0, 2]), np.full((2, 2), 0.5), "class indices in [0, 2)"),
        (np.array([0, 1]), np.ones((2, 1)), "classes >= 2"),
    ],
)
def test_bad_inputs_are_refused_naming_what_was_found(
    labels: np.ndarray, probabilities: np.ndarray, words: str
) -> None:
    with pytest.raises(ValueError, match=words.replace("[", r"\[").replace(")", r"\)")):
        classification_metrics(labels, probabilities)


def test_binary_tasks_lead_with_auc_and_multi_class_with_accuracy_unless_one_class_dominates() -> None:
    assert lead_metric(2) == lead_metric(2, 0.5) == "auc"
    assert lead_metric(10, 0.11) == "accuracy"
    assert lead_metric(10, 0.2) == "balanced_accuracy"  # twice its fair share
    assert lead_metric(3, 0.5) == "accuracy"
    with pytest.raises(ValueError, match="at least 2 classes"):
        lead_metric(1)


def test_evaluate_reports_the_models_scores_and_keeps_the_class_balance_to_itself() -> None:
    # Prepare: a linear model that scores the first input
    model = nn.Linear(1, 2)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[-1.0], [1.0]]))
        model.bias.zero_()
    inputs = np.array([[-2.0], [-1.0], [0.5], [1.5], [-0.2]], dtype=np.float32)
    labels = np.array([0, 0, 1, 1, 1])
    # Execute
    metrics = evaluate(model, inputs, labels)
    # Assert
    assert set(metrics) == set(MODEL_METRICS) and not set(metrics) & set(REFERENCE_METRICS)
    assert metrics["auc"] == 1.0 and metrics["accuracy"] == pytest.approx(0.8)
    assert metrics["balanced_accuracy"] == pytest.approx((1 + 2 / 3) / 2)
    with torch.no_grad():
        logits = model(torch.as_tensor(inputs))
    assert metrics["loss"] == pytest.approx(float(nn.functional.cross_entropy(logits, torch.as_tensor(labels))))
