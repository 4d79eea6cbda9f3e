"""Training-only augmentation on Pillow images (flip, crop, colour jitter, rotation).

Evaluation, export and serving never call this: they use :func:`catsdogs.preprocessing.preprocess`
alone. Every random draw comes from the generator passed in, so a resumed run repeats it exactly.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageEnhance, ImageOps


def random_resized_crop(
    image: Image.Image, rng: np.random.Generator, *, scale: tuple[float, float] = (0.6, 1.0)
) -> Image.Image:
    """Crop a random region covering ``scale`` of the area with an aspect ratio in [3/4, 4/3]."""
    width, height = image.size
    area = width * height * rng.uniform(*scale)
    ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
    crop_w = min(width, max(1, round(math.sqrt(area * ratio))))
    crop_h = min(height, max(1, round(math.sqrt(area / ratio))))
    left = int(rng.integers(0, width - crop_w + 1))
    top = int(rng.integers(0, height - crop_h + 1))
    return image.crop((left, top, left + crop_w, top + crop_h))


def color_jitter(image: Image.Image, rng: np.random.Generator, *, strength: float = 0.2) -> Image.Image:
    """Random brightness, contrast and saturation within ±strength."""
    for enhancer in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        image = enhancer(image).enhance(1.0 + rng.uniform(-strength, strength))
    return image


def augment(image: Image.Image, rng: np.random.Generator, *, max_rotation: float = 10.0) -> Image.Image:
    """The training augmentation: crop, horizontal flip (p=0.5), colour jitter, small rotation."""
    image = random_resized_crop(image, rng)
    if rng.random() < 0.5:
        image = ImageOps.mirror(image)
    image = color_jitter(image, rng)
    angle = rng.uniform(-max_rotation, max_rotation)
    return image.rotate(angle, resample=Image.Resampling.BILINEAR, fillcolor=(127, 127, 127))
