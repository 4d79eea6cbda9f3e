"""Pydantic models for every request and response (they are the OpenAPI schema at ``/docs``)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class ErrorBody(BaseModel):
    error: str = Field(description="Stable machine-readable code, e.g. `not_an_image`.")
    detail: str = Field(description="What went wrong and what to do, for humans.")


_LABEL = "The predicted class, or `unknown`: the upload does not look like a cat or dog photo."
_PREDICTED = "The most probable class, also when `label` is `unknown`."
_OOD_SCORE = (
    "How unfamiliar the upload is to the model: above 1 it is answered `unknown`; "
    "`null` for a model without an unknown detector."
)
_REASON = "Why `label` is `unknown`: `unfamiliar`, `flat_image` or `too_small`; `null` otherwise."


class PredictionOut(BaseModel):
    label: str = Field(description=_LABEL, examples=["cat"])
    confidence: float = Field(ge=0, le=1, examples=[0.97], description="Probability of `predicted`.")
    probabilities: dict[str, float] = Field(examples=[{"cat": 0.97, "dog": 0.03}])
    prediction_id: str = Field(description="Signed token; send it back to `/feedback` with the true label.")
    model_version: str
    latency_ms: float
    predicted: str = Field(description=_PREDICTED, examples=["cat"])
    ood_score: float | None = Field(default=None, description=_OOD_SCORE, examples=[0.42])
    unknown_reason: str | None = Field(default=None, description=_REASON, examples=[None])


class ExplanationOut(PredictionOut):
    overlay_png: str = Field(
        description="Base64 PNG: the photo with the evidence for `predicted` as a heat map over it "
        "(a `data:image/png;base64,` URL shows it)."
    )
    overlay_size: list[int] = Field(description="The overlay's width and height in pixels.")
    evidence: list[list[float]] | None = Field(
        default=None,
        description="With `?map=true`: the raw (h, w) evidence map for `predicted` (its vote minus the "
        "classes' mean vote per place of the last feature map), covering the overlay's area.",
    )


class BatchItemOut(BaseModel):
    """One entry per uploaded image, in upload order: a prediction or an error."""

    index: int
    filename: str | None = None
    label: str | None = None
    confidence: float | None = None
    probabilities: dict[str, float] | None = None
    prediction_id: str | None = None
    model_version: str | None = None
    predicted: str | None = None
    ood_score: float | None = None
    unknown_reason: str | None = None
    error: str | None = None
    detail: str | None = None


class BatchOut(BaseModel):
    results: list[BatchItemOut]
    count: int
    failed: int
    latency_ms: float


class HealthOut(BaseModel):
    status: str = "ok"


class ReadyOut(BaseModel):
    ready: bool
    model_version: str | None = None
    detail: str | None = None


class SamplesOut(BaseModel):
    samples: list[str] = Field(
        description="Labelled sample images shipped in the served bundle (`/samples/{name}`)."
    )


class ModelInfoOut(BaseModel):
    name: str
    version: str
    alias: str
    architecture: str
    uri: str | None = Field(description="The served model URI or folder (`null` for anonymous callers).")
    source: str = Field(description="`registry`, `cache` (registry unreachable at load) or `local`.")
    note: str | None = Field(
        description="Why the cache is served, when it is (`null` for anonymous callers)."
    )
    loaded_at: float
    metrics: dict[str, Any] = Field(
        description="The bundle's evaluation metrics (what it was promoted with)."
    )
    registry: dict[str, Any] | None = Field(
        description="Registry facts: run id, version tags (`null` for anonymous callers)."
    )
    preprocessing: dict[str, Any]
    input_shape: list[int | str | None]
    onnx_file: str
    samples: list[str] = Field(
        description="Labelled sample images shipped in the bundle (`/samples/{name}`)."
    )


class StatsOut(BaseModel):
    pid: int = Field(description="Statistics are per worker process.")
    since: float
    uptime_s: float
    predictions: int
    errors: int
    counts: dict[str, int]
    mean_confidence: float | None
    mean_confidence_by_label: dict[str, float | None]
    latency_ms: dict[str, float | None]
    queue_depth: int
    live_accuracy: float | None
    feedback_count: int


class FeedbackIn(BaseModel):
    prediction_id: str = Field(min_length=10, max_length=1024)
    label: str = Field(description="The true label.", examples=["dog"])


class FeedbackOut(BaseModel):
    correct: bool
    predicted: str
    label: str
    model_version: str
    live_accuracy: float | None
    image_kept: bool = Field(
        default=False, description="The image sent with the label was kept as training data."
    )


class ReloadOut(BaseModel):
    reloaded: bool
    version: str | None
    previous: str | None
    detail: str
