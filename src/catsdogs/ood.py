"""Out-of-distribution answers: is an upload a photo of a cat or a dog at all?

A classifier that must pick ``cat`` or ``dog`` answers a rabbit, a sofa or a screenshot with high
confidence. Three signals turn such uploads into ``unknown``, none needing another model:

* **unfamiliar features**: the Mahalanobis distance of the model's pooled features to the nearest
  class mean of its training images. The covariance is a probabilistic PCA (the ``k`` main
  directions of the within-class scatter, isotropic variance for the rest), which stays
  well-conditioned with fewer images than feature dimensions and costs ``D·k`` multiply-adds per
  image. The threshold is calibrated on the validation split for a target false-``unknown`` rate;
* **flat images**: blank or single-colour uploads (pixel standard deviation under a floor);
* **tiny images**: under ``unknown_min_side`` pixels on a side (the service refuses still smaller);
* **noise**: neighbouring pixels that do not correlate, as no photo's do.

Only NumPy is needed: serving, evaluation and training share this one definition.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from catsdogs import CatsdogsError

OOD_FORMAT = 1
REASON_UNFAMILIAR = "unfamiliar"
REASON_FLAT = "flat_image"
REASON_SMALL = "too_small"
REASON_NOISE = "noise"
UNKNOWN = "unknown"
"""The label of an answer that is neither class."""


@dataclass(frozen=True)
class FeatureDensity:
    """Where a model's training images lie in its feature space (fitted by :func:`fit_density`)."""

    mean: np.ndarray
    """(D,) mean of the training features."""
    class_means: np.ndarray
    """(C, D) class means, relative to ``mean``."""
    components: np.ndarray
    """(D, k) main directions of the within-class scatter (orthonormal columns)."""
    variances: np.ndarray
    """(k,) the scatter's variance along each direction."""
    residual_variance: float
    """The variance of every other direction (the mean of the remaining eigenvalues)."""

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])

    def distance(self, features: np.ndarray) -> np.ndarray:
        """(N, D) features → (N,) squared Mahalanobis distance to the nearest class mean, divided by D
        (about 1 for the training distribution, whatever the feature width)."""
        fast = self._float32
        centred = features.astype(np.float32, copy=False) - fast["mean"]
        projected = centred @ fast["components"]  # (N, k)
        squared = np.einsum("nd,nd->n", centred, centred)
        cross = centred @ fast["class_means"].T  # (N, C)
        best = np.full(len(features), np.inf, dtype=np.float32)
        for c in range(len(fast["class_means"])):
            inside = projected - fast["class_projected"][c]
            total = squared - 2 * cross[:, c] + fast["class_norms"][c]
            residual = np.maximum(total - np.einsum("nk,nk->n", inside, inside), 0.0)
            mahalanobis = (inside * inside) @ fast["inverse_variances"] + residual / self.residual_variance
            best = np.minimum(best, mahalanobis)
        return best.astype(np.float64) / self.dim

    @functools.cached_property
    def _float32(self) -> dict[str, np.ndarray]:
        """The arrays a request uses, once, in float32 (half the bytes to read per request; the
        distances agree with float64 to 1e-5)."""
        class_means = self.class_means.astype(np.float32)
        components = self.components.astype(np.float32)
        return {
            "mean": self.mean.astype(np.float32),
            "components": components,
            "class_means": class_means,
            "class_projected": class_means @ components,
            "class_norms": np.einsum("cd,cd->c", class_means, class_means),
            "inverse_variances": (1.0 / self.variances).astype(np.float32),
        }

    def save(self, path: Path) -> None:
        """Arrays only (``np.load(allow_pickle=False)`` reads them back: no code in the file)."""
        from catsdogs.files import atomic_path

        with atomic_path(path, suffix=".npz") as tmp, tmp.open("wb") as handle:
            np.savez(
                handle,
                format_version=np.asarray(OOD_FORMAT),
                mean=self.mean.astype(np.float32),
                class_means=self.class_means.astype(np.float32),
                components=self.components.astype(np.float32),
                variances=self.variances.astype(np.float64),
                residual_variance=np.asarray(self.residual_variance, np.float64),
            )

    @classmethod
    def load(cls, path: Path) -> FeatureDensity:
        try:
            with np.load(path, allow_pickle=False) as arrays:
                if int(arrays["format_version"]) != OOD_FORMAT:
                    raise CatsdogsError(f"{path}: unknown format {int(arrays['format_version'])}")
                density = cls(
                    mean=arrays["mean"].astype(np.float64),
                    class_means=arrays["class_means"].astype(np.float64),
                    components=arrays["components"].astype(np.float64),
                    variances=arrays["variances"],
                    residual_variance=float(arrays["residual_variance"]),
                )
        except (OSError, KeyError, ValueError) as exc:
            raise CatsdogsError(f"{path} is not a feature density file: {exc}") from None
        d, k = density.components.shape
        if density.mean.shape != (d,) or density.class_means.shape[1] != d or density.variances.shape != (k,):
            raise CatsdogsError(f"{path}: the arrays' shapes do not fit together")
        return density


def fit_density(features: np.ndarray, labels: np.ndarray, *, components: int) -> FeatureDensity:
    """Fit class means and a probabilistic-PCA within-class covariance to training features."""
    n, d = features.shape
    classes = np.unique(labels)
    if n < 2 * len(classes) or len(classes) < 1:
        raise CatsdogsError(f"fitting the feature density needs at least two images per class, not {n}")
    x = features.astype(np.float64)
    mean = x.mean(0)
    centred = x - mean
    class_means = np.stack([centred[labels == c].mean(0) for c in classes])
    within = centred - class_means[np.searchsorted(classes, labels)]
    _, singular, vt = np.linalg.svd(within, full_matrices=False)
    eigen = singular**2 / max(n - len(classes), 1)
    total = float(eigen.sum())
    # A quarter of the images at most: directions estimated from fewer are mostly noise.
    k = max(1, min(components, n // 4, d - 1))
    rest = d - k
    residual = (total - float(eigen[:k].sum())) / rest if rest else 0.0
    floor = max(total / d, 1e-12) * 1e-3  # directions the training images never varied in
    residual = max(residual, floor)
    return FeatureDensity(
        mean=mean,
        class_means=class_means,
        components=vt[:k].T.copy(),
        variances=eigen[:k] + residual,
        residual_variance=residual,
    )


def calibrate_threshold(scores: np.ndarray, *, false_unknown_rate: float) -> float:
    """The distance above which an answer is ``unknown``, from in-distribution (validation) scores.

    The ``⌈(n + 1)(1 − rate)⌉``-th smallest score: the split-conformal rank, so a new image from
    the same distribution exceeds it with probability at most ``rate`` (the largest score when
    there are too few images for that guarantee).
    """
    finite = np.sort(scores[np.isfinite(scores)])
    if not len(finite):
        raise CatsdogsError("calibrating the unknown threshold needs validation images")
    rank = math.ceil((len(finite) + 1) * (1 - false_unknown_rate))
    return float(finite[min(rank, len(finite)) - 1])


def quality_reason(
    size: tuple[int, int], array: np.ndarray, *, min_side: int, flat_std: float, min_smoothness: float
) -> str | None:
    """Why an image cannot be judged at all (too small, flat, noise), or ``None``.

    ``size`` is the decoded image's (width, height); ``array`` the model input (C, H, W) it became.
    Flat: no channel varies by more than ``flat_std`` (in the model's normalised units). Noise:
    horizontally neighbouring pixels correlate less than ``min_smoothness`` (photos correlate
    strongly: at least 0.89 on 1,500 validation photos; white noise about 0, Gaussian noise saved as
    JPEG about 0.35). Both on every fourth row of the input (true neighbours within a row): under
    0.1 ms.
    """
    if min(size) < min_side:
        return REASON_SMALL
    sample = array[:, ::4, :]
    spread = sample.reshape(sample.shape[0], -1).std(1)
    if float(spread.max()) < flat_std:
        return REASON_FLAT
    channel = sample[int(np.argmax(spread))]
    left, right = channel[:, :-1].ravel(), channel[:, 1:].ravel()
    left, right = left - left.mean(), right - right.mean()
    norm = float(np.sqrt((left @ left) * (right @ right)))
    if norm > 0 and float(left @ right) / norm < min_smoothness:
        return REASON_NOISE
    return None


@dataclass(frozen=True)
class UnknownDetector:
    """A model's feature density, its calibrated thresholds and the quality floors it was calibrated
    with (all from the bundle: ``ood.npz`` and ``metadata.json``'s ``ood`` record)."""

    density: FeatureDensity
    distance_threshold: float
    pet_mass_floor: float | None
    """Below it the backbone's ImageNet head sees no cat or dog (``None``: a graph without that output)."""
    min_side: int
    flat_std: float
    min_smoothness: float = 0.0

    @classmethod
    def from_record(cls, density: FeatureDensity, record: dict) -> UnknownDetector:
        floor = record.get("pet_mass_floor")
        return cls(
            density,
            distance_threshold=float(record["distance_threshold"]),
            pet_mass_floor=None if floor is None else float(floor),
            min_side=int(record["min_side"]),
            flat_std=float(record["flat_std"]),
            min_smoothness=float(record.get("min_smoothness", 0.0)),
        )

    def quality(self, size: tuple[int, int], array: np.ndarray) -> str | None:
        """Why an image cannot be judged (:func:`quality_reason`), or ``None``."""
        return quality_reason(
            size, array, min_side=self.min_side, flat_std=self.flat_std, min_smoothness=self.min_smoothness
        )

    def scores(self, features: np.ndarray, pet_mass: np.ndarray | None) -> np.ndarray:
        """OOD scores: how far past its threshold the worse of the two signals is (above 1: unfamiliar)."""
        scores = self.density.distance(features) / self.distance_threshold
        if self.pet_mass_floor is not None and pet_mass is not None:
            scores = np.maximum(scores, self.pet_mass_floor / np.maximum(pet_mass, 1e-6))
        return scores

    def judge(
        self, features: np.ndarray, pet_mass: np.ndarray | None, quality: list[str | None]
    ) -> tuple[np.ndarray, list[str | None]]:
        """OOD scores and, per image, why it is ``unknown`` (a quality reason first) or ``None``."""
        scores = self.scores(features, pet_mass)
        return scores, [unknown_reason(reason, score) for reason, score in zip(quality, scores, strict=True)]


def run_judged(session: Any, batch: np.ndarray, detector: UnknownDetector) -> tuple[np.ndarray, np.ndarray]:
    """One pass of a model graph: float32 probabilities and the detector's OOD scores (never the
    activation maps, which only ``/explain`` asks for)."""
    from catsdogs.preprocessing import softmax
    from catsdogs.runtime import FEATURES_NAME, OUTPUT_NAME, PET_MASS_NAME, output_names, run_named

    available = output_names(session)
    names = [name for name in (OUTPUT_NAME, FEATURES_NAME, PET_MASS_NAME) if name in available]
    out = run_named(session, batch, names)
    probabilities = softmax(out[OUTPUT_NAME].astype(np.float32, copy=False))
    return probabilities, detector.scores(out[FEATURES_NAME], out.get(PET_MASS_NAME))


def unknown_reason(quality: str | None, score: float) -> str | None:
    """Why an answer is ``unknown``: a quality reason first, else an OOD score above 1, else ``None``."""
    if quality is not None:
        return quality
    return REASON_UNFAMILIAR if score > 1.0 else None


def answer_label(predicted: str, reason: str | None) -> str:
    """The label a caller sees: the predicted class, or ``unknown`` when there is a reason for it."""
    return predicted if reason is None else UNKNOWN
