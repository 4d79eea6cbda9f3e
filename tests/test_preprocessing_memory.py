"""Decoding in bounded memory: the banded conversion gives the pixels of a whole-image one, the
header-based estimate covers what decoding really takes, and an image over budget is refused
before a pixel is decoded."""

from __future__ import annotations

import io
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from catsdogs import image_memory
from catsdogs.image_memory import decode_bytes, to_rgb
from catsdogs.preprocessing import ImageError, decode_image

REPO = Path(__file__).resolve().parents[1]
RNG = np.random.default_rng(0)


def _encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def _images() -> dict[str, Image.Image]:
    rgba = Image.fromarray(RNG.integers(0, 256, (61, 97, 4), dtype=np.uint8), "RGBA")
    palette = rgba.convert("RGB").convert("P")
    palette.info["transparency"] = 3
    big_endian = RNG.integers(0, 65536, (61, 97), dtype=np.uint16).astype(">u2")
    return {
        "I;16": Image.fromarray(RNG.integers(0, 65536, (61, 97), dtype=np.uint16)),
        "I;16 low": Image.fromarray(RNG.integers(0, 200, (61, 97), dtype=np.uint16)),
        "I;16B": Image.frombuffer("I;16B", (97, 61), big_endian.tobytes(), "raw", "I;16B", 0, 1),
        "I": Image.fromarray(RNG.integers(-5000, 90000, (61, 97), dtype=np.int32)),
        "F": Image.fromarray(RNG.normal(3.0, 2.0, (61, 97)).astype(np.float32)),
        "P": palette,
        "RGBA": rgba,
        "LA": rgba.convert("LA"),
        "CMYK": rgba.convert("CMYK"),
        "L": rgba.convert("L"),
        "1": rgba.convert("1"),
    }


@pytest.mark.parametrize("name", list(_images()))
def test_bands_give_the_pixels_of_one_whole_image_conversion(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    image = _images()[name]
    whole = np.asarray(to_rgb(image))
    monkeypatch.setattr(image_memory, "BAND_PIXELS", 97 * 4)  # 16 bands of 4 rows
    banded = np.asarray(to_rgb(image))
    assert banded.shape == (61, 97, 3)
    np.testing.assert_array_equal(banded, whole)


def test_sixteen_bit_values_are_scaled_to_eight_bits_as_before() -> None:
    values = RNG.integers(0, 65536, (61, 97), dtype=np.uint16)
    expected = np.clip(values.astype(np.float64) / 65535.0 * 255.0 + 0.5, 0, 255).astype(np.uint8)
    converted = np.asarray(decode_image(_encode(Image.fromarray(values), "PNG")))
    np.testing.assert_array_equal(converted[..., 0], expected)


def test_an_image_over_the_decode_budget_is_refused_from_its_header() -> None:
    data = _encode(Image.new("I;16", (7071, 7071)), "PNG")  # the issue's ~97 KB upload
    started = time.perf_counter()
    with pytest.raises(ImageError) as info:
        decode_image(data, max_decode_bytes=192 * 1024 * 1024)
    assert time.perf_counter() - started < 0.5  # the header only: decoding it takes seconds
    assert info.value.code == "image_too_large"
    assert "7071x7071 I;16" in info.value.detail and "MiB" in info.value.detail


def test_a_rotation_counts_in_the_budget() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6
    photo = Image.fromarray(RNG.integers(0, 256, (600, 800, 3), dtype=np.uint8))
    upright, rotated = _encode(photo, "JPEG"), _encode(photo, "JPEG", exif=exif)
    budget = decode_bytes(Image.open(io.BytesIO(upright)), transposed=False)
    assert decode_image(upright, max_decode_bytes=budget).size == (800, 600)
    with pytest.raises(ImageError):
        decode_image(rotated, max_decode_bytes=budget)
    assert decode_image(rotated, max_decode_bytes=2 * budget).size == (600, 800)


def test_an_upload_in_a_bytearray_decodes_like_its_bytes() -> None:
    data = _encode(Image.fromarray(RNG.integers(0, 256, (40, 50, 3), dtype=np.uint8)), "PNG")
    expected = np.asarray(decode_image(data))
    for buffer in (bytearray(data), memoryview(data)):
        np.testing.assert_array_equal(np.asarray(decode_image(buffer)), expected)


_MEASURE = """
import io, sys
from PIL import Image
from catsdogs.image_memory import decode_bytes, orientation
from catsdogs.preprocessing import decode_image
data = open(sys.argv[1], "rb").read()
image = Image.open(io.BytesIO(data))
estimate = decode_bytes(image, transposed=orientation(image) != 1)
status = lambda: open("/proc/self/status").read()
hwm = lambda: int(status().split("VmHWM:")[1].split()[0]) * 1024
before = hwm()
decode_image(data)
print(estimate, hwm() - before)
"""


@pytest.mark.parametrize(("mode", "fmt"), [("I;16", "PNG"), ("RGBA", "WEBP"), ("P", "PNG"), ("RGB", "JPEG")])
def test_the_estimate_covers_what_decoding_takes(mode: str, fmt: str, tmp_path: Path) -> None:
    """Measured in a fresh process (VmHWM): in this one, memory freed by earlier tests is reused."""
    size = (2400, 1800)
    if mode == "I;16":
        image = Image.fromarray(RNG.integers(0, 65536, size[::-1], dtype=np.uint16))
    else:
        image = Image.fromarray(RNG.integers(0, 256, (*size[::-1], 4), dtype=np.uint8), "RGBA").convert(mode)
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / f"image.{fmt.lower()}"
    path.write_bytes(_encode(image, fmt, **({"exif": exif} if fmt == "JPEG" else {})))
    out = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(path)],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONPATH": str(REPO / "src")},
        timeout=60,
    ).stdout
    estimate, measured = map(int, out.split())
    assert measured <= estimate < 3 * measured + 16 * 1024 * 1024, (measured, estimate)
