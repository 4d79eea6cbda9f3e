"""One chunk of images through the model: the code both engines run.

Each image is decoded by :func:`catsdogs.preprocessing.decode_for_model` (the decode of serving and
evaluation) and preprocessed with the bundle's own config; a file that cannot be read or decoded
becomes a row with an ``error``, never a failed job. Probabilities are the softmax of the graph's
logits in float32, as the service computes them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from catsdogs.batch.collection import READ_ERRORS, ImageCollection
from catsdogs.bundle import find_bundle
from catsdogs.preprocessing import ImageError, PreprocessConfig, decode_for_model, preprocess, softmax
from catsdogs.runtime import open_model, run_logits, session_options


@dataclass(frozen=True)
class ScoringModel:
    """What a job scores with; small and picklable, so it travels to Ray actors."""

    bundle_root: Path
    version: str
    config: PreprocessConfig

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


def prepare(collection: ImageCollection, name: str, config: PreprocessConfig) -> Prepared:
    """Read, decode and preprocess one image; failures are returned, not raised."""
    try:
        data = collection.read(name)
    except READ_ERRORS as exc:
        return Prepared(name, None, f"unreadable: {exc}")
    try:
        return Prepared(name, preprocess(decode_for_model(data, config), config))
    except ImageError as exc:
        return Prepared(name, None, str(exc))


def score(session: Any, model: ScoringModel, prepared: Sequence[Prepared]) -> list[dict[str, Any]]:
    """Rows ``path, label, confidence, probabilities, model_version, error`` in input order."""
    names = model.config.class_names
    good = [item for item in prepared if item.array is not None]
    probs = (
        softmax(run_logits(session, np.stack([item.array for item in good])).astype(np.float32, copy=False))
        if good
        else np.zeros((0, len(names)), dtype=np.float32)
    )
    scored = iter(probs)
    rows = []
    for item in prepared:
        p = next(scored) if item.array is not None else None
        best = int(p.argmax()) if p is not None else -1
        rows.append(
            {
                "path": item.name,
                "label": names[best] if p is not None else "",
                "confidence": float(p[best]) if p is not None else None,
                "probabilities": {n: float(p[k]) for k, n in enumerate(names)} if p is not None else {},
                "model_version": model.version,
                "error": item.error,
            }
        )
    return rows
