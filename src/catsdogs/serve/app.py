"""The app factory: wires settings, the service parts, middleware and routers; nothing else."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI
from fastapi.middleware.cors import CORSMiddleware

from catsdogs import __version__
from catsdogs.malloc import PeriodicTrim
from catsdogs.runtime import single_threaded_blas
from catsdogs.serve.access_log import AccessLogMiddleware
from catsdogs.serve.drift import DriftWindowFactory
from catsdogs.serve.errors import install_error_handlers
from catsdogs.serve.feedback_gate import FeedbackGate
from catsdogs.serve.rate_limit import RATE_LIMITED, build_rate_limiter, enforce_rate_limit
from catsdogs.serve.routes import admin, feedback, ops, predict, ui
from catsdogs.serve.service import build_service
from catsdogs.serve.uploads import FRAMING_ALLOWANCE
from catsdogs.settings import Settings, get_settings

logger = logging.getLogger(__name__)


def create_app(
    settings: Settings | None = None, *, drift_factory: DriftWindowFactory | None = None
) -> FastAPI:
    """Build the service; the model loads in the background once the server starts (``/ready``)."""
    settings = settings or get_settings()
    service = build_service(settings, drift_factory=drift_factory)
    trim = PeriodicTrim()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        single_threaded_blas()
        await asyncio.to_thread(service.feedback_log.open)  # migrations first: a bad URL stops the start
        await service.predictor.start()
        service.store.start()
        trim.start()
        if service.shadow is not None:
            service.shadow.start()
        if settings.workers > 1:  # see Settings.worker_start_wait_s
            wait = settings.worker_start_wait_s
            if not await asyncio.to_thread(service.store.wait_loaded, wait):
                logger.warning("no model after %.0f s; accepting requests anyway (503 until loaded)", wait)
        yield
        service.store.stop()
        trim.stop()
        if service.shadow is not None:
            await asyncio.to_thread(service.shadow.stop)
        await service.predictor.stop()  # in-flight work finishes first (uvicorn drains on SIGTERM)
        service.drift.stop()
        service.feedback_log.close()
        if app.state.rate_limiter is not None:
            app.state.rate_limiter.close()

    app = FastAPI(
        title="catsdogs",
        version=__version__,
        lifespan=lifespan,
        description="Tells cats from dogs in photos. Errors are `{error, detail}` JSON.",
    )
    app.state.service = service
    app.state.rate_limiter = build_rate_limiter(settings)
    install_error_handlers(app)
    for module in (ui, ops):
        app.include_router(module.router)
    for module in (predict, feedback):  # the endpoints that do work
        app.include_router(module.router, dependencies=[Depends(enforce_rate_limit)], responses=RATE_LIMITED)
    if service.admin_token:
        app.include_router(admin.router)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["*"],
            expose_headers=["X-Request-ID", "Retry-After"],
        )
    # A kept image rides along with the label: then /feedback takes an upload's size too.
    image_bytes = settings.max_upload_bytes + FRAMING_ALLOWANCE if settings.feedback_keep_images else 0
    app.add_middleware(FeedbackGate, max_body_bytes=settings.feedback_max_body_bytes + image_bytes)
    app.add_middleware(AccessLogMiddleware, metrics=service.metrics)
    return app
