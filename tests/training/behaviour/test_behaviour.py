"""Behavioural tests on the smoke-trained model, run exactly as serving runs it (ONNX Runtime):
invariance to a horizontal flip and to a darker exposure."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import ImageEnhance, ImageOps

from catsdogs.bundle import ModelBundle
from catsdogs.preprocessing import preprocess_batch, softmax
from catsdogs.runtime import open_model, run_logits
from catsdogs.training.features import load_image, read_manifest, split_samples

pytestmark = pytest.mark.slow


def _predict(bundle: ModelBundle, images) -> np.ndarray:
    config = bundle.preprocessing
    return softmax(run_logits(open_model(bundle.onnx_path(), config), preprocess_batch(images, config)))


def _confident_test_images(head_run, label: str):
    result, _, settings = head_run
    bundle = ModelBundle.open(result.bundle_dir)
    samples = [s for s in split_samples(read_manifest(settings.data_dir), "test") if s.label == label]
    images = [load_image(s.path) for s in samples]
    index = bundle.preprocessing.class_names.index(label)
    prob = _predict(bundle, images)[:, index]
    kept = [image for image, p in zip(images, prob, strict=True) if p > 0.7]
    assert len(kept) >= 10, "the smoke-trained model should be confident on most test images"
    return bundle, kept, index


def test_a_flipped_cat_is_still_a_cat(head_run) -> None:
    bundle, cats, index = _confident_test_images(head_run, "cat")
    flipped = _predict(bundle, [ImageOps.mirror(image) for image in cats])
    assert (flipped.argmax(1) == index).mean() >= 0.95


def test_a_darker_dog_is_still_a_dog(head_run) -> None:
    bundle, dogs, index = _confident_test_images(head_run, "dog")
    darker = _predict(bundle, [ImageEnhance.Brightness(image).enhance(0.6) for image in dogs])
    assert (darker.argmax(1) == index).mean() >= 0.9
