"""Helpers for the API tests: what the tiny model (``fakes``) must answer, real photos, readiness."""

from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from catsdogs.preprocessing import PreprocessConfig, decode_for_model, preprocess_batch
from fakes import IMAGE_SIZE, REGISTERED_NAME, register_bundle  # noqa: F401  (serve tests import them here)
from support import dataset_photos, free_port  # noqa: F401


def config() -> PreprocessConfig:
    return PreprocessConfig(image_size=IMAGE_SIZE)


def expected_probabilities(weights: np.ndarray, data: bytes, bias: np.ndarray | None = None) -> np.ndarray:
    """What the model must answer for these bytes, computed without the service (but with the one
    decode step every consumer of a bundle shares, draft included)."""
    image = decode_for_model(data, config())
    batch = preprocess_batch([image], config())
    logits = batch.mean(axis=(2, 3)) @ weights + (0 if bias is None else bias)
    shifted = np.exp(logits - logits.max())
    return (shifted / shifted.sum())[0]


def read_dataset(zip_path: Path, n_per_class: int) -> list[tuple[str, str, bytes]]:
    """(name, label, bytes) of the first n cats and n dogs of the real archive (named ``cat.0.jpg``...)."""
    return [
        (f"{label}.{i}.jpg", label, data)
        for label in ("cat", "dog")
        for i, data in enumerate(dataset_photos(zip_path, label, n_per_class))
    ]


def jpeg_bytes(image: Image.Image, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", **options)
    return buffer.getvalue()


def wait_ready(client: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if client.get("/ready").status_code == 200:
            return
        time.sleep(0.05)
    raise AssertionError(f"service not ready after {timeout}s: {client.get('/ready').text}")


def registered_run_id(tracking_uri: str, version: str) -> str:
    """The run behind a registered version (its folder in the bundle cache)."""
    from mlflow import MlflowClient

    return str(MlflowClient(tracking_uri).get_model_version(REGISTERED_NAME, version).run_id)
