"""Decoding in bounded memory: what an image costs to decode and turn into RGB, known from its header,
and a conversion to RGB that never holds more than the source and the result.

Only NumPy and Pillow are imported here (it is part of the shared image pipeline, see
:mod:`catsdogs.preprocessing`). The figures are Pillow's own storage: every mode but ``1``, ``L``,
``P`` and the 16-bit ones takes 4 bytes a pixel (RGB is stored as RGBX), and the conversion works
on horizontal bands, so its temporaries are a few megabytes whatever the image size.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator

import numpy as np
from PIL import ExifTags, Image

#: Pillow's bytes per pixel of the modes stored in fewer than 4.
_PIXEL_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16L": 2, "I;16B": 2, "I;16N": 2}
_SIXTEEN_BIT = {"I;16", "I;16B", "I;16L", "I;16N", "I"}
_ALPHA = {"RGBA", "LA", "PA", "RGBa", "La"}
#: Pixels converted at a time: small enough that a band's float64 temporaries (16-bit and float
#: modes) stay under ~8 MB, large enough that the per-band overhead is invisible.
BAND_PIXELS = 1 << 18
#: The most a band's temporaries take (three float64 arrays and the RGBA steps of a band).
_BAND_BYTES = BAND_PIXELS * 40
#: Decoders that hold more than the image: libwebp decodes into its own RGBA buffer, which Pillow
#: copies and keeps to the end (measured: 8 to 10 bytes a pixel above the PNG of the same image).
_DECODER_EXTRA = {"WEBP": 10}
#: What any decoder holds besides the pixels (libjpeg's and zlib's row buffers, the EXIF block).
_DECODER_BYTES = 4 * 1024 * 1024
ORIENTATION = ExifTags.Base.Orientation
MIB = 1024 * 1024


def pixel_bytes(mode: str) -> int:
    return _PIXEL_BYTES.get(mode, 4)


def decode_bytes(image: Image.Image, *, transposed: bool) -> int:
    """Peak bytes of decoding ``image`` (opened, not loaded), turning it upright and into RGB.

    Decoding holds the pixels (plus a decoder's own buffer, for WebP) to the end; an EXIF rotation
    makes a second copy in the same mode; the conversion adds the RGB result and one band.
    """
    width, height = image.size
    pixels = width * height
    decoded = pixels * (pixel_bytes(image.mode) + _DECODER_EXTRA.get(image.format or "", 0))
    rotation = pixels * pixel_bytes(image.mode) if transposed else 0
    conversion = 0 if image.mode == "RGB" else pixels * pixel_bytes("RGB") + _BAND_BYTES
    return _DECODER_BYTES + decoded + max(rotation, conversion)


def orientation(image: Image.Image) -> int:
    """The EXIF orientation known without decoding pixels (PNG keeps eXIf after the pixels at times:
    Pillow then finds it only on load, so it is read here only when the header had it)."""
    if image.format == "PNG" and "exif" not in image.info:
        return 1
    value = image.getexif().get(ORIENTATION, 1)
    return value if isinstance(value, int) else 1


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB, band by band; transparency is composited onto white.

    Every step is per pixel, except the scale of 16-bit and float images, which comes from the
    whole image's extrema: so the bands give the pixels one whole-image conversion would.
    """
    if image.mode == "RGB":
        return image
    convert = _band_converter(image)
    if image.height <= _band_rows(image):
        return convert(image)
    result = Image.new("RGB", image.size)
    for top, band in _bands(image):
        result.paste(convert(band), (0, top))
    return result


def _band_rows(image: Image.Image) -> int:
    return max(1, BAND_PIXELS // max(image.width, 1))


def _bands(image: Image.Image) -> Iterator[tuple[int, Image.Image]]:
    rows = _band_rows(image)
    for top in range(0, image.height, rows):
        yield top, image.crop((0, top, image.width, min(image.height, top + rows)))


def _band_converter(image: Image.Image) -> Callable[[Image.Image], Image.Image]:
    mode = image.mode
    if mode in _SIXTEEN_BIT or mode == "F":
        # NumPy reads every 16-bit byte order (Pillow's getextrema does not take I;16B).
        low, high = 0.0, 1.0
        for _, band in _bands(image):
            array = np.asarray(band)
            low, high = min(low, float(array.min(initial=0))), max(high, float(array.max(initial=1)))
        if mode == "F":
            # As the whole image's np.min(initial=0) / np.max(initial=1): 0 and 1 always in range.
            return lambda band: _gray(band, low, max(high - low, 1e-12))
        # Pillow's convert("L") clips 16-bit values at 255 instead of scaling them.
        return lambda band: _gray(band, 0.0, 65535.0 if high > 255 else 255.0)
    if mode == "P" or mode in _ALPHA:
        return _on_white
    return lambda band: band.convert("RGB")


def _gray(band: Image.Image, low: float, scale: float) -> Image.Image:
    array = np.asarray(band, dtype=np.float64)
    if low:
        array = array - low
    gray = np.clip(array / scale * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return Image.fromarray(gray, mode="L").convert("RGB")


def _on_white(band: Image.Image) -> Image.Image:
    rgba = band.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


class ViewReader(io.RawIOBase):
    """A read-only file over a bytes-like object without copying it (``io.BytesIO`` copies anything
    but ``bytes``): an upload received into a ``bytearray`` is decoded where it lies."""

    def __init__(self, data: bytes | bytearray | memoryview) -> None:
        super().__init__()
        self._view = memoryview(data).cast("B")
        self._position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        start = min(self._position, len(self._view))
        count = min(len(buffer), len(self._view) - start)
        buffer[:count] = self._view[start : start + count]
        self._position = start + count
        return count

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: len(self._view)}[whence]
        if base + offset < 0:
            raise ValueError("negative seek position")
        self._position = base + offset
        return self._position

    def tell(self) -> int:
        return self._position
