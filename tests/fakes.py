"""Fake-but-real model bundles for every test folder (importable as ``fakes``, like ``support``), and
their registration in a real MLflow store.

The graph is a tiny real ONNX model built with ``onnx.helper``: normalized image → (optionally its
top half) → GlobalAveragePool → (N, 3) mean colour → MatMul ``W`` + ``b`` → logits. The answer
depends on the image, two weight matrices give two distinguishable models, and ONNX Runtime runs
it in microseconds. Files are named with :mod:`catsdogs.bundle`'s own constants, so a renamed file
is renamed here too.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from catsdogs.bundle import DRIFT_REFERENCE, METADATA, METRICS, MODEL_CARD, ONNX, PREPROCESSING, SAMPLES
from catsdogs.preprocessing import PreprocessConfig
from catsdogs.runtime import INPUT_NAME, OUTPUT_NAME

IMAGE_SIZE = 64
#: Mean colour → logits: red-ish images lean "cat", green- and blue-ish ones "dog".
WEIGHTS_A = np.array([[4.0, -4.0], [-2.0, 2.0], [-3.0, 3.0]], dtype=np.float32)
WEIGHTS_B = -WEIGHTS_A  # the opposite model: every answer flips
CLASS_NAMES = ("cat", "dog")


def tiny_onnx(
    path: Path,
    weights: np.ndarray,
    *,
    bias: np.ndarray | None = None,
    image_size: int | str = IMAGE_SIZE,
    top_half: bool = False,
) -> Path:
    """Write the tiny graph; ``top_half`` pools only the upper half, so orientation changes the answer.
    A string ``image_size`` leaves the graph's height and width symbolic (any size)."""
    bias = np.zeros(weights.shape[1], dtype=np.float32) if bias is None else np.asarray(bias, np.float32)
    initializers = [numpy_helper.from_array(weights.astype(np.float32), "W")]
    initializers.append(numpy_helper.from_array(bias, "b"))
    if top_half:
        crop = helper.make_node("Slice", [INPUT_NAME, "starts", "ends", "axes"], ["region"])
        initializers += [
            numpy_helper.from_array(np.array([0], dtype=np.int64), "starts"),
            numpy_helper.from_array(np.array([image_size // 2], dtype=np.int64), "ends"),
            numpy_helper.from_array(np.array([2], dtype=np.int64), "axes"),
        ]
    else:
        crop = helper.make_node("Identity", [INPUT_NAME], ["region"])
    graph = helper.make_graph(
        [
            crop,
            helper.make_node("GlobalAveragePool", ["region"], ["pooled"]),
            helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
            helper.make_node("MatMul", ["flat", "W"], ["scores"]),
            helper.make_node("Add", ["scores", "b"], [OUTPUT_NAME]),
        ],
        "tiny",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["N", 3, image_size, image_size])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["N", weights.shape[1]])],
        initializer=initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # readable by every onnxruntime the serving extra may pin
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def metrics_payload(accuracy: float, recall: dict[str, float], n: int = 200) -> dict[str, Any]:
    """A ``metrics.json`` as evaluation writes it, with the accuracy and per-class recall a test chose."""
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


def build_bundle(
    root: Path,
    weights: np.ndarray = WEIGHTS_A,
    *,
    bias: np.ndarray | None = None,
    image_size: int = IMAGE_SIZE,
    top_half: bool = False,
    samples: dict[str, bytes] | None = None,
    metadata: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    model_card: str | None = None,
    drift_reference: dict[str, Any] | None = None,
) -> Path:
    """A bundle folder as training writes it (only what a test needs); ``samples`` maps file names
    (``<label>.<anything>.jpg``) to their bytes."""
    root.mkdir(parents=True, exist_ok=True)
    tiny_onnx(root / ONNX, weights, bias=bias, image_size=image_size, top_half=top_half)
    PreprocessConfig(image_size=image_size).save(root / PREPROCESSING)
    default_metadata = {"architecture": "tiny_gap_linear", "class_names": list(CLASS_NAMES), "num_classes": 2}
    (root / METADATA).write_text(json.dumps(metadata or default_metadata))
    (root / METRICS).write_text(json.dumps(metrics or {"accuracy": 0.5, "n_images": 10}))
    if model_card is not None:
        (root / MODEL_CARD).write_text(model_card)
    if drift_reference is not None:
        (root / DRIFT_REFERENCE).write_text(json.dumps(drift_reference))
    if samples:
        (root / SAMPLES).mkdir(exist_ok=True)
        for name, data in samples.items():
            (root / SAMPLES / name).write_bytes(data)
    return root


REGISTERED_NAME = "catsdogs-classifier"


def register_bundle(
    tracking_uri: str, bundle: Path, artifacts: Path, *, alias: str | None = "champion"
) -> str:
    """Log a bundle as a run's model, register it and point ``alias`` at it (directly, as an
    operator outside catsdogs could; ``None``: no alias); returns the version."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("serve-test")
    experiment_id = (
        experiment.experiment_id
        if experiment
        else client.create_experiment("serve-test", artifact_location=artifacts.as_uri())
    )
    run = client.create_run(experiment_id)
    client.log_artifacts(run.info.run_id, str(bundle), "model/artifacts/bundle")
    client.set_terminated(run.info.run_id)
    if not client.search_registered_models(f"name='{REGISTERED_NAME}'"):
        client.create_registered_model(REGISTERED_NAME)
    version = client.create_model_version(
        REGISTERED_NAME, f"{run.info.artifact_uri}/model", run_id=run.info.run_id
    ).version
    if alias is not None:
        client.set_registered_model_alias(REGISTERED_NAME, alias, version)
    return str(version)
