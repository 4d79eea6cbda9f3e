"""Odd and broken files made on the fly, and small archives/folders built from real photos."""

from __future__ import annotations

import io
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from catsdogs.settings import Settings
from support import require_tool  # noqa: F401


def encode(image: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width×height but holds no pixels: a decompression bomb's header."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def convertible_files(photos: list[bytes]) -> dict[str, bytes]:
    """Valid images in modes ingest must convert: CMYK, L, P, RGBA, 16-bit, animated GIF (6 photos)."""
    rgb = [decode(p) for p in photos[:6]]
    gray16 = np.asarray(rgb[4].convert("L"), dtype=np.uint16) * 257
    frames = [rgb[5], rgb[5].transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    return {
        "cmyk.jpg": encode(rgb[0].convert("CMYK"), "JPEG", quality=90),
        "gray.png": encode(rgb[1].convert("L"), "PNG"),
        "palette.png": encode(rgb[2].convert("P"), "PNG"),
        "rgba.png": encode(rgb[3].convert("RGBA"), "PNG"),
        "sixteen.png": encode(Image.fromarray(gray16), "PNG"),
        "animated.gif": encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100),
    }


def generated_photos(
    per_class: int, *, seed: int = 0, size: tuple[int, int] = (64, 48)
) -> dict[str, list[bytes]]:
    """Distinct random-noise JPEGs per class, for tests where what the picture shows does not matter."""
    rng = np.random.default_rng(seed)
    return {
        label: [
            encode(Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)), "JPEG")
            for _ in range(per_class)
        ]
        for label in ("cat", "dog")
    }


def broken_files(photo: bytes) -> dict[str, tuple[bytes, str]]:
    """Files ingest must reject, with the reason it must give."""
    tiny = encode(Image.new("RGB", (16, 16), (200, 10, 10)), "PNG")
    return {
        "empty.jpg": (b"", "empty"),
        "text.jpg": (b"this is a text file, not a photo\n" * 20, "not_an_image"),
        "truncated.jpg": (photo[: len(photo) // 2], "truncated"),
        "tiny.png": (tiny, "image_too_small"),
        "bomb.png": (png_header_only(100_000, 100_000), "image_too_large"),
    }


def write_zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def write_folder(root: Path, members: dict[str, bytes]) -> Path:
    for name, data in members.items():
        target = root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    return root


def kaggle_members(photos: dict[str, list[bytes]], count: int) -> dict[str, bytes]:
    """``train/<label>.<i>.jpg`` members for the first ``count`` photos of each class."""
    return {
        f"train/{label}.{i}.jpg": data
        for label, items in photos.items()
        for i, data in enumerate(items[:count])
    }


def read_manifest(settings: Settings) -> list[dict[str, str]]:
    import csv

    with settings.manifest_path.open(newline="") as handle:
        return list(csv.DictReader(handle))
