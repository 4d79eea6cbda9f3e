"""A real, tiny model bundle, and the real service serving it in-process, for tests of any folder.

The model's answer follows the mean colour of the image (:data:`TINY_WEIGHTS`): a red image is a
cat, a blue one a dog, so a test chooses each prediction by the colour it paints.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from catsdogs.drift import build_reference, image_stats
from catsdogs.preprocessing import PreprocessConfig
from catsdogs.settings import Settings

IMAGE_SIZE = 64
TINY_WEIGHTS = np.array([[4.0, -4.0], [-2.0, 2.0], [-3.0, 3.0]], dtype=np.float32)
RED, BLUE = (230, 20, 20), (20, 20, 230)  # predicted cat, predicted dog


def build_tiny_bundle(root: Path, *, reference_images: list[Image.Image] | None = None) -> Path:
    """A real, tiny model bundle: normalized image -> mean colour -> linear -> logits (onnx.helper).

    The bundle ships a ``drift_reference.json`` built from ``reference_images`` (by default a few
    painted ones), so the service publishes drift scores.
    """
    if reference_images is None:
        painted = [painted_png(colour, seed=seed) for seed in range(4) for colour in (RED, BLUE)]
        reference_images = [Image.open(io.BytesIO(data)).convert("RGB") for data in painted]
    graph = helper.make_graph(
        [
            helper.make_node("GlobalAveragePool", ["input"], ["pooled"]),
            helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
            helper.make_node("MatMul", ["flat", "W"], ["logits"]),
        ],
        "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, IMAGE_SIZE, IMAGE_SIZE])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 2])],
        initializer=[numpy_helper.from_array(TINY_WEIGHTS, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    root.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(root / "model.onnx"))
    PreprocessConfig(image_size=IMAGE_SIZE).save(root / "preprocessing.json")
    metadata = {"architecture": "tiny_gap_linear", "class_names": ["cat", "dog"], "num_classes": 2}
    (root / "metadata.json").write_text(json.dumps(metadata))
    (root / "metrics.json").write_text(json.dumps({"accuracy": 0.5, "n_images": 0}))
    reference = build_reference([image_stats(image) for image in reference_images])
    (root / "drift_reference.json").write_text(json.dumps(reference))
    return root


def painted_png(colour: tuple[int, int, int], *, seed: int = 0) -> bytes:
    """A 64×64 PNG of one colour with a little noise (so no two files are byte-identical)."""
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(colour) + rng.integers(-10, 11, (IMAGE_SIZE, IMAGE_SIZE, 3)), 0, 255)
    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def write_images(root: Path, files: dict[str, tuple[int, int, int]]) -> Path:
    """A labelled folder: each relative name gets a PNG painted in its colour."""
    for seed, (name, colour) in enumerate(files.items()):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(painted_png(colour, seed=seed))
    return root


class _Session:
    """The part of ``requests.Session`` that ``evaluate-deployed`` uses, over a TestClient (which
    has no network to time out)."""

    def __init__(self, client: Any) -> None:
        self._client = client
        self.headers = client.headers

    def post(self, url: str, *, timeout: float | None = None, **kwargs: Any) -> Any:
        return self._client.post(url, **kwargs)


@contextmanager
def service_in_process(bundle: Path, settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The real app serving ``bundle`` under a TestClient, standing in for the HTTP session that
    ``evaluate-deployed`` opens; yields the URL to give it."""
    from fastapi.testclient import TestClient

    from catsdogs.monitoring import evaluate_deployed
    from catsdogs.serve.app import create_app

    values = {**settings.model_dump(), "model_uri": str(bundle), "reload_interval_s": 0.0}
    with TestClient(create_app(Settings(**values))) as client:
        deadline = time.monotonic() + 20  # the model loads in the background
        while client.get("/ready").status_code != 200:
            assert time.monotonic() < deadline, f"service not ready: {client.get('/ready').text}"
            time.sleep(0.05)
        monkeypatch.setattr(evaluate_deployed.requests, "Session", lambda: _Session(client))
        yield str(client.base_url)
