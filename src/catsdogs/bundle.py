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
      ood.npz                 the unknown detector's feature density (optional; its thresholds are
                              metadata.json's ``ood`` record): :mod:`catsdogs.ood`
      samples/                a few labelled test images: ``<label>.<anything>.jpg``
      manifest.json           SHA-256 of every other file (:func:`write_manifest`); its own SHA-256
                              is the registered version's ``bundle_manifest_sha256`` tag

Only the standard library, NumPy and Pillow are needed here, so serving can use it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from catsdogs import CatsdogsError
from catsdogs.files import file_sha256, write_text_atomic
from catsdogs.ood import FeatureDensity, UnknownDetector
from catsdogs.preprocessing import PREPROCESSING_FILE, PreprocessConfig

WEIGHTS = "weights.pt"
ONNX = "model.onnx"
ONNX_INT8 = "model.int8.onnx"
PREPROCESSING = PREPROCESSING_FILE
METADATA = "metadata.json"
METRICS = "metrics.json"
MODEL_CARD = "model_card.md"
DRIFT_REFERENCE = "drift_reference.json"
OOD = "ood.npz"
SAMPLES = "samples"
MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
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

    def unknown_detector(self) -> UnknownDetector | None:
        """The model's calibrated unknown detector, or ``None`` for a bundle without one."""
        record = self.metadata.get("ood")
        if not record or not self.path(OOD).is_file():
            return None
        return UnknownDetector.from_record(FeatureDensity.load(self.path(OOD)), record)

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


class BundleIntegrityError(CatsdogsError):
    """A bundle's files do not match its manifest, or its manifest not the registered digest."""


def file_digests(root: Path) -> dict[str, str]:
    """SHA-256 of every file in the bundle but the manifest itself, by POSIX path relative to ``root``."""
    return {
        path.relative_to(root).as_posix(): file_sha256(path)
        for path in sorted(root.rglob("*"))
        if path.is_file() and path.relative_to(root).as_posix() != MANIFEST
    }


def write_manifest(root: Path) -> str:
    """Record the SHA-256 of every file of the bundle in ``manifest.json``; call it after the last
    change to the bundle's files. Returns the manifest's own SHA-256 (the registry tag)."""
    manifest = {"format_version": MANIFEST_FORMAT, "algorithm": "sha256", "files": file_digests(root)}
    write_json_atomic(root / MANIFEST, manifest)
    return file_sha256(root / MANIFEST)


def verify_manifest(root: Path, *, expected_sha256: str | None = None) -> str | None:
    """Check the bundle's files against its manifest, and the manifest against ``expected_sha256``
    (the registered digest) when one is given.

    Returns:
        The manifest's SHA-256, or ``None`` for a bundle written before manifests existed (only
        acceptable when nothing is expected; the caller decides how loudly to say so).

    Raises:
        BundleIntegrityError: a file was changed, added or removed, or the manifest is not the
            registered one.
    """
    path = root / MANIFEST
    if not path.is_file():
        if expected_sha256:
            raise BundleIntegrityError(
                f"{root} has no {MANIFEST} but the registry recorded digest {expected_sha256[:12]}: refused"
            )
        return None
    actual = file_sha256(path)
    if expected_sha256 and actual != expected_sha256:
        raise BundleIntegrityError(
            f"{path} has SHA-256 {actual[:12]}, the registry recorded {expected_sha256[:12]}: refused"
        )
    try:
        recorded = json.loads(path.read_text())["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise BundleIntegrityError(f"{path} is not a bundle manifest ({exc!r}): refused") from None
    found = file_digests(root)
    changed = sorted(name for name in set(recorded) | set(found) if recorded.get(name) != found.get(name))
    if changed:
        raise BundleIntegrityError(
            f"{root}: {', '.join(changed[:5])}{' …' if len(changed) > 5 else ''} "
            f"{'does' if len(changed) == 1 else 'do'} not match {MANIFEST} (changed, added or removed): "
            "refused"
        )
    return actual
