"""Any upload is safe: a 4xx JSON error or a correct prediction, never a 5xx.

Odd files are generated on the fly; "correct" means equal to the model's answer on the same
picture decoded by the shared preprocessing.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from serve_testing import expected_probabilities, jpeg_bytes

from fakes import WEIGHTS_A, build_bundle

WEIGHTS_TOP = np.array([[-3.0, 3.0], [3.0, -3.0], [0.0, 0.0]], dtype=np.float32)


def _photo(cat_jpeg: bytes) -> Image.Image:
    return Image.open(io.BytesIO(cat_jpeg)).convert("RGB")


def _encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A valid PNG signature + IHDR declaring width×height, with almost no pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))


def _gif_header_only(width: int, height: int) -> bytes:
    """A GIF whose screen and first frame declare width×height, with a few bytes of LZW data."""
    screen = struct.pack("<HH", width, height) + b"\x80\x00\x00" + b"\x00\x00\x00\xff\xff\xff"
    frame = b"\x2c" + struct.pack("<HHHH", 0, 0, width, height) + b"\x00" + b"\x02\x02\x4c\x01\x00"
    return b"GIF89a" + screen + frame + b"\x3b"


def _assert_error(response, status: int, code: str) -> None:  # type: ignore[no-untyped-def]
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"] == code
    assert isinstance(body["detail"], str) and body["detail"]


def _post(client: TestClient, data: bytes, name: str = "upload.jpg", ctype: str = "image/jpeg"):  # type: ignore[no-untyped-def]
    return client.post("/predict", files={"file": (name, data, ctype)})


def test_empty_upload_is_400(client: TestClient) -> None:
    _assert_error(_post(client, b""), 400, "empty")


def test_empty_raw_body_is_400(client: TestClient) -> None:
    _assert_error(client.post("/predict", content=b"", headers={"Content-Type": "image/jpeg"}), 400, "empty")


def test_text_file_named_jpg_is_415(client: TestClient) -> None:
    _assert_error(_post(client, b"hello, I am a text file\n" * 20, "cat.jpg"), 415, "not_an_image")


def test_random_bytes_are_415(client: TestClient) -> None:
    noise = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    _assert_error(_post(client, noise, "x.png", "image/png"), 415, "not_an_image")


def test_truncated_jpeg_is_422(client: TestClient, cat_jpeg: bytes) -> None:
    response = _post(client, cat_jpeg[: len(cat_jpeg) // 2])
    assert response.status_code == 422
    assert response.json()["error"] in {"truncated", "decode_failed"}


def test_png_decompression_bomb_is_refused_before_decoding(client: TestClient) -> None:
    bomb = _png_header_only(20000, 20000)
    assert len(bomb) < 200
    _assert_error(_post(client, bomb, "bomb.png", "image/png"), 422, "image_too_large")


def test_gif_decompression_bomb_is_refused(client: TestClient) -> None:
    _assert_error(_post(client, _gif_header_only(30000, 30000), "bomb.gif"), 422, "image_too_large")


def test_too_small_image_is_422(client: TestClient) -> None:
    _assert_error(_post(client, _encode(Image.new("RGB", (8, 8)), "PNG")), 422, "image_too_small")


def test_upload_over_the_limit_is_413_from_content_length(
    make_client: Callable[..., TestClient],
) -> None:
    client = make_client(max_upload_bytes=1000)
    _assert_error(_post(client, b"\xff\xd8" + b"\0" * 5000), 413, "upload_too_large")
    raw = client.post("/predict", content=b"\0" * 5000, headers={"Content-Type": "image/jpeg"})
    _assert_error(raw, 413, "upload_too_large")


def test_chunked_upload_over_the_limit_is_413(make_client: Callable[..., TestClient]) -> None:
    client = make_client(max_upload_bytes=1000)

    def chunks():  # type: ignore[no-untyped-def]  # no Content-Length: the limit is enforced while reading
        for _ in range(50):
            yield b"\0" * 100

    response = client.post("/predict", content=chunks(), headers={"Content-Type": "image/jpeg"})
    _assert_error(response, 413, "upload_too_large")


@pytest.mark.parametrize(
    ("mode", "fmt"),
    [("CMYK", "JPEG"), ("L", "JPEG"), ("RGBA", "PNG"), ("P", "PNG"), ("I;16", "PNG"), ("LA", "PNG")],
)
def test_every_colour_mode_is_classified(client: TestClient, cat_jpeg: bytes, mode: str, fmt: str) -> None:
    photo = _photo(cat_jpeg)
    if mode == "I;16":
        gray = np.asarray(photo.convert("L"), dtype=np.uint16) * 257
        image = Image.fromarray(gray)
        assert image.mode == "I;16"
    else:
        image = photo.convert(mode)
    data = _encode(image, fmt)
    response = _post(client, data, f"x.{fmt.lower()}", "application/octet-stream")
    assert response.status_code == 200, response.text
    expected = expected_probabilities(WEIGHTS_A, data)
    assert response.json()["probabilities"]["cat"] == pytest.approx(float(expected[0]), abs=1e-5)


def test_animated_gif_uses_the_first_frame(client: TestClient, cat_jpeg: bytes) -> None:
    first = _photo(cat_jpeg)
    second = Image.new("RGB", first.size, (0, 0, 255))
    animated = io.BytesIO()
    first.save(animated, format="GIF", save_all=True, append_images=[second], duration=100, loop=0)
    single = _encode(first, "GIF")
    answer = _post(client, animated.getvalue(), "a.gif").json()
    assert answer["probabilities"] == pytest.approx(_post(client, single, "b.gif").json()["probabilities"])


def test_exif_orientation_is_honoured(make_client: Callable[..., TestClient], tmp_path: Path) -> None:
    # A model that looks only at the top half, and a photo with a green top band: turning the
    # photo changes the answer, so the test can tell whether EXIF orientation was applied.
    client = make_client(model_uri=str(build_bundle(tmp_path / "top", WEIGHTS_TOP, top_half=True)))
    upright = Image.new("RGB", (96, 64), (255, 0, 0))
    upright.paste((0, 255, 0), (0, 0, 96, 24))
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # what the camera wrote
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    with_exif = _post(client, jpeg_bytes(stored, exif=exif, quality=95)).json()["probabilities"]
    upright_answer = _post(client, jpeg_bytes(upright, quality=95)).json()["probabilities"]
    ignored = _post(client, jpeg_bytes(stored, quality=95)).json()["probabilities"]
    assert with_exif == pytest.approx(upright_answer, abs=0.02)
    assert abs(ignored["cat"] - upright_answer["cat"]) > 0.1


@pytest.mark.slow
def test_a_48_megapixel_phone_photo_is_accepted(client: TestClient, cat_jpeg: bytes) -> None:
    big = _photo(cat_jpeg).resize((8000, 6000), Image.Resampling.NEAREST)
    data = jpeg_bytes(big, quality=70)
    del big
    assert len(data) < 10 * 1024 * 1024
    response = _post(client, data)
    assert response.status_code == 200, response.text
    assert response.json()["label"] in {"cat", "dog"}


def test_bad_inputs_are_counted_by_reason(client: TestClient) -> None:
    _post(client, b"")
    _post(client, b"text" * 100)
    text = client.get("/metrics").text
    assert 'catsdogs_rejected_inputs_total{reason="empty"} 1.0' in text
    assert 'catsdogs_rejected_inputs_total{reason="not_an_image"} 1.0' in text


def test_multipart_without_boundary_is_400(client: TestClient, cat_jpeg: bytes) -> None:
    response = client.post("/predict", content=cat_jpeg, headers={"Content-Type": "multipart/form-data"})
    _assert_error(response, 400, "bad_multipart")


def test_garbled_multipart_is_400(client: TestClient) -> None:
    body = b"--xyz\r\nthis is not a part header at all\r\n\r\n"
    response = client.post(
        "/predict", content=body, headers={"Content-Type": "multipart/form-data; boundary=xyz"}
    )
    assert 400 <= response.status_code < 500
    assert "error" in response.json()
