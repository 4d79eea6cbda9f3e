"""Drift monitoring: reference statistics made at training time, compared with live traffic.

The training pipeline calls :func:`build_reference` and ships the result in the model bundle as
``drift_reference.json``; the service feeds every decoded upload (and its output probabilities) to
a :class:`DriftMonitor` and publishes :meth:`DriftMonitor.scores` as ``catsdogs_drift_score``.

Method (see ``docs/monitoring.md``):

* **Histogram features** (brightness, contrast, ...): bin edges are the reference deciles, so
  every bin holds ~10 % of the training images. The score is the Population Stability Index
  ``PSI = sum_i (a_i - e_i) * ln(a_i / e_i)`` between the live window's bin proportions ``a``
  (smoothed by half a count per bin, :func:`live_proportions`) and the reference proportions ``e``
  (floored at :data:`PSI_EPSILON`, so an empty bin gives a large but finite PSI).
  Usual reading: < 0.1 stable, 0.1-0.25 watch, >= 0.25 drift (:data:`PSI_WATCH`, :data:`PSI_DRIFT`).
* **Range features**: a feature with no spread in the training data (every image here is
  200x200, so width, height and aspect ratio are constant) cannot have a histogram: any live
  value off the single reference value would be "drift" forever. It gets a configured expected
  range instead, and its score is the fraction of the live window outside that range (0.25 means
  a quarter of the traffic is outside, the same alert threshold).
* **Model outputs**: the predicted-class mix (categorical PSI) and the confidence of the top
  class (histogram PSI), when the reference was built with probabilities.
* **Embeddings** (optional): the distance of a pooled backbone embedding to the reference mean
  embedding, as a histogram feature. The served ONNX graph outputs only logits, so the service
  has no embedding and this feature is absent there; it is kept for pipelines that do have one.

Only NumPy and Pillow are imported: the serving install runs this module.
"""

from __future__ import annotations

import logging
import math
import threading
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)

REFERENCE_FORMAT = 1
PSI_WATCH = 0.1
"""PSI at or above this: the feature moved; look at it."""
PSI_DRIFT = 0.25
"""PSI (or out-of-range fraction) at or above this: drift; the ``CatsdogsInputDrift`` alert fires."""
PSI_EPSILON = 1e-4
"""Floor for a bin proportion, so a bin that is empty on one side gives a large but finite PSI."""
LIVE_PRIOR = 0.5
"""Pseudo-count added to every bin of a live window (see :func:`live_proportions`)."""
DEFAULT_BINS = 10
STATS_MAX_SIDE = 128
"""Image statistics are computed on a copy at most this big: cheap per request, and independent
of the upload's resolution (sharpness of a 4000 px photo and of a 200 px one compare)."""

IMAGE_FEATURES: tuple[str, ...] = (
    "brightness",
    "contrast",
    "saturation",
    "sharpness",
    "edge_orientation",
    "aspect_ratio",
    "width",
    "height",
)
ORIGINAL_SIZE = "original_size"
CONFIDENCE = "confidence"
PREDICTED_CLASS = "predicted_class"
EMBEDDING_DISTANCE = "embedding_distance"

#: Expected ranges for features that may have no spread in the training data. The dataset here is
#: all 200x200: sizes from the smallest accepted upload to a large phone photo, and aspect ratios a
#: squash resize still handles (4:3 and 3:4 phone photos pass, panoramas do not).
DEFAULT_EXPECTED_RANGES: dict[str, tuple[float, float]] = {
    "width": (32.0, 8192.0),
    "height": (32.0, 8192.0),
    "aspect_ratio": (0.5, 2.0),
}


def stats_image(image: Image.Image) -> Image.Image:
    """The small RGB copy (longest side at most :data:`STATS_MAX_SIDE`) the statistics are computed on.

    The copy remembers the upload's size (``info["original_size"]``), so :func:`image_stats` of the
    copy equals :func:`image_stats` of the upload. The service makes it on its decode thread and
    drops the full-size upload at once; the drift thread computes the statistics later.
    """
    width, height = _original_size(image)
    # convert() copies even RGB input, so the caller's image is not touched; when the resize below
    # makes a new image anyway, that copy is skipped.
    small = image if image.mode == "RGB" and max(image.size) > STATS_MAX_SIDE else image.convert("RGB")
    if max(small.size) > STATS_MAX_SIDE:
        scale = STATS_MAX_SIDE / max(small.size)
        small = small.resize(
            (max(1, round(small.width * scale)), max(1, round(small.height * scale))),
            Image.Resampling.BILINEAR,
            reducing_gap=3.0,  # box-reduce first: 3x faster on phone photos, same statistics
        )
    small.info[ORIGINAL_SIZE] = (width, height)
    return small


def _original_size(image: Image.Image) -> tuple[int, int]:
    size = image.info.get(ORIGINAL_SIZE)
    return (int(size[0]), int(size[1])) if size else image.size


def image_stats(image: Image.Image, *, original_size: tuple[int, int] | None = None) -> dict[str, float]:
    """Cheap, resolution-independent statistics of one image, the inputs of drift detection.

    Args:
        image: the decoded upload, or its :func:`stats_image` copy (same result).
        original_size: ``(width, height)`` of the upload, when ``image`` is a reduced copy made
            some other way.

    Returns:
        ``brightness`` (mean luma, 0-1), ``contrast`` (luma standard deviation), ``saturation``
        (mean HSV saturation), ``sharpness`` (mean absolute Laplacian of the luma),
        ``edge_orientation`` (share of the gradient energy that is vertical: photos have more
        horizontal edges than vertical ones, so a rotated image moves it), ``aspect_ratio``
        (width / height) and the upload's ``width`` and ``height`` in pixels.
    """
    width, height = original_size or _original_size(image)
    # A stats_image copy (what the service feeds) is used as is: copying it again changes nothing.
    small = image if image.mode == "RGB" and max(image.size) <= STATS_MAX_SIDE else stats_image(image)
    rgb = np.asarray(small, dtype=np.float32) / 255.0
    luma = rgb @ np.asarray([0.299, 0.587, 0.114], dtype=np.float32)
    red, green, blue = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    # Same values as rgb.max(axis=2) / min(axis=2), which NumPy reduces slowly over a length-3 axis.
    high = np.maximum(np.maximum(red, green), blue)
    low = np.minimum(np.minimum(red, green), blue)
    saturation = np.where(high > 0, (high - low) / np.maximum(high, 1e-6), 0.0)
    laplacian = 4 * luma[1:-1, 1:-1] - luma[:-2, 1:-1] - luma[2:, 1:-1] - luma[1:-1, :-2] - luma[1:-1, 2:]
    grad_x = float(np.abs(np.diff(luma, axis=1)).mean()) if luma.shape[1] > 1 else 0.0
    grad_y = float(np.abs(np.diff(luma, axis=0)).mean()) if luma.shape[0] > 1 else 0.0
    return {
        "brightness": float(luma.mean()),
        "contrast": float(luma.std()),
        "saturation": float(saturation.mean()),
        "sharpness": float(np.abs(laplacian).mean()) if laplacian.size else 0.0,
        "edge_orientation": grad_y / (grad_x + grad_y) if grad_x + grad_y > 0 else 0.5,
        "aspect_ratio": width / height,
        "width": float(width),
        "height": float(height),
    }


def output_stats(probabilities: np.ndarray) -> tuple[int, float]:
    """The predicted class index and its probability (the confidence) of one prediction."""
    probs = np.asarray(probabilities, dtype=np.float64).reshape(-1)
    index = int(np.argmax(probs))
    return index, float(probs[index])


def _quantile_edges(values: np.ndarray, bins: int) -> list[float] | None:
    """Interior bin edges at reference quantiles, or ``None`` when the values have no spread."""
    interior = np.quantile(values, np.linspace(0.0, 1.0, bins + 1)[1:-1])
    if values.max() <= values.min():
        return None
    # Ties (many identical values) merge quantiles: fewer, still meaningful, bins.
    return [float(edge) for edge in np.unique(interior)]


def _bin_counts(values: np.ndarray, edges: Sequence[float]) -> np.ndarray:
    """Counts per bin; bins are ``(-inf, e0], (e0, e1], ..., (e_last, inf)``."""
    index = np.searchsorted(np.asarray(edges, dtype=np.float64), values, side="left")
    return np.bincount(index, minlength=len(edges) + 1).astype(np.float64)


def _histogram_entry(values: np.ndarray, bins: int) -> dict[str, Any] | None:
    edges = _quantile_edges(values, bins)
    if edges is None:
        return None
    counts = _bin_counts(values, edges)
    return {
        "kind": "histogram",
        "edges": edges,
        "proportions": (counts / counts.sum()).tolist(),
        "mean": float(values.mean()),
        "std": float(values.std()),
        "n": int(values.size),
    }


def live_proportions(counts: np.ndarray) -> np.ndarray:
    """Bin proportions of a live window, smoothed by half a count per bin (Jeffreys prior).

    A window of a few hundred images leaves some of 10 bins (nearly) empty by chance, and one
    empty bin alone adds ~0.7 to an unsmoothed PSI: smoothing keeps in-distribution windows
    under the watch threshold and barely moves a real shift (which empties most bins).
    """
    counts = np.asarray(counts, dtype=np.float64)
    return (counts + LIVE_PRIOR) / (counts.sum() + LIVE_PRIOR * counts.size)


def psi(expected: Sequence[float], actual: Sequence[float]) -> float:
    """Population Stability Index between two proportion vectors of the same bins."""
    e = np.clip(np.asarray(expected, dtype=np.float64), PSI_EPSILON, None)
    a = np.clip(np.asarray(actual, dtype=np.float64), PSI_EPSILON, None)
    e, a = e / e.sum(), a / a.sum()
    return float(np.sum((a - e) * np.log(a / e)))


def build_reference(
    stats: Sequence[Mapping[str, float]],
    *,
    probabilities: np.ndarray | None = None,
    embeddings: np.ndarray | None = None,
    class_names: Sequence[str] | None = None,
    expected_ranges: Mapping[str, Sequence[float]] | None = None,
    bins: int = DEFAULT_BINS,
) -> dict[str, Any]:
    """Reference statistics of the training data, to ship in the bundle as ``drift_reference.json``.

    Args:
        stats: :func:`image_stats` of the reference images (a few hundred to a few thousand).
        probabilities: ``(N, classes)`` model outputs on held-out images (not the training images,
            on which the model is overconfident); enables the output features.
        embeddings: ``(N, D)`` pooled backbone features; enables ``embedding_distance``.
        class_names: names of the probability columns (default ``class_0``...).
        expected_ranges: ``{feature: (low, high)}`` for features that may have no spread
            (default :data:`DEFAULT_EXPECTED_RANGES`).
        bins: histogram bins per feature (quantile bins: ~equal reference mass each).

    Raises:
        ValueError: no stats, or a feature without spread that has no expected range.
    """
    if not stats:
        raise ValueError("build_reference needs the image_stats of at least one reference image")
    ranges = dict(DEFAULT_EXPECTED_RANGES if expected_ranges is None else expected_ranges)
    features: dict[str, Any] = {}
    for name in stats[0]:
        values = np.asarray([row[name] for row in stats], dtype=np.float64)
        entry = _histogram_entry(values, bins)
        if entry is None:
            if name not in ranges:
                raise ValueError(
                    f"feature {name!r} has no spread in the reference data (always {values[0]:g}): "
                    "give it an expected range in expected_ranges, or it would alert forever"
                )
            low, high = (float(v) for v in ranges[name])
            entry = {"kind": "range", "low": low, "high": high, "reference_value": float(values[0])}
        features[name] = entry
    reference: dict[str, Any] = {
        "format": REFERENCE_FORMAT,
        "method": "psi",
        "thresholds": {"watch": PSI_WATCH, "drift": PSI_DRIFT},
        "n_images": len(stats),
        "features": features,
    }
    if probabilities is not None:
        reference["outputs"] = _output_reference(np.asarray(probabilities), class_names, bins)
    if embeddings is not None:
        reference["embedding"] = _embedding_reference(np.asarray(embeddings, dtype=np.float64), bins)
    return reference


def _output_reference(probs: np.ndarray, class_names: Sequence[str] | None, bins: int) -> dict[str, Any]:
    if probs.ndim != 2 or probs.shape[0] == 0:
        raise ValueError(f"probabilities must be a non-empty (N, classes) array, got shape {probs.shape}")
    names = list(class_names) if class_names is not None else [f"class_{i}" for i in range(probs.shape[1])]
    if len(names) != probs.shape[1]:
        raise ValueError(f"{len(names)} class names for {probs.shape[1]} probability columns")
    predicted = probs.argmax(axis=1)
    counts = np.bincount(predicted, minlength=probs.shape[1]).astype(np.float64)
    confidence = probs.max(axis=1)
    histogram = _histogram_entry(confidence, bins)
    return {
        "class_names": names,
        "class_ratio": (counts / counts.sum()).tolist(),
        # A model that is always certain has no confidence spread: then only the class mix is watched.
        CONFIDENCE: histogram,
    }


def _embedding_reference(embeddings: np.ndarray, bins: int) -> dict[str, Any]:
    if embeddings.ndim != 2 or embeddings.shape[0] < 2:
        raise ValueError(f"embeddings must be an (N >= 2, D) array, got shape {embeddings.shape}")
    mean = embeddings.mean(axis=0)
    distances = np.linalg.norm(embeddings - mean, axis=1)
    histogram = _histogram_entry(distances, bins)
    if histogram is None:
        raise ValueError("all reference embeddings are identical: the backbone output is broken")
    return {"dim": int(embeddings.shape[1]), "mean": mean.tolist(), EMBEDDING_DISTANCE: histogram}


class DriftMonitor:
    """Sliding windows of live statistics and their drift scores against a reference.

    Thread-safe: the service's request handlers call :meth:`update` concurrently and the metrics
    collector calls :meth:`scores`.
    """

    def __init__(self, reference: Mapping[str, Any], *, window: int = 500, min_samples: int = 200) -> None:
        """
        Args:
            reference: the dict :func:`build_reference` made (``drift_reference.json``).
            window: live samples kept per feature (the most recent ones).
            min_samples: a feature gets a score only once its window holds this many samples.
                PSI of a small window is noise: measured on real in-distribution images, the
                highest of the feature scores reaches 0.25 in ~70 % of 50-image windows, ~15 % of
                100-image windows and none of 40 200-image windows (docs/monitoring.md).
        """
        if window < 1 or not 1 <= min_samples <= window:
            raise ValueError(f"need window >= 1 and 1 <= min_samples <= window, got {window}, {min_samples}")
        if "features" not in reference:
            raise ValueError("not a drift reference: it has no 'features' (build it with build_reference)")
        self.reference = reference
        self.window = window
        self.min_samples = min_samples
        self._features: dict[str, Mapping[str, Any]] = dict(reference["features"])
        outputs = reference.get("outputs")
        self._class_ratio: list[float] | None = outputs["class_ratio"] if outputs else None
        if outputs and outputs.get(CONFIDENCE):
            self._features[CONFIDENCE] = outputs[CONFIDENCE]
        embedding = reference.get("embedding")
        self._embedding_mean = np.asarray(embedding["mean"]) if embedding else None
        if embedding:
            self._features[EMBEDDING_DISTANCE] = embedding[EMBEDDING_DISTANCE]
        self._values: dict[str, deque[float]] = {name: deque(maxlen=window) for name in self._features}
        if self._class_ratio is not None:
            self._values[PREDICTED_CLASS] = deque(maxlen=window)
        self._lock = threading.Lock()

    @property
    def features(self) -> tuple[str, ...]:
        """Every feature this monitor can score (the ``feature`` label values)."""
        return tuple(self._values)

    def update(
        self,
        image: Image.Image,
        probabilities: np.ndarray | None = None,
        *,
        original_size: tuple[int, int] | None = None,
        embedding: np.ndarray | None = None,
    ) -> None:
        """Add one live image (and, if given, the model's probabilities and embedding for it).

        Pass the decoded upload or its :func:`stats_image` copy: never the model input, whose fixed
        size and resampling hide size drift and move sharpness.
        """
        stats = image_stats(image, original_size=original_size)
        sample: dict[str, float] = {k: v for k, v in stats.items() if k in self._values}
        if probabilities is not None and (CONFIDENCE in self._values or PREDICTED_CLASS in self._values):
            index, confidence = output_stats(probabilities)
            sample[CONFIDENCE] = confidence
            sample[PREDICTED_CLASS] = float(index)
        if embedding is not None and self._embedding_mean is not None:
            vector = np.asarray(embedding, dtype=np.float64).reshape(-1)
            sample[EMBEDDING_DISTANCE] = float(np.linalg.norm(vector - self._embedding_mean))
        with self._lock:
            for name, value in sample.items():
                if name in self._values:
                    self._values[name].append(value)

    def counts(self) -> dict[str, int]:
        """Live samples currently in each feature's window."""
        with self._lock:
            return {name: len(values) for name, values in self._values.items()}

    def scores(self) -> dict[str, float]:
        """Drift score per feature whose window holds at least ``min_samples`` samples.

        Histogram features: PSI; range features: fraction of the window outside the range;
        ``predicted_class``: categorical PSI of the predicted-class mix. Compare with
        :data:`PSI_WATCH` and :data:`PSI_DRIFT`.
        """
        with self._lock:
            windows = {name: np.asarray(values) for name, values in self._values.items()}
        result: dict[str, float] = {}
        for name, values in windows.items():
            if values.size < self.min_samples:
                continue
            result[name] = self._score(name, values)
        return result

    def _score(self, name: str, values: np.ndarray) -> float:
        if name == PREDICTED_CLASS:
            assert self._class_ratio is not None
            counts = np.bincount(values.astype(np.int64), minlength=len(self._class_ratio))
            return psi(self._class_ratio, live_proportions(counts[: len(self._class_ratio)]))
        entry = self._features[name]
        if entry["kind"] == "range":
            outside = (values < entry["low"]) | (values > entry["high"])
            return float(outside.mean())
        return psi(entry["proportions"], live_proportions(_bin_counts(values, entry["edges"])))


def drift_status(score: float) -> str:
    """``ok``, ``watch`` or ``drift`` for a score, by the documented thresholds."""
    if math.isnan(score) or score < PSI_WATCH:
        return "ok"
    return "watch" if score < PSI_DRIFT else "drift"
