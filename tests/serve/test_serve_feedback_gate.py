"""``/feedback`` is authenticated and bounded before its body is read (counted at the ASGI receive)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator

import pytest
from fastapi.testclient import TestClient

CHUNK = 64 * 1024
TWENTY_MB = 320  # chunks of 64 KiB


def _post_feedback(app, headers: dict[str, str], chunks: Iterator[bytes]) -> tuple[int, int]:
    """POST /feedback straight to the ASGI app; (status, body bytes the app pulled from receive)."""
    pulled = 0
    messages: list[dict] = []

    async def receive() -> dict:
        nonlocal pulled
        chunk = next(chunks, None)
        if chunk is None:
            return {"type": "http.request", "body": b"", "more_body": False}
        pulled += len(chunk)
        return {"type": "http.request", "body": chunk, "more_body": True}

    async def send(message: dict) -> None:
        messages.append(message)

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": "/feedback", "raw_path": b"/feedback", "root_path": "",
        "query_string": b"", "server": ("127.0.0.1", 8000), "client": ("127.0.0.1", 50000),
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
    }  # fmt: skip
    asyncio.run(app(scope, receive, send))
    return next(m["status"] for m in messages if m["type"] == "http.response.start"), pulled


def _twenty_mb() -> Iterator[bytes]:
    return (b"x" * CHUNK for _ in range(TWENTY_MB))


@pytest.fixture
def keyed(make_client: Callable[..., TestClient]) -> TestClient:
    return make_client(api_keys=["key-one"])


def test_unauthenticated_20_mb_feedback_is_401_after_reading_under_64_kib(keyed: TestClient) -> None:
    status, pulled = _post_feedback(keyed.app, {"content-type": "application/json"}, _twenty_mb())
    assert status == 401
    assert pulled < CHUNK


def test_a_wrong_key_is_403_before_the_body(keyed: TestClient) -> None:
    headers = {"content-type": "application/json", "x-api-key": "nope"}
    assert _post_feedback(keyed.app, headers, _twenty_mb()) == (403, 0)


def test_a_declared_oversized_body_is_413_before_it_is_read(keyed: TestClient) -> None:
    headers = {"content-type": "application/json", "x-api-key": "key-one", "content-length": str(20 << 20)}
    assert _post_feedback(keyed.app, headers, _twenty_mb()) == (413, 0)


def test_an_undeclared_oversized_body_stops_being_read_at_the_limit(keyed: TestClient) -> None:
    headers = {"content-type": "application/json", "x-api-key": "key-one"}
    status, pulled = _post_feedback(keyed.app, headers, _twenty_mb())
    assert status == 413
    assert pulled <= 2 * CHUNK  # the limit (64 KiB) and the chunk that crossed it


def test_an_authenticated_small_feedback_still_reaches_the_route(keyed: TestClient) -> None:
    response = keyed.post(
        "/feedback",
        json={"prediction_id": "abcdefghij.klmnop", "label": "cat"},
        headers={"X-API-Key": "key-one"},
    )
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_prediction_id"
