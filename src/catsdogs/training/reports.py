"""Evaluation figures and the model card (what a reviewer reads before promoting a model)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from catsdogs.files import atomic_path

logger = logging.getLogger(__name__)


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    with atomic_path(path, suffix=path.suffix) as tmp:
        fig.savefig(tmp, dpi=100, bbox_inches="tight")
    return path


def plot_confusion_matrix(path: Path, confusion: Sequence[Sequence[int]], class_names: Sequence[str]) -> Path:
    plt = _figure()
    fig, ax = plt.subplots(figsize=(4, 4))
    matrix = np.asarray(confusion)
    ax.imshow(matrix, cmap="Blues")
    for (i, j), value in np.ndenumerate(matrix):
        ax.text(j, i, str(value), ha="center", va="center", color="black")
    ax.set_xticks(range(len(class_names)), class_names)
    ax.set_yticks(range(len(class_names)), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    _save(fig, path)
    plt.close(fig)
    return path


def plot_roc_pr(roc_path: Path, pr_path: Path, y_true: np.ndarray, score: np.ndarray) -> None:
    """ROC and precision-recall curves of the positive class (thresholds swept over all scores)."""
    plt = _figure()
    order = np.argsort(-score, kind="mergesort")
    y = y_true[order]
    tp = np.cumsum(y)
    fp = np.cumsum(1 - y)
    positives, negatives = max(int(y.sum()), 1), max(len(y) - int(y.sum()), 1)
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.plot(np.r_[0, fp / negatives], np.r_[0, tp / positives])
    ax.plot([0, 1], [0, 1], "--", color="grey")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    _save(fig, roc_path)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.plot(tp / positives, tp / np.maximum(tp + fp, 1))
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    _save(fig, pr_path)
    plt.close(fig)


def plot_training_curves(path: Path, history: Sequence[dict[str, float]]) -> Path:
    """Loss and accuracy per epoch (an ensemble's members one after another, on their ``step``)."""
    plt = _figure()
    epochs = [row.get("step", row["epoch"]) for row in history]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    for key in ("train_loss", "val_loss"):
        left.plot(epochs, [row[key] for row in history], marker="o", label=key)
    for key in ("train_accuracy", "val_accuracy"):
        right.plot(epochs, [row[key] for row in history], marker="o", label=key)
    left.set_xlabel("epoch")
    right.set_xlabel("epoch")
    left.legend()
    right.legend()
    _save(fig, path)
    plt.close(fig)
    return path


def plot_misclassified(
    path: Path, errors: Sequence[tuple[bytes, str, str, float]], *, columns: int = 6
) -> Path:
    """Gallery of the worst test errors: (image bytes, true label, predicted label, confidence)."""
    import io

    from PIL import Image

    plt = _figure()
    rows = max(1, -(-len(errors) // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(2 * columns, 2.2 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (data, label, predicted, confidence) in zip(axes.flat, errors, strict=False):
        ax.imshow(Image.open(io.BytesIO(data)).convert("RGB"))
        ax.set_title(f"{label}→{predicted} {confidence:.2f}", fontsize=8)
    if not errors:
        axes.flat[0].text(0.5, 0.5, "no errors", ha="center")
    _save(fig, path)
    plt.close(fig)
    return path


def model_card(*, metadata: dict[str, Any], metrics: dict[str, Any], data: dict[str, Any]) -> str:
    """The model card in Markdown: data, metrics per class, intended use, limits, licences."""
    low, high = metrics["accuracy_ci95"]
    per_class = "\n".join(
        f"| {name} | {m['precision']:.4f} | {m['recall']:.4f} | {m['f1']:.4f} | {m['support']} |"
        for name, m in metrics["per_class"].items()
    )
    m = metadata
    members = int(m.get("members", 1))
    kinds = ", ".join(m.get("member_architectures") or []) or f"{members} {m['architecture']}"
    ensemble = (
        f"\nAn ensemble of {kinds} models trained with consecutive seeds: it serves the mean of "
        f"their probabilities and costs the time of all {members} per image.\n"
        if members > 1
        else ""
    )
    return f"""# Model card: {m["architecture"]} ({m["strategy"]}, profile {m["profile"]})

Created {m["created_at"]} by catsdogs {m["package_version"]} (commit {m["git_commit"]}).
{ensemble}
## Data
- Dataset: Kaggle "Dogs vs. Cats" training images (`train.zip`), ingested by `catsdogs data ingest`.
- Data version (manifest SHA-256): `{metadata["data_version"]}`
- Images used: {data["n_train"]} train (training views: {", ".join(data["views"])}),
  {data["n_val"]} validation, {metrics["n_images"]} test.
- Choices (backbone, head, epochs) were made on the validation split only.

## Metrics (test split, exactly what serving runs: ONNX, TTA {metrics.get("tta", "none")})
- Accuracy **{metrics["accuracy"]:.4f}** (95% Wilson CI [{low:.4f}, {high:.4f}])
- Precision {metrics["precision"]:.4f}, recall {metrics["recall"]:.4f}, F1 {metrics["f1"]:.4f}
  (positive class: {metrics.get("positive_class")}), log-loss {metrics["log_loss"]:.4f},
  ROC-AUC {metrics["roc_auc"]:.4f}

| class | precision | recall | F1 | support |
|---|---|---|---|---|
{per_class}

## Intended use
Telling whether a photo uploaded to a pet adoption platform shows a cat or a dog, to pre-fill a
listing that a person then reviews.

## Limits
- Two classes only: any other image (other animals, people, both a cat and a dog) still gets
  "cat" or "dog"; check the probability and keep a human in the loop.
- Trained on one public dataset of amateur photos (mostly 200-500 px); drawings, very small,
  heavily edited or night-vision images are out of distribution.
- Accuracy is measured on a held-out split of the same dataset; live accuracy may be lower.

## Licences
- Weights: {metadata["weights_licence"]}
- Data: Kaggle "Dogs vs. Cats" (Asirra, Microsoft Research) — for research and non-commercial use
  under the competition's rules.
"""
