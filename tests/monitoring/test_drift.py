"""Drift detection: a reference from real training images, then in-distribution and shifted traffic.

The reference is built from 300 real training images; the live traffic is 200 *other* real images,
fed unchanged (scores must stay under the drift threshold) and shifted (grayscale, very dark,
rotated 90 degrees, a synthetic non-photo pattern): the feature each shift moves must cross it.
"""

from __future__ import annotations

import io
import json
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from catsdogs.drift import (
    DEFAULT_EXPECTED_RANGES,
    PSI_DRIFT,
    PSI_WATCH,
    DriftMonitor,
    build_reference,
    drift_status,
    image_stats,
    live_proportions,
    psi,
    stats_image,
)
from support import dataset_photos

WINDOW = 200


def _load(archive: Path, n: int, *, offset: int) -> list[Image.Image]:
    return [
        Image.open(io.BytesIO(data)).convert("RGB")
        for label in ("cat", "dog")
        for data in dataset_photos(archive, label, n, offset=offset)
    ]


@pytest.fixture(scope="module")
def reference(dataset_zip: Path) -> dict:
    return build_reference([image_stats(image) for image in _load(dataset_zip, 150, offset=0)])


@pytest.fixture(scope="module")
def live_images(dataset_zip: Path) -> list[Image.Image]:
    return _load(dataset_zip, 100, offset=5000)


def _scores(reference: dict, images: list[Image.Image], shift: Callable[[Image.Image], Image.Image]) -> dict:
    monitor = DriftMonitor(reference, window=WINDOW, min_samples=50)
    for image in images:
        monitor.update(shift(image))
    return monitor.scores()


def _pattern(index: int) -> Image.Image:
    """Another kind of picture: a flat-coloured synthetic checkerboard, nothing like a pet photo."""
    period = 4 + index % 16
    yy, xx = np.indices((200, 200))
    board = ((yy // period + xx // period) % 2 * 255).astype(np.uint8)
    rgb = np.stack([board, np.full_like(board, (index * 37) % 256), 255 - board], axis=2)
    return Image.fromarray(rgb)


@pytest.fixture(scope="module")
def baseline(reference: dict, live_images: list[Image.Image]) -> dict:
    return _scores(reference, live_images, lambda image: image)


def test_in_distribution_traffic_stays_below_the_drift_threshold(reference, baseline) -> None:
    scores = baseline
    assert set(scores) == set(reference["features"])
    assert max(scores.values()) < PSI_DRIFT, scores


def test_fixed_size_training_images_get_a_range_not_a_histogram(reference) -> None:
    # Every training image is 200x200: a histogram of a constant would flag any other size forever.
    for name in ("width", "height", "aspect_ratio"):
        entry = reference["features"][name]
        assert entry["kind"] == "range"
        assert (entry["low"], entry["high"]) == DEFAULT_EXPECTED_RANGES[name]
        assert entry["reference_value"] == (200.0 if name != "aspect_ratio" else 1.0)


def test_photos_of_another_size_do_not_alert_forever(reference, live_images) -> None:
    scores = _scores(reference, live_images[:60], lambda image: image.resize((640, 480)))
    assert scores["width"] == scores["height"] == scores["aspect_ratio"] == 0.0


def test_panoramas_push_the_aspect_ratio_out_of_range(reference, live_images) -> None:
    scores = _scores(reference, live_images[:60], lambda image: image.resize((600, 200)))
    assert scores["aspect_ratio"] == 1.0
    assert scores["width"] == 0.0


@pytest.mark.parametrize(
    ("shift", "moved"),
    [
        (lambda image: ImageOps.grayscale(image).convert("RGB"), "saturation"),
        (lambda image: image.point(lambda value: value // 5), "brightness"),
        (lambda image: image.rotate(90, expand=True), "edge_orientation"),
    ],
    ids=["grayscale", "very-dark", "rotated-90"],
)
def test_shifted_traffic_crosses_the_threshold(reference, live_images, baseline, shift, moved) -> None:
    scores = _scores(reference, live_images, shift)
    assert scores[moved] >= PSI_DRIFT, scores
    assert baseline[moved] < PSI_DRIFT
    assert drift_status(scores[moved]) == "drift"


def test_a_non_photo_pattern_crosses_the_threshold(reference) -> None:
    scores = _scores(reference, [_pattern(i) for i in range(WINDOW)], lambda image: image)
    drifting = {name for name, score in scores.items() if score >= PSI_DRIFT}
    assert {"brightness", "contrast", "sharpness"} <= drifting, scores


def test_no_score_before_min_samples(reference, live_images) -> None:
    monitor = DriftMonitor(reference, window=WINDOW, min_samples=50)
    for image in live_images[:49]:
        monitor.update(image)
    assert monitor.scores() == {}
    monitor.update(live_images[49])
    assert set(monitor.scores()) == set(reference["features"])


def test_the_window_forgets_old_traffic(reference, live_images) -> None:
    monitor = DriftMonitor(reference, window=100, min_samples=50)
    for image in live_images[:100]:
        monitor.update(image.point(lambda value: value // 5))
    assert monitor.scores()["brightness"] >= PSI_DRIFT
    for image in live_images[100:200]:
        monitor.update(image)
    assert monitor.counts()["brightness"] == 100
    assert monitor.scores()["brightness"] < PSI_DRIFT


def test_reference_is_json_serialisable(reference) -> None:
    assert json.loads(json.dumps(reference)) == reference
    assert reference["thresholds"] == {"watch": PSI_WATCH, "drift": PSI_DRIFT}


def test_a_feature_without_spread_and_without_range_is_refused() -> None:
    stats = [{"brightness": 0.1 * i, "width": 200.0} for i in range(20)]
    with pytest.raises(ValueError, match="'width' has no spread"):
        build_reference(stats, expected_ranges={})


def test_empty_reference_is_refused() -> None:
    with pytest.raises(ValueError, match="at least one reference image"):
        build_reference([])


def test_not_a_reference_is_refused() -> None:
    with pytest.raises(ValueError, match="not a drift reference"):
        DriftMonitor({"format": 1})


def test_live_proportions_add_half_a_count_per_bin() -> None:
    assert live_proportions(np.array([0, 10])) == pytest.approx([0.5 / 11, 10.5 / 11])


def test_psi_is_zero_for_identical_and_grows_with_the_shift() -> None:
    even = [0.25, 0.25, 0.25, 0.25]
    assert psi(even, even) == pytest.approx(0.0)
    assert 0 < psi(even, [0.3, 0.3, 0.2, 0.2]) < psi(even, [0.7, 0.1, 0.1, 0.1])
    # Hand-computed: (0.4-0.5)ln(0.4/0.5) + (0.6-0.5)ln(0.6/0.5) = 0.0405465
    assert psi([0.5, 0.5], [0.4, 0.6]) == pytest.approx(0.0405465, abs=1e-6)


def _probabilities(rng: np.random.Generator, n: int, dog_share: float) -> np.ndarray:
    dog = rng.random(n) < dog_share
    confidence = rng.uniform(0.6, 1.0, n)
    p_dog = np.where(dog, confidence, 1 - confidence)
    return np.stack([1 - p_dog, p_dog], axis=1)


def test_output_drift_class_mix_and_confidence(reference, live_images) -> None:
    rng = np.random.default_rng(0)
    stats = [image_stats(image) for image in live_images]
    ref = build_reference(stats, probabilities=_probabilities(rng, 400, 0.5), class_names=["cat", "dog"])
    assert ref["outputs"]["class_names"] == ["cat", "dog"]

    same = DriftMonitor(ref, window=WINDOW, min_samples=50)
    for image, probs in zip(live_images, _probabilities(rng, WINDOW, 0.5), strict=True):
        same.update(image, probs)
    assert same.scores()["predicted_class"] < PSI_WATCH
    assert same.scores()["confidence"] < PSI_DRIFT

    # A broken upstream that sends only cats, which the model sees with low confidence.
    skewed = DriftMonitor(ref, window=WINDOW, min_samples=50)
    for image in live_images:
        skewed.update(image, np.array([0.55, 0.45]))
    assert skewed.scores()["predicted_class"] >= PSI_DRIFT
    assert skewed.scores()["confidence"] >= PSI_DRIFT


def test_embedding_distance_separates_shifted_embeddings(reference) -> None:
    rng = np.random.default_rng(1)
    stats = [{"brightness": float(v)} for v in rng.random(300)]
    ref = build_reference(stats, embeddings=rng.normal(size=(300, 16)))
    image = Image.new("RGB", (64, 64), (120, 110, 100))
    near = DriftMonitor(ref, window=WINDOW, min_samples=50)
    far = DriftMonitor(ref, window=WINDOW, min_samples=50)
    for vector in rng.normal(size=(WINDOW, 16)):
        near.update(image, embedding=vector)
        far.update(image, embedding=vector + 2.0)
    assert near.scores()["embedding_distance"] < PSI_DRIFT
    assert far.scores()["embedding_distance"] >= PSI_DRIFT


def test_updates_from_many_threads_are_all_counted(reference, live_images) -> None:
    monitor = DriftMonitor(reference, window=1000, min_samples=50)

    def feed() -> None:
        for image in live_images[:50]:
            monitor.update(image)

    threads = [threading.Thread(target=feed) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert monitor.counts()["brightness"] == 200


def test_image_stats_of_a_known_image() -> None:
    stats = image_stats(Image.new("RGB", (300, 150), (255, 0, 0)))
    assert stats["width"] == 300 and stats["height"] == 150 and stats["aspect_ratio"] == 2.0
    assert stats["saturation"] == pytest.approx(1.0)
    assert stats["brightness"] == pytest.approx(0.299, abs=1e-3)
    assert stats["contrast"] == pytest.approx(0.0, abs=1e-6)
    assert stats["sharpness"] == pytest.approx(0.0, abs=1e-6)


def test_stats_of_the_reduced_copy_with_the_original_size_equal_the_full_image_stats(live_images) -> None:
    photo = live_images[0].resize((1600, 1200))
    small = stats_image(photo)
    assert max(small.size) <= 128
    assert image_stats(small) == image_stats(photo)
    assert image_stats(small.copy(), original_size=photo.size) == image_stats(photo)
    assert photo.size == (1600, 1200) and "original_size" not in photo.info


def test_the_model_input_is_not_a_substitute_for_the_upload(reference, live_images) -> None:
    # What the service must not do: feed the squashed 64x64 model input instead of the upload.
    scores = _scores(reference, live_images, lambda image: image.resize((64, 64)))
    assert scores["sharpness"] >= PSI_DRIFT
