"""Everything one app instance owns, built from the settings; routes reach it via ``Depends``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from catsdogs.feedback.store import FeedbackStore, store_url
from catsdogs.serve.drift import DriftFeed, DriftWindowFactory, default_window_factory
from catsdogs.serve.feedback import LiveAccuracy, PredictionSigner, resolve_keys
from catsdogs.serve.metrics import Metrics
from catsdogs.serve.model_store import LoadedModel, ModelStore
from catsdogs.serve.predictor import Predictor
from catsdogs.serve.shadow import ShadowScorer
from catsdogs.serve.stats import RunningStats
from catsdogs.settings import Settings


@dataclass
class Service:
    settings: Settings
    metrics: Metrics
    stats: RunningStats
    store: ModelStore
    predictor: Predictor
    signer: PredictionSigner
    live: LiveAccuracy
    feedback_log: FeedbackStore
    drift: DriftFeed
    api_keys: list[str]
    admin_token: str | None
    shadow: ShadowScorer | None = None


def build_service(settings: Settings, *, drift_factory: DriftWindowFactory | None = None) -> Service:
    """Wire the parts; nothing is loaded or started here (see the app's lifespan)."""
    metrics = Metrics()
    metrics.model_ready.set(0)
    stats = RunningStats(settings.classes)
    make_window = drift_factory or default_window_factory

    def publish(scores: dict[str, float]) -> None:
        for feature, value in scores.items():
            metrics.drift_score.labels(feature).set(value)

    drift = DriftFeed(publish, max_images_per_s=settings.drift_max_images_per_s, fill=settings.drift_window)

    def on_swap(model: LoadedModel) -> None:
        metrics.set_model(
            name=model.resolved.name,
            version=model.version,
            alias=model.resolved.alias,
            architecture=model.architecture,
        )
        metrics.model_ready.set(1)
        drift.set_window(make_window(model.resolved.bundle))

    def on_reload(success: bool) -> None:
        metrics.model_reloads.labels("success" if success else "failure").inc()

    store = ModelStore(settings, on_swap=on_swap, on_reload=on_reload)
    signer = PredictionSigner(resolve_keys(settings.feedback_keys), max_age_s=settings.feedback_max_age_s)
    predictor = Predictor(settings, store=store, metrics=metrics, stats=stats, signer=signer, drift=drift)
    feedback_log = FeedbackStore(store_url(settings))
    if settings.shadow_fraction > 0:
        predictor.shadow = ShadowScorer(settings, metrics=metrics, feedback_log=feedback_log, signer=signer)
    return Service(
        settings=settings,
        metrics=metrics,
        stats=stats,
        store=store,
        predictor=predictor,
        signer=signer,
        live=LiveAccuracy(settings.feedback_window),
        feedback_log=feedback_log,
        drift=drift,
        api_keys=[key.get_secret_value() for key in settings.api_keys],
        admin_token=settings.admin_token.get_secret_value() if settings.admin_token else None,
        shadow=predictor.shadow,
    )


async def get_service(request: Request) -> Service:
    # async: a plain def dependency would cost a thread-pool hop on every request.
    return request.app.state.service  # type: ignore[no-any-return]


ServiceDep = Annotated[Service, Depends(get_service)]
