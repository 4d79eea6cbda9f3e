"""The hook where per-image drift statistics are fed (the math lives in :mod:`catsdogs.drift`).

A drift window has ``update(image: PIL.Image.Image, probabilities) -> None`` and
``scores() -> dict[str, float]``, and is fed the *upload* (or its small statistics copy,
:func:`catsdogs.drift.stats_image`), not the model input. :func:`default_window_factory` builds a
:class:`catsdogs.drift.DriftMonitor` from the bundle's ``drift_reference.json`` when it has one
(tests pass other factories). The small copy is made on the decode thread (the full-size
upload is dropped at once); updates run on one background thread through a bounded queue, so drift
statistics never slow a prediction down (they are dropped under overload). Once ``fill`` uploads
have filled a new model's window, at most ``max_images_per_s`` are fed, evenly spaced in time: a
window of recent images describes the traffic as well, at a fraction of the CPU. Scores are recomputed
when ``/metrics`` is scraped and at most once per ``publish_interval_s`` in the background (for the
other workers' scrapes), not per image: scoring every window costs more than updating it.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
from PIL import Image

from catsdogs.bundle import ModelBundle
from catsdogs.drift import DriftMonitor

logger = logging.getLogger(__name__)


class DriftWindow(Protocol):
    def update(self, image: Image.Image, probabilities: Any) -> None: ...

    def scores(self) -> dict[str, float]: ...


DriftWindowFactory = Callable[[ModelBundle], DriftWindow | None]


def default_window_factory(bundle: ModelBundle) -> DriftWindow | None:
    """A :class:`catsdogs.drift.DriftMonitor` for bundles that ship a drift reference, else ``None``."""
    reference = bundle.drift_reference
    if not reference:
        return None
    try:
        return DriftMonitor(reference)
    except Exception:  # a broken reference costs the drift scores, never the service
        logger.exception("could not build the drift window from %s", bundle.root)
        return None


class DriftFeed:
    """Feeds (model-input image, probabilities) pairs to the drift window off the request path."""

    def __init__(
        self,
        publish: Callable[[dict[str, float]], None],
        *,
        capacity: int = 256,
        publish_interval_s: float = 1.0,
        max_images_per_s: float = 0.0,
        fill: int = 0,
    ) -> None:
        self._publish = publish
        self._min_gap_s = 1.0 / max_images_per_s if max_images_per_s > 0 else 0.0
        self._fill = fill
        self._fed = 0
        self._sampled_at = -float("inf")
        self._sample_lock = threading.Lock()
        self._queue: queue.Queue[tuple[Image.Image, np.ndarray] | None] = queue.Queue(capacity)
        self._window: DriftWindow | None = None
        self._publish_interval_s = publish_interval_s
        self._thread: threading.Thread | None = None

    @property
    def active(self) -> bool:
        return self._window is not None

    def set_window(self, window: DriftWindow | None) -> None:
        """A new model brings its own reference: start a fresh window."""
        self._window = window
        self._fed = 0
        if window is not None and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="catsdogs-drift", daemon=True)
            self._thread.start()

    def wants_sample(self) -> bool:
        """Whether this upload should feed the drift window (decide before making its small copy)."""
        if self._window is None:
            return False
        if self._min_gap_s <= 0:
            return True
        now = time.monotonic()
        with self._sample_lock:
            if self._fed >= self._fill and now - self._sampled_at < self._min_gap_s:
                return False
            self._fed += 1
            self._sampled_at = now
            return True

    def offer(self, image: Image.Image, probabilities: np.ndarray) -> None:
        """Queue one observation; dropped when the drift thread is behind."""
        if self._window is None:
            return
        with contextlib.suppress(queue.Full):
            self._queue.put_nowait((image, probabilities))

    def publish_now(self) -> None:
        """Recompute and publish the scores (the ``/metrics`` route calls this before rendering)."""
        window = self._window
        if window is None:
            return
        try:
            self._publish(window.scores())
        except Exception:
            logger.exception("drift scores failed")

    def _run(self) -> None:
        published_at, pending = time.monotonic(), False
        while True:
            # With updates not yet published, wake up when the interval is over even without traffic.
            timeout = (
                max(0.0, published_at + self._publish_interval_s - time.monotonic()) if pending else None
            )
            item: tuple[Image.Image, np.ndarray] | tuple[()] | None
            try:
                item = self._queue.get(timeout=timeout)
            except queue.Empty:
                item = ()  # the interval is over and nothing new came: publish what is pending
            if item is None:
                return
            window = self._window
            if window is None:
                continue
            if item:
                try:
                    window.update(item[0], item[1])
                    pending = True
                except Exception:
                    logger.exception("drift window update failed")
            if pending and time.monotonic() - published_at >= self._publish_interval_s:
                self.publish_now()
                published_at, pending = time.monotonic(), False

    def stop(self) -> None:
        if self._thread is not None:
            try:
                self._queue.put(None, timeout=1)
            except queue.Full:
                return
            self._thread.join(timeout=5)
