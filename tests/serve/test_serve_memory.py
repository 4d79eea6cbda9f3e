"""Memory is bounded by bytes: measured on a real server process (its VmHWM / VmRSS in /proc),
since Pillow and ONNX Runtime allocate outside anything Python could trace."""

from __future__ import annotations

import io
import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from catsdogs.bundle import ONNX
from catsdogs.runtime import INPUT_NAME, OUTPUT_NAME
from fakes import IMAGE_SIZE, build_bundle

MB = 1_000_000
MIB = 1024 * 1024


def _status(pid: int, field: str) -> int:
    """A ``/proc/<pid>/status`` figure in bytes (VmHWM: the peak resident set; VmRSS: the current)."""
    text = Path(f"/proc/{pid}/status").read_text()
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.M)
    assert match, text
    return int(match.group(1)) * 1024


def _metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=5).text
    match = re.search(rf"^{name} (\S+)", text, re.M)
    assert match, name
    return float(match.group(1))


def slow_bundle(root: Path, *, passes: int) -> Path:
    """A bundle whose graph takes real time in little memory: a 3x3 convolution of 256 channels on
    the 64x64 image (about 0.05 s on one core), run ``passes`` times by an ONNX ``Loop`` (one set
    of weights, 4 MiB activations), then pooled into two logits."""
    build_bundle(root)
    # A gain of about 1.5 per pass, capped by tanh: the values neither vanish into denormals (which
    # make a CPU's float units far slower than any fixed count of passes) nor overflow.
    kernel = np.random.default_rng(0).standard_normal((256, 256, 3, 3)).astype(np.float32) * (1.5 / 48)
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("Conv", ["x_in", "kernel"], ["conv"], pads=[1, 1, 1, 1]),
            helper.make_node("Tanh", ["conv"], ["x_out"]),
        ],
        "pass",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("x_in", TensorProto.FLOAT, None),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("x_out", TensorProto.FLOAT, None),
        ],
    )
    initializers = [
        numpy_helper.from_array(np.zeros((256, 3, 1, 1), np.float32) + 0.1, "widen"),
        numpy_helper.from_array(kernel, "kernel"),
        numpy_helper.from_array(np.array(passes, np.int64), "passes"),
        numpy_helper.from_array(np.array(True), "true"),
        numpy_helper.from_array(np.full((256, 2), 0.01, np.float32), "W"),
    ]
    nodes = [
        helper.make_node("Conv", [INPUT_NAME, "widen"], ["wide"]),
        helper.make_node("Loop", ["passes", "true", "wide"], ["looped"], body=body),
        helper.make_node("GlobalAveragePool", ["looped"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
        helper.make_node("MatMul", ["flat", "W"], [OUTPUT_NAME]),
    ]
    graph = helper.make_graph(
        nodes,
        "slow",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["N", 3, IMAGE_SIZE, IMAGE_SIZE])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["N", 2])],
        initializer=initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(root / ONNX))
    return root


def _sixteen_bit_zeros() -> bytes:
    """The upload of the issue: 7071x7071 16-bit grayscale, all zero, ~97 KB as PNG."""
    buffer = io.BytesIO()
    Image.new("I;16", (7071, 7071)).save(buffer, "PNG")
    return buffer.getvalue()


def _phone_jpeg() -> bytes:
    """A 48-megapixel 8-bit JPEG as a phone takes it (8000x6000, EXIF "rotate 90"): gradients with
    blocky noise, so it compresses to a few megabytes like a photo."""
    height, width = 6000, 8000
    y = np.linspace(0, 160, height, dtype=np.float32)[:, None]
    x = np.linspace(0, 160, width, dtype=np.float32)[None, :]
    pixels = np.empty((height, width, 3), np.uint8)
    pixels[..., 0] = y + x * 0.5
    pixels[..., 1] = x
    pixels[..., 2] = 200 - y
    noise = np.random.default_rng(0).integers(0, 48, (height // 8, width // 8, 3), dtype=np.uint8)
    pixels += np.repeat(np.repeat(noise, 8, axis=0), 8, axis=1)
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90, exif=exif)
    return buffer.getvalue()


def test_a_sixteen_bit_png_does_not_blow_the_memory_and_a_phone_photo_still_passes(
    start_server: Callable[..., object], bundle_a: Path, cat_jpeg: bytes
) -> None:
    server = start_server({"CATSDOGS_MODEL_URI": str(bundle_a)})
    pid = server.proc.pid  # type: ignore[attr-defined]
    url = server.url  # type: ignore[attr-defined]
    png, jpeg = _sixteen_bit_zeros(), _phone_jpeg()
    assert len(png) < 200_000
    assert httpx.post(f"{url}/predict", files={"file": ("c.jpg", cat_jpeg)}, timeout=30).status_code == 200
    before = _status(pid, "VmHWM")
    response = httpx.post(f"{url}/predict", content=png, headers={"Content-Type": "image/png"}, timeout=60)
    grown = _status(pid, "VmHWM") - before
    assert response.status_code == 200 or 400 <= response.status_code < 500, response.text
    assert grown < 300 * MB, f"peak RSS grew by {grown / MB:.0f} MB"
    photo = httpx.post(f"{url}/predict", content=jpeg, headers={"Content-Type": "image/jpeg"}, timeout=60)
    assert photo.status_code == 200, photo.text


def _noise_png(side: int, seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG", compress_level=0)
    return buffer.getvalue()


def test_a_flood_of_batch_uploads_stays_within_the_in_flight_byte_budget(
    start_server: Callable[..., object], tmp_path: Path
) -> None:
    budget = 40 * MIB
    server = start_server(
        {
            "CATSDOGS_MODEL_URI": str(slow_bundle(tmp_path / "slow", passes=6)),
            "CATSDOGS_MAX_INFLIGHT_BYTES": str(budget),
            "CATSDOGS_ORT_INTRA_THREADS": "1",
        }
    )
    pid, url = server.proc.pid, server.url  # type: ignore[attr-defined]
    files = [("files", (f"{i}.png", _noise_png(1270, i))) for i in range(2)]  # 2 x 4.6 MiB
    body_size = sum(len(data) for _, (_, data) in files)
    assert 9 * MIB < body_size < 10 * MIB
    with httpx.Client(timeout=60) as warm:
        assert warm.post(f"{url}/predict/batch", files=files[:1]).status_code == 200
    idle = _status(pid, "VmRSS")
    statuses: list[int] = []
    start = threading.Barrier(64)

    def upload(_: int) -> None:
        with httpx.Client(timeout=120) as client:
            start.wait()
            statuses.append(client.post(f"{url}/predict/batch", files=files).status_code)

    with ThreadPoolExecutor(max_workers=64) as pool:
        list(pool.map(upload, range(64)))
    peak = _status(pid, "VmHWM")
    assert set(statuses) <= {200, 413, 503}, statuses
    assert statuses.count(200) >= 1 and statuses.count(503) >= 1, statuses
    assert peak <= idle + budget + 100 * MB, f"peak {peak / MB:.0f} MB, idle {idle / MB:.0f} MB"


def test_a_timed_out_request_keeps_its_admission_until_its_work_ends(
    start_server: Callable[..., object], tmp_path: Path, cat_jpeg: bytes
) -> None:
    """One pool thread, a forward pass of about a second and a 0.2 s timeout: the first request's
    work runs on after its 504 and stays counted; the two queued behind it never run."""
    server = start_server(
        {
            "CATSDOGS_MODEL_URI": str(slow_bundle(tmp_path / "slow", passes=20)),
            "CATSDOGS_REQUEST_TIMEOUT_S": "0.2",
            "CATSDOGS_DECODE_THREADS": "1",
            "CATSDOGS_INFERENCE_WORKERS": "1",
            "CATSDOGS_BATCH_MAX_SIZE": "1",
            "CATSDOGS_ORT_INTRA_THREADS": "1",
        }
    )
    url = server.url  # type: ignore[attr-defined]
    runs_before = _metric(url, "catsdogs_inference_duration_seconds_count")

    def send(_: int) -> int:
        return httpx.post(f"{url}/predict", files={"file": ("c.jpg", cat_jpeg)}, timeout=30).status_code

    with ThreadPoolExecutor(max_workers=3) as pool:
        assert list(pool.map(send, range(3))) == [504] * 3
    assert _metric(url, "catsdogs_queue_depth") >= 1  # the running job still holds its image and bytes
    deadline = time.monotonic() + 15
    while _metric(url, "catsdogs_queue_depth") > 0:
        assert time.monotonic() < deadline, "the admission was never returned"
        time.sleep(0.05)
    assert _metric(url, "catsdogs_inference_duration_seconds_count") - runs_before <= 1
