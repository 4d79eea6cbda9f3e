"""Per-caller rate limiting: 429 with Retry-After past the burst, one count per API key (or client
address), shared by the worker processes of one server."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from catsdogs.serve.rate_limit import LocalRateLimiter, RateLimiter, build_rate_limiter
from catsdogs.settings import Settings

KEYS = "key-one-secret,key-two-secret"


def _shared(tmp_path: Path, **kwargs: int) -> RateLimiter:
    return RateLimiter(tmp_path / "buckets.sqlite", **kwargs)


def _local(_: Path, **kwargs: int) -> LocalRateLimiter:
    return LocalRateLimiter(**kwargs)


@pytest.mark.parametrize("make", [_shared, _local], ids=["sqlite_file", "one_process"])
def test_the_burst_passes_then_the_rate_applies(tmp_path: Path, make: Callable[..., object]) -> None:
    limiter = make(tmp_path, per_minute=60, burst=3)
    assert [limiter.retry_after("a", now=100.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.retry_after("a", now=100.0) == pytest.approx(1.0)  # one request a second refills
    assert limiter.retry_after("b", now=100.0) == 0.0  # another caller has its own bucket
    assert limiter.retry_after("a", now=100.5) == pytest.approx(0.5)
    assert limiter.retry_after("a", now=101.0) == 0.0
    assert limiter.retry_after("a", now=101.0) == pytest.approx(1.0)
    assert [limiter.retry_after("a", now=200.0) for _ in range(3)] == [0.0, 0.0, 0.0]  # full again


def test_one_process_keeps_counts_in_memory_and_forgets_idle_callers() -> None:
    limiter = build_rate_limiter(Settings(api_keys=KEYS, rate_limit_per_minute=60, rate_limit_burst=2))
    assert isinstance(limiter, LocalRateLimiter)  # no store configured: one process, nothing to share
    limiter.max_callers = 3
    for caller in ("a", "b", "c"):
        assert limiter.retry_after(caller, now=10.0) == 0.0
    # A flood of new callers cannot grow the table: once full, the idle ones (refilled) are dropped.
    assert limiter.retry_after("d", now=20.0) == 0.0
    assert limiter.retry_after("e", now=20.0) == 0.0
    assert len(limiter._tat) <= 3
    assert limiter.retry_after("d", now=20.0) == 0.0
    assert limiter.retry_after("d", now=20.0) > 0  # the active caller still has its count


def test_a_configured_store_is_the_shared_sqlite_file(tmp_path: Path) -> None:
    store = tmp_path / "buckets.sqlite"
    limiter = build_rate_limiter(Settings(api_keys=KEYS, rate_limit_store=store))
    assert isinstance(limiter, RateLimiter) and store.exists()


def test_two_limiters_on_one_file_share_the_count(tmp_path: Path) -> None:
    first, second = (RateLimiter(tmp_path / "buckets.sqlite", per_minute=60, burst=2) for _ in range(2))
    assert first.retry_after("a", now=10.0) == 0.0
    assert second.retry_after("a", now=10.0) == 0.0
    assert first.retry_after("a", now=10.0) > 0
    assert second.retry_after("a", now=10.0) > 0


@pytest.mark.parametrize(
    ("overrides", "limited"),
    [
        ({}, False),  # a developer's loopback service without keys
        ({"api_keys": KEYS}, True),  # on by default once there are keys
        ({"host": "0.0.0.0", "allow_anonymous": True}, True),  # public without keys: by address
        ({"api_keys": KEYS, "rate_limit_per_minute": 0}, False),
    ],
)
def test_limiting_is_on_by_default_for_a_service_others_can_reach(
    overrides: dict[str, object], limited: bool
) -> None:
    assert (build_rate_limiter(Settings(**overrides)) is not None) is limited


def test_the_request_past_the_burst_gets_429_with_retry_after(
    make_client: Callable[..., TestClient], cat_jpeg: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    client = make_client(api_keys=KEYS, rate_limit_per_minute=6, rate_limit_burst=3)
    one, two = ({"X-API-Key": key} for key in KEYS.split(","))
    with caplog.at_level(logging.DEBUG):
        statuses = [
            client.post("/predict", files={"file": ("c.jpg", cat_jpeg)}, headers=one).status_code
            for _ in range(3)
        ]
        refused = client.post("/predict", files={"file": ("c.jpg", cat_jpeg)}, headers=one)
    assert statuses == [200, 200, 200]
    assert refused.status_code == 429
    assert refused.json()["error"] == "rate_limited"
    assert 1 <= int(refused.headers["Retry-After"]) <= 10  # one request every 10 s
    # One count per caller across the limited endpoints: batch and feedback are refused too.
    batch = client.post("/predict/batch", files=[("files", ("c.jpg", cat_jpeg))], headers=one)
    assert batch.status_code == 429
    assert (
        client.post("/feedback", json={"prediction_id": "x", "label": "cat"}, headers=one).status_code == 429
    )
    # Another key has its own allowance; a wrong key is refused as such, not counted.
    assert client.post("/predict", files={"file": ("c.jpg", cat_jpeg)}, headers=two).status_code == 200
    wrong = {"X-API-Key": "not-a-key"}
    assert client.post("/predict", files={"file": ("c.jpg", cat_jpeg)}, headers=wrong).status_code == 403
    assert client.get("/health").status_code == 200  # operational endpoints are not limited
    assert "key-one-secret" not in caplog.text
    assert "429" in json.dumps(client.get("/openapi.json").json()["paths"]["/predict"])


@pytest.mark.integration
def test_two_workers_of_one_server_share_the_limit(
    start_server: Callable[..., object], bundle_a: Path, cat_jpeg: bytes
) -> None:
    """Without sharing, each worker would let its own burst through: up to twice as many 200s."""
    burst = 8
    server = start_server(
        {
            "CATSDOGS_MODEL_URI": str(bundle_a),
            "CATSDOGS_WORKERS": "2",
            "CATSDOGS_API_KEYS": KEYS,
            "CATSDOGS_RATE_LIMIT_PER_MINUTE": "1",  # no refill during the test
            "CATSDOGS_RATE_LIMIT_BURST": str(burst),
        }
    )
    statuses: list[int] = []
    lock = threading.Lock()
    deadline = time.monotonic() + 60

    def pids() -> set[object]:
        text = server.log.read_text()
        lines = text[: text.rfind("\n") + 1].splitlines()  # a worker may be writing the last line
        entries = [json.loads(line) for line in lines if line.startswith("{")]
        return {entry["pid"] for entry in entries if entry.get("route") == "/predict"}

    def client_loop() -> None:
        # Connection: close and four concurrent clients: both workers get to accept connections.
        headers = {"Connection": "close", "X-API-Key": KEYS.split(",")[0]}
        with httpx.Client(base_url=server.url, timeout=10, headers=headers) as http:
            while time.monotonic() < deadline:
                with lock:
                    if len(statuses) >= 3 * burst and len(pids()) == 2:
                        return
                response = http.post("/predict", files={"file": ("c.jpg", cat_jpeg)})
                assert response.status_code in (200, 429), response.text
                if response.status_code == 429:
                    assert int(response.headers["Retry-After"]) >= 1
                with lock:
                    statuses.append(response.status_code)

    with ThreadPoolExecutor(max_workers=4) as pool:
        for future in [pool.submit(client_loop) for _ in range(4)]:
            future.result()
    assert len(pids()) == 2, "both workers answered"
    assert statuses.count(200) == burst
    assert statuses.count(429) == len(statuses) - burst
