"""Running the service under uvicorn: logging, worker processes, graceful shutdown."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from importlib.util import find_spec
from pathlib import Path
from typing import TYPE_CHECKING

from catsdogs import CatsdogsError
from catsdogs.malloc import bound_freed_memory
from catsdogs.serve.access_log import configure_logging
from catsdogs.serve.metrics import MULTIPROC_ENV
from catsdogs.settings import Settings, get_settings

if TYPE_CHECKING:
    from fastapi import FastAPI

logger = logging.getLogger(__name__)


def _multiproc_dir() -> str:
    """A fresh folder for prometheus-client's per-worker files (stale files would skew sums)."""
    folder = os.environ.get(MULTIPROC_ENV)
    if folder:
        shutil.rmtree(folder, ignore_errors=True)
        Path(folder).mkdir(parents=True, exist_ok=True)
        return folder
    return tempfile.mkdtemp(prefix="catsdogs-prom-")


def _prepare_process(settings: Settings) -> None:
    """What a serving process sets up first: the malloc policy, before any thread starts (the log
    writer's, the model's, the decoders'), then logging."""
    bound_freed_memory()
    configure_logging(settings.log_level)


def worker_app() -> FastAPI:
    """App factory for worker processes: they start fresh, so logging is set up here again."""
    from catsdogs.serve.app import create_app

    settings = get_settings()
    _prepare_process(settings)
    return create_app(settings)


def check_exposure(settings: Settings) -> None:
    """Closed by default: a service reachable from other machines needs API keys, or an explicit
    ``allow_anonymous`` (a misnamed Secret must not leave a public service open to anyone).

    Raises:
        CatsdogsError: ``host`` is not loopback, no API key is configured and no opt-in was given.
    """
    if settings.loopback_only or settings.api_keys:
        return
    if not settings.allow_anonymous:
        raise CatsdogsError(
            f"refusing to serve {settings.host or 'every interface'} without API keys: set "
            "CATSDOGS_API_KEYS (comma-separated), or CATSDOGS_ALLOW_ANONYMOUS=true to serve anyone on purpose"
        )
    logger.warning(
        "serving %s without API keys (CATSDOGS_ALLOW_ANONYMOUS=true): anyone who reaches it can predict "
        "and send feedback",
        settings.host,
    )


def serve(settings: Settings) -> None:
    """Serve until SIGTERM/SIGINT; then stop accepting, finish in-flight requests, exit."""
    import uvicorn

    _prepare_process(settings)
    check_exposure(settings)
    options = {
        "host": settings.host,
        "port": settings.port,
        "log_config": None,
        "access_log": False,
        "timeout_graceful_shutdown": settings.graceful_timeout_s,
        "limit_concurrency": settings.max_connections,  # per worker; 503 from uvicorn above it
        "loop": "uvloop" if find_spec("uvloop") else "asyncio",
        "http": "httptools" if find_spec("httptools") else "h11",
    }
    if settings.workers > 1:
        # Workers are separate processes that build their own settings from the environment.
        os.environ[MULTIPROC_ENV] = _multiproc_dir()
        os.environ["CATSDOGS_MODEL_URI"] = settings.model_uri
        os.environ["CATSDOGS_HOST"] = settings.host  # who may see details depends on it (security.py)
        os.environ["CATSDOGS_WORKERS"] = str(settings.workers)
        if settings.rate_limit_store is None:  # one file for all workers: they share the limit
            folder = tempfile.mkdtemp(prefix="catsdogs-ratelimit-")
            os.environ["CATSDOGS_RATE_LIMIT_STORE"] = str(Path(folder) / "buckets.sqlite")
        uvicorn.run("catsdogs.serve.server:worker_app", factory=True, workers=settings.workers, **options)
        return
    from catsdogs.serve.app import create_app

    uvicorn.run(create_app(settings), **options)
