"""Training augmentation is random but reproducible from its generator, and keeps images valid."""

from __future__ import annotations

import numpy as np
from PIL import Image

from catsdogs.training.augment import augment, random_resized_crop


def _image() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (90, 120, 3), dtype=np.uint8))


def test_same_generator_state_gives_the_same_augmentation() -> None:
    a = augment(_image(), np.random.default_rng([7, 2]))
    b = augment(_image(), np.random.default_rng([7, 2]))
    assert np.array_equal(np.asarray(a), np.asarray(b))


def test_different_epochs_give_different_augmentations() -> None:
    a = augment(_image(), np.random.default_rng([7, 1]))
    b = augment(_image(), np.random.default_rng([7, 2]))
    assert a.size != b.size or not np.array_equal(np.asarray(a), np.asarray(b))


def test_crops_stay_inside_the_image_and_keep_enough_of_it() -> None:
    rng = np.random.default_rng(1)
    for _ in range(50):
        crop = random_resized_crop(_image(), rng)
        width, height = crop.size
        assert 1 <= width <= 120 and 1 <= height <= 90
        assert width * height >= 0.4 * 120 * 90


def test_augmented_images_are_rgb() -> None:
    assert augment(_image(), np.random.default_rng(3)).mode == "RGB"
