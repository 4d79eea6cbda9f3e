"""The request path from bytes to an answer: admission, decoding off the event loop, batching.

Two modes, chosen by ``batch_max_size``: ``1`` runs decode + preprocess + forward pass in one
thread hop (the leanest path, best on a couple of cores); above 1, decoding runs on a decoder
pool and the :class:`~catsdogs.serve.batcher.MicroBatcher` groups images into forward passes
(pays on many cores and GPUs).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any, Protocol, TypeVar

import numpy as np
from PIL import Image

from catsdogs.bundle import write_json_atomic
from catsdogs.drift import stats_image
from catsdogs.explain import display_image, evidence, overlay_png
from catsdogs.files import atomic_path
from catsdogs.ood import answer_label, unknown_reason
from catsdogs.preprocessing import (
    ImageBytes,
    ImageError,
    PreprocessConfig,
    decode_for_model,
    resize,
    to_array,
)
from catsdogs.runtime import available_cores, single_threaded_blas
from catsdogs.serve.admission import Admission, Ticket
from catsdogs.serve.batcher import MicroBatcher
from catsdogs.serve.drift import DriftFeed
from catsdogs.serve.errors import ApiError, image_error
from catsdogs.serve.feedback import PredictionSigner
from catsdogs.serve.metrics import Metrics
from catsdogs.serve.model_store import LoadedModel, ModelStore, Scores, batch_size, inference_workers
from catsdogs.serve.stats import RunningStats
from catsdogs.settings import Settings

logger = logging.getLogger(__name__)
_Result = TypeVar("_Result")
NO_SCORES = Scores(np.zeros(0, np.float32), None)


@dataclass(frozen=True)
class Prediction:
    label: str
    """The predicted class, or ``unknown`` (:mod:`catsdogs.ood`)."""
    confidence: float
    probabilities: dict[str, float]
    prediction_id: str
    model_version: str
    latency_ms: float
    predicted: str
    """The most probable class, also when ``label`` is ``unknown``."""
    ood_score: float | None = None
    unknown_reason: str | None = None


@dataclass(frozen=True)
class Overlay:
    """The evidence drawn over the photo: PNG bytes and their (width, height)."""

    png: bytes
    size: tuple[int, int]


@dataclass(frozen=True)
class Explanation:
    """A prediction, the (h, w) evidence map of its predicted class, and its overlay."""

    prediction: Prediction
    evidence: np.ndarray
    overlay: Overlay


@dataclass(frozen=True)
class _Judged:
    """A forward pass's scores for one upload, and what the upload itself says about its quality."""

    scores: Scores
    quality: str | None
    stats_copy: Image.Image | None


def decode_upload(data: ImageBytes, config: PreprocessConfig, settings: Settings) -> Image.Image:
    """An upload decoded for the model ``config`` belongs to, within the service's limits."""
    return decode_for_model(
        data,
        config,
        max_pixels=settings.max_image_pixels,
        min_side=settings.min_image_side,
        max_decode_bytes=settings.max_decode_bytes,
    )


class ShadowSink(Protocol):
    """Where answered uploads may go to be scored again (``serve.shadow.ShadowScorer``)."""

    def offer(
        self, data: ImageBytes, *, prediction_id: str, champion_version: str, champion_label: str
    ) -> None: ...


class Predictor:
    """Turns uploaded bytes into predictions with bounded queueing and per-request timeouts."""

    def __init__(
        self,
        settings: Settings,
        *,
        store: ModelStore,
        metrics: Metrics,
        stats: RunningStats,
        signer: PredictionSigner,
        drift: DriftFeed,
    ) -> None:
        self.settings = settings
        self.store = store
        self.metrics = metrics
        self.stats = stats
        self.signer = signer
        self.drift = drift
        #: Set by the service when shadow testing is on (``shadow_fraction`` > 0).
        self.shadow: ShadowSink | None = None
        self.admission = Admission(
            max_images=settings.queue_max,
            max_bytes=settings.max_inflight_bytes,
            on_change=lambda images, _: metrics.queue_depth.set(images),
            on_refuse=metrics.overload_rejections.inc,
        )
        self._label_metrics: dict[str, tuple[Any, Any]] = {}  # labels() children, looked up once
        max_batch = batch_size(settings)
        workers = inference_workers(settings)
        self.batching = max_batch > 1
        decode_threads = settings.decode_threads or available_cores()
        # Direct mode: the same threads decode and run the model. One thread per core measured best on
        # 2 cores (one more thread for decoding cut c16 throughput by ~20 %: it only adds contention).
        pool_size = decode_threads if self.batching else max(decode_threads, workers)
        self._pool = ThreadPoolExecutor(
            pool_size, thread_name_prefix="catsdogs-decode", initializer=single_threaded_blas
        )
        # Direct mode: decoding runs in parallel, but at most `inference_workers` forward passes at
        # once, each on all its intra-op threads (more would oversubscribe the cores).
        self._run_slots = threading.BoundedSemaphore(workers)
        self.batcher = (
            MicroBatcher(
                max_size=max_batch,
                max_wait_s=settings.batch_max_wait_ms / 1000,
                workers=workers,
                observe=self._observe,
            )
            if self.batching
            else None
        )

    async def start(self) -> None:
        if self.batcher:
            self.batcher.start()

    async def stop(self) -> None:
        if self.batcher:
            await self.batcher.stop()
        self._pool.shutdown(wait=True)

    def _observe(self, batch_size: int, seconds: float) -> None:
        self.metrics.batch_size.observe(batch_size)
        self.metrics.inference_duration.observe(seconds)

    def model(self) -> LoadedModel:
        model = self.store.current
        if model is None:
            raise ApiError(
                503,
                "model_not_ready",
                "the model is still loading; retry shortly",
                headers={"Retry-After": "2"},
            )
        return model

    @property
    def in_flight(self) -> int:
        """Images admitted and not yet done (their pool work included)."""
        return self.admission.images

    def admit(self, nbytes: int = 0) -> Ticket:
        """Reserve ``nbytes`` of upload room before a body is read (the request's declared length, or
        nothing yet when it declared none: the reader reserves chunks as they come); refuses at once
        with 503 + Retry-After when the worker is full, 413 when one request could never fit."""
        return self.admission.ticket(nbytes)

    # --- work done on pool threads ----------------------------------------------------------------
    def _prepare(self, model: LoadedModel, data: ImageBytes) -> tuple[np.ndarray, _Judged]:
        """The model input, and (with no scores yet) the upload's quality and drift sample."""
        if self.settings.store_uploads:
            self._store(data)
        image = decode_upload(data, model.config, self.settings)
        # Drift statistics need the upload itself (its size, sharpness), as a small copy.
        stats_copy = stats_image(image) if self.drift.wants_sample() else None
        size = image.size
        resized = resize(image, model.config)
        del image  # a 48 MP upload is freed here, before the forward pass
        array = to_array(resized, model.config)
        quality = model.detector.quality(size, array) if model.detector else None
        return array, _Judged(NO_SCORES, quality, stats_copy)

    def _prepare_and_run(self, model: LoadedModel, data: ImageBytes) -> _Judged:
        array, judged = self._prepare(model, data)
        with self._run_slots:
            started = time.perf_counter()
            # Alone in this worker: the forward pass may take every core (the latency of the bare
            # model); with others in flight each keeps its share (the throughput under load).
            alone = self.admission.images <= 1 and model.wide_session is not None
            scores = model.run(array[None], alone=alone).row(0)
            if alone:
                self.metrics.lone_runs.inc()
            self._observe(1, time.perf_counter() - started)
        return replace(judged, scores=scores)

    def _store(self, data: ImageBytes) -> None:
        digest = hashlib.sha256(data).hexdigest()
        folder = self.settings.upload_dir / time.strftime("%Y-%m-%d")
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(folder / f"{digest}.bin") as tmp:
            tmp.write_bytes(data)
        write_json_atomic(folder / f"{digest}.json", {"received_at": time.time(), "bytes": len(data)})

    # --- event loop side -----------------------------------------------------------------------------
    async def _on_pool(self, ticket: Ticket, work: Callable[..., _Result], *args: object) -> _Result:
        """Run ``work`` on the pool holding ``ticket`` until it is done, not merely until its caller
        gave up: a job whose request timed out is dropped if it has not started, else its bytes
        stay counted until it ends (so the pool's queue never holds more than admission allows)."""
        ticket.hold()
        try:
            job = self._pool.submit(work, *args)
        except BaseException:
            ticket.drop()
            raise
        job.add_done_callback(ticket.drop)
        return await asyncio.wrap_future(job)

    async def _judge(self, model: LoadedModel, data: ImageBytes, ticket: Ticket) -> _Judged:
        try:
            if self.batcher is None:
                return await self._on_pool(ticket, self._prepare_and_run, model, data)
            array, judged = await self._on_pool(ticket, self._prepare, model, data)
            return replace(judged, scores=await self.batcher.submit(model, array))
        except ImageError as exc:
            self.metrics.rejected_inputs.labels(exc.code).inc()
            self.stats.record_error()
            raise image_error(exc) from None

    async def predict(self, data: ImageBytes, *, ticket: Ticket, started: float) -> Prediction:
        """One image (admitted with ``ticket``) → one prediction; raises :class:`ApiError`
        (4xx/503/504) otherwise."""
        model = self.model()
        try:
            async with asyncio.timeout(self.settings.request_timeout_s):
                judged = await self._judge(model, data, ticket)
        except TimeoutError:
            raise ApiError(504, "timeout", f"no answer within {self.settings.request_timeout_s}s") from None
        # Only while feedback images are kept: binds an image sent to /feedback to this prediction.
        image_sha256 = hashlib.sha256(data).hexdigest() if self.settings.feedback_keep_images else None
        answer = self._answer(model, judged, started, image_sha256)
        if self.shadow is not None:
            self.shadow.offer(
                data,
                prediction_id=answer.prediction_id,
                champion_version=answer.model_version,
                champion_label=answer.predicted,
            )
        return answer

    # --- /explain ------------------------------------------------------------------------------------
    def _explain_on_pool(self, model: LoadedModel, data: ImageBytes) -> tuple[_Judged, np.ndarray, Overlay]:
        """Decode, run the graph with its maps, and draw the overlay (a PNG encode: off the loop)."""
        image = decode_upload(data, model.config, self.settings)
        shown = display_image(image, model.config)
        size = image.size
        array = to_array(resize(image, model.config), model.config)
        del image
        quality = model.detector.quality(size, array) if model.detector else None
        with self._run_slots:
            scores, cams = model.explain(array[None])
        judged = _Judged(scores.row(0), quality, None)
        values = evidence(cams[0], int(np.argmax(judged.scores.probabilities)))
        return judged, values, Overlay(overlay_png(shown, values), shown.size)

    async def explain(self, data: ImageBytes, *, ticket: Ticket, started: float) -> Explanation:
        """One image → its prediction and the evidence map of the predicted class (409 for a model
        without activation maps)."""
        model = self.model()
        if not model.explains:
            raise ApiError(
                409,
                "explain_unavailable",
                f"model version {model.version} ({model.architecture}, head "
                f"{model.resolved.bundle.metadata.get('head', 'none')}) has no class activation maps: "
                "/explain needs a linear head on a pretrained backbone's pooled features",
            )
        try:
            async with asyncio.timeout(self.settings.request_timeout_s):
                judged, values, overlay = await self._on_pool(ticket, self._explain_on_pool, model, data)
        except TimeoutError:
            raise ApiError(504, "timeout", f"no answer within {self.settings.request_timeout_s}s") from None
        except ImageError as exc:
            self.metrics.rejected_inputs.labels(exc.code).inc()
            raise image_error(exc) from None
        return Explanation(self._answer(model, judged, started, None), values, overlay)

    def _label_children(self, label: str) -> tuple[Any, Any]:
        children = self._label_metrics.get(label)
        if children is None:
            children = (self.metrics.predictions.labels(label), self.metrics.confidence.labels(label))
            self._label_metrics[label] = children
        return children

    def _answer(
        self, model: LoadedModel, judged: _Judged, started: float, image_sha256: str | None
    ) -> Prediction:
        probs, ood = judged.scores
        index = int(np.argmax(probs))
        predicted = model.class_names[index]
        reason = unknown_reason(judged.quality, float(ood)) if ood is not None else None
        label = answer_label(predicted, reason)
        if reason is not None:
            self.metrics.unknown_answers.labels(reason).inc()
        confidence = float(probs[index])
        latency_ms = (time.perf_counter() - started) * 1000
        counter, histogram = self._label_children(label)
        counter.inc()
        histogram.observe(confidence)
        self.stats.record(label, confidence, latency_ms)
        if judged.stats_copy is not None:
            self.drift.offer(judged.stats_copy, probs)
        return Prediction(
            label=label,
            predicted=predicted,
            ood_score=None if ood is None else round(float(ood), 4),
            unknown_reason=reason,
            confidence=confidence,
            probabilities={name: float(p) for name, p in zip(model.class_names, probs, strict=True)},
            prediction_id=self.signer.issue(
                model_version=model.version, label=predicted, confidence=confidence, image_sha256=image_sha256
            ),
            model_version=model.version,
            latency_ms=round(latency_ms, 3),
        )
