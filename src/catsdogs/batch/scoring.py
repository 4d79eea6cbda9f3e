"""One chunk of images through the model: the code both engines run.

Each image is decoded by :func:`catsdogs.preprocessing.decode_for_model` (the decode of serving and
evaluation) and preprocessed with the bundle's own config; a file that cannot be read or decoded
becomes a row with an ``error``, never a failed job. Probabilities are the softmax of the graph's
logits in float32, and ``label`` is ``unknown`` where the bundle's detector says so, as the service
computes them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from catsdogs.batch.collection import READ_ERRORS, ImageCollection
from catsdogs.bundle import find_bundle
from catsdogs.ood import UnknownDetector, answer_label, run_judged, unknown_reason
from catsdogs.preprocessing import ImageError, PreprocessConfig, decode_for_model, preprocess, softmax
from catsdogs.runtime import open_model, run_logits, session_options


@dataclass(frozen=True)
class ScoringModel:
    """What a job scores with; small and picklable, so it travels to Ray actors."""

    bundle_root: Path
    version: str
    config: PreprocessConfig
    detector: UnknownDetector | None = None
    """The bundle's unknown detector (NumPy arrays: pickles to Ray actors as they are)."""

    def open_session(self, *, intra_threads: int, allow_spinning: bool = True) -> Any:
        """An ORT session over the bundle's graph (the one session factory, :mod:`catsdogs.runtime`)."""
        options = session_options(intra_threads=intra_threads, allow_spinning=allow_spinning)
        return open_model(find_bundle(self.bundle_root).onnx_path(), self.config, options=options)


@dataclass(frozen=True)
class Prepared:
    """One image ready for the model, or the reason it is not."""

    name: str
    array: np.ndarray | None
    error: str = ""
    quality: str | None = None


def prepare(collection: ImageCollection, name: str, model: ScoringModel) -> Prepared:
    """Read, decode and preprocess one image; failures are returned, not raised."""
    try:
        data = collection.read(name)
    except READ_ERRORS as exc:
        return Prepared(name, None, f"unreadable: {exc}")
    try:
        image = decode_for_model(data, model.config)
    except ImageError as exc:
        return Prepared(name, None, str(exc))
    array = preprocess(image, model.config)
    quality = model.detector.quality(image.size, array) if model.detector else None
    return Prepared(name, array, quality=quality)


def _judge(session: Any, model: ScoringModel, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Probabilities and (with a detector) OOD scores of a batch."""
    if model.detector is None:
        return softmax(run_logits(session, batch).astype(np.float32, copy=False)), None
    return run_judged(session, batch, model.detector)


def score(session: Any, model: ScoringModel, prepared: Sequence[Prepared]) -> list[dict[str, Any]]:
    """Rows ``path, label, predicted, confidence, probabilities, ood_score, unknown_reason,
    model_version, error`` in input order."""
    names = model.config.class_names
    good = [item for item in prepared if item.array is not None]
    probs, ood = (
        _judge(session, model, np.stack([item.array for item in good]))
        if good
        else (np.zeros((0, len(names)), dtype=np.float32), None)
    )
    scored = iter(range(len(good)))
    rows = []
    for item in prepared:
        if item.array is None:
            rows.append(_failed_row(item, model))
            continue
        k = next(scored)
        best = int(probs[k].argmax())
        reason = None if ood is None else unknown_reason(item.quality, float(ood[k]))
        rows.append(
            {
                "path": item.name,
                "label": answer_label(names[best], reason),
                "predicted": names[best],
                "confidence": float(probs[k][best]),
                "probabilities": {n: float(probs[k][j]) for j, n in enumerate(names)},
                "ood_score": None if ood is None else float(ood[k]),
                "unknown_reason": reason,
                "model_version": model.version,
                "error": item.error,
            }
        )
    return rows


def _failed_row(item: Prepared, model: ScoringModel) -> dict[str, Any]:
    return {
        "path": item.name,
        "label": "",
        "predicted": "",
        "confidence": None,
        "probabilities": {},
        "ood_score": None,
        "unknown_reason": None,
        "model_version": model.version,
        "error": item.error,
    }
