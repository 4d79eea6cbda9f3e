"""The unknown detector's parts on synthetic data: the density, the calibration, the quality checks."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from catsdogs import CatsdogsError
from catsdogs.ood import (
    REASON_FLAT,
    REASON_NOISE,
    REASON_SMALL,
    REASON_UNFAMILIAR,
    FeatureDensity,
    UnknownDetector,
    answer_label,
    calibrate_threshold,
    fit_density,
    quality_reason,
    unknown_reason,
)
from catsdogs.preprocessing import PreprocessConfig, preprocess

RNG = np.random.default_rng(7)


def _two_classes(n: int, dim: int = 64) -> tuple[np.ndarray, np.ndarray]:
    labels = np.arange(n) % 2
    centres = np.stack([np.full(dim, -1.0), np.full(dim, 1.0)])
    return centres[labels] + RNG.normal(size=(n, dim)), labels


def test_the_distance_is_about_one_in_distribution_and_large_far_from_it() -> None:
    features, labels = _two_classes(2000)
    density = fit_density(features, labels, components=16)
    inside, _ = _two_classes(500)
    assert 0.8 < float(np.median(density.distance(inside))) < 1.3
    far = inside + 6.0 * RNG.normal(size=inside.shape)  # off the training distribution
    assert float(np.min(density.distance(far))) > float(np.percentile(density.distance(inside), 99.9))


def test_the_directions_are_capped_at_a_quarter_of_the_images() -> None:
    features, labels = _two_classes(40)
    assert fit_density(features, labels, components=256).components.shape == (64, 10)


def test_fitting_needs_two_images_per_class() -> None:
    with pytest.raises(CatsdogsError, match="at least two images per class"):
        fit_density(np.zeros((3, 4)), np.array([0, 1, 1]), components=2)


def test_the_threshold_is_the_split_conformal_rank() -> None:
    scores = np.arange(1, 1001, dtype=float)  # 1..1000
    assert calibrate_threshold(scores, false_unknown_rate=0.01) == 991.0  # ceil(1001 * 0.99) = 991st
    assert calibrate_threshold(scores[:50], false_unknown_rate=0.01) == 50.0  # too few: the largest
    with pytest.raises(CatsdogsError):
        calibrate_threshold(np.array([np.nan]), false_unknown_rate=0.01)


def test_new_scores_from_the_same_distribution_cross_the_threshold_at_about_the_rate() -> None:
    threshold = calibrate_threshold(RNG.normal(size=5000), false_unknown_rate=0.01)
    assert 0.005 < float((RNG.normal(size=20000) > threshold).mean()) < 0.015


def _array(pixels: np.ndarray) -> np.ndarray:
    config = PreprocessConfig(image_size=128)
    return preprocess(Image.fromarray(pixels.astype(np.uint8)), config)


def test_quality_flags_tiny_flat_and_noise_images_and_passes_a_smooth_one() -> None:
    floors = {"min_side": 64, "flat_std": 0.02, "min_smoothness": 0.6}
    gradient = np.linspace(0, 255, 200)[None, :, None] * np.ones((150, 1, 3))
    noise = RNG.integers(0, 256, (150, 200, 3))
    flat = np.full((150, 200, 3), (200, 40, 90))
    assert quality_reason((200, 150), _array(gradient), **floors) is None
    assert quality_reason((200, 150), _array(noise), **floors) == REASON_NOISE
    assert quality_reason((200, 150), _array(flat), **floors) == REASON_FLAT
    assert quality_reason((48, 150), _array(gradient), **floors) == REASON_SMALL


def test_a_quality_reason_comes_first_then_the_score_decides() -> None:
    assert unknown_reason(REASON_FLAT, 0.1) == REASON_FLAT
    assert unknown_reason(None, 1.01) == REASON_UNFAMILIAR
    assert unknown_reason(None, 0.99) is None
    assert answer_label("cat", None) == "cat" and answer_label("cat", REASON_NOISE) == "unknown"


def test_the_score_is_the_worse_signal_over_its_threshold() -> None:
    features, labels = _two_classes(400)
    density = fit_density(features, labels, components=8)
    detector = UnknownDetector(
        density, distance_threshold=2.0, pet_mass_floor=0.1, min_side=64, flat_std=0.02
    )
    distance = density.distance(features[:2])
    scores = detector.scores(features[:2], np.array([1.0, 0.01]))
    assert scores[0] == pytest.approx(distance[0] / 2.0)  # the pet mass is no concern
    assert scores[1] == pytest.approx(max(distance[1] / 2.0, 10.0))  # 0.1 / 0.01: ten times past


def test_a_density_with_mismatched_shapes_is_refused(tmp_path) -> None:
    features, labels = _two_classes(100, dim=8)
    density = fit_density(features, labels, components=4)
    bad = FeatureDensity(density.mean[:4], density.class_means, density.components, density.variances, 1.0)
    bad.save(tmp_path / "ood.npz")
    with pytest.raises(CatsdogsError, match="do not fit together"):
        FeatureDensity.load(tmp_path / "ood.npz")
