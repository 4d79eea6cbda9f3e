"""Shadow testing: a share of live requests also scored by a second model, off the request path.

With ``shadow_fraction`` > 0, the model at ``shadow_model_uri`` (the registry's ``challenger`` by
default) is loaded and polled like the served one. After a prediction is answered, that fraction
of uploads is handed to one background thread that decodes the upload for the shadow model's own
preprocessing, runs it on one intra-op thread and keeps the result in the feedback store (so counts
add up across replicas and restarts, and ``/feedback`` labels join both models' answers). The
answer never waits for it: when the thread is busy the sample is skipped (counted), and a shadow
failure is a counted log line, never an error for the caller. ``catsdogs promote --require-shadow
N`` reads the store.
"""

from __future__ import annotations

import logging
import os
import random
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from catsdogs.feedback.store import FeedbackStore, ShadowRecord
from catsdogs.preprocessing import ImageBytes, resize, to_array
from catsdogs.runtime import single_threaded_blas
from catsdogs.serve.feedback import PredictionSigner
from catsdogs.serve.metrics import Metrics
from catsdogs.serve.model_store import ModelStore
from catsdogs.serve.predictor import decode_upload
from catsdogs.settings import Settings

logger = logging.getLogger(__name__)

#: Uploads waiting for (or in) the shadow thread; past this, samples are skipped, not queued.
MAX_PENDING = 2


def shadow_settings(settings: Settings) -> Settings:
    """The served settings, pointed at the shadow model, on one thread and no second session: the
    shadow must leave the cores to the answers."""
    return settings.model_copy(
        update={
            "model_uri": settings.shadow_model_uri,
            "ort_intra_threads": 1,
            "ort_lone_request_all_cores": False,
            "batch_max_size": 1,
            "serve_int8": False,
        }
    )


SHADOW_NICENESS = 19
"""The shadow thread's scheduling priority (Linux niceness of that one thread): under full load the
answers keep the cores and the shadow takes what is left (its skipped samples are counted)."""


def _background_thread() -> None:
    """The shadow pool's thread: lowest CPU priority (its ORT session runs in it: one intra-op
    thread) and NumPy's BLAS on one thread."""
    single_threaded_blas()
    try:  # Linux: a thread id as the "process" of setpriority changes that thread alone
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), SHADOW_NICENESS)
    except (AttributeError, OSError) as exc:  # other systems: run at normal priority
        logger.info("shadow thread priority unchanged: %s", exc)


class ShadowScorer:
    """Scores sampled uploads with the shadow model and records them; see the module docstring."""

    def __init__(
        self, settings: Settings, *, metrics: Metrics, feedback_log: FeedbackStore, signer: PredictionSigner
    ) -> None:
        self.settings = settings
        self._signer = signer
        self.fraction = settings.shadow_fraction
        self.store = ModelStore(shadow_settings(settings))
        self._metrics = metrics
        self._log = feedback_log
        self._pool = ThreadPoolExecutor(
            1, thread_name_prefix="catsdogs-shadow", initializer=_background_thread
        )
        self._pending = threading.BoundedSemaphore(MAX_PENDING)
        self._random = random.Random()  # noqa: S311 (sampling, not security)

    def start(self) -> None:
        self.store.start()

    def stop(self) -> None:
        self.store.stop()
        self._pool.shutdown(wait=True)

    def offer(
        self, data: ImageBytes, *, prediction_id: str, champion_version: str, champion_label: str
    ) -> None:
        """Maybe score this upload later (never blocks, never raises)."""
        if self._random.random() >= self.fraction or self.store.current is None:
            return
        if not self._pending.acquire(blocking=False):
            self._metrics.shadow_skipped.inc()
            return
        future = self._pool.submit(self._score, data, prediction_id, champion_version, champion_label)
        future.add_done_callback(lambda _: self._pending.release())

    def _score(
        self, data: ImageBytes, prediction_id: str, champion_version: str, champion_label: str
    ) -> None:
        model = self.store.current
        if model is None:
            return
        try:
            nonce = self._signer.verify(prediction_id).nonce  # the key /feedback labels join on
            image = decode_upload(data, model.config, self.settings)
            probs = model.run(to_array(resize(image, model.config), model.config)[None]).probabilities[0]
            index = int(np.argmax(probs))
            record = ShadowRecord(
                nonce=nonce,
                champion_version=champion_version,
                champion_label=champion_label,
                challenger_version=model.version,
                challenger_label=model.class_names[index],
                challenger_confidence=float(probs[index]),
            )
            self._log.record_shadow(record)
        except Exception as exc:  # the shadow must never matter to the caller: count it, say it once
            self._metrics.shadow_failures.inc()
            logger.warning("shadow scoring failed: %s: %s", type(exc).__name__, exc)
            return
        agree = record.challenger_label == champion_label
        self._metrics.shadow_predictions.labels(str(agree).lower()).inc()
        self._metrics.shadow_confidence.observe(record.challenger_confidence)
