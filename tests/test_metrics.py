"""Our metrics agree with scikit-learn, every accuracy has a correct Wilson interval, and a name
means the same figure offline and after deployment."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sklearn import metrics as sk

from catsdogs.bundle import find_bundle
from catsdogs.metrics import classification_metrics, label_metrics, roc_auc, wilson_interval
from catsdogs.monitoring.evaluate_deployed import SCALAR_METRICS, evaluate_deployed, mlflow_metrics
from catsdogs.registry.tracking import flatten_metrics
from catsdogs.settings import Settings
from catsdogs.training.evaluate import evaluate_bundle
from tiny_bundle import BLUE, RED, build_tiny_bundle, service_in_process, write_images


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
    for name in ("precision", "recall", "f1"):
        scorer = getattr(sk, f"{name}_score")
        assert m[f"macro_{name}"] == pytest.approx(scorer(y, pred, average="macro"))
    assert m["positive_class"] == "dog"
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
    assert m["f1"] == m["macro_f1"] and m["positive_class"] is None
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


def test_label_metrics_match_a_hand_computed_confusion_matrix() -> None:
    # truth cat: 3 right, 1 called dog; truth dog: 2 right, 2 called cat
    y_true = [0] * 4 + [1] * 4
    y_pred = [0, 0, 0, 1, 1, 1, 0, 0]
    metrics = label_metrics(y_true, y_pred, ["cat", "dog"])
    assert metrics["confusion_matrix"] == [[3, 1], [2, 2]]
    assert metrics["accuracy"] == pytest.approx(5 / 8)
    cat, dog = metrics["per_class"]["cat"], metrics["per_class"]["dog"]
    assert cat["precision"] == pytest.approx(3 / 5) and cat["recall"] == pytest.approx(3 / 4)
    assert dog["precision"] == pytest.approx(2 / 3) and dog["recall"] == pytest.approx(2 / 4)
    assert cat["f1"] == pytest.approx(2 * (3 / 5) * (3 / 4) / (3 / 5 + 3 / 4))
    assert metrics["precision"] == pytest.approx(2 / 3) and metrics["recall"] == pytest.approx(2 / 4)
    assert metrics["macro_precision"] == pytest.approx((3 / 5 + 2 / 3) / 2)
    assert metrics["macro_recall"] == pytest.approx((3 / 4 + 2 / 4) / 2)


def test_a_class_never_predicted_has_zero_precision_not_nan() -> None:
    metrics = label_metrics([0, 1], [0, 0], ["cat", "dog"])
    assert metrics["per_class"]["dog"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert metrics["macro_f1"] == pytest.approx((2 * 0.5 * 1 / 1.5) / 2)
    assert metrics["f1"] == 0.0


def test_no_image_gives_an_undefined_accuracy_not_a_perfect_or_zero_one() -> None:
    metrics = classification_metrics([], np.zeros((0, 2)), ("cat", "dog"))
    assert np.isnan(metrics["accuracy"]) and np.isnan(metrics["log_loss"])
    assert metrics["accuracy_ci95"] == [0.0, 1.0] and metrics["n_images"] == 0


def test_the_same_predictions_give_the_same_metrics_offline_and_after_deployment(
    tmp_path: Path, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One model, one labelled folder: ``evaluate`` (ONNX Runtime in-process) and
    ``evaluate-deployed`` (the real app over HTTP) log the same names with the same values."""
    bundle = build_tiny_bundle(tmp_path / "bundle")
    # truth cat: 3 red (cat) and 1 blue (dog); truth dog: 2 blue (dog) and 2 red (cat)
    colours = [RED, RED, RED, BLUE, BLUE, BLUE, RED, RED]
    folder = write_images(
        tmp_path / "photos", {f"{'cat' if i < 4 else 'dog'}/{i}.png": c for i, c in enumerate(colours)}
    )
    offline = evaluate_bundle(find_bundle(bundle), folder, progress=False).metrics
    with service_in_process(bundle, settings, monkeypatch) as url:
        deployed = evaluate_deployed(url, folder, classes=("cat", "dog"))
    assert deployed.n_failed == 0
    assert offline["confusion_matrix"] == deployed.metrics["confusion_matrix"] == [[3, 1], [2, 2]]
    logged_offline = flatten_metrics(offline, prefix="test")  # what training logs for its test split
    logged_deployed = mlflow_metrics(deployed)
    for name in SCALAR_METRICS:
        assert logged_offline[f"test_{name}"] == logged_deployed[name], name
    for label in ("cat", "dog"):
        for key in ("precision", "recall", "f1"):
            assert logged_offline[f"test_per_class_{label}_{key}"] == logged_deployed[f"{label}_{key}"]
    assert logged_deployed["precision"] == pytest.approx(2 / 3)  # of the dogs, not the macro mean
    assert logged_deployed["macro_precision"] == pytest.approx((3 / 5 + 2 / 3) / 2)
