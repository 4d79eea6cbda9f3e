"""One error shape for every refusal: ``{"error": code, "detail": text}`` with the right status."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from catsdogs.preprocessing import ImageError

logger = logging.getLogger(__name__)

#: HTTP status for each :class:`~catsdogs.preprocessing.ImageError` code.
IMAGE_ERROR_STATUS: dict[str, int] = {
    "empty": 400,
    "not_an_image": 415,
    "image_too_large": 422,
    "image_too_small": 422,
    "truncated": 422,
    "decode_failed": 422,
    "upload_too_large": 413,
}


class ApiError(Exception):
    """An expected refusal; the handler turns it into the stable JSON error body."""

    def __init__(self, status: int, code: str, detail: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(f"{code}: {detail}")
        self.status = status
        self.code = code
        self.detail = detail
        self.headers = headers


class BodyTooLarge(StarletteHTTPException):
    """A request body that passed its limit while being read. An HTTPException because FastAPI
    turns any other exception raised while it reads a body into a 400."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body is at most {limit} bytes")


def image_error(exc: ImageError) -> ApiError:
    """Map a decoding failure to its HTTP status (4xx, never 5xx)."""
    return ApiError(IMAGE_ERROR_STATUS.get(exc.code, 422), exc.code, exc.detail)


def error_response(
    status: int, code: str, detail: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse({"error": code, "detail": detail}, status_code=status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    """Register handlers so refusals and unexpected failures both answer with the error body."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.detail, exc.headers)

    @app.exception_handler(BodyTooLarge)
    async def _body_too_large(request: Request, exc: BodyTooLarge) -> JSONResponse:
        return error_response(413, "body_too_large", exc.detail)

    @app.exception_handler(ImageError)
    async def _image_error(request: Request, exc: ImageError) -> JSONResponse:
        err = image_error(exc)
        return error_response(err.status, err.code, err.detail)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = [f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors()]
        return error_response(422, "invalid_request", "; ".join(parts) or "invalid request")

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unexpected error on %s", request.url.path)
        return error_response(500, "internal_error", "unexpected server error; see the service log")
