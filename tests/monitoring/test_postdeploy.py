"""evaluate-deployed's parts that need no service: loading a labelled set, metrics, latency."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

from catsdogs import CatsdogsError
from catsdogs.monitoring.evaluate_deployed import classification_metrics, latency_percentiles, load_labelled


def test_metrics_match_a_hand_computed_confusion_matrix() -> None:
    # truth cat: 3 right, 1 called dog; truth dog: 2 right, 2 called cat
    y_true = ["cat"] * 4 + ["dog"] * 4
    y_pred = ["cat", "cat", "cat", "dog", "dog", "dog", "cat", "cat"]
    metrics = classification_metrics(y_true, y_pred, ["cat", "dog"])
    assert metrics["confusion_matrix"] == [[3, 1], [2, 2]]
    assert metrics["accuracy"] == pytest.approx(5 / 8)
    cat, dog = metrics["per_class"]["cat"], metrics["per_class"]["dog"]
    assert cat["precision"] == pytest.approx(3 / 5) and cat["recall"] == pytest.approx(3 / 4)
    assert dog["precision"] == pytest.approx(2 / 3) and dog["recall"] == pytest.approx(2 / 4)
    assert cat["f1"] == pytest.approx(2 * (3 / 5) * (3 / 4) / (3 / 5 + 3 / 4))
    assert metrics["precision"] == pytest.approx((3 / 5 + 2 / 3) / 2)
    assert metrics["recall"] == pytest.approx((3 / 4 + 2 / 4) / 2)


def test_a_class_never_predicted_has_zero_precision_not_nan() -> None:
    metrics = classification_metrics(["cat", "dog"], ["cat", "cat"], ["cat", "dog"])
    assert metrics["per_class"]["dog"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert metrics["f1"] == pytest.approx((2 * 0.5 * 1 / 1.5) / 2)


def test_latency_percentiles() -> None:
    result = latency_percentiles([float(v) for v in range(1, 101)])
    assert result["p50"] == pytest.approx(50.5)
    assert result["p95"] == pytest.approx(95.05)
    assert result["mean"] == pytest.approx(50.5)
    assert latency_percentiles([]) == {}


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"not decoded here")
    return path


def test_folder_layout_with_a_balanced_limit(tmp_path: Path) -> None:
    for i in range(5):
        _touch(tmp_path / "cat" / f"c{i}.jpg")
    for i in range(2):
        _touch(tmp_path / "dog" / f"d{i}.png")
    _touch(tmp_path / "dog" / "notes.txt")
    items = load_labelled(tmp_path, classes=("cat", "dog"), limit=4)
    assert [(item.label, Path(item.name).name) for item in items] == [
        ("cat", "c0.jpg"),
        ("dog", "d0.png"),
        ("cat", "c1.jpg"),
        ("dog", "d1.png"),
    ]
    assert len(load_labelled(tmp_path, classes=("cat", "dog"))) == 7


def test_kaggle_zip_layout(tmp_path: Path) -> None:
    archive = tmp_path / "train.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("train/cat.1.jpg", b"cat bytes")
        zf.writestr("train/dog.7.jpg", b"dog bytes")
        zf.writestr("train/readme.md", b"skip me")
    items = load_labelled(archive, classes=("cat", "dog"))
    assert {(item.label, item.read()) for item in items} == {("cat", b"cat bytes"), ("dog", b"dog bytes")}


def test_missing_source_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(CatsdogsError, match="neither a folder nor a zip"):
        load_labelled(tmp_path / "nope", classes=("cat", "dog"))


def test_source_without_labelled_images_is_a_clear_error(tmp_path: Path) -> None:
    _touch(tmp_path / "birds" / "b.jpg")
    with pytest.raises(CatsdogsError, match="no labelled image"):
        load_labelled(tmp_path, classes=("cat", "dog"))
