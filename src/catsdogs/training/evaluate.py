"""Evaluation: predictions of exactly what serving runs, and their metrics with confidence intervals.

Predictions come from the bundle's ONNX graph through ONNX Runtime, with the bundle's own
preprocessing; images are read by :mod:`catsdogs.data.labelled` (or from a manifest split) and the
metrics are those of :mod:`catsdogs.metrics`, the same as after deployment.
"""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from catsdogs import CatsdogsError
from catsdogs.bundle import ModelBundle, find_bundle, write_json_atomic
from catsdogs.data.labelled import LabelledImage, balanced, read_labelled
from catsdogs.metrics import classification_metrics
from catsdogs.preprocessing import ImageError, PreprocessConfig, decode_image, preprocess, softmax
from catsdogs.settings import Settings

logger = logging.getLogger(__name__)

# --- prediction --------------------------------------------------------------------------------


def predict_probabilities(
    session: Any,
    config: PreprocessConfig,
    images: Sequence[LabelledImage],
    *,
    tta: bool = False,
    batch_size: int = 64,
    progress: bool = True,
) -> tuple[np.ndarray, list[str]]:
    """Class probabilities from an ONNX session; undecodable images are skipped and reported."""
    from concurrent.futures import ThreadPoolExecutor

    from catsdogs.training.export import onnx_logits

    def load(item: LabelledImage) -> np.ndarray | None:
        try:
            return preprocess(decode_image(item.read()), config)
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
    images: Sequence[LabelledImage],
    *,
    tta: bool = False,
    split: str = "test",
    progress: bool = True,
) -> EvaluationResult:
    """Evaluate an ONNX session on labelled images with the given preprocessing."""
    prob, skipped = predict_probabilities(session, config, images, tta=tta, progress=progress)
    skipped_names = set(skipped)
    kept = [item for item in images if item.name not in skipped_names]
    names = config.class_names
    labels = np.asarray([names.index(item.label) for item in kept], dtype=np.int64)
    metrics = classification_metrics(labels, prob, names, split=split)
    metrics["tta"] = "hflip" if tta else "none"
    predictions = [
        {
            "image": item.name,
            "label": item.label,
            "predicted": names[int(p.argmax())],
            "correct": names[int(p.argmax())] == item.label,
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


def labelled_source(
    source: Path, class_names: Sequence[str], *, split: str | None = None, limit: int | None = None
) -> list[LabelledImage]:
    """The images of a ``manifest.csv`` (optionally one split), or of a labelled folder or archive.

    Raises:
        CatsdogsError: no labelled image (see :func:`catsdogs.data.labelled.read_labelled`).
    """
    if not ((source.is_file() and source.name.endswith(".csv")) or (source / "manifest.csv").is_file()):
        return read_labelled(source, class_names, limit=limit)
    from catsdogs.training.features import read_manifest

    data_dir = source.parent if source.is_file() else source
    images = [
        LabelledImage(str(sample.path), sample.label, sample.path.read_bytes)
        for sample in read_manifest(data_dir)
        if (not split or sample.split == split) and sample.label in class_names
    ]
    if not images:
        raise CatsdogsError(f"no labelled images of split {split!r} in the manifest of {source}")
    return balanced(images, class_names, limit)


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
    from catsdogs.training.features import ort_session

    config = bundle.preprocessing
    images = labelled_source(source, config.class_names, split=split, limit=limit)
    session = ort_session(bundle.onnx_path(int8=int8))
    result = evaluate_session(session, config, images, tta=tta, split=split or source.name, progress=progress)
    if out_dir is not None:
        write_json_atomic(out_dir / "metrics.json", result.metrics)
        write_predictions_csv(out_dir / "predictions.csv", result.predictions)
    return result
