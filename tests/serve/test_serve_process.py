"""The real process: graceful SIGTERM drain, `catsdogs smoke`, two workers.

(That serving runs without torch and MLflow is tested in ``tests/test_architecture.py``.)
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from PIL import Image

from catsdogs.serve.smoke import run_smoke

REPO = Path(__file__).resolve().parents[2]


def _big_png(seed: int) -> bytes:
    # Slow enough to decode (no reduced-size path for PNG) that requests are still in flight.
    rng = __import__("numpy").random.default_rng(seed)
    pixels = rng.integers(0, 256, (1200, 1600, 3), dtype="uint8")
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


@pytest.mark.integration
@pytest.mark.slow
def test_sigterm_finishes_requests_in_flight_then_exits(
    start_server: Callable[..., object], bundle_a: Path
) -> None:
    server = start_server({"CATSDOGS_MODEL_URI": str(bundle_a)})
    payloads = [_big_png(i) for i in range(6)]
    results: list[tuple[int, int]] = []

    def send() -> None:
        files = [("files", (f"{i}.png", data)) for i, data in enumerate(payloads)]
        response = httpx.post(f"{server.url}/predict/batch", files=files, timeout=60)
        results.append((response.status_code, response.json()["failed"]))

    threads = [threading.Thread(target=send) for _ in range(3)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:  # wait until the server is busy with them
        metrics = httpx.get(f"{server.url}/metrics", timeout=5).text
        depth = re.search(r"^catsdogs_queue_depth (\S+)", metrics, re.M)
        if depth and float(depth.group(1)) > 0:
            break
        time.sleep(0.01)
    server.proc.send_signal(signal.SIGTERM)
    for thread in threads:
        thread.join(timeout=60)
    # uvicorn re-raises the signal after its graceful shutdown: killed by SIGTERM, on purpose.
    assert server.proc.wait(timeout=30) in (0, -signal.SIGTERM)
    assert "Finished server process" in server.log.read_text()
    assert results == [(200, 0)] * 3
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{server.url}/health", timeout=2)


@pytest.mark.integration
def test_smoke_passes_against_a_healthy_service_and_fails_on_wrong_answers(
    start_server: Callable[..., object], smoke_bundle: Path, tmp_path: Path
) -> None:
    server = start_server({"CATSDOGS_MODEL_URI": str(smoke_bundle), "CATSDOGS_API_KEYS": "k"})
    report = run_smoke(server.url, api_key="k")
    assert report.ok, report.checks
    assert {c.name for c in report.checks} >= {
        "health",
        "ready",
        "predict cat",
        "predict dog",
        "bad upload refused",
        "metrics",
    }
    # The same pictures with swapped labels: the smoke test must catch the wrong answers.
    swapped = tmp_path / "swapped"
    swapped.mkdir()
    for path in (smoke_bundle / "samples").iterdir():
        other = "dog" if path.name.startswith("cat") else "cat"
        (swapped / f"{other}.{path.name}").write_bytes(path.read_bytes())
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "CATSDOGS_SMOKE_API_KEY": "k"}
    ok = subprocess.run(
        [sys.executable, "-m", "catsdogs", "smoke", "--url", server.url],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ok.returncode == 0, ok.stderr
    bad = subprocess.run(
        [sys.executable, "-m", "catsdogs", "smoke", "--url", server.url, "--images", str(swapped)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 1
    assert "FAIL predict cat" in bad.stderr


def test_smoke_fails_when_nothing_listens() -> None:
    from serve_testing import free_port

    report = run_smoke(f"http://127.0.0.1:{free_port()}", ready_wait_s=0)
    assert not report.ok


@pytest.mark.integration
@pytest.mark.slow
def test_two_workers_share_metrics_and_accept_each_others_prediction_ids(
    start_server: Callable[..., object], bundle_a: Path, cat_jpeg: bytes, tmp_path: Path
) -> None:
    server = start_server(
        {
            "CATSDOGS_MODEL_URI": str(bundle_a),
            "CATSDOGS_WORKERS": "2",
            "CATSDOGS_FEEDBACK_SECRET": "shared",
            "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "prom"),
        }
    )
    # The workers share one socket and the kernel decides who accepts: sequential requests can all
    # land on one worker. Concurrent clients with Connection: close keep one worker busy while the
    # other accepts; send until the access log shows both serving /predict (bounded in time).
    ids: list[str] = []
    lock = threading.Lock()
    deadline = time.monotonic() + 60

    def logged(route: str) -> list[dict[str, object]]:
        text = server.log.read_text()
        complete = text[: text.rfind("\n") + 1]  # a worker may be writing the last line right now
        entries = [json.loads(line) for line in complete.splitlines() if line.startswith("{")]
        return [entry for entry in entries if entry.get("route") == route]

    def client_loop() -> None:
        with httpx.Client(base_url=server.url, timeout=10, headers={"Connection": "close"}) as http:
            while time.monotonic() < deadline:
                with lock:
                    if len(ids) >= 30 and len({entry["pid"] for entry in logged("/predict")}) == 2:
                        return
                # Neither worker accepts before its model is loaded: no 503 model_not_ready.
                response = http.post("/predict", files={"file": ("c.jpg", cat_jpeg)})
                assert response.status_code == 200, response.text
                with lock:
                    ids.append(response.json()["prediction_id"])

    with ThreadPoolExecutor(max_workers=4) as pool:
        for future in [pool.submit(client_loop) for _ in range(4)]:
            future.result()
    with httpx.Client(base_url=server.url, timeout=10, headers={"Connection": "close"}) as http:
        for prediction_id in ids:  # whichever worker answers knows the other's ids too
            assert (
                http.post("/feedback", json={"prediction_id": prediction_id, "label": "cat"}).status_code
                == 200
            )
        for prediction_id in ids:  # and whichever worker sees it again refuses it (the shared store)
            replay = http.post("/feedback", json={"prediction_id": prediction_id, "label": "dog"})
            assert replay.status_code == 409, replay.text
        metrics = http.get("/metrics").text
    total = sum(float(v) for v in re.findall(r"^catsdogs_predictions_total\{[^}]*\} (\S+)", metrics, re.M))
    assert total == len(ids)  # aggregated over both workers
    feedback = sum(float(v) for v in re.findall(r"^catsdogs_feedback_total\{[^}]*\} (\S+)", metrics, re.M))
    assert feedback == len(ids)
    server.stop()
    # Workers log too: one JSON access line per request, with the pid of the worker that served it.
    predictions = logged("/predict")
    assert [entry["status"] for entry in predictions] == [200] * len(ids)
    assert len({entry["pid"] for entry in predictions}) == 2  # both workers served predictions
