"""Tiny real ONNX models and bundles for the API tests (built with onnx.helper in tmp_path).

Graph: normalized image → GlobalAveragePool → (N, 3) mean colour → MatMul W + b → logits, so the
answer depends on the image, and two weight matrices give two distinguishable models.
"""

from __future__ import annotations

import io
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from catsdogs.preprocessing import PreprocessConfig, decode_image, preprocess_batch
from support import dataset_photos, free_port  # noqa: F401

IMAGE_SIZE = 64
WEIGHTS_A = np.array([[4.0, -4.0], [-2.0, 2.0], [-3.0, 3.0]], dtype=np.float32)
WEIGHTS_B = -WEIGHTS_A  # the opposite model: every answer flips


def build_onnx(
    path: Path, weights: np.ndarray, *, top_half: bool = False, bias: np.ndarray | None = None
) -> Path:
    """``top_half``: pool only the upper half of the image, so orientation changes the answer."""
    bias = np.zeros(2, dtype=np.float32) if bias is None else bias.astype(np.float32)
    crop = (
        [
            helper.make_node("Slice", ["input", "starts", "ends", "axes"], ["region"]),
        ]
        if top_half
        else [helper.make_node("Identity", ["input"], ["region"])]
    )
    extra = (
        [
            numpy_helper.from_array(np.array([0], dtype=np.int64), "starts"),
            numpy_helper.from_array(np.array([IMAGE_SIZE // 2], dtype=np.int64), "ends"),
            numpy_helper.from_array(np.array([2], dtype=np.int64), "axes"),
        ]
        if top_half
        else []
    )
    graph = helper.make_graph(
        [
            *crop,
            helper.make_node("GlobalAveragePool", ["region"], ["pooled"]),
            helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
            helper.make_node("MatMul", ["flat", "W"], ["scores"]),
            helper.make_node("Add", ["scores", "b"], ["logits"]),
        ],
        "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, IMAGE_SIZE, IMAGE_SIZE])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 2])],
        initializer=[numpy_helper.from_array(weights, "W"), numpy_helper.from_array(bias, "b"), *extra],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def config() -> PreprocessConfig:
    return PreprocessConfig(image_size=IMAGE_SIZE)


def expected_probabilities(weights: np.ndarray, data: bytes, bias: np.ndarray | None = None) -> np.ndarray:
    """What the model must answer for these bytes, computed without the service."""
    image = decode_image(data)
    batch = preprocess_batch([image], config())
    logits = batch.mean(axis=(2, 3)) @ weights + (0 if bias is None else bias)
    shifted = np.exp(logits - logits.max())
    return (shifted / shifted.sum())[0]


def build_bundle(
    root: Path,
    weights: np.ndarray,
    *,
    samples: dict[str, bytes] | None = None,
    metrics: dict | None = None,
    top_half: bool = False,
    bias: np.ndarray | None = None,
) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    build_onnx(root / "model.onnx", weights, top_half=top_half, bias=bias)
    config().save(root / "preprocessing.json")
    (root / "metadata.json").write_text(
        json.dumps({"architecture": "tiny_gap_linear", "class_names": ["cat", "dog"]})
    )
    (root / "metrics.json").write_text(json.dumps(metrics or {"accuracy": 0.5, "n_images": 10}))
    if samples:
        (root / "samples").mkdir(exist_ok=True)
        for name, data in samples.items():
            (root / "samples" / name).write_bytes(data)
    return root


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
