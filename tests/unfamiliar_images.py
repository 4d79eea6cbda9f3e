"""Images that are neither a cat nor a dog, all available offline: the photos inside the scikit-image
wheel and generated ones (noise, flat colours, text, drawings). Shared by the OOD tests and
``benchmarks/bench_ood.py``."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

#: scikit-image's cat: in distribution, so never counted as an unfamiliar image.
SKIMAGE_CAT = "chelsea.png"
SKIMAGE_SUFFIXES = (".png", ".jpg", ".gif", ".tif")


def skimage_photos() -> dict[str, bytes]:
    """Every image file the installed scikit-image wheel ships in ``skimage/data``, except its cat.

    Listed from the wheel at run time (what a release ships changes), never from a fixed list.
    """
    import skimage

    folder = Path(skimage.__file__).parent / "data"
    return {
        path.name: path.read_bytes()
        for path in sorted(folder.iterdir())
        if path.suffix.lower() in SKIMAGE_SUFFIXES and path.name != SKIMAGE_CAT
    }


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _text(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    image = Image.new("RGB", size, tuple(int(v) for v in rng.integers(200, 256, 3)))
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=int(rng.integers(14, 40)))
    words = ["adopt", "me", "invoice", "total", "2026", "hello", "shelter", "form", "name:", "age"]
    y = 10
    while y < size[1] - 20:
        line = " ".join(rng.choice(words, int(rng.integers(3, 8))))
        draw.text((10, y), line, fill=tuple(int(v) for v in rng.integers(0, 80, 3)), font=font)
        y += int(rng.integers(24, 50))
    return image


def _drawing(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    image = Image.new("RGB", size, tuple(int(v) for v in rng.integers(180, 256, 3)))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(5, 25))):
        box = sorted(rng.integers(0, size[0], 2)), sorted(rng.integers(0, size[1], 2))
        xy = (int(box[0][0]), int(box[1][0]), int(box[0][1]) + 1, int(box[1][1]) + 1)
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        shape = rng.integers(0, 3)
        if shape == 0:
            draw.ellipse(xy, outline=colour, width=int(rng.integers(1, 6)))
        elif shape == 1:
            draw.rectangle(xy, fill=colour)
        else:
            draw.line(xy, fill=colour, width=int(rng.integers(1, 8)))
    return image


def _gradient(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    x = np.linspace(0, 1, size[0])[None, :, None]
    y = np.linspace(0, 1, size[1])[:, None, None]
    a, b = rng.random(3), rng.random(3)
    pixels = (a * x + b * y) / 2 * 255
    return Image.fromarray(pixels.astype(np.uint8))


def generated_images(count_per_kind: int = 5, *, seed: int = 0) -> dict[str, bytes]:
    """Synthetic uploads that are not pets: uniform and Gaussian noise, flat colours, text, drawings
    and gradients, at a few sizes, as PNG or JPEG."""
    rng = np.random.default_rng(seed)
    images: dict[str, bytes] = {}
    for i in range(count_per_kind):
        size = (int(rng.integers(200, 640)), int(rng.integers(200, 640)))
        shape = (size[1], size[0], 3)
        noise = rng.integers(0, 256, shape, dtype=np.uint8)
        gauss = np.clip(rng.normal(128, 40, shape), 0, 255).astype(np.uint8)
        flat = Image.new("RGB", size, tuple(int(v) for v in rng.integers(0, 256, 3)))
        images[f"noise-uniform-{i}.png"] = _png(Image.fromarray(noise))
        images[f"noise-gaussian-{i}.jpg"] = _jpeg(Image.fromarray(gauss))
        images[f"flat-{i}.png"] = _png(flat)
        images[f"text-{i}.png"] = _png(_text(rng, size))
        images[f"drawing-{i}.png"] = _png(_drawing(rng, size))
        images[f"gradient-{i}.jpg"] = _jpeg(_gradient(rng, size))
    return images
