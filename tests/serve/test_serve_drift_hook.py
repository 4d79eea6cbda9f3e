"""The drift hook: each prediction's model-input image and probabilities reach the drift window,
and its scores are exported as ``catsdogs_drift_score{feature}`` (the drift math is monitor's)."""

from __future__ import annotations

import io
import re
import time
from pathlib import Path

import numpy as np
from fastapi.testclient import TestClient
from PIL import Image

from catsdogs.bundle import ModelBundle
from catsdogs.serve.app import create_app
from catsdogs.settings import Settings


class RecordingWindow:
    """A drift window that counts what it is fed and reports the mean brightness it saw."""

    def __init__(self) -> None:
        self.seen: list[tuple[tuple[int, int], int, np.ndarray]] = []

    def update(self, image: Image.Image, probabilities: np.ndarray) -> None:
        self.seen.append((image.info["original_size"], max(image.size), np.asarray(probabilities)))

    def scores(self) -> dict[str, float]:
        return {"images_seen": float(len(self.seen))}


def test_predictions_feed_the_drift_window_and_scores_are_exported(
    settings: Settings, bundle_a: Path, images: list[tuple[str, str, bytes]]
) -> None:
    windows: list[RecordingWindow] = []

    def factory(bundle: ModelBundle) -> RecordingWindow:
        windows.append(RecordingWindow())
        return windows[-1]

    app = create_app(settings.model_copy(update={"model_uri": str(bundle_a)}), drift_factory=factory)
    with TestClient(app) as client:
        from serve_testing import wait_ready

        wait_ready(client)
        for name, _, data in images[:5]:
            assert client.post("/predict", files={"file": (name, data)}).status_code == 200
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and len(windows[0].seen) < 5:
            time.sleep(0.02)
        metrics = client.get("/metrics").text
    assert len(windows[0].seen) == 5
    # A small copy of the upload itself (not the model input), remembering the upload's size.
    upload_sizes = sorted(Image.open(io.BytesIO(data)).size for _, _, data in images[:5])
    assert sorted(original for original, _, _ in windows[0].seen) == upload_sizes
    assert all(side <= 128 for _, side, _ in windows[0].seen)
    assert all(probs.shape == (2,) and abs(probs.sum() - 1) < 1e-5 for _, _, probs in windows[0].seen)
    assert re.search(r'^catsdogs_drift_score\{feature="images_seen"\} 5.0$', metrics, re.M)


def test_without_a_drift_reference_nothing_is_fed(client: TestClient, cat_jpeg: bytes) -> None:
    client.post("/predict", files={"file": ("c.jpg", cat_jpeg)})
    assert "catsdogs_drift_score{" not in client.get("/metrics").text


def test_default_factory_needs_a_reference(bundle_a: Path) -> None:
    from catsdogs.serve.drift import default_window_factory

    assert default_window_factory(ModelBundle(bundle_a)) is None


def test_scores_are_published_once_per_interval_not_per_image() -> None:
    """Scoring a window costs more than updating it: a burst is scored about once per interval, and
    the last update is published when the interval ends even if no more traffic comes."""
    from catsdogs.serve.drift import DriftFeed

    class CountingWindow(RecordingWindow):
        def __init__(self) -> None:
            super().__init__()
            self.scored = 0

        def scores(self) -> dict[str, float]:
            self.scored += 1
            return super().scores()

    published: list[dict[str, float]] = []
    feed = DriftFeed(published.append, publish_interval_s=0.5)
    window = CountingWindow()
    feed.set_window(window)
    image = Image.new("RGB", (64, 48))
    image.info["original_size"] = (640, 480)
    try:
        for _ in range(100):
            feed.offer(image, np.array([0.3, 0.7]))
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not (published and published[-1]["images_seen"] == 100):
            time.sleep(0.02)
        assert published and published[-1] == {"images_seen": 100.0}
        assert window.scored <= 3
    finally:
        feed.stop()


def test_after_the_window_is_filled_uploads_are_sampled_at_the_configured_rate() -> None:
    from catsdogs.serve.drift import DriftFeed

    feed = DriftFeed(lambda scores: None, max_images_per_s=2.0, fill=3)
    assert not feed.wants_sample()  # no drift reference: nothing to feed
    feed.set_window(RecordingWindow())
    try:
        assert [feed.wants_sample() for _ in range(6)] == [True] * 3 + [False] * 3
        time.sleep(0.55)
        assert [feed.wants_sample() for _ in range(2)] == [True, False]
        feed.set_window(RecordingWindow())  # a new model fills its new window again
        assert [feed.wants_sample() for _ in range(3)] == [True] * 3
    finally:
        feed.stop()
