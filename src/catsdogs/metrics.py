"""Classification metrics: one definition, used in training, by ``evaluate`` and after deployment.

NumPy only (no torch, no scikit-learn; the tests compare every figure with scikit-learn), so the
post-deploy evaluation and the serving side can import it.

Each name means one thing wherever it is logged:

* ``precision``, ``recall``, ``f1``: with two classes, those of the *positive* class, the second
  class name (``dog``), as the ``positive_class`` key says; with more classes, the macro means.
* ``macro_precision``, ``macro_recall``, ``macro_f1``: the unweighted means over the classes.
* ``per_class``: precision, recall, F1 and support of every class.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

Z_95 = 1.959963984540054
#: Probabilities are clipped to this before the log of the log-loss, like scikit-learn did.
EPS = 1e-15
_PRF = ("precision", "recall", "f1")


def wilson_interval(successes: int, n: int, *, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval for a proportion (well-behaved near 0 and 1, unlike the normal one)."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    low = 0.0 if successes == 0 else max(0.0, centre - half)  # exact ends, free of rounding
    high = 1.0 if successes == n else min(1.0, centre + half)
    return (low, high)


def roc_auc(y_true: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve via the rank statistic (ties get average ranks); NaN with one class."""
    positives = int(y_true.sum())
    negatives = len(y_true) - positives
    if positives == 0 or negatives == 0:
        return float("nan")
    order = np.argsort(score, kind="mergesort")
    ranks = np.empty(len(score), dtype=np.float64)
    sorted_scores = score[order]
    i = 0
    while i < len(score):
        j = i
        while j + 1 < len(score) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[y_true == 1].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def log_loss(y_true: np.ndarray, prob: np.ndarray) -> float:
    """Mean negative log-probability of the true class (NaN for no image)."""
    if not len(y_true):
        return float("nan")
    return float(-np.log(np.clip(prob[np.arange(len(y_true)), y_true], EPS, 1.0)).mean())


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """Counts with rows = truth and columns = prediction, like scikit-learn's."""
    matrix = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(matrix, (y_true, y_pred), 1)
    return matrix


def precision_recall_f1(tp: int, fp: int, fn: int) -> tuple[float, float, float]:
    """0 rather than NaN when undefined (a class never predicted), so means over classes stay defined."""
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


def per_class_metrics(matrix: np.ndarray, class_names: Sequence[str]) -> dict[str, dict[str, float | int]]:
    """Precision, recall, F1 and support of each class, from a confusion matrix."""
    per_class: dict[str, dict[str, float | int]] = {}
    for index, name in enumerate(class_names):
        tp, support = int(matrix[index, index]), int(matrix[index].sum())
        predicted = int(matrix[:, index].sum())
        precision, recall, f1 = precision_recall_f1(tp, fp=predicted - tp, fn=support - tp)
        per_class[name] = {"precision": precision, "recall": recall, "f1": f1, "support": support}
    return per_class


def label_metrics(
    y_true: Sequence[int] | np.ndarray, y_pred: Sequence[int] | np.ndarray, class_names: Sequence[str]
) -> dict[str, Any]:
    """Everything predicted labels alone give: accuracy with its Wilson interval, the named
    precision/recall/F1 (see the module docstring), per-class figures and the confusion matrix."""
    y = np.asarray(y_true, dtype=np.int64)
    pred = np.asarray(y_pred, dtype=np.int64)
    n = len(y)
    matrix = confusion_matrix(y, pred, len(class_names))
    correct = int(np.trace(matrix))
    per_class = per_class_metrics(matrix, class_names)
    macro = {f"macro_{k}": float(np.mean([c[k] for c in per_class.values()])) for k in _PRF}
    binary = len(class_names) == 2
    named = (
        {k: float(per_class[class_names[1]][k]) for k in _PRF}
        if binary
        else {k: macro[f"macro_{k}"] for k in _PRF}
    )
    return {
        "accuracy": correct / n if n else float("nan"),
        "accuracy_ci95": list(wilson_interval(correct, n)),
        **named,
        **macro,
        "per_class": per_class,
        "confusion_matrix": matrix.tolist(),
        "n_images": n,
        "classes": list(class_names),
        "positive_class": class_names[1] if binary else None,
    }


def classification_metrics(
    y_true: Sequence[int] | np.ndarray,
    prob: np.ndarray,
    class_names: Sequence[str],
    *,
    split: str = "test",
) -> dict[str, Any]:
    """The ``metrics.json`` payload: :func:`label_metrics` of the arg-max, plus the log-loss and
    ROC-AUC the probabilities allow (of the positive class for two classes, else the one-vs-rest
    macro mean)."""
    y = np.asarray(y_true, dtype=np.int64)
    prob = np.asarray(prob, dtype=np.float64)
    n_classes = len(class_names)
    if n_classes == 2:
        auc = roc_auc(y, prob[:, 1])
    else:
        auc = float(np.nanmean([roc_auc((y == k).astype(np.int64), prob[:, k]) for k in range(n_classes)]))
    return {
        **label_metrics(y, prob.argmax(axis=1), class_names),
        "log_loss": log_loss(y, prob),
        "roc_auc": auc,
        "split": split,
    }
