"""Prometheus metrics, named exactly as in docs/architecture.md.

Each app owns a registry (several apps can live in one test process). With
``PROMETHEUS_MULTIPROC_DIR`` set (several workers), prometheus-client writes values to files in that
folder and ``/metrics`` aggregates every worker through ``MultiProcessCollector``.
"""

from __future__ import annotations

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
INFERENCE_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
CONFIDENCE_BUCKETS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)


def multiprocess_enabled() -> bool:
    return bool(os.environ.get(MULTIPROC_ENV))


class Metrics:
    """Every metric the service exports, registered in its own registry."""

    def __init__(self) -> None:
        disable_created_metrics()  # the *_created series only double the scrape size
        self.registry = CollectorRegistry(auto_describe=True)
        self._declare_traffic(self.registry)
        self._declare_model(self.registry)
        self._declare_quality(self.registry)
        self._info_labels: tuple[str, str, str, str] | None = None

    def _declare_traffic(self, reg: CollectorRegistry) -> None:
        """Requests, their latency, the batcher's queue and what was refused."""
        self.http_requests = Counter(
            "catsdogs_http_requests", "HTTP requests answered.", ["route", "method", "status"], registry=reg
        )
        self.http_duration = Histogram(
            "catsdogs_http_request_duration_seconds",
            "Time from request start to response start.",
            ["route", "method"],
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.inference_duration = Histogram(
            "catsdogs_inference_duration_seconds",
            "One ONNX Runtime forward pass.",
            buckets=INFERENCE_BUCKETS,
            registry=reg,
        )
        self.batch_size = Histogram(
            "catsdogs_batch_size", "Images per forward pass.", buckets=BATCH_BUCKETS, registry=reg
        )
        self.shadow_predictions = Counter(
            "catsdogs_shadow_predictions_total",
            "Live requests the shadow model also scored, by whether it agreed with the served model.",
            ["agree"],
            registry=reg,
        )
        self.shadow_confidence = Histogram(
            "catsdogs_shadow_confidence",
            "The shadow model's confidence in its answer.",
            buckets=(0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0),
            registry=reg,
        )
        self.shadow_feedback = Counter(
            "catsdogs_shadow_feedback_total",
            "Feedback labels of shadowed requests, by model (champion, challenger) and correctness.",
            ["model", "correct"],
            registry=reg,
        )
        self.shadow_skipped = Counter(
            "catsdogs_shadow_skipped_total", "Samples skipped because the shadow was busy.", registry=reg
        )
        self.shadow_failures = Counter(
            "catsdogs_shadow_failures_total",
            "Shadow scorings that failed (the answer was not affected).",
            registry=reg,
        )
        self.lone_runs = Counter(
            "catsdogs_inference_lone_total",
            "Forward passes that found the worker idle and ran on every core.",
            registry=reg,
        )
        self.queue_depth = Gauge(
            "catsdogs_queue_depth",
            "Images admitted and not answered yet.",
            multiprocess_mode="livesum",
            registry=reg,
        )
        self.overload_rejections = Counter(
            "catsdogs_overload_rejections",
            "Requests refused with 503 because the queue was full.",
            registry=reg,
        )
        self.rejected_inputs = Counter(
            "catsdogs_rejected_inputs", "Uploads refused, by reason.", ["reason"], registry=reg
        )

    def _declare_model(self, reg: CollectorRegistry) -> None:
        """What the model answered, and which model is loaded."""
        self.predictions = Counter(
            "catsdogs_predictions",
            "Predictions made, by label (`unknown` included).",
            ["label"],
            registry=reg,
        )
        self.unknown_answers = Counter(
            "catsdogs_unknown_answers",
            "Answers `unknown`, by reason (unfamiliar, flat_image, too_small).",
            ["reason"],
            registry=reg,
        )
        self.confidence = Histogram(
            "catsdogs_prediction_confidence",
            "Confidence of the predicted label.",
            ["label"],
            buckets=CONFIDENCE_BUCKETS,
            registry=reg,
        )
        self.model_info = Gauge(
            "catsdogs_model_info",
            "The model being served (value 1).",
            ["name", "version", "alias", "architecture"],
            multiprocess_mode="livemax",
            registry=reg,
        )
        self.model_ready = Gauge(
            "catsdogs_model_ready",
            "1 once a model is loaded and warmed up.",
            multiprocess_mode="livemin",
            registry=reg,
        )
        self.model_reloads = Counter(
            "catsdogs_model_reloads", "Model swaps attempted, by result.", ["result"], registry=reg
        )

    def _declare_quality(self, reg: CollectorRegistry) -> None:
        """Feedback, live accuracy and drift: how good the answers are."""
        self.feedback = Counter(
            "catsdogs_feedback", "Feedback labels received.", ["correct", "model_version"], registry=reg
        )
        self.live_accuracy = Gauge(
            "catsdogs_live_accuracy",
            "Accuracy over the most recent feedback labels in this process.",
            multiprocess_mode="livemostrecent",
            registry=reg,
        )
        self.drift_score = Gauge(
            "catsdogs_drift_score",
            "Drift score per feature.",
            ["feature"],
            multiprocess_mode="livemostrecent",
            registry=reg,
        )

    def set_model(self, *, name: str, version: str, alias: str, architecture: str) -> None:
        """Point ``catsdogs_model_info`` at the new model (the old label set drops to 0)."""
        labels = (name, version, alias, architecture)
        if self._info_labels and self._info_labels != labels:
            self.model_info.labels(*self._info_labels).set(0)
        self.model_info.labels(*labels).set(1)
        self._info_labels = labels

    def render(self) -> tuple[bytes, str]:
        """The text exposition of this process, or of every worker in multiprocess mode."""
        if multiprocess_enabled():
            registry = CollectorRegistry()
            MultiProcessCollector(registry)
            return generate_latest(registry), CONTENT_TYPE_LATEST
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
