"""The one image pipeline shared by ingest, training, evaluation, export and serving.

Only NumPy and Pillow are imported here, so the serving install (no torch) runs exactly the code
that training ran. :class:`PreprocessConfig` is saved with every model as ``preprocessing.json``.
"""

from __future__ import annotations

import io
import json
import logging
import struct
import warnings
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from catsdogs import CatsdogsError
from catsdogs.image_memory import MIB, ORIENTATION, ViewReader, decode_bytes, orientation, to_rgb

#: Formats we are willing to parse at all; everything else is "not an image" (smaller attack surface).
#: Multi-picture JPEGs from phones (MPO) open through the JPEG entry.
ALLOWED_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF")
DEFAULT_MAX_PIXELS = 50_000_000
DEFAULT_MIN_SIDE = 32
PREPROCESSING_FILE = "preprocessing.json"

logger = logging.getLogger(__name__)

# Pillow raises its own DecompressionBombError only at 2x this; we check sizes ourselves first.
Image.MAX_IMAGE_PIXELS = None
ImageFile.LOAD_TRUNCATED_IMAGES = False


class ImageError(ValueError):
    """An upload or file that cannot be used as an image; ``code`` is stable and machine-readable."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail


FORMAT_VERSION = 3
"""The ``preprocessing.json`` schema. Version 1 (the first bundles, no ``format_version`` key) had
every key of version 2 except ``format_version`` and ``decode_draft_factor``; version 2 every key of
version 3 except ``decoder``."""

DECODER = "pillow"
"""The one JPEG decoder: Pillow (libjpeg-turbo) with its DCT draft. simplejpeg, PyTurboJPEG and
OpenCV gave byte-identical model inputs at 0.83-1.06x its speed, and simplejpeg's faster modes
changed pixels and labels (``benchmarks/results/decode.json``); every earlier bundle used it."""

DEFAULT_DECODE_DRAFT_FACTOR = 2.0
"""New models' :attr:`PreprocessConfig.decode_draft_factor`: phone JPEGs decode 2.5-7x faster with
labels unchanged and probabilities within 0.004 (``draft_decode_parity`` of every
``benchmarks/results/serve*.json``: six phone photos per run, 448-600 px drafts)."""

V1_DECODE_DRAFT_FACTOR = 2.0
"""What version-1 bundles were served with (the service's ``decode_draft_factor`` setting, 2.0 then).
Their training and ``evaluate`` decoded without a draft, which on the image store is the same decode
whenever ``image_size`` is above 128 (stored images are at most 512 px, and a JPEG is only drafted
once both its sides are at least twice the draft size); so the migrated bundles keep the
predictions they were served with, and every figure measured on the store stands."""

_V1_KEYS = (
    "image_size", "resize", "crop_pct", "interpolation", "mean", "std", "channel_order", "layout",
    "class_names",
)  # fmt: skip


class PreprocessConfig(BaseModel):
    """Everything the model needs to see an image. Saved next to the weights as ``preprocessing.json``
    and read by every consumer; the model's ONNX graph is checked against ``image_size`` at load."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    format_version: Literal[3] = FORMAT_VERSION
    image_size: int = Field(gt=0)
    """The model input is image_size × image_size pixels (the network is built for it)."""
    resize: Literal["squash", "shorter_side_crop"] = "squash"
    """``squash``: resize straight to size×size (keeps the whole animal in frame);
    ``shorter_side_crop``: resize the shorter side to size/crop_pct, then center-crop."""
    crop_pct: float = Field(default=1.0, gt=0.0, le=1.0)
    interpolation: Literal["bilinear", "bicubic"] = "bilinear"
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    channel_order: Literal["RGB"] = "RGB"
    layout: Literal["NCHW"] = "NCHW"
    class_names: tuple[str, ...] = ("cat", "dog")
    decoder: Literal["pillow"] = DECODER
    """The decoder training, evaluation and serving all use for this model (recorded, so a later
    decoder can only be adopted with a model trained on it)."""
    decode_draft_factor: float = Field(default=DEFAULT_DECODE_DRAFT_FACTOR, ge=0.0)
    """JPEGs are DCT-decoded at no less than this × ``image_size`` on a side (0: full size). Applied
    by :func:`decode_for_model`, i.e. by evaluation, the MLflow pyfunc model and the service alike."""

    @property
    def draft_size(self) -> int | None:
        """The smallest side a JPEG is decoded at, or ``None`` for a full-size decode."""
        factor = self.decode_draft_factor
        return round(self.image_size * factor) if factor > 0 else None

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.model_dump(mode="json"), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: Path) -> PreprocessConfig:
        """Read a ``preprocessing.json`` of any known version (older ones through :func:`migrate`)."""
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise CatsdogsError(f"{path} is not valid JSON: {exc}") from None
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = PREPROCESSING_FILE) -> PreprocessConfig:
        """Validate a current-version payload: every key present, none unknown, no silent default."""
        data = migrate(data, source=source)
        missing = sorted(set(cls.model_fields) - set(data))
        if missing:
            raise CatsdogsError(
                f"{source} (format {FORMAT_VERSION}) lacks {', '.join(missing)}: it was not written by "
                "catsdogs; re-export the model or write the missing keys"
            )
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            raise CatsdogsError(f"{source} is not a valid preprocessing config: {problems}") from None


def migrate(data: dict[str, Any], *, source: str = PREPROCESSING_FILE) -> dict[str, Any]:
    """Bring a ``preprocessing.json`` payload of any known version to :data:`FORMAT_VERSION`.

    Versions 1 and 2 get the keys they lack with the values their models were served with (every one
    was decoded by Pillow); a version-1 file missing one of its own keys, or an unknown version, is an
    error.
    """
    if not isinstance(data, dict):
        raise CatsdogsError(f"{source} must hold a JSON object, not {type(data).__name__}")
    version = data.get("format_version", 1)
    if version == FORMAT_VERSION:
        return data
    if version == 2:
        return {**data, "format_version": FORMAT_VERSION, "decoder": DECODER}
    if version != 1:
        raise CatsdogsError(
            f"{source} has format_version {version!r}; this catsdogs reads versions 1 to {FORMAT_VERSION}: "
            "upgrade catsdogs to load this model"
        )
    missing = [key for key in _V1_KEYS if key not in data]
    if missing:
        raise CatsdogsError(f"{source} (format 1) lacks {', '.join(missing)}: it is not a catsdogs bundle's")
    return {
        **data,
        "format_version": FORMAT_VERSION,
        "decode_draft_factor": V1_DECODE_DRAFT_FACTOR,
        "decoder": DECODER,
    }


#: What Pillow's format plugins raise on hostile or damaged bytes besides ``OSError``: header fields
#: unpacked with ``struct`` past the end, tables indexed by a value from the file, arithmetic on sizes
#: the file declares, a TIFF offset tag of the wrong type (``TypeError``, found by fuzzing the decoder
#: with the mutations of ``tests/serve/test_serve_fuzz.py``). Caught only around Pillow's calls,
#: so a bug elsewhere still surfaces as one.
DECODER_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    ValueError,
    SyntaxError,
    EOFError,
    struct.error,
    LookupError,  # IndexError, KeyError
    ArithmeticError,  # ZeroDivisionError, OverflowError
    TypeError,
    MemoryError,
)


#: The bytes of an image as received: an upload's ``bytearray`` is decoded without a copy.
ImageBytes = bytes | bytearray | memoryview


def _open(data: ImageBytes) -> Image.Image:
    """Read the header only (no pixel is decoded yet); any failure means "not an image of ours"."""
    # No copy of the upload: BytesIO shares a bytes object; the buffered view copies 8 KB at a time
    # (Pillow's header parsers read a few bytes per call: unbuffered, that costs 0.1 ms an image).
    source = io.BytesIO(data) if isinstance(data, bytes) else io.BufferedReader(ViewReader(data))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(source, formats=ALLOWED_FORMATS)
    except UnidentifiedImageError:
        raise ImageError(
            "not_an_image", "the content is not a supported image (JPEG, PNG, GIF, WebP, BMP, TIFF)"
        ) from None
    except DECODER_ERRORS as exc:
        code = "truncated" if "truncated" in str(exc).lower() else "not_an_image"
        raise ImageError(code, f"the image header cannot be read: {_describe(exc)}") from None


def _describe(exc: BaseException) -> str:
    """The exception as a client may read it; the type says what broke when the message is bare.

    Failures other than ``OSError`` are also logged with their traceback (at debug: hostile uploads
    are routine), so a Pillow bug can still be traced to its line.
    """
    if isinstance(exc, OSError):
        return str(exc)
    logger.debug("decoder raised %s", type(exc).__name__, exc_info=exc)
    return f"{type(exc).__name__}: {exc}"


def decode_image(
    data: ImageBytes,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_side: int = DEFAULT_MIN_SIDE,
    draft_size: int | None = None,
    max_decode_bytes: int | None = None,
) -> Image.Image:
    """Decode bytes into an upright 8-bit RGB image, deciding by content, never by name or type.

    Every failure a decoder can raise on hostile bytes (:data:`DECODER_ERRORS`) becomes an
    :class:`ImageError`, so each consumer (the service, evaluation, ingest) refuses that one file.

    Args:
        data: the raw file bytes.
        max_pixels: refuse images whose header declares more pixels (decompression bombs)
            before any pixel is decoded.
        min_side: refuse images smaller than this on either side.
        draft_size: if set, JPEGs are decoded at a reduced DCT scale that still keeps both sides
            at or above this size (several times faster for large photos).
        max_decode_bytes: refuse images whose decoding and conversion to RGB would take more memory
            (:func:`~catsdogs.image_memory.decode_bytes`, from the header); ``None``: no such limit.

    Raises:
        ImageError: with codes ``empty``, ``not_an_image``, ``image_too_large``, ``image_too_small``,
            ``truncated`` or ``decode_failed``.
    """
    if not data:
        raise ImageError("empty", "the upload is empty (0 bytes)")
    image = _open(data)
    width, height = image.size
    if width * height > max_pixels:
        raise ImageError(
            "image_too_large",
            f"{width}x{height} = {width * height} pixels is over the limit of {max_pixels} pixels",
        )
    if min(width, height) < min_side:
        raise ImageError("image_too_small", f"{width}x{height} is smaller than {min_side} pixels on a side")
    try:
        return _decode(image, draft_size=draft_size, max_decode_bytes=max_decode_bytes)
    except ImageError:
        raise
    except OSError as exc:
        message = str(exc)
        truncated = "truncated" in message.lower() or "broken data stream" in message
        code = "truncated" if truncated else "decode_failed"
        raise ImageError(code, f"the image data cannot be decoded: {message}") from None
    except (*DECODER_ERRORS, Image.DecompressionBombError) as exc:
        raise ImageError("decode_failed", f"the image data cannot be decoded: {_describe(exc)}") from None


def _decode(image: Image.Image, *, draft_size: int | None, max_decode_bytes: int | None) -> Image.Image:
    """Pixels of an opened image, upright and RGB; the memory budget is checked before the decode,
    and again before a rotation that only the decode revealed (PNG's eXIf may follow the pixels)."""
    if draft_size and image.format in {"JPEG", "MPO"}:
        image.draft("RGB", (draft_size, draft_size))
    image.seek(0)  # animated images: the first frame
    _check_budget(image, max_decode_bytes, transposed=orientation(image) != 1)
    image.load()
    if image.getexif().get(ORIENTATION, 1) != 1:
        _check_budget(image, max_decode_bytes, transposed=True)
        ImageOps.exif_transpose(image, in_place=True)  # in place: no full copy of an upright photo
    return to_rgb(image)


def _check_budget(image: Image.Image, max_decode_bytes: int | None, *, transposed: bool) -> None:
    if max_decode_bytes is None:
        return
    needed = decode_bytes(image, transposed=transposed)
    if needed > max_decode_bytes:
        width, height = image.size
        raise ImageError(
            "image_too_large",
            f"decoding this {width}x{height} {image.mode} image takes about {needed // MIB} MiB of memory, "
            f"over the limit of {max_decode_bytes // MIB} MiB; send it as an 8-bit JPEG or smaller",
        )


def decode_for_model(
    data: ImageBytes,
    config: PreprocessConfig,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_side: int = DEFAULT_MIN_SIDE,
    max_decode_bytes: int | None = None,
) -> Image.Image:
    """Decode an image for the model ``config`` belongs to, JPEG draft included.

    The one decode step of evaluation, the MLflow pyfunc model and the service: given the same
    bytes and config, all three hand the model the same pixels. ``max_pixels``, ``min_side`` and
    ``max_decode_bytes`` only decide what is refused (see :func:`decode_image`).
    """
    return decode_image(
        data,
        max_pixels=max_pixels,
        min_side=min_side,
        draft_size=config.draft_size,
        max_decode_bytes=max_decode_bytes,
    )


#: JPEG quality of the images a data set stores (ingested photos, kept feedback images).
STORE_JPEG_QUALITY = 95


def store_jpeg(image: Image.Image, *, max_side: int) -> bytes:
    """A decoded image (upright RGB: :func:`decode_image`) as a data set stores it: shrunk in place to
    ``max_side``, JPEG quality 95, with no metadata (no EXIF, GPS, XMP or ICC profile is written)."""
    if max(image.size) > max_side:
        image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=STORE_JPEG_QUALITY)
    return buffer.getvalue()


_RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


def resize(image: Image.Image, config: PreprocessConfig) -> Image.Image:
    """Apply the configured resize policy; the result is image_size × image_size."""
    size = config.image_size
    resample = _RESAMPLE[config.interpolation]
    if config.resize == "squash":
        return image.resize((size, size), resample)
    scaled = round(size / config.crop_pct)
    width, height = image.size
    ratio = scaled / min(width, height)
    new_w, new_h = max(size, round(width * ratio)), max(size, round(height * ratio))
    image = image.resize((new_w, new_h), resample)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return image.crop((left, top, left + size, top + size))


def to_array(image: Image.Image, config: PreprocessConfig) -> np.ndarray:
    """Normalize an already-resized RGB image into a float32 CHW array: ``(x / 255 - mean) / std``.

    The CHW buffer is filled once and normalized in place: the same float32 operations in the same
    order as the textbook expression (bit-identical results), in about half the time, because no
    temporary HWC arrays are made and the transpose happens in the uint8 → float32 copy.
    """
    pixels = np.asarray(image)
    array = np.empty((3, pixels.shape[0], pixels.shape[1]), dtype=np.float32)
    np.copyto(array, pixels.transpose(2, 0, 1))
    array /= np.float32(255.0)
    array -= np.asarray(config.mean, dtype=np.float32)[:, None, None]
    array /= np.asarray(config.std, dtype=np.float32)[:, None, None]
    return array


def preprocess(image: Image.Image, config: PreprocessConfig) -> np.ndarray:
    """RGB image → normalized float32 array of shape (3, size, size)."""
    return to_array(resize(image, config), config)


def preprocess_batch(images: list[Image.Image], config: PreprocessConfig) -> np.ndarray:
    """Stack preprocessed images into an (N, 3, size, size) batch."""
    size = config.image_size
    if not images:
        return np.zeros((0, 3, size, size), dtype=np.float32)
    return np.stack([preprocess(image, config) for image in images])


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax that is stable for large logits."""
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)
