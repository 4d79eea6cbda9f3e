"""The pretrained Lite weights and our normalization agree: ImageNet's own head recognizes real
cats and dogs only if the pixels are normalized the way the weights were trained."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from catsdogs.preprocessing import PreprocessConfig, decode_image, preprocess_batch
from catsdogs.training.models import (
    IMAGENET_CAT_CLASSES,
    IMAGENET_DOG_CLASSES,
    load_imagenet_model,
    preprocess_config,
)
from support import dataset_photos


def _imagenet_hits(model, images, labels, config: PreprocessConfig) -> float:
    with torch.inference_mode():
        predicted = model(torch.from_numpy(preprocess_batch(images, config))).argmax(1).numpy()
    groups = {"cat": IMAGENET_CAT_CLASSES, "dog": IMAGENET_DOG_CLASSES}
    return float(np.mean([p in groups[label] for p, label in zip(predicted, labels, strict=True)]))


@pytest.mark.slow
def test_lite_normalization_puts_real_cats_and_dogs_in_their_imagenet_classes(dataset_zip: Path) -> None:
    labels = [label for label in ("cat", "dog") for _ in range(12)]
    images = [
        decode_image(data)
        for label in ("cat", "dog")
        for data in dataset_photos(dataset_zip, label, 12, offset=5000)
    ]
    model = load_imagenet_model("efficientnet_lite0")
    config = preprocess_config("efficientnet_lite0")
    assert config.mean == config.std == (0.5, 0.5, 0.5)
    hits = _imagenet_hits(model, images, labels, config)
    # Cat photos land in ImageNet's 5 cat classes and dogs in its 118 dog breeds.
    assert hits >= 0.8, f"only {hits:.0%} of real photos land in the right ImageNet classes"
    # The check can fail: pixels left unscaled (0-255, a classic bug) collapse it.
    unscaled = PreprocessConfig(image_size=224, mean=(0.0, 0.0, 0.0), std=(1 / 255, 1 / 255, 1 / 255))
    assert _imagenet_hits(model, images, labels, unscaled) < 0.5
