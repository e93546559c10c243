"""Classification metrics that cannot flatter: every score beside the reference a model must beat.

On a task with 5% positives, predicting "negative" for everyone scores 0.95
accuracy. So ``classification_metrics`` reports, besides accuracy and
cross-entropy, the scores such a predictor cannot win: for two classes the ROC
AUC and average precision (both 0.5 / the positive rate for a random model) and
the balanced accuracy (0.5 for any constant predictor); for more classes the
balanced accuracy (mean recall over the classes present). And it reports the
majority-class rate of the labels, the accuracy of always guessing the most
common class, and for two classes the positive rate, the average precision of a
random model.

``lead_metric`` says which score a table or plot should lead with.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score

# A model's scores, in the order reports show them; what an institution may share about the global model.
MODEL_METRICS = ("auc", "average_precision", "balanced_accuracy", "accuracy", "loss")
# The labels' own statistics: references, not the model's scores.
REFERENCE_METRICS = ("majority_rate", "positive_rate")
LABELS = {
    "auc": "ROC AUC",
    "average_precision": "average precision",
    "balanced_accuracy": "balanced accuracy",
    "accuracy": "accuracy",
    "loss": "cross-entropy",
    "majority_rate": "majority-class rate",
    "positive_rate": "positive rate",
}
PROBABILITY_FLOOR = 1e-15  # a probability of 0 for the true class costs -log(1e-15) = 34.5 nats, not infinity
# A multi-class task leads with balanced accuracy when its majority class holds at least this many fair shares.
IMBALANCE_FACTOR = 2.0


def classification_metrics(labels: np.ndarray, probabilities: np.ndarray) -> dict[str, float]:
    """Scores of predicted class probabilities against the true labels, and the labels' reference rates.

    Parameters
    ----------
    labels
        Class indices, shape ``(n,)``, each in ``[0, k)``.
    probabilities
        Predicted class probabilities, shape ``(n, k)``, ``k >= 2`` (rows summing to 1);
        the predicted class is the most probable one.

    Returns
    -------
    dict
        ``accuracy``, ``loss`` (mean cross-entropy, nats), ``majority_rate`` (the share
        of the most common class: the accuracy of always guessing it) and, when at least
        two classes are present, ``balanced_accuracy`` (mean recall over the classes
        present). For two classes (``k == 2``, class 1 the positive) also
        ``positive_rate`` and, when both classes are present, ``auc`` (ROC AUC) and
        ``average_precision`` (the area under the precision-recall curve; a random
        model scores the positive rate).

    Raises
    ------
    ValueError
        When there are no records, the shapes disagree or a label is out of range.
    """
    y = np.asarray(labels)
    p = np.asarray(probabilities, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] < 2:
        raise ValueError(f"probabilities must have shape (records, classes >= 2). Found shape {p.shape}.")
    if y.ndim != 1 or len(y) != len(p):
        raise ValueError(f"labels must have shape ({len(p)},), one per row of probabilities. Found shape {y.shape}.")
    if len(y) == 0:
        raise ValueError("metrics need at least one record. Found none.")
    if not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= p.shape[1]:
        raise ValueError(f"labels must be class indices in [0, {p.shape[1]}). Found values {np.unique(y)[:10]}.")
    counts = np.bincount(y, minlength=p.shape[1])
    predicted = p.argmax(axis=1)
    picked = np.clip(p[np.arange(len(y)), y], PROBABILITY_FLOOR, 1.0)
    out = {
        "accuracy": float((predicted == y).mean()),
        "loss": float(-np.log(picked).mean()),
        "majority_rate": float(counts.max() / len(y)),
    }
    present = np.flatnonzero(counts)
    if len(present) >= 2:
        recalls = [float((predicted[y == c] == c).mean()) for c in present]
        out["balanced_accuracy"] = float(np.mean(recalls))
    if p.shape[1] == 2:
        out["positive_rate"] = float(counts[1] / len(y))
        if len(present) == 2:
            out["auc"] = float(roc_auc_score(y, p[:, 1]))
            out["average_precision"] = float(average_precision_score(y, p[:, 1]))
    return out


def lead_metric(num_classes: int, majority_rate: float | None = None) -> str:
    """The score a table or plot of this task leads with.

    Two classes: ``auc`` (a constant predictor scores 0.5 whatever the class balance).
    More classes: ``accuracy``, unless the majority class holds at least
    ``IMBALANCE_FACTOR`` times its fair share ``1 / num_classes`` of the records, in
    which case ``balanced_accuracy``.
    """
    if num_classes < 2:
        raise ValueError(f"a classification task has at least 2 classes. Found {num_classes}.")
    if num_classes == 2:
        return "auc"
    if majority_rate is not None and majority_rate >= IMBALANCE_FACTOR / num_classes:
        return "balanced_accuracy"
    return "accuracy"
