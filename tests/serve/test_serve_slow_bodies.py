"""Slow clients cannot hold a worker: a body must arrive within its deadline (408), and a worker
takes a bounded number of connections (uvicorn's ``limit_concurrency``)."""

from __future__ import annotations

import json
import select
import socket
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from urllib.parse import urlsplit

import httpx


def _connect(url: str) -> socket.socket:
    parts = urlsplit(url)
    return socket.create_connection((parts.hostname, parts.port), timeout=5)


def test_a_one_byte_per_second_upload_gets_408_while_a_normal_predict_gets_200(
    start_server: Callable[..., object], bundle_a: Path, cat_jpeg: bytes
) -> None:
    deadline_s = 2.0
    server = start_server(
        {"CATSDOGS_MODEL_URI": str(bundle_a), "CATSDOGS_UPLOAD_READ_TIMEOUT_S": str(deadline_s)}
    )
    url = server.url  # type: ignore[attr-defined]
    normal: list[int] = []

    def predict() -> None:
        normal.append(
            httpx.post(f"{url}/predict", files={"file": ("c.jpg", cat_jpeg)}, timeout=10).status_code
        )

    with _connect(url) as slow:
        slow.sendall(
            b"POST /predict HTTP/1.1\r\nHost: test\r\nContent-Type: image/jpeg\r\n"
            b"Content-Length: 1000\r\n\r\n"
        )
        started = time.monotonic()
        parallel = threading.Thread(target=predict)
        parallel.start()
        answer = b""
        for byte in cat_jpeg[:8]:  # one byte a second: 8 s if the deadline did not cut it
            slow.sendall(bytes([byte]))
            if select.select([slow], [], [], 1.0)[0]:
                answer = slow.recv(65536)
                break
        elapsed = time.monotonic() - started
        parallel.join(timeout=10)
        head, _, body = answer.partition(b"\r\n\r\n")
        length = next(
            (
                int(line.split(b":")[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            ),
            0,
        )
        while len(body) < length and select.select([slow], [], [], 2.0)[0]:  # the body may come apart
            chunk = slow.recv(65536)
            if not chunk:
                break
            body += chunk
    assert head.startswith(b"HTTP/1.1 408"), answer
    assert json.loads(body)["error"] == "upload_timeout"
    assert deadline_s <= elapsed < deadline_s + 2
    assert normal == [200]


def test_a_worker_refuses_connections_past_its_limit(
    start_server: Callable[..., object], bundle_a: Path
) -> None:
    server = start_server({"CATSDOGS_MODEL_URI": str(bundle_a), "CATSDOGS_MAX_CONNECTIONS": "4"})
    url = server.url  # type: ignore[attr-defined]
    with ExitStack() as idle:
        for _ in range(4):
            idle.enter_context(_connect(url))
        time.sleep(0.2)  # the server has accepted them
        assert httpx.get(f"{url}/health", timeout=5).status_code == 503
    deadline = time.monotonic() + 5
    while httpx.get(f"{url}/health", timeout=5).status_code != 200:  # closed connections are let go
        assert time.monotonic() < deadline
        time.sleep(0.05)
