"""Plain helpers for the registry tests: a tiny real ONNX model, metrics.json payloads, manifests."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from catsdogs.preprocessing import PreprocessConfig
from catsdogs.runtime import INPUT_NAME, OUTPUT_NAME
from catsdogs.settings import Settings

IMAGE_SIZE = 32


def tiny_onnx(path: Path, *, bias: tuple[float, float] = (0.0, 0.0)) -> None:
    """logits = mean colour per channel @ W + bias: red-ish images lean "cat", blue-ish "dog".

    Real ONNX Runtime runs it, and different biases give different, predictable predictions.
    """
    weights = np.array([[2.0, -2.0], [0.0, 0.0], [-2.0, 2.0]], dtype=np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("GlobalAveragePool", [INPUT_NAME], ["pooled"]),
            helper.make_node("Flatten", ["pooled"], ["features"], axis=1),
            helper.make_node("MatMul", ["features", "W"], ["scores"]),
            helper.make_node("Add", ["scores", "b"], [OUTPUT_NAME]),
        ],
        "tiny",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["N", 3, IMAGE_SIZE, IMAGE_SIZE])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["N", 2])],
        initializer=[
            numpy_helper.from_array(weights, "W"),
            numpy_helper.from_array(np.array(bias, dtype=np.float32), "b"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def metrics_payload(accuracy: float, recall: dict[str, float], n: int = 200) -> dict:
    """A metrics.json as the evaluation helper writes it (numbers chosen by the test)."""
    return {
        "accuracy": accuracy,
        "accuracy_ci95": [accuracy - 0.01, min(1.0, accuracy + 0.01)],
        "precision": accuracy,
        "recall": accuracy,
        "f1": accuracy,
        "log_loss": 0.1,
        "roc_auc": 0.99,
        "per_class": {
            label: {"precision": accuracy, "recall": value, "f1": accuracy, "support": n // 2}
            for label, value in recall.items()
        },
        "confusion_matrix": [[90, 10], [5, 95]],
        "n_images": n,
        "split": "test",
    }


def write_manifest(settings: Settings, test_hashes: list[str]) -> Path:
    """A manifest whose test split is exactly these content hashes (plus one train row)."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    path = settings.manifest_path
    rows = [("images/cat/aa.jpg", "cat", "aa" * 32, "0" * 16, 200, 200, "train")]
    rows += [(f"images/cat/{h}.jpg", "cat", h, "0" * 16, 200, 200, "test") for h in test_hashes]
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "sha256", "phash", "width", "height", "split"])
        writer.writerows(sorted(rows, key=lambda row: row[2]))
    return path


def hashes(*words: str) -> list[str]:
    return [hashlib.sha256(word.encode()).hexdigest() for word in words]


def build_bundle(
    root: Path,
    samples: dict[str, list[bytes]],
    *,
    accuracy: float = 0.98,
    recall: dict[str, float] | None = None,
    bias: tuple[float, float] = (0.0, 0.0),
) -> Path:
    """A bundle folder as export writes it, with test metrics chosen by the test."""
    (root / "samples").mkdir(parents=True)
    tiny_onnx(root / "model.onnx", bias=bias)
    PreprocessConfig(image_size=IMAGE_SIZE).save(root / "preprocessing.json")
    metadata = {"architecture": "tiny", "strategy": "head", "class_names": ["cat", "dog"]}
    (root / "metadata.json").write_text(json.dumps(metadata))
    metrics = metrics_payload(accuracy, recall or {"cat": accuracy, "dog": accuracy})
    (root / "metrics.json").write_text(json.dumps(metrics))
    (root / "model_card.md").write_text("# tiny test model\n")
    for label, blobs in samples.items():
        (root / "samples" / f"{label}.0.jpg").write_bytes(blobs[0])
    return root


def write_plots(folder: Path) -> Path:
    """Evaluation plots as the training helper writes them (small real PNGs) and a gallery folder."""
    from PIL import Image

    (folder / "misclassified").mkdir(parents=True)
    names = ["confusion_matrix.png", "roc_curve.png", "pr_curve.png", "training_curves.png"]
    for index, name in enumerate(names):
        Image.new("RGB", (40, 30), (index * 40, 100, 200)).save(folder / name)
    Image.new("RGB", (40, 30), (200, 10, 10)).save(folder / "misclassified" / "gallery.png")
    return folder
