"""Validate one image, hash it and write it into the normalized store (runs in worker processes).

Validation and conversion are the shared :func:`catsdogs.preprocessing.decode_image`, so the data
set holds exactly what training and serving can read; its ``ImageError.code`` is the rejection
reason. ``sha256`` is taken over the ORIGINAL bytes (the identity of the file we were given, so
re-ingesting finds the same name); ``phash`` over the decoded RGB pixels.

Store policy: a baseline RGB JPEG that is upright and within ``store_max_side`` is copied byte for
byte (lossless and fast: the 200×200 Kaggle JPEGs all take this path); anything else is converted
to RGB, downscaled to ``store_max_side`` and re-encoded as JPEG quality 95.
"""

from __future__ import annotations

import hashlib
import io
import logging
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import imagehash
from PIL import Image

from catsdogs.preprocessing import ImageError, decode_image, store_jpeg

_logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class StoreConfig:
    """What a worker needs to know; small and picklable."""

    images_dir: Path
    max_pixels: int
    min_side: int
    store_max_side: int
    max_bytes: int


@dataclass(frozen=True, slots=True)
class Accepted:
    """A valid image now in the store at ``images/<label>/<sha256>.jpg``."""

    source: str
    label: str
    sha256: str
    phash: str
    width: int
    height: int


@dataclass(frozen=True, slots=True)
class Rejected:
    """A file that is not in the data set, and why (``reason`` is an ``ImageError`` code or ours)."""

    source: str
    label: str | None
    reason: str
    detail: str


def _copyable(data: bytes, max_side: int) -> bool:
    """True for baseline 8-bit RGB JPEGs, upright and small enough: their bytes are the store bytes."""
    with Image.open(io.BytesIO(data)) as probe:
        if probe.format != "JPEG" or probe.mode != "RGB" or max(probe.size) > max_side:
            return False
        if probe.info.get("progressive") or probe.info.get("progression"):
            return False
        return probe.getexif().get(0x0112, 1) == 1  # EXIF Orientation


def _write_once(path: Path, data: bytes) -> None:
    """Create ``path`` with ``data`` unless it exists.

    The store is built in a private staging folder that is swapped in whole, so no reader sees a
    half-written file and a per-file temp+rename (a third of the per-image cost) buys nothing. The
    name is the SHA-256 of the source bytes and the stored bytes are a pure function of them, so
    when two workers store the same exact duplicate, the second has nothing to add.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with path.open("xb") as handle:
            handle.write(data)
    except FileExistsError:
        pass


def process(source: str, label: str | None, data: bytes, config: StoreConfig) -> Accepted | Rejected:
    """Validate, hash and store one file; never raises for bad content (it becomes a ``Rejected``)."""
    if label is None:
        return Rejected(source, None, "no_label", "the path names no class folder or class file prefix")
    try:
        image = decode_image(
            data, max_pixels=config.max_pixels, min_side=config.min_side, draft_size=config.store_max_side
        )
        phash = str(imagehash.phash(image))
        copyable = _copyable(data, config.store_max_side)
    except ImageError as exc:
        return Rejected(source, label, exc.code, exc.detail)
    except Exception as exc:  # a decoder bug on a hostile file must cost one file, not the whole ingest
        _logger.warning("unexpected %s decoding %s: %s", type(exc).__name__, source, exc)
        return Rejected(source, label, "decode_failed", f"{type(exc).__name__}: {exc}")
    sha256 = hashlib.sha256(data).hexdigest()
    stored = data if copyable else store_jpeg(image, max_side=config.store_max_side)
    _write_once(config.images_dir / label / f"{sha256}.jpg", stored)
    width, height = image.size
    return Accepted(source, label, sha256, phash, width, height)


# --- worker side: one archive handle per process, reused across chunks --------------------------

_archive: zipfile.ZipFile | None = None
_root: Path | None = None
_config: StoreConfig | None = None


def init_worker(path: Path, kind: str, config: StoreConfig) -> None:
    """Pool initializer: open the archive once per worker instead of once per image."""
    global _archive, _root, _config
    _archive = zipfile.ZipFile(path) if kind == "zip" else None
    _root = None if kind == "zip" else path
    _config = config


def close_worker() -> None:
    """Close the archive opened by :func:`init_worker` (in-process runs: no handle left open)."""
    global _archive, _root, _config
    if _archive is not None:
        _archive.close()
    _archive, _root, _config = None, None, None


def process_task(task: tuple[str, str | None, int]) -> Accepted | Rejected:
    """Read one member in the worker (only names cross process boundaries, not image bytes)."""
    name, label, size = task
    assert _config is not None
    if size > _config.max_bytes:
        return Rejected(name, label, "file_too_large", f"{size} bytes is over {_config.max_bytes}")
    try:
        data = _archive.read(name) if _archive is not None else (_root / name).read_bytes()  # type: ignore[operator]
    except (zipfile.BadZipFile, OSError, EOFError, zlib.error, RuntimeError, NotImplementedError) as exc:
        # bad CRC, corrupt deflate stream, encrypted member (RuntimeError), unknown compression
        return Rejected(name, label, "unreadable", f"the archive member cannot be read: {exc}")
    return process(name, label, data, _config)
