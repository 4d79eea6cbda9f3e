"""Evaluation: metrics with confidence intervals, and predictions of exactly what serving runs.

Metrics are computed here with NumPy (tests compare them with scikit-learn); predictions come
from the bundle's ONNX graph through ONNX Runtime, with the bundle's own preprocessing.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from catsdogs import CatsdogsError
from catsdogs.bundle import ModelBundle, find_bundle, write_json_atomic
from catsdogs.preprocessing import ImageError, PreprocessConfig, decode_for_model, preprocess, softmax
from catsdogs.settings import Settings

logger = logging.getLogger(__name__)

Z_95 = 1.959963984540054
EPS = 1e-15


# --- metrics -----------------------------------------------------------------------------------


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


def _prf(tp: int, fp: int, fn: int) -> tuple[float, float, float]:
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


def classification_metrics(
    y_true: Sequence[int] | np.ndarray,
    prob: np.ndarray,
    class_names: Sequence[str],
    *,
    split: str = "test",
) -> dict[str, Any]:
    """The ``metrics.json`` payload. For two classes, precision/recall/F1 treat the second class
    (``dog``) as positive and ROC-AUC uses its probability; otherwise they are macro averages."""
    y = np.asarray(y_true, dtype=np.int64)
    prob = np.asarray(prob, dtype=np.float64)
    n_classes = len(class_names)
    pred = prob.argmax(axis=1)
    n = len(y)
    correct = int((pred == y).sum())
    confusion = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(confusion, (y, pred), 1)
    per_class: dict[str, dict[str, float | int]] = {}
    for index, name in enumerate(class_names):
        tp = int(confusion[index, index])
        precision, recall, f1 = _prf(
            tp, int(confusion[:, index].sum()) - tp, int(confusion[index].sum()) - tp
        )
        per_class[name] = {
            "precision": precision,
            "recall": recall,
            "f1": f1,
            "support": int(confusion[index].sum()),
        }
    clipped = np.clip(prob[np.arange(n), y], EPS, 1.0) if n else np.zeros(0)
    if n_classes == 2:
        positive = per_class[class_names[1]]
        precision, recall, f1 = positive["precision"], positive["recall"], positive["f1"]
        auc = roc_auc(y, prob[:, 1])
    else:
        precision, recall, f1 = (
            float(np.mean([c[k] for c in per_class.values()])) for k in ("precision", "recall", "f1")
        )
        aucs = [roc_auc((y == k).astype(np.int64), prob[:, k]) for k in range(n_classes)]
        auc = float(np.nanmean(aucs))
    accuracy = correct / n if n else float("nan")
    return {
        "accuracy": accuracy,
        "accuracy_ci95": list(wilson_interval(correct, n)),
        "precision": float(precision),
        "recall": float(recall),
        "f1": float(f1),
        "log_loss": float(-np.log(clipped).mean()) if n else float("nan"),
        "roc_auc": auc,
        "per_class": per_class,
        "confusion_matrix": confusion.tolist(),
        "n_images": n,
        "split": split,
        "positive_class": class_names[1] if n_classes == 2 else None,
    }


# --- labelled sources --------------------------------------------------------------------------


@dataclass(frozen=True)
class LabeledImage:
    """An image to evaluate: a display name, a way to read its bytes, its label index."""

    name: str
    read: Callable[[], bytes]
    label: int


def _label_of(name: str, class_names: Sequence[str]) -> str | None:
    """Label from a parent folder called like a class, else from a ``<class>.…`` file name prefix."""
    parts = Path(name).parts
    for part in reversed(parts[:-1]):
        if part.lower() in class_names:
            return part.lower()
    prefix = parts[-1].split(".", 1)[0].lower()
    return prefix if prefix in class_names else None


def _is_image_name(name: str) -> bool:
    return Path(name).suffix.lower() in {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif"}


def labeled_images(
    source: Path, class_names: Sequence[str], *, split: str | None = None, limit: int | None = None
) -> list[LabeledImage]:
    """Labelled images from a folder, a ``.zip`` archive or a ``manifest.csv`` (with ``split``)."""
    index = {name: i for i, name in enumerate(class_names)}
    items: list[LabeledImage] = []
    if (source.is_file() and source.name.endswith(".csv")) or (source / "manifest.csv").is_file():
        from catsdogs.training.features import read_manifest

        data_dir = source.parent if source.is_file() else source
        for sample in read_manifest(data_dir):
            if split and sample.split != split:
                continue
            if sample.label in index:
                items.append(LabeledImage(str(sample.path), sample.path.read_bytes, index[sample.label]))
    elif source.is_file() and zipfile.is_zipfile(source):
        with zipfile.ZipFile(source) as archive:
            names = sorted(n for n in archive.namelist() if _is_image_name(n) and not n.endswith("/"))
        for name in names:
            label = _label_of(name, class_names)
            if label is not None:
                items.append(LabeledImage(name, _zip_reader(source, name), index[label]))
    elif source.is_dir():
        for path in sorted(p for p in source.rglob("*") if p.is_file() and _is_image_name(p.name)):
            label = _label_of(str(path.relative_to(source)), class_names)
            if label is not None:
                items.append(LabeledImage(str(path), path.read_bytes, index[label]))
    else:
        raise CatsdogsError(f"{source} is not a folder, a .zip archive or a manifest.csv")
    if not items:
        raise CatsdogsError(
            f"no labelled images in {source}: name files <class>.<id>.jpg or put them in folders named "
            f"after the classes ({', '.join(class_names)})"
        )
    return items[:limit] if limit else items


def _zip_reader(archive: Path, name: str) -> Callable[[], bytes]:
    def read() -> bytes:
        with zipfile.ZipFile(archive) as handle:
            return handle.read(name)

    return read


# --- prediction --------------------------------------------------------------------------------


def predict_probabilities(
    session: Any,
    config: PreprocessConfig,
    images: Sequence[LabeledImage],
    *,
    tta: bool = False,
    batch_size: int = 64,
    progress: bool = True,
) -> tuple[np.ndarray, list[str]]:
    """Class probabilities from an ONNX session; undecodable images are skipped and reported."""
    from concurrent.futures import ThreadPoolExecutor

    from catsdogs.training.export import onnx_logits

    def load(item: LabeledImage) -> np.ndarray | None:
        try:
            return preprocess(decode_for_model(item.read(), config), config)
        except ImageError as exc:
            logger.warning("skipping %s: %s", item.name, exc)
            return None

    probs: list[np.ndarray] = []
    skipped: list[str] = []
    with ThreadPoolExecutor(max_workers=2) as pool:
        for start in tqdm(range(0, len(images), batch_size), desc="evaluate", disable=not progress):
            chunk = images[start : start + batch_size]
            arrays = list(pool.map(load, chunk))
            skipped += [item.name for item, array in zip(chunk, arrays, strict=True) if array is None]
            kept = (
                np.stack([a for a in arrays if a is not None]) if any(a is not None for a in arrays) else None
            )
            if kept is None:
                continue
            prob = softmax(onnx_logits(session, kept))
            if tta:  # horizontal flip: reverse the width axis of the CHW arrays
                prob = (prob + softmax(onnx_logits(session, np.ascontiguousarray(kept[..., ::-1])))) / 2
            probs.append(prob)
    return (np.concatenate(probs) if probs else np.zeros((0, len(config.class_names)))), skipped


@dataclass
class EvaluationResult:
    """Metrics and per-image predictions of one evaluation."""

    metrics: dict[str, Any]
    predictions: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def evaluate_session(
    session: Any,
    config: PreprocessConfig,
    images: Sequence[LabeledImage],
    *,
    tta: bool = False,
    split: str = "test",
    progress: bool = True,
) -> EvaluationResult:
    """Evaluate an ONNX session on labelled images with the given preprocessing."""
    prob, skipped = predict_probabilities(session, config, images, tta=tta, progress=progress)
    skipped_names = set(skipped)
    kept = [item for item in images if item.name not in skipped_names]
    labels = np.asarray([item.label for item in kept], dtype=np.int64)
    metrics = classification_metrics(labels, prob, config.class_names, split=split)
    metrics["tta"] = "hflip" if tta else "none"
    names = config.class_names
    predictions = [
        {
            "image": item.name,
            "label": names[item.label],
            "predicted": names[int(p.argmax())],
            "correct": bool(p.argmax() == item.label),
            **{f"p_{name}": float(p[k]) for k, name in enumerate(names)},
        }
        for item, p in zip(kept, prob, strict=True)
    ]
    return EvaluationResult(metrics=metrics, predictions=predictions, skipped=skipped)


def write_predictions_csv(path: Path, predictions: Sequence[dict[str, Any]]) -> Path:
    """Per-image predictions as CSV, written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.StringIO()
    if predictions:
        writer = csv.DictWriter(buffer, fieldnames=list(predictions[0]))
        writer.writeheader()
        writer.writerows(predictions)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(buffer.getvalue())
    tmp.replace(path)
    return path


def resolve_model_uri(model_uri: str, *, settings: Settings) -> ModelBundle:
    """The single place where a model URI (``models:/…``, ``runs:/…`` or a folder) becomes a local bundle."""
    if model_uri.startswith(("models:/", "runs:/")):
        from catsdogs.registry.model_source import download_bundle

        return find_bundle(download_bundle(model_uri, settings))
    return find_bundle(Path(model_uri))


def evaluate_bundle(
    bundle: ModelBundle,
    source: Path,
    *,
    split: str | None = None,
    tta: bool = False,
    int8: bool = False,
    out_dir: Path | None = None,
    limit: int | None = None,
    progress: bool = True,
) -> EvaluationResult:
    """Evaluate a bundle's ONNX model on a labelled folder, archive or manifest split.

    Writes ``metrics.json`` and ``predictions.csv`` to ``out_dir`` when given.
    """
    from catsdogs.runtime import open_model

    config = bundle.preprocessing
    images = labeled_images(source, config.class_names, split=split, limit=limit)
    session = open_model(bundle.onnx_path(int8=int8), config)
    result = evaluate_session(session, config, images, tta=tta, split=split or source.name, progress=progress)
    if out_dir is not None:
        write_json_atomic(out_dir / "metrics.json", result.metrics)
        write_predictions_csv(out_dir / "predictions.csv", result.predictions)
    return result
