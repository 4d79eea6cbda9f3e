"""``/feedback`` is authenticated and bounded before its body is read.

FastAPI reads a JSON body before it runs a route's dependencies, so the API-key check of
``/feedback`` would only refuse a 20 MB unauthenticated body after reading all of it. This ASGI
middleware answers 401/403 from the headers alone, 413 for a declared ``Content-Length`` over the
limit, and stops reading (413) once a body without one grows past it.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from catsdogs.serve.errors import ApiError, BodyTooLarge, error_response
from catsdogs.serve.security import require_api_key

FEEDBACK_PATH = "/feedback"


class FeedbackGate:
    """Refuse unauthenticated or oversized ``/feedback`` requests before reading their bodies."""

    def __init__(self, app: ASGIApp, *, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != FEEDBACK_PATH:
            await self.app(scope, receive, send)
            return
        refusal = await self._refusal(Request(scope))
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        await self.app(scope, self._bounded(receive), send)

    async def _refusal(self, request: Request) -> Any | None:
        try:
            await require_api_key(request)
        except ApiError as exc:
            return error_response(exc.status, exc.code, exc.detail, exc.headers)
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_body_bytes):
            return self._too_large()
        return None

    def _too_large(self) -> Any:
        return error_response(413, "body_too_large", BodyTooLarge(self.max_body_bytes).detail)

    def _bounded(self, receive: Receive) -> Receive:
        seen = 0

        async def bounded() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body_bytes:
                    raise BodyTooLarge(self.max_body_bytes)
            return message

        return bounded
