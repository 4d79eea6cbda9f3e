"""Every decoder failure is the client's error: a 4xx for that image only, never a 5xx.

Seeds are small valid images of every accepted format, written by Pillow at test time; hypothesis
mutates them (bit flips, overwritten header fields, insertions, truncations) and posts them to
``/predict`` and, next to a good image, to ``/predict/batch``. Derandomized, bounded in examples.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, PngImagePlugin

from support import DECODER_FAILURES

FUZZ = settings(
    max_examples=1500,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def _seeds() -> dict[str, bytes]:
    """One valid image per format and a few encoder variants, all with an EXIF orientation."""
    pixels = np.random.default_rng(0).integers(0, 256, size=(40, 48, 3), dtype=np.uint8)
    photo = Image.fromarray(pixels)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated: the EXIF reader runs too
    variants: list[tuple[str, Image.Image, dict[str, object]]] = [
        ("JPEG", photo, {"exif": exif}),
        ("JPEG", photo, {"progressive": True}),
        ("PNG", photo, {"exif": exif}),
        ("PNG", photo.convert("P"), {}),
        ("PNG", photo.convert("RGBA"), {}),
        ("GIF", photo, {}),
        ("WEBP", photo, {"exif": exif}),
        ("WEBP", photo, {"lossless": True}),
        ("TIFF", photo, {"exif": exif}),
        ("TIFF", photo, {"compression": "tiff_lzw"}),
        ("TIFF", photo, {"compression": "jpeg"}),
        ("BMP", photo, {}),
        ("BMP", photo.convert("P"), {}),
    ]
    seeds = {}
    for fmt, image, options in variants:
        buffer = io.BytesIO()
        image.save(buffer, format=fmt, **options)
        seeds[f"{fmt}-{image.mode}-{'-'.join(options)}"] = buffer.getvalue()
    return seeds


SEEDS = _seeds()
GOOD_PNG = SEEDS["PNG-RGB-exif"]
# Pillow warns about every damaged TIFF tag it skips; expected here, noise in the report.
pytestmark = pytest.mark.filterwarnings(r"ignore::UserWarning:PIL\..*")
_FIELD_VALUES = [b"\x00", b"\xff", b"\x7f", b"\x80"]


@st.composite
def mutated_images(draw: st.DrawFn) -> bytes:
    """A seed with one to four mutations, biased to the first 256 bytes where headers live."""
    data = bytearray(SEEDS[draw(st.sampled_from(sorted(SEEDS)))])
    for _ in range(draw(st.integers(1, 4))):
        span = len(data) if draw(st.booleans()) else min(len(data), 256)
        at = draw(st.integers(0, max(span - 1, 0)))
        kind = draw(st.sampled_from(["flip", "field", "insert", "truncate"]))
        if kind == "flip":
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "field":  # a 1/2/4-byte header field set to an extreme
            width = draw(st.sampled_from([1, 2, 4]))
            data[at : at + width] = draw(st.sampled_from(_FIELD_VALUES)) * width
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        else:
            del data[max(at, 1) :]
    return bytes(data)


def _assert_client_error_or_answer(response) -> None:  # type: ignore[no-untyped-def]
    assert response.status_code < 500, response.text
    if response.status_code != 200:
        assert set(response.json()) == {"error", "detail"}


def test_every_seed_is_a_good_image(client: TestClient) -> None:
    """The seeds themselves are answered: the mutations, not the seeds, make the bad inputs."""
    for name, data in SEEDS.items():
        response = client.post("/predict", files={"file": ("seed", data, "application/octet-stream")})
        assert response.status_code == 200, (name, response.text)


@given(data=mutated_images())
@FUZZ
def test_a_mutated_upload_is_never_a_server_error(client: TestClient, data: bytes) -> None:
    response = client.post("/predict", files={"file": ("upload", data, "application/octet-stream")})
    _assert_client_error_or_answer(response)


@given(data=mutated_images())
@settings(parent=FUZZ, max_examples=400)
def test_a_mutated_image_in_a_batch_fails_alone(client: TestClient, data: bytes) -> None:
    files = [("files", ("bad", data, "application/octet-stream")), ("files", ("good", GOOD_PNG, "image/png"))]
    response = client.post("/predict/batch", files=files)
    assert response.status_code == 200, response.text
    bad, good = response.json()["results"]
    assert good["label"] in {"cat", "dog"} and good["error"] is None
    assert (bad["label"] is None) == (bad["error"] is not None)


def _broken_png_decoder(failure: BaseException) -> Callable[[object], None]:
    def load(self: object) -> None:
        raise failure

    return load


@pytest.mark.parametrize("failure", DECODER_FAILURES, ids=lambda exc: type(exc).__name__)
def test_a_decoder_failure_is_a_4xx_and_fails_only_its_image_in_a_batch(
    client: TestClient, failure: BaseException, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", _broken_png_decoder(failure))
    single = client.post("/predict", files={"file": ("x.png", GOOD_PNG, "image/png")})
    assert single.status_code == 422, single.text
    assert single.json()["error"] == "decode_failed"
    files = [
        ("files", ("x.png", GOOD_PNG, "image/png")),
        ("files", ("y.jpg", SEEDS["JPEG-RGB-exif"], "image/jpeg")),
    ]
    batch = client.post("/predict/batch", files=files)
    assert batch.status_code == 200, batch.text
    body = batch.json()
    bad, good = body["results"]
    assert (bad["error"], bad["label"]) == ("decode_failed", None)
    assert good["error"] is None and good["label"] in {"cat", "dog"}
    assert body["failed"] == 1
