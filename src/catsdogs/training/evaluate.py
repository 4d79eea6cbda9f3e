"""Evaluation: predictions of exactly what serving runs, and their metrics with confidence intervals.

Predictions come from the bundle's ONNX graph through ONNX Runtime, with the bundle's own
preprocessing; images are read by :mod:`catsdogs.data.labelled` (or from a manifest split) and the
metrics are those of :mod:`catsdogs.metrics`, the same as after deployment.
"""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from catsdogs import CatsdogsError
from catsdogs.bundle import ModelBundle, find_bundle, write_json_atomic
from catsdogs.data.labelled import LabelledImage, balanced, read_labelled
from catsdogs.files import write_text_atomic
from catsdogs.metrics import classification_metrics
from catsdogs.ood import UnknownDetector
from catsdogs.preprocessing import ImageError, PreprocessConfig, decode_for_model, preprocess, softmax
from catsdogs.settings import Settings

logger = logging.getLogger(__name__)

# --- prediction --------------------------------------------------------------------------------


@dataclass
class Outputs:
    """What a model graph said about a list of images (those it could decode, in order)."""

    probabilities: np.ndarray
    skipped: list[str] = field(default_factory=list)
    features: np.ndarray | None = None
    pet_mass: np.ndarray | None = None
    quality: list[str | None] = field(default_factory=list)
    """Per image, why it cannot be judged (:func:`catsdogs.ood.quality_reason`), when asked for."""


def predict_outputs(
    session: Any,
    config: PreprocessConfig,
    images: Sequence[LabelledImage],
    *,
    quality_floors: tuple[int, float, float] | None = None,
    tta: bool = False,
    batch_size: int = 64,
    progress: bool = True,
) -> Outputs:
    """Class probabilities from an ONNX session; undecodable images are skipped and reported.

    With ``quality_floors`` (min side, flat std, min smoothness) also what the unknown detector
    needs: each image's quality, and the graph's features and pet mass (when it has them).
    """
    from concurrent.futures import ThreadPoolExecutor

    from catsdogs.ood import quality_reason
    from catsdogs.runtime import FEATURES_NAME, OUTPUT_NAME, PET_MASS_NAME, output_names, run_named

    available = output_names(session)
    names = [OUTPUT_NAME] + (
        [n for n in (FEATURES_NAME, PET_MASS_NAME) if n in available] if quality_floors else []
    )

    def load(item: LabelledImage) -> tuple[np.ndarray, str | None] | None:
        try:
            image = decode_for_model(item.read(), config)
            array = preprocess(image, config)
        except ImageError as exc:
            logger.warning("skipping %s: %s", item.name, exc)
            return None
        if quality_floors is None:
            return array, None
        min_side, flat_std, smoothness = quality_floors
        return array, quality_reason(
            image.size, array, min_side=min_side, flat_std=flat_std, min_smoothness=smoothness
        )

    parts: dict[str, list[np.ndarray]] = {name: [] for name in names}
    result = Outputs(np.zeros((0, len(config.class_names))))
    with ThreadPoolExecutor(max_workers=2) as pool:
        for start in tqdm(range(0, len(images), batch_size), desc="evaluate", disable=not progress):
            chunk = images[start : start + batch_size]
            loaded = list(pool.map(load, chunk))
            result.skipped += [item.name for item, got in zip(chunk, loaded, strict=True) if got is None]
            kept = [got for got in loaded if got is not None]
            if not kept:
                continue
            batch = np.stack([array for array, _ in kept])
            result.quality += [reason for _, reason in kept]
            out = run_named(session, batch, names)
            prob = softmax(out[OUTPUT_NAME])
            if tta:  # horizontal flip: reverse the width axis of the CHW arrays
                flipped = np.ascontiguousarray(batch[..., ::-1])
                prob = (prob + softmax(run_named(session, flipped, [OUTPUT_NAME])[OUTPUT_NAME])) / 2
            out[OUTPUT_NAME] = prob
            for name in names:
                parts[name].append(out[name])
    if parts[OUTPUT_NAME]:
        result.probabilities = np.concatenate(parts[OUTPUT_NAME])
    if parts.get(FEATURES_NAME):
        result.features = np.concatenate(parts[FEATURES_NAME])
    if parts.get(PET_MASS_NAME):
        result.pet_mass = np.concatenate(parts[PET_MASS_NAME])
    return result


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
    out = predict_outputs(session, config, images, tta=tta, batch_size=batch_size, progress=progress)
    return out.probabilities, out.skipped


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
    detector: UnknownDetector | None = None,
    tta: bool = False,
    split: str = "test",
    progress: bool = True,
) -> EvaluationResult:
    """Evaluate an ONNX session on labelled images with the given preprocessing.

    Accuracy judges the predicted class of every image (what the promotion gate compares). With the
    bundle's unknown ``detector``, each prediction also says whether the service would have answered
    ``unknown``; ``unknown_rate`` is that share (every labelled image is a cat or a dog, so each one
    is a false ``unknown``).
    """
    floors = (detector.min_side, detector.flat_std, detector.min_smoothness) if detector else None
    out = predict_outputs(session, config, images, quality_floors=floors, tta=tta, progress=progress)
    prob, skipped = out.probabilities, out.skipped
    skipped_names = set(skipped)
    kept = [item for item in images if item.name not in skipped_names]
    names = config.class_names
    labels = np.asarray([names.index(item.label) for item in kept], dtype=np.int64)
    metrics = classification_metrics(labels, prob, names, split=split)
    metrics["tta"] = "hflip" if tta else "none"
    unknown = _unknown_columns(detector, out)
    if unknown:
        flagged = sum(row["unknown_reason"] is not None for row in unknown)
        metrics["unknown_count"], metrics["unknown_rate"] = flagged, flagged / max(len(unknown), 1)
    predictions = [
        {
            "image": item.name,
            "label": item.label,
            "predicted": names[int(p.argmax())],
            "correct": names[int(p.argmax())] == item.label,
            **{f"p_{name}": float(p[k]) for k, name in enumerate(names)},
            **(unknown[i] if unknown else {}),
        }
        for i, (item, p) in enumerate(zip(kept, prob, strict=True))
    ]
    return EvaluationResult(metrics=metrics, predictions=predictions, skipped=skipped)


def _unknown_columns(detector: UnknownDetector | None, out: Outputs) -> list[dict[str, Any]]:
    """Per image: the OOD score and why it would be ``unknown`` (empty without a detector)."""
    if detector is None or out.features is None:
        return []
    scores, reasons = detector.judge(out.features, out.pet_mass, out.quality)
    return [
        {"ood_score": float(score), "unknown_reason": reason}
        for score, reason in zip(scores, reasons, strict=True)
    ]


def write_predictions_csv(path: Path, predictions: Sequence[dict[str, Any]]) -> Path:
    """Per-image predictions as CSV, written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.StringIO()
    if predictions:
        writer = csv.DictWriter(buffer, fieldnames=list(predictions[0]))
        writer.writeheader()
        writer.writerows(predictions)
    return write_text_atomic(path, buffer.getvalue())


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
    from catsdogs.runtime import open_model

    config = bundle.preprocessing
    images = labelled_source(source, config.class_names, split=split, limit=limit)
    session = open_model(bundle.onnx_path(int8=int8), config)
    result = evaluate_session(
        session,
        config,
        images,
        detector=bundle.unknown_detector(),
        tta=tta,
        split=split or source.name,
        progress=progress,
    )
    if out_dir is not None:
        write_json_atomic(out_dir / "metrics.json", result.metrics)
        write_predictions_csv(out_dir / "predictions.csv", result.predictions)
    return result


def evaluator_on_test_split(settings: Settings) -> Callable[[Path], dict[str, Any]]:
    """``bundle folder -> metrics`` on the test split of ``settings``' manifest: how the promotion gate
    re-tests a champion that was tested on other data (:func:`catsdogs.registry.promote`)."""

    def evaluate(bundle_dir: Path) -> dict[str, Any]:
        return evaluate_bundle(
            find_bundle(bundle_dir), settings.manifest_path, split="test", progress=False
        ).metrics

    return evaluate
