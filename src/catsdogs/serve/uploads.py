"""Reading uploads with hard size limits, streaming, without trusting names or content types.

A multipart body is parsed chunk by chunk as it arrives (python-multipart's push parser), so an
oversized upload is refused with 413 after at most ``limit`` bytes, or at once when the declared
``Content-Length`` already says so. Any other content type is taken as the raw image bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from fastapi import Request
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect

from catsdogs.serve.errors import ApiError

if TYPE_CHECKING:
    from catsdogs.serve.admission import Ticket
    from catsdogs.serve.service import Service

# Multipart framing (boundaries, part headers) on top of the file bytes themselves.
FRAMING_ALLOWANCE = 16 * 1024


@dataclass
class Part:
    """One uploaded file (or the whole raw body)."""

    name: str
    filename: str | None = None
    data: bytearray = field(default_factory=bytearray)
    too_large: bool = False


def too_large(limit: int) -> ApiError:
    return ApiError(413, "upload_too_large", f"the upload is over the limit of {limit} bytes")


def declared_length(request: Request) -> int | None:
    """The body size the client announced, if it did (a chunked upload does not)."""
    declared = request.headers.get("content-length")
    return int(declared) if declared is not None and declared.isdigit() else None


def _check_declared_length(request: Request, limit: int, *, reported: int | None = None) -> None:
    declared = declared_length(request)
    if declared is not None and declared > limit:
        raise too_large(reported or limit)


@dataclass(frozen=True)
class BodyBudget:
    """How a body may be read: ``reserve(total)`` is told the bytes received so far before they are
    kept (it raises to refuse them), and the whole body must arrive within ``timeout_s`` (408)."""

    reserve: Callable[[int], None]
    timeout_s: float


@contextlib.asynccontextmanager
async def _reading(budget: BodyBudget) -> AsyncIterator[None]:
    """Around a body's read loop: 408 once the deadline passes, 400 when the client goes away."""
    try:
        async with asyncio.timeout(budget.timeout_s):
            yield
    except TimeoutError:
        raise ApiError(
            408,
            "upload_timeout",
            f"the upload did not arrive within {budget.timeout_s:g} s; "
            "retry on a faster connection or send a smaller image",
        ) from None
    except ClientDisconnect:
        raise _disconnected() from None


async def read_raw(request: Request, *, limit: int, budget: BodyBudget) -> Part:
    """The raw body as one part; 413 as soon as it passes ``limit``."""
    _check_declared_length(request, limit)
    part = Part(name="body")
    async with _reading(budget):
        async for chunk in request.stream():
            if len(part.data) + len(chunk) > limit:
                raise too_large(limit)
            budget.reserve(len(part.data) + len(chunk))
            part.data += chunk
    return part


def _disconnected() -> ApiError:
    return ApiError(400, "incomplete_upload", "the client disconnected before the upload was complete")


class _PartCollector:
    """python-multipart callbacks that keep only the wanted fields, each capped at ``part_limit``."""

    def __init__(self, fields: set[str], part_limit: int, *, fail_fast: bool) -> None:
        self.fields = fields
        self.part_limit = part_limit
        self.fail_fast = fail_fast
        self.parts: list[Part] = []
        self._current: Part | None = None
        self._header_name = bytearray()
        self._header_value = bytearray()
        self._headers: dict[bytes, bytes] = {}

    def callbacks(self) -> dict[str, object]:
        return {
            "on_part_begin": self._begin,
            "on_header_field": lambda d, s, e: self._header_name.extend(d[s:e]),
            "on_header_value": lambda d, s, e: self._header_value.extend(d[s:e]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._data,
            "on_part_end": self._end,
        }

    def _begin(self) -> None:
        self._headers = {}
        self._current = None

    def _header_end(self) -> None:
        self._headers[bytes(self._header_name).lower()] = bytes(self._header_value)
        self._header_name.clear()
        self._header_value.clear()

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        name = options.get(b"name", b"").decode("utf-8", "replace")
        if name in self.fields:
            filename = options.get(b"filename")
            self._current = Part(
                name=name, filename=filename.decode("utf-8", "replace") if filename else None
            )

    def _data(self, data: bytes, start: int, end: int) -> None:
        part = self._current
        if part is None or part.too_large:
            return
        if len(part.data) + (end - start) > self.part_limit:
            if self.fail_fast:
                raise too_large(self.part_limit)
            part.too_large = True
            part.data = bytearray()  # keep nothing of an oversized file
            return
        part.data += data[start:end]

    def _end(self) -> None:
        if self._current is not None:
            self.parts.append(self._current)
        self._current = None


async def read_multipart(
    request: Request,
    *,
    fields: set[str],
    part_limit: int,
    body_limit: int,
    max_parts: int,
    fail_fast: bool,
    budget: BodyBudget,
) -> list[Part]:
    """Stream-parse a multipart body, keeping the files named in ``fields``."""
    _, options = parse_options_header(request.headers.get("content-type"))
    boundary = options.get(b"boundary")
    if not boundary:
        raise ApiError(400, "bad_multipart", "multipart/form-data without a boundary")
    limit = body_limit + FRAMING_ALLOWANCE
    _check_declared_length(request, limit, reported=body_limit)
    collector = _PartCollector(fields, part_limit, fail_fast=fail_fast)
    parser = MultipartParser(boundary, collector.callbacks())  # type: ignore[arg-type]
    received = 0
    try:
        async with _reading(budget):
            async for chunk in request.stream():
                received += len(chunk)
                if received > limit:
                    raise too_large(body_limit)
                budget.reserve(received)
                parser.write(chunk)
                if len(collector.parts) > max_parts:
                    raise ApiError(413, "too_many_images", f"at most {max_parts} images per request")
        parser.finalize()
    except MultipartParseError as exc:
        raise ApiError(400, "bad_multipart", f"the multipart body cannot be parsed: {exc}") from None
    return collector.parts


def admit_upload(request: Request, service: Service, body_limit: int) -> Ticket:
    """Reserve the declared body before any of it is read. A declaration over the route's limit is
    413 first (a body that will never be read is not told to retry later)."""
    declared = declared_length(request) or 0
    if declared > body_limit + FRAMING_ALLOWANCE:
        raise too_large(body_limit)
    return service.predictor.admit(declared)


def upload_budget(service: Service, ticket: Ticket) -> BodyBudget:
    """How an admitted upload is read: its bytes reserved on ``ticket``, within the read timeout."""
    return BodyBudget(reserve=ticket.reserve_bytes, timeout_s=service.settings.upload_read_timeout_s)


def is_multipart(request: Request) -> bool:
    return request.headers.get("content-type", "").lower().startswith("multipart/form-data")
