"""Plain helpers for the registry tests: bundles with chosen test metrics, manifests, plots."""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import numpy as np

from catsdogs.settings import Settings
from fakes import build_bundle, metrics_payload

IMAGE_SIZE = 32
#: Mean colour → logits: red-ish images lean "cat", blue-ish "dog"; a bias moves the answers predictably.
WEIGHTS = np.array([[2.0, -2.0], [0.0, 0.0], [-2.0, 2.0]], dtype=np.float32)


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


def registry_bundle(
    root: Path,
    samples: dict[str, list[bytes]],
    *,
    accuracy: float = 0.98,
    recall: dict[str, float] | None = None,
    bias: tuple[float, float] = (0.0, 0.0),
) -> Path:
    """A :func:`fakes.build_bundle` with test metrics chosen by the test, a model card and one real
    sample photo per class (what the tracker logs and the gate reads)."""
    return build_bundle(
        root,
        WEIGHTS,
        bias=np.array(bias, dtype=np.float32),
        image_size=IMAGE_SIZE,
        samples={f"{label}.0.jpg": blobs[0] for label, blobs in samples.items()},
        metadata={"architecture": "tiny", "strategy": "head", "class_names": ["cat", "dog"]},
        metrics=metrics_payload(accuracy, recall or {"cat": accuracy, "dog": accuracy}),
        model_card="# tiny test model\n",
    )


def write_plots(folder: Path) -> Path:
    """Evaluation plots as the training helper writes them (small real PNGs) and a gallery folder."""
    from PIL import Image

    (folder / "misclassified").mkdir(parents=True)
    names = ["confusion_matrix.png", "roc_curve.png", "pr_curve.png", "training_curves.png"]
    for index, name in enumerate(names):
        Image.new("RGB", (40, 30), (index * 40, 100, 200)).save(folder / name)
    Image.new("RGB", (40, 30), (200, 10, 10)).save(folder / "misclassified" / "gallery.png")
    return folder


def run_id_of(settings: Settings, version: int | str) -> str:
    """The MLflow run behind a registered version: the name of its folder in the bundle cache."""
    from mlflow import MlflowClient

    client = MlflowClient(settings.mlflow_tracking_uri, registry_uri=settings.mlflow_registry_uri)
    return str(client.get_model_version(settings.model_name, str(version)).run_id)
