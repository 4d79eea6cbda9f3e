"""Shadow testing: a share of live requests also scored by a second model, off the request path.

With ``shadow_fraction`` > 0, the model at ``shadow_model_uri`` (the registry's ``challenger`` by
default) is loaded and polled like the served one, in its own low-priority process
(:mod:`catsdogs.serve.shadow_worker`). After a prediction is answered, that fraction of uploads is
queued for one background thread that hands each to the worker, which decodes it for the shadow
model's own preprocessing and scores it on one intra-op thread; the thread keeps the result in the
feedback store (so counts add up across replicas and restarts, and ``/feedback`` labels join both
models' answers). The answer never waits for it: when the worker is busy or has used its share of
the CPU (``shadow_max_cpu_share``, :class:`CpuBudget`) the sample is skipped (counted), and a
shadow failure (an error, a crash, a timeout: the worker is replaced) is a counted log line, never
an error for the caller. ``catsdogs promote --require-shadow N`` reads the store.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import random
import threading
import time

from catsdogs.feedback.store import FeedbackStore, ShadowRecord
from catsdogs.preprocessing import ImageBytes
from catsdogs.runtime import available_cores
from catsdogs.serve.feedback import PredictionSigner
from catsdogs.serve.metrics import Metrics
from catsdogs.serve.shadow_worker import ShadowAnswer, ShadowWorker
from catsdogs.settings import Settings

logger = logging.getLogger(__name__)

#: Uploads waiting while the worker scores another; past this, samples are skipped, not queued.
MAX_WAITING = 1

#: How often an idle scorer asks the worker which version it has loaded (sampling waits for one).
STATUS_INTERVAL_S = 2.0


class CpuBudget:
    """A token bucket of CPU seconds: refilled at ``share`` of ``cores`` per wall-clock second, up to
    ``burst_s``; each scored sample is charged what it used. Empty: skip the next samples."""

    def __init__(self, share: float, cores: int, *, burst_s: float = 0.25) -> None:
        self.rate = share * cores
        self.burst_s = burst_s
        self._tokens = burst_s
        self._at = time.monotonic()
        self._lock = threading.Lock()

    def _refill(self) -> None:
        now = time.monotonic()
        self._tokens = min(self.burst_s, self._tokens + (now - self._at) * self.rate)
        self._at = now

    def available(self) -> bool:
        with self._lock:
            self._refill()
            return self._tokens > 0

    def charge(self, cpu_s: float) -> None:
        with self._lock:
            self._refill()
            self._tokens -= cpu_s


class ShadowScorer:
    """Samples answered uploads, has the worker score them and records them; see the module docstring."""

    def __init__(
        self, settings: Settings, *, metrics: Metrics, feedback_log: FeedbackStore, signer: PredictionSigner
    ) -> None:
        self.settings = settings
        self._signer = signer
        self.fraction = settings.shadow_fraction
        self._timeout_s = max(30.0, settings.request_timeout_s)
        self.worker = ShadowWorker(settings, timeout_s=self._timeout_s)
        self._metrics = metrics
        self._log = feedback_log
        self._waiting: queue.Queue[tuple[bytes, str, str, str] | None] = queue.Queue(MAX_WAITING)
        self._thread = threading.Thread(target=self._run, name="catsdogs-shadow", daemon=True)
        self._stopping = threading.Event()
        self._random = random.Random()  # noqa: S311 (sampling, not security)
        self.budget = CpuBudget(settings.shadow_max_cpu_share, available_cores())
        #: The version the worker has loaded (None: none yet, or no such model).
        self.version: str | None = None

    def start(self) -> None:
        self.worker.start()
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        with contextlib.suppress(queue.Full):
            self._waiting.put_nowait(None)  # wakes the thread; a full queue wakes it anyway
        self._thread.join(timeout=self._timeout_s + 5)
        self.worker.stop()

    def offer(
        self, data: ImageBytes, *, prediction_id: str, champion_version: str, champion_label: str
    ) -> None:
        """Maybe score this upload later (never blocks, never raises)."""
        if self._random.random() >= self.fraction or self.version is None:
            return
        if not self.budget.available():
            self._metrics.shadow_skipped.inc()
            return
        try:
            self._waiting.put_nowait((bytes(data), prediction_id, champion_version, champion_label))
        except queue.Full:
            self._metrics.shadow_skipped.inc()

    def _run(self) -> None:
        self._status()
        while not self._stopping.is_set():
            try:
                item = self._waiting.get(timeout=STATUS_INTERVAL_S)
            except queue.Empty:
                self._status()
                continue
            if item is not None:
                self._score(*item)

    def _status(self) -> None:
        try:
            self.version = self.worker.ask(("status",)).version
        except Exception as exc:  # a crashed worker is replaced; the next status asks the new one
            logger.warning("shadow worker status failed: %s: %s", type(exc).__name__, exc)

    def _score(self, data: bytes, prediction_id: str, champion_version: str, champion_label: str) -> None:
        try:
            nonce = self._signer.verify(prediction_id).nonce  # the key /feedback labels join on
            answer: ShadowAnswer = self.worker.ask(("score", data))
            self.budget.charge(answer.cpu_s)
            self.version = answer.version
            if answer.version is None:  # the model went away: nothing scored, nothing to count
                return
            if answer.error is not None or answer.label is None or answer.confidence is None:
                raise RuntimeError(answer.error or "no answer")
            record = ShadowRecord(
                nonce=nonce,
                champion_version=champion_version,
                champion_label=champion_label,
                challenger_version=answer.version,
                challenger_label=answer.label,
                challenger_confidence=answer.confidence,
            )
            self._log.record_shadow(record)
        except Exception as exc:  # the shadow must never matter to the caller: count it, say it once
            self._metrics.shadow_failures.inc()
            logger.warning("shadow scoring failed: %s: %s", type(exc).__name__, exc)
            return
        agree = record.challenger_label == champion_label
        self._metrics.shadow_predictions.labels(str(agree).lower()).inc()
        self._metrics.shadow_confidence.observe(record.challenger_confidence)
