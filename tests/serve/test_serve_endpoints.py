"""Every endpoint answers as specified (TestClient on a tiny real ONNX model)."""

from __future__ import annotations

import json
import logging
import queue
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from serve_testing import expected_probabilities

from fakes import WEIGHTS_A

METRIC_NAMES = [
    "catsdogs_http_requests_total",
    "catsdogs_http_request_duration_seconds",
    "catsdogs_inference_duration_seconds",
    "catsdogs_batch_size",
    "catsdogs_queue_depth",
    "catsdogs_overload_rejections_total",
    "catsdogs_rejected_inputs_total",
    "catsdogs_predictions_total",
    "catsdogs_prediction_confidence",
    "catsdogs_model_info",
    "catsdogs_model_ready",
    "catsdogs_model_reloads_total",
    "catsdogs_feedback_total",
    "catsdogs_live_accuracy",
    "catsdogs_drift_score",
]


def test_health_answers_ok(client: TestClient) -> None:
    response = client.get("/health")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_ready_reports_the_loaded_version(client: TestClient) -> None:
    body = client.get("/ready").json()
    assert body["ready"] is True
    assert body["model_version"].startswith("local-")


def test_ready_is_503_and_predict_refused_while_no_model_can_load(
    make_client: Callable[..., TestClient], tmp_path: Path, cat_jpeg: bytes
) -> None:
    client = make_client(ready=False, model_uri=str(tmp_path / "no-such-bundle"))
    response = client.get("/ready")
    assert response.status_code == 503
    assert response.json()["ready"] is False
    assert client.get("/health").status_code == 200
    refused = client.post("/predict", files={"file": ("cat.jpg", cat_jpeg)})
    assert refused.status_code == 503
    assert refused.json()["error"] == "model_not_ready"
    assert "Retry-After" in refused.headers


def test_a_worker_of_several_starts_serving_only_with_its_model_loaded(
    make_client: Callable[..., TestClient],
) -> None:
    # Several workers share one socket: one still loading must not take connections yet.
    client = make_client(ready=False, workers=2)
    assert client.get("/ready").status_code == 200  # at once: startup waited for the model


def test_a_worker_without_a_model_still_starts_after_its_wait(
    make_client: Callable[..., TestClient], tmp_path: Path
) -> None:
    started = time.monotonic()
    client = make_client(
        ready=False, workers=2, worker_start_wait_s=0.5, model_uri=str(tmp_path / "no-such-bundle")
    )
    assert time.monotonic() - started < 10
    assert client.get("/ready").status_code == 503


def test_predict_multipart_returns_the_models_answer(client: TestClient, cat_jpeg: bytes) -> None:
    response = client.post("/predict", files={"file": ("cat.jpg", cat_jpeg, "image/jpeg")})
    assert response.status_code == 200
    body = response.json()
    expected = expected_probabilities(WEIGHTS_A, cat_jpeg)
    assert set(body) == {
        "label",
        "confidence",
        "probabilities",
        "prediction_id",
        "model_version",
        "latency_ms",
        "predicted",
        "ood_score",
        "unknown_reason",
    }
    assert body["probabilities"]["cat"] == pytest.approx(float(expected[0]), abs=1e-5)
    assert body["label"] == body["predicted"] == ("cat" if expected[0] > expected[1] else "dog")
    assert body["ood_score"] is None and body["unknown_reason"] is None  # a bundle without a detector
    assert body["confidence"] == pytest.approx(float(expected.max()), abs=1e-5)
    assert body["latency_ms"] > 0


def test_predict_accepts_octet_stream_as_curl_sends_it(client: TestClient, cat_jpeg: bytes) -> None:
    response = client.post("/predict", files={"file": ("cat.jpg", cat_jpeg, "application/octet-stream")})
    assert response.status_code == 200


def test_predict_accepts_a_raw_image_body(client: TestClient, cat_jpeg: bytes) -> None:
    multipart = client.post("/predict", files={"file": ("cat.jpg", cat_jpeg)}).json()
    raw = client.post("/predict", content=cat_jpeg, headers={"Content-Type": "image/jpeg"})
    assert raw.status_code == 200
    assert raw.json()["probabilities"] == multipart["probabilities"]


def test_predict_without_file_field_is_400(client: TestClient) -> None:
    response = client.post("/predict", files={"other": ("x.jpg", b"abc")})
    assert response.status_code == 400
    assert response.json()["error"] == "missing_file"


def test_batch_answers_in_order_with_an_error_entry_for_a_bad_image(
    client: TestClient, images: list[tuple[str, str, bytes]]
) -> None:
    files = [("files", (name, data, "image/jpeg")) for name, _, data in images[:3]]
    files.insert(1, ("files", ("notes.jpg", b"just text, not a jpeg", "image/jpeg")))
    response = client.post("/predict/batch", files=files)
    assert response.status_code == 200
    body = response.json()
    assert (body["count"], body["failed"]) == (4, 1)
    results = body["results"]
    assert [r["index"] for r in results] == [0, 1, 2, 3]
    assert results[1]["error"] == "not_an_image" and results[1]["label"] is None
    for result, (name, _, data) in zip([results[0], *results[2:]], images[:3], strict=True):
        assert result["filename"] == name
        expected = expected_probabilities(WEIGHTS_A, data)
        assert result["probabilities"]["dog"] == pytest.approx(float(expected[1]), abs=1e-5)


def test_batch_over_the_image_limit_is_413(make_client: Callable[..., TestClient], cat_jpeg: bytes) -> None:
    client = make_client(max_batch_images=2)
    files = [("files", (f"{i}.jpg", cat_jpeg)) for i in range(3)]
    response = client.post("/predict/batch", files=files)
    assert response.status_code == 413
    assert response.json()["error"] == "too_many_images"


def test_batch_marks_an_oversized_file_without_failing_the_batch(
    make_client: Callable[..., TestClient], cat_jpeg: bytes
) -> None:
    client = make_client(max_upload_bytes=len(cat_jpeg) + 10)
    files = [("files", ("ok.jpg", cat_jpeg)), ("files", ("big.jpg", cat_jpeg + b"\0" * 100))]
    results = client.post("/predict/batch", files=files).json()["results"]
    assert results[0]["label"] in {"cat", "dog"}
    assert results[1]["error"] == "upload_too_large"


def test_batch_needs_multipart(client: TestClient, cat_jpeg: bytes) -> None:
    response = client.post("/predict/batch", content=cat_jpeg, headers={"Content-Type": "image/jpeg"})
    assert response.status_code == 400
    assert response.json()["error"] == "missing_file"


def test_micro_batcher_mode_gives_the_same_answers(
    make_client: Callable[..., TestClient], images: list[tuple[str, str, bytes]]
) -> None:
    client = make_client(batch_max_size=8, batch_max_wait_ms=5)
    files = [("files", (name, data)) for name, _, data in images]
    results = client.post("/predict/batch", files=files).json()["results"]
    for result, (_, _, data) in zip(results, images, strict=True):
        expected = expected_probabilities(WEIGHTS_A, data)
        assert result["probabilities"]["cat"] == pytest.approx(float(expected[0]), abs=1e-5)
    metrics = client.get("/metrics").text
    # 16 images arrived together: at least one forward pass carried more than one image.
    count = float(re.search(r"^catsdogs_batch_size_count (\S+)", metrics, re.M).group(1))
    assert count < len(images)


def test_model_info_describes_the_served_bundle(client: TestClient, bundle_a: Path) -> None:
    body = client.get("/model-info").json()
    assert body["architecture"] == "tiny_gap_linear"
    assert body["source"] == "local"
    assert body["uri"] == str(bundle_a)
    assert body["metrics"]["accuracy"] == 0.5
    assert body["preprocessing"]["image_size"] == 64
    assert body["input_shape"] == ["N", 3, 64, 64]
    assert body["samples"] == ["cat.0.jpg"]


def test_samples_serves_bundle_images_and_404s_unknown_names(client: TestClient, cat_jpeg: bytes) -> None:
    assert client.get("/samples/cat.0.jpg").content == cat_jpeg
    missing = client.get("/samples/../../etc/passwd")
    assert missing.status_code == 404


def test_stats_count_classes_confidence_and_latency(
    client: TestClient, images: list[tuple[str, str, bytes]]
) -> None:
    answers = [client.post("/predict", files={"file": (n, d)}).json() for n, _, d in images[:6]]
    client.post("/predict", files={"file": ("bad.jpg", b"nope")})
    stats = client.get("/stats").json()
    assert stats["predictions"] == 6
    assert stats["errors"] == 1
    labels = [a["label"] for a in answers]
    assert stats["counts"] == {"cat": labels.count("cat"), "dog": labels.count("dog"), "unknown": 0}
    assert stats["mean_confidence"] == pytest.approx(np.mean([a["confidence"] for a in answers]), abs=1e-6)
    assert 0 < stats["latency_ms"]["p50"] <= stats["latency_ms"]["p99"]


def test_metrics_export_every_documented_name(client: TestClient, cat_jpeg: bytes) -> None:
    client.post("/predict", files={"file": ("cat.jpg", cat_jpeg)})
    client.post("/predict", files={"file": ("bad.jpg", b"")})
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    for name in METRIC_NAMES:
        assert re.search(rf"^# TYPE {name}\b", text, re.M), name
    assert 'catsdogs_rejected_inputs_total{reason="empty"} 1.0' in text
    assert 'catsdogs_http_requests_total{method="POST",route="/predict",status="200"} 1.0' in text
    assert "catsdogs_model_ready 1.0" in text
    assert re.search(r'catsdogs_model_info\{.*architecture="tiny_gap_linear".*\} 1.0', text)


def test_openapi_documents_every_endpoint(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    for path in [
        "/predict",
        "/predict/batch",
        "/health",
        "/ready",
        "/model-info",
        "/stats",
        "/metrics",
        "/feedback",
    ]:
        assert path in paths
    assert "multipart/form-data" in paths["/predict"]["post"]["requestBody"]["content"]
    assert client.get("/docs").status_code == 200


def test_index_page_works_offline(client: TestClient) -> None:
    response = client.get("/")
    assert response.status_code == 200
    assert "text/html" in response.headers["content-type"]
    assert 'type="file"' in response.text
    assert not re.search(r"(src|href)=\"https?://", response.text)  # no CDN


def test_unknown_route_is_404_and_wrong_method_is_405(client: TestClient) -> None:
    assert client.get("/nope").status_code == 404
    assert client.get("/predict").status_code == 405


def test_request_id_is_echoed_or_generated(client: TestClient) -> None:
    assert client.get("/health", headers={"X-Request-ID": "abc-123"}).headers["x-request-id"] == "abc-123"
    generated = client.get("/health", headers={"X-Request-ID": "bad id with spaces"}).headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", generated)


def test_access_log_is_one_json_line_without_image_or_secrets(
    make_client: Callable[..., TestClient], cat_jpeg: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    from catsdogs.serve.access_log import JsonFormatter

    client = make_client(api_keys=["s3cret-key"])
    with caplog.at_level(logging.INFO, logger="catsdogs.serve.access"):
        client.post("/predict", files={"file": ("cat.jpg", cat_jpeg)}, headers={"X-API-Key": "s3cret-key"})
    records = [r for r in caplog.records if r.name == "catsdogs.serve.access"]
    assert len(records) == 1
    line = JsonFormatter().format(records[0])
    entry = json.loads(line)
    assert entry["route"] == "/predict" and entry["status"] == 200
    assert {"timestamp", "request_id", "latency_ms", "label", "confidence", "model_version"} <= set(entry)
    assert "s3cret-key" not in line
    assert len(line) < 1000  # no image bytes


@pytest.mark.parametrize("ending", ["exit", "sigterm"])
def test_log_lines_are_written_off_the_calling_thread_and_all_reach_stderr_at_exit(ending: str) -> None:
    code = """
import logging, os, signal, sys, threading
from catsdogs.serve.access_log import configure_logging
configure_logging("info")
writers = {t.name for t in threading.enumerate()} - {"MainThread"}
assert len(writers) == 1, writers  # the one writer thread
for i in range(500):
    logging.getLogger("catsdogs.serve.access").info("request", extra={"fields": {"n": i}})
if sys.argv[1] == "sigterm":  # how a pod is stopped: SIGTERM's default skips atexit
    os.kill(os.getpid(), signal.SIGTERM)
"""
    out = subprocess.run([sys.executable, "-c", code, ending], capture_output=True, text=True, timeout=60)
    assert out.returncode == (0 if ending == "exit" else -signal.SIGTERM), out.stderr
    lines = [json.loads(line) for line in out.stderr.splitlines()]
    assert [line["n"] for line in lines] == list(range(500))  # none lost, in order, flushed at exit


def test_a_stalled_log_writer_drops_lines_instead_of_blocking_the_caller() -> None:
    from catsdogs.serve.access_log import _HandOff

    handler = _HandOff(queue.Queue(2))  # nobody drains it: a stalled stderr
    record = logging.LogRecord("catsdogs.serve.access", logging.INFO, __file__, 1, "request", None, None)
    for _ in range(5):
        handler.emit(record)  # returns at once
    assert handler.queue.qsize() == 2 and handler.dropped == 3


def test_cors_headers_only_for_configured_origins(make_client: Callable[..., TestClient]) -> None:
    client = make_client(cors_origins=["https://pets.example"])
    allowed = client.get("/health", headers={"Origin": "https://pets.example"})
    assert allowed.headers["access-control-allow-origin"] == "https://pets.example"
    other = client.get("/health", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in other.headers


def test_full_queue_is_refused_at_once_with_retry_after(
    make_client: Callable[..., TestClient], cat_jpeg: bytes
) -> None:
    client = make_client(queue_max=2)
    response = client.post("/predict/batch", files=[("files", (f"{i}.jpg", cat_jpeg)) for i in range(3)])
    assert response.status_code == 503
    assert response.json()["error"] == "overloaded"
    assert response.headers["retry-after"] == "1"
    assert "catsdogs_overload_rejections_total 1.0" in client.get("/metrics").text


def test_request_timeout_answers_504(make_client: Callable[..., TestClient], cat_jpeg: bytes) -> None:
    client = make_client(request_timeout_s=1e-6)
    response = client.post("/predict", files={"file": ("cat.jpg", cat_jpeg)})
    assert response.status_code == 504
    assert response.json()["error"] == "timeout"


def test_uploads_are_not_stored_unless_enabled(
    make_client: Callable[..., TestClient], cat_jpeg: bytes, tmp_path: Path
) -> None:
    off = make_client(upload_dir=tmp_path / "off")
    off.post("/predict", files={"file": ("cat.jpg", cat_jpeg)})
    assert not (tmp_path / "off").exists()
    on = make_client(upload_dir=tmp_path / "on", store_uploads=True)
    on.post("/predict", files={"file": ("cat.jpg", cat_jpeg)})
    stored = list((tmp_path / "on").rglob("*.bin"))
    assert len(stored) == 1 and stored[0].read_bytes() == cat_jpeg
