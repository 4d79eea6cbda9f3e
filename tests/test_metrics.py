"""Our metrics agree with scikit-learn, and every accuracy has a correct Wilson interval."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn import metrics as sk

from catsdogs.training.evaluate import classification_metrics, roc_auc, wilson_interval


def _random_binary(seed: int, n: int = 500):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    p_dog = np.clip(np.round(y * 0.6 + rng.normal(0.2, 0.25, n), 2), 0.01, 0.99)  # rounding makes ties
    return y, np.stack([1 - p_dog, p_dog], axis=1)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_binary_metrics_match_scikit_learn(seed: int) -> None:
    y, prob = _random_binary(seed)
    pred = prob.argmax(1)
    m = classification_metrics(y, prob, ("cat", "dog"))
    assert m["accuracy"] == pytest.approx(sk.accuracy_score(y, pred))
    assert m["precision"] == pytest.approx(sk.precision_score(y, pred))
    assert m["recall"] == pytest.approx(sk.recall_score(y, pred))
    assert m["f1"] == pytest.approx(sk.f1_score(y, pred))
    assert m["log_loss"] == pytest.approx(sk.log_loss(y, prob))
    assert m["roc_auc"] == pytest.approx(sk.roc_auc_score(y, prob[:, 1]))
    assert m["confusion_matrix"] == sk.confusion_matrix(y, pred).tolist()
    per_class = sk.precision_recall_fscore_support(y, pred)
    for k, name in enumerate(("cat", "dog")):
        assert m["per_class"][name]["precision"] == pytest.approx(per_class[0][k])
        assert m["per_class"][name]["recall"] == pytest.approx(per_class[1][k])
        assert m["per_class"][name]["f1"] == pytest.approx(per_class[2][k])
        assert m["per_class"][name]["support"] == per_class[3][k]


def test_three_classes_use_macro_averages_like_scikit_learn() -> None:
    rng = np.random.default_rng(3)
    y = rng.integers(0, 3, 300)
    logits = rng.normal(size=(300, 3)) + np.eye(3)[y] * 1.5
    prob = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    m = classification_metrics(y, prob, ("a", "b", "c"))
    assert m["f1"] == pytest.approx(sk.f1_score(y, prob.argmax(1), average="macro"))
    assert m["roc_auc"] == pytest.approx(sk.roc_auc_score(y, prob, multi_class="ovr", average="macro"))


def test_wilson_interval_matches_the_textbook_values() -> None:
    # Newcombe (1998), Table I: 81/263 -> 0.2553 to 0.3662; 15/148 -> 0.0624 to 0.1605.
    assert wilson_interval(81, 263) == pytest.approx((0.2553, 0.3662), abs=1e-4)
    assert wilson_interval(15, 148) == pytest.approx((0.0624, 0.1605), abs=1e-4)


def test_wilson_interval_stays_inside_zero_and_one_at_the_extremes() -> None:
    low, high = wilson_interval(100, 100)
    assert high == 1.0 and 0.95 < low < 1.0
    low, high = wilson_interval(0, 50)
    assert low == 0.0 and 0.0 < high < 0.1
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_accuracy_always_lies_inside_its_interval() -> None:
    y, prob = _random_binary(4, n=57)
    m = classification_metrics(y, prob, ("cat", "dog"))
    low, high = m["accuracy_ci95"]
    assert low < m["accuracy"] < high


def test_roc_auc_is_undefined_with_a_single_class() -> None:
    assert np.isnan(roc_auc(np.ones(5, dtype=int), np.linspace(0, 1, 5)))
