"""One JSON log line and the HTTP metrics per request, as a plain ASGI middleware (no extra hop).

Routes add ``label``, ``confidence`` and ``model_version`` to ``request.state.log``. Never logged:
image bytes, headers, query strings, keys or tokens.
"""

from __future__ import annotations

import atexit
import itertools
import json
import logging
import queue
import re
import secrets
import signal
import sys
import threading
import time
from logging.handlers import QueueHandler, QueueListener
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from catsdogs.serve.metrics import Metrics

access_logger = logging.getLogger("catsdogs.serve.access")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


class JsonFormatter(logging.Formatter):
    """Render a record as one JSON object; ``extra={"fields": {...}}`` are merged in."""

    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "pid": record.process,  # which worker, when several share the socket
            "message": record.getMessage(),
        }
        payload.update(getattr(record, "fields", {}))
        if record.exc_info:
            payload["exception"] = self.formatException(record.exc_info)
        return json.dumps(payload, default=str)


def _route(scope: Scope) -> str:
    route = scope.get("route")
    return getattr(route, "path", None) or "unmatched"


class AccessLogMiddleware:
    """Request id (``X-Request-ID`` in and out), JSON access log, request counters and latency."""

    def __init__(self, app: ASGIApp, *, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics
        # Request ids: a random per-app prefix and a counter (32 hex digits, like a uuid4), unique
        # across workers without an os.urandom system call per request.
        self._id_prefix = secrets.token_hex(8)
        self._id_counter = itertools.count()
        # prometheus-client's labels() takes a lock and builds a key per call: keep the children.
        self._children: dict[tuple[str, str, str], tuple[Any, Any]] = {}

    def _request_metrics(self, route: str, method: str, status: str) -> tuple[Any, Any]:
        key = (route, method, status)
        children = self._children.get(key)
        if children is None:
            children = (
                self.metrics.http_requests.labels(route, method, status),
                self.metrics.http_duration.labels(route, method),
            )
            self._children[key] = children
        return children

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        incoming = dict(scope.get("headers") or ()).get(b"x-request-id", b"").decode("latin-1")
        request_id = (
            incoming if _REQUEST_ID.match(incoming) else f"{self._id_prefix}{next(self._id_counter):016x}"
        )
        fields: dict[str, Any] = {}
        scope.setdefault("state", {})["log"] = fields
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            elapsed = time.perf_counter() - started
            route, method = _route(scope), scope["method"]
            requests, duration = self._request_metrics(route, method, str(status))
            requests.inc()
            duration.observe(elapsed)
            if access_logger.isEnabledFor(logging.INFO):
                access_logger.info(
                    "request",
                    extra={
                        "fields": {
                            "request_id": request_id,
                            "method": method,
                            "route": route,
                            "status": status,
                            "latency_ms": round(elapsed * 1000, 3),
                            **fields,
                        }
                    },
                )


#: Log records waiting for the writer thread; past it records are dropped and counted, never waited for.
LOG_QUEUE_MAX = 10_000


class _HandOff(QueueHandler):
    """Queues the record as it is: formatting and the write happen on the writer thread."""

    def __init__(self, records: queue.Queue[logging.LogRecord]) -> None:
        super().__init__(records)
        self.dropped = 0

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        return record

    def enqueue(self, record: logging.LogRecord) -> None:
        try:
            self.queue.put_nowait(record)
        except queue.Full:  # a stalled stderr must not stall the event loop, nor grow memory
            self.dropped += 1


_writer: QueueListener | None = None


def _stop_writer() -> None:
    """Write what is still queued and stop the writer thread (at exit, or before a new one)."""
    global _writer
    if _writer is not None:
        _writer.stop()
        _writer = None


atexit.register(_stop_writer)


def _flush_then_terminate(signum: int, _frame: object) -> None:
    """SIGTERM's default ends the process without ``atexit``: write the queued lines first.

    uvicorn restores this handler after its graceful shutdown and raises the signal again, so its
    last lines ("Finished server process") are written and the exit status stays "killed by SIGTERM".
    """
    _stop_writer()
    signal.signal(signum, signal.SIG_DFL)
    signal.raise_signal(signum)


def configure_logging(level: str) -> None:
    """JSON lines on stderr for the whole process (uvicorn's own access log is replaced by ours).

    Records are handed to one writer thread: the event loop never waits on stderr (a write there
    took ~0.2 ms of the loop per request at concurrency 1, and a stalled log pipe would have
    stalled every request). Pending lines are written at exit, SIGTERM included.
    """
    global _writer
    _stop_writer()
    stream = logging.StreamHandler(sys.stderr)
    stream.setFormatter(JsonFormatter())
    records: queue.Queue[logging.LogRecord] = queue.Queue(LOG_QUEUE_MAX)
    _writer = QueueListener(records, stream)
    _writer.start()
    is_main = threading.current_thread() is threading.main_thread()
    if is_main and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _flush_then_terminate)
    root = logging.getLogger()
    root.handlers[:] = [_HandOff(records)]
    root.setLevel(level.upper())
    logging.getLogger("uvicorn.access").disabled = True
