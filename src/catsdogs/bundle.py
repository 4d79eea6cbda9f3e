"""The model bundle: one self-describing folder per model version.

Layout (every consumer reads through :class:`ModelBundle`, never by hard-coded names)::

    bundle/
      weights.pt              PyTorch state dict (torch.load(..., weights_only=True)); training side only
      model.onnx              float32 graph, input ``input`` (N, 3, H, W), output ``logits`` (N, classes)
                              (names: :mod:`catsdogs.runtime`; H = W = preprocessing.json's image_size)
      model.int8.onnx         optional statically quantized variant
      preprocessing.json      :class:`~catsdogs.preprocessing.PreprocessConfig`: image size, resize,
                              normalization, JPEG decode draft, class names
      metadata.json           architecture, head, strategy, versions, data version, ONNX parity, ...
      metrics.json            evaluation metrics with 95% confidence intervals
      model_card.md           data, metrics per class, intended use, limits, licences
      drift_reference.json    reference statistics for drift monitoring (optional)
      samples/                a few labelled test images: ``<label>.<anything>.jpg``

Only the standard library, NumPy and Pillow are needed here, so serving can use it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from catsdogs import CatsdogsError
from catsdogs.files import write_text_atomic
from catsdogs.preprocessing import PREPROCESSING_FILE, PreprocessConfig

WEIGHTS = "weights.pt"
ONNX = "model.onnx"
ONNX_INT8 = "model.int8.onnx"
PREPROCESSING = PREPROCESSING_FILE
METADATA = "metadata.json"
METRICS = "metrics.json"
MODEL_CARD = "model_card.md"
DRIFT_REFERENCE = "drift_reference.json"
SAMPLES = "samples"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")


def write_json_atomic(path: Path, payload: Any) -> None:
    """Write JSON through a temporary file and a rename, so readers never see half a file."""
    write_text_atomic(path, json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    return json.loads(path.read_text())


@dataclass(frozen=True)
class ModelBundle:
    """A model version on disk."""

    root: Path

    @classmethod
    def open(cls, root: Path | str) -> ModelBundle:
        """Open an existing bundle, refusing a folder that lacks the files serving needs."""
        bundle = cls(Path(root))
        if not bundle.root.is_dir():
            raise CatsdogsError(f"model bundle {bundle.root} does not exist or is not a folder")
        if not (bundle.root / PREPROCESSING).is_file():
            raise CatsdogsError(f"{bundle.root} is not a model bundle: {PREPROCESSING} is missing")
        return bundle

    def path(self, name: str) -> Path:
        return self.root / name

    @property
    def preprocessing(self) -> PreprocessConfig:
        """The model's preprocessing; an older ``format_version`` is migrated, an unknown one or a
        missing key refused (:meth:`PreprocessConfig.load`)."""
        return PreprocessConfig.load(self.root / PREPROCESSING)

    @property
    def metadata(self) -> dict[str, Any]:
        return _read_json(self.root / METADATA)

    @property
    def metrics(self) -> dict[str, Any]:
        return _read_json(self.root / METRICS)

    @property
    def drift_reference(self) -> dict[str, Any]:
        return _read_json(self.root / DRIFT_REFERENCE)

    def onnx_path(self, *, int8: bool = False) -> Path:
        path = self.root / (ONNX_INT8 if int8 else ONNX)
        if not path.is_file():
            raise CatsdogsError(f"{path} is missing: run `catsdogs export` for this model first")
        return path

    def samples(self) -> list[tuple[Path, str]]:
        """Labelled smoke-test images shipped in the bundle, as (path, label) pairs."""
        folder = self.root / SAMPLES
        if not folder.is_dir():
            return []
        return [
            (path, path.name.split(".", 1)[0])
            for path in sorted(folder.iterdir())
            if path.suffix.lower() in IMAGE_SUFFIXES
        ]


def find_bundle(path: Path | str) -> ModelBundle:
    """Locate the bundle in a folder: the folder itself, or ``artifacts/bundle`` inside a downloaded
    MLflow model (the registry logs the bundle as the pyfunc model's ``bundle`` artifact)."""
    root = Path(path)
    for candidate in (root, root / "artifacts" / "bundle", root / "bundle"):
        if (candidate / PREPROCESSING).is_file():
            return ModelBundle(candidate)
    raise CatsdogsError(
        f"no model bundle found in {root} (expected {PREPROCESSING} there or in artifacts/bundle)"
    )
