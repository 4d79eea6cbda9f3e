"""Helpers shared by every test folder (importable as ``support``: pytest puts tests/ on sys.path)."""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
DATASET_ZIP = REPO.parent / "shared" / "datasets" / "dogs-vs-cats" / "train.zip"


def require_tool(name: str) -> str:
    """Path of an external tool; a missing tool fails in CI (where .ci/run installs it), skips elsewhere."""
    path = shutil.which(name)
    if path:
        return path
    if os.environ.get("CI"):
        pytest.fail(f"{name} is not installed; .ci/run must install it")
    pytest.skip(f"{name} is not installed here (CI installs it)")


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (servers in tests bind loopback only)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def mean_colour_onnx(path: Path, *, image_size: int | str, weights: Any = None) -> Path:
    """A tiny real classifier graph with the model contract (:mod:`catsdogs.runtime` tensor names):
    mean colour per channel @ ``weights`` (3×2) → logits. ``image_size``: the graph's H = W (a
    string leaves them symbolic)."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from catsdogs.runtime import INPUT_NAME, OUTPUT_NAME

    weights = np.array([[2.0, -2.0], [0.0, 0.0], [-2.0, 2.0]]) if weights is None else weights
    graph = helper.make_graph(
        [
            helper.make_node("GlobalAveragePool", [INPUT_NAME], ["pooled"]),
            helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
            helper.make_node("MatMul", ["flat", "W"], [OUTPUT_NAME]),
        ],
        "mean_colour",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["N", 3, image_size, image_size])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["N", 2])],
        initializer=[numpy_helper.from_array(np.asarray(weights, dtype=np.float32), "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path
