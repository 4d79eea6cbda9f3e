"""Why this answer: class activation maps turned into a heat map over the photo.

The graph's ``cam`` output (:class:`~catsdogs.training.models.ServingGraph`) holds, per class and
per place of the last feature map, that place's vote for the class: their mean is the logit. The
*evidence* for a class is its vote minus the mean vote of all classes (for two classes: half the
logit difference, which alone decides the softmax), so a place that looks like a cat *and* a dog
counts for neither. Only NumPy and Pillow: the service and training's gallery share it.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from PIL import Image

from catsdogs.preprocessing import PreprocessConfig

DISPLAY_MAX_SIDE = 512
"""Overlays are drawn on the photo shrunk to this size (what a page shows)."""
OVERLAY_ALPHA = 0.65
"""Opacity of the heat map where the evidence is strongest; it fades to nothing where there is none."""

# Perceptually ordered ramp (dark blue → teal → yellow), sampled at five stops.
_RAMP = np.asarray(
    [[48, 18, 59], [40, 118, 206], [31, 201, 149], [186, 230, 53], [253, 231, 37]], dtype=np.float32
)


def evidence(cam: np.ndarray, index: int) -> np.ndarray:
    """(classes, h, w) activation maps → (h, w) evidence for class ``index`` against the others."""
    return cam[index] - cam.mean(axis=0)


def colourize(values: np.ndarray) -> np.ndarray:
    """(h, w) map → (h, w, 4) uint8 RGBA: the positive evidence scaled to its maximum, as colour and
    as opacity (places without evidence leave the photo as it is)."""
    top = float(values.max())
    scaled = np.clip(values / top, 0.0, 1.0) if top > 0 else np.zeros_like(values, dtype=np.float64)
    position = scaled * (len(_RAMP) - 1)
    low = np.floor(position).astype(int)
    high = np.minimum(low + 1, len(_RAMP) - 1)
    frac = (position - low)[..., None]
    rgb = _RAMP[low] * (1 - frac) + _RAMP[high] * frac
    alpha = (scaled * OVERLAY_ALPHA * 255)[..., None]
    return np.concatenate([rgb, alpha], axis=-1).astype(np.uint8)


def display_image(image: Image.Image, config: PreprocessConfig) -> Image.Image:
    """The picture the map is drawn over: the region the model saw, at a size a page shows.

    A squashed input saw the whole photo (kept at its own aspect ratio); a cropped one saw the
    centre square, which is what is shown then.
    """
    if config.resize != "squash":
        from catsdogs.preprocessing import resize

        return resize(image, config)
    shown = image.copy()
    shown.thumbnail((DISPLAY_MAX_SIDE, DISPLAY_MAX_SIDE), Image.Resampling.BILINEAR)
    return shown


def overlay_png(shown: Image.Image, values: np.ndarray) -> bytes:
    """A PNG of ``shown`` with the (h, w) evidence map blended over it (smoothly upsampled)."""
    heat = Image.fromarray(colourize(values), mode="RGBA").resize(shown.size, Image.Resampling.BICUBIC)
    blended = Image.alpha_composite(shown.convert("RGBA"), heat).convert("RGB")
    buffer = io.BytesIO()
    blended.save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


def explain_upload(session: Any, config: PreprocessConfig, data: bytes) -> tuple[int, bytes]:
    """Outside the service (training's gallery): an image's predicted class index and its overlay PNG,
    from a session over a graph with activation maps."""
    from catsdogs.preprocessing import decode_for_model, preprocess
    from catsdogs.runtime import CAM_NAME, OUTPUT_NAME, run_named

    image = decode_for_model(data, config)
    out = run_named(session, preprocess(image, config)[None], (OUTPUT_NAME, CAM_NAME))
    index = int(np.argmax(out[OUTPUT_NAME][0]))
    return index, overlay_png(display_image(image, config), evidence(out[CAM_NAME][0], index))


def peak(values: np.ndarray, size: tuple[int, int]) -> tuple[float, float]:
    """Where the evidence is strongest, as (x, y) in an image of ``size`` (width, height) that the
    map covers: the centre of the map's top cell."""
    row, col = np.unravel_index(int(np.argmax(values)), values.shape)
    height, width = values.shape
    return (col + 0.5) / width * size[0], (row + 0.5) / height * size[1]
