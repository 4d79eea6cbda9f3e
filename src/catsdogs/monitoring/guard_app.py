"""``catsdogs guard`` as a service: the periodic check, an Alertmanager webhook, and its own metrics.

``POST /alertmanager`` takes Alertmanager's webhook payload (version 4): every firing alert named in
``guard_error_alerts`` asks for a rollback (the guard's hold and cooldown still apply). A background
task runs :func:`~catsdogs.monitoring.guard.check` every ``guard_interval_s``. ``/metrics`` counts
the rollbacks, which is what the ``CatsdogsAutomaticRollback`` alert watches.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, HTTPException, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, generate_latest
from pydantic import BaseModel, Field, ValidationError
from starlette.concurrency import run_in_threadpool

from catsdogs import CatsdogsError
from catsdogs.access import is_loopback
from catsdogs.feedback.store import FeedbackStore, store_url
from catsdogs.monitoring.guard import GuardDecision, Trigger, check, on_alert
from catsdogs.settings import Settings

_logger = logging.getLogger(__name__)

#: Alertmanager sends every alert of a group in one payload; far bigger bodies are not Alertmanager's.
MAX_BODY_BYTES = 1024 * 1024


class AlertIn(BaseModel):
    """One alert of the webhook payload (the fields the guard reads; the rest is ignored)."""

    status: str
    labels: dict[str, str]
    annotations: dict[str, str] = Field(default_factory=dict)


class WebhookIn(BaseModel):
    """Alertmanager's webhook payload, version 4."""

    version: str
    status: str
    alerts: list[AlertIn] = Field(max_length=1000)


class GuardMetrics:
    """The guard's Prometheus metrics, in a registry of their own (one per app)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.rollbacks = Counter(
            "catsdogs_guard_rollbacks_total",
            "Automatic rollbacks of champion",
            ["trigger"],
            registry=self.registry,
        )
        self.checks = Counter(
            "catsdogs_guard_checks_total", "Guard checks by outcome", ["result"], registry=self.registry
        )
        self.live_accuracy = Gauge(
            "catsdogs_guard_live_accuracy", "Champion accuracy over its latest labels", registry=self.registry
        )
        self.baseline = Gauge(
            "catsdogs_guard_baseline_accuracy", "What live accuracy is compared with", registry=self.registry
        )
        for trigger in ("live_accuracy", "alert"):  # both series exist from the start: increase() sees 0 → 1
            self.rollbacks.labels(trigger)

    def observe(self, decision: GuardDecision, trigger: Trigger) -> None:
        self.checks.labels(decision.result).inc()
        if decision.action == "rollback":
            self.rollbacks.labels(trigger).inc()
        if decision.live_accuracy is not None and decision.baseline is not None:
            self.live_accuracy.set(decision.live_accuracy)
            self.baseline.set(decision.baseline)


def check_exposure(settings: Settings, host: str) -> None:
    """Closed by default: a webhook reachable from other machines needs ``guard_webhook_token``.

    Raises:
        CatsdogsError: ``host`` is not loopback and no token is configured.
    """
    if not is_loopback(host) and settings.guard_webhook_token is None:
        raise CatsdogsError(
            f"refusing to serve the guard on {host or 'every interface'} without a webhook token: set "
            "CATSDOGS_GUARD_WEBHOOK_TOKEN (and give Alertmanager the same one)"
        )


def _authorized(request: Request, authorization: Annotated[str | None, Header()] = None) -> None:
    settings: Settings = request.app.state.settings
    if int(request.headers.get("content-length") or 0) > MAX_BODY_BYTES:
        raise HTTPException(413, "payload too large for an Alertmanager webhook")
    token = settings.guard_webhook_token
    if token is None:  # loopback only (check_exposure), as the service without API keys
        return
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        given.encode(), token.get_secret_value().encode()
    ):
        raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})


async def _check_forever(app: FastAPI) -> None:
    settings: Settings = app.state.settings
    while True:
        try:
            decision = await run_in_threadpool(check, settings, store=app.state.store)
            app.state.metrics.observe(decision, "live_accuracy")
            app.state.last_check = decision
        except CatsdogsError as exc:  # e.g. no registered model yet
            _logger.warning("guard check failed: %s", exc)
            app.state.metrics.checks.labels("error").inc()
        except Exception:  # the registry or the store is down: say so, try again next interval
            _logger.exception("guard check failed")
            app.state.metrics.checks.labels("error").inc()
        await asyncio.sleep(settings.guard_interval_s)


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    store = FeedbackStore(store_url(app.state.settings))
    await run_in_threadpool(store.open)
    app.state.store = store
    task = asyncio.create_task(_check_forever(app))
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        store.close()


async def _read_payload(request: Request) -> WebhookIn:
    """The webhook's JSON, read only after the token was checked and never past ``MAX_BODY_BYTES``
    (a chunked body declares no length)."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise HTTPException(413, "payload too large for an Alertmanager webhook")
    try:
        return WebhookIn.model_validate_json(bytes(body))
    except ValidationError as exc:
        raise HTTPException(422, f"not an Alertmanager webhook payload: {exc.error_count()} errors") from None


async def _alertmanager(request: Request) -> dict[str, Any]:
    settings: Settings = request.app.state.settings
    payload = await _read_payload(request)
    decisions = []
    for alert in payload.alerts:
        name = alert.labels.get("alertname", "")
        if alert.status != "firing" or name not in settings.guard_error_alerts:
            continue
        detail = alert.annotations.get("description") or alert.annotations.get("summary", "")
        try:
            decision = await run_in_threadpool(on_alert, settings, alert=name, detail=detail)
        except CatsdogsError as exc:
            raise HTTPException(409, str(exc)) from None
        except Exception:  # the registry is unreachable: Alertmanager retries a 5xx
            _logger.exception("guard could not act on alert %s", name)
            raise HTTPException(503, "the model registry is unreachable; retry") from None
        request.app.state.metrics.observe(decision, "alert")
        decisions.append(decision.as_dict())
    return {"decisions": decisions}


def create_guard_app(settings: Settings) -> FastAPI:
    """The guard's app: the webhook, ``/metrics``, ``/healthz`` and the periodic check."""
    app = FastAPI(title="catsdogs guard", lifespan=_lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.settings, app.state.metrics, app.state.last_check = settings, GuardMetrics(), None
    app.post("/alertmanager", dependencies=[Depends(_authorized)])(_alertmanager)

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(generate_latest(app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        last: GuardDecision | None = app.state.last_check
        return {"status": "ok", "last_check": None if last is None else last.as_dict()}

    return app


def run_once(settings: Settings) -> GuardDecision:
    """One check (what a CronJob runs): open the store, look, act if needed, close."""
    store = FeedbackStore(store_url(settings))
    store.open()
    try:
        return check(settings, store=store)
    finally:
        store.close()


def serve_guard(settings: Settings, *, host: str, port: int) -> None:
    """Serve the guard until SIGTERM/SIGINT."""
    import uvicorn

    check_exposure(settings, host)
    logging.getLogger().setLevel(settings.log_level.upper())  # the CLI configured the handler
    uvicorn.run(create_guard_app(settings), host=host, port=port, access_log=False)
