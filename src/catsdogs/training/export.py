"""ONNX export, verified where it happens: checker, dynamic batch, parity with PyTorch, INT8 gate.

Serving runs ``model.onnx`` (input :data:`~catsdogs.runtime.INPUT_NAME` (N, 3, H, W) float32,
output :data:`~catsdogs.runtime.OUTPUT_NAME`), so every export is compared with the PyTorch model on
real images before it is accepted. A bundle's model is rebuilt and exported at the one image size
of its ``preprocessing.json``.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from catsdogs import CatsdogsError
from catsdogs.files import atomic_path
from catsdogs.preprocessing import softmax
from catsdogs.runtime import INPUT_NAME, OUTPUT_NAME, open_session

logger = logging.getLogger(__name__)

PARITY_MAX_PROB_DIFF = 1e-4
INT8_MAX_DROP_POINTS = 0.3


def export_model(model: nn.Module, path: Path, *, image_size: int) -> Path:
    """Export a classifier as its :class:`~catsdogs.training.models.ServingGraph`: logits, pooled
    features and, for linear heads, activation maps, from one pass."""
    from catsdogs.training.models import ServingGraph

    graph = ServingGraph(model.eval().cpu()).eval()
    return export_onnx(graph, path, image_size=image_size, output_names=graph.output_names)


def export_onnx(
    module: nn.Module, path: Path, *, image_size: int, output_names: Sequence[str] = (OUTPUT_NAME,)
) -> Path:
    """Export ``module`` to one self-contained ONNX file with a dynamic batch axis (onnx.checker-checked)."""
    import onnx

    # The exporter's optimizer logs every deduplicated initializer at INFO.
    logging.getLogger("onnx_ir").setLevel(logging.WARNING)
    module = module.eval().cpu()
    example = torch.zeros(2, 3, image_size, image_size)
    with atomic_path(path, suffix=".onnx") as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (example,),
            tmp,
            input_names=[INPUT_NAME],
            output_names=list(output_names),
            dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},),
            dynamo=True,
            external_data=False,
            optimize=True,
            verbose=False,
        )
        onnx.checker.check_model(onnx.load(tmp), full_check=True)
    logger.info("exported %s (%.1f MB)", path, path.stat().st_size / 1e6)
    return path


def onnx_logits(session: Any, batch: np.ndarray, *, chunk: int = 64) -> np.ndarray:
    """Run an ONNX Runtime session over a batch in chunks (bounded memory); its logits."""
    outputs = [
        session.run([OUTPUT_NAME], {INPUT_NAME: batch[i : i + chunk]})[0] for i in range(0, len(batch), chunk)
    ]
    return np.concatenate(outputs) if outputs else np.zeros((0, 0), np.float32)


@dataclass(frozen=True)
class ParityReport:
    """How closely ONNX Runtime reproduces PyTorch on real images."""

    n_images: int
    max_abs_prob_diff: float
    max_abs_logit_diff: float
    labels_identical: bool
    tolerance: float = PARITY_MAX_PROB_DIFF

    @property
    def passed(self) -> bool:
        return self.labels_identical and self.max_abs_prob_diff <= self.tolerance

    def to_dict(self) -> dict[str, Any]:
        return {
            "n_images": self.n_images,
            "max_abs_prob_diff": self.max_abs_prob_diff,
            "max_abs_logit_diff": self.max_abs_logit_diff,
            "labels_identical": self.labels_identical,
            "tolerance": self.tolerance,
            "passed": self.passed,
        }


def check_parity(model: nn.Module, onnx_path: Path, batch: np.ndarray) -> ParityReport:
    """Compare PyTorch and ONNX Runtime on preprocessed real images (the same array goes to both)."""
    if len(batch) == 0:
        raise CatsdogsError("parity needs at least one real image")
    with torch.inference_mode():
        torch_logits = model.eval().cpu()(torch.from_numpy(batch)).numpy()
    ort_logits = onnx_logits(open_session(onnx_path), batch)
    torch_prob, ort_prob = softmax(torch_logits), softmax(ort_logits)
    return ParityReport(
        n_images=len(batch),
        max_abs_prob_diff=float(np.abs(torch_prob - ort_prob).max()),
        max_abs_logit_diff=float(np.abs(torch_logits - ort_logits).max()),
        labels_identical=bool((torch_prob.argmax(1) == ort_prob.argmax(1)).all()),
    )


def export_verified(
    model: nn.Module, path: Path, *, image_size: int, parity_batch: np.ndarray
) -> ParityReport:
    """Export, then refuse (delete) the file unless it matches PyTorch on ``parity_batch``."""
    export_model(model, path, image_size=image_size)
    report = check_parity(model, path, parity_batch)
    if not report.passed:
        path.unlink(missing_ok=True)
        raise CatsdogsError(
            f"ONNX parity failed: max |Δprob| {report.max_abs_prob_diff:.2e} "
            f"(limit {report.tolerance:.0e}), labels identical: {report.labels_identical}"
        )
    logger.info("ONNX parity on %d images: max |Δprob| %.2e", report.n_images, report.max_abs_prob_diff)
    return report


class _CalibrationReader:
    """Feeds preprocessed training images to ONNX Runtime's static quantization calibrator."""

    def __init__(self, batches: Sequence[np.ndarray]) -> None:
        self._batches = iter(batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {INPUT_NAME: batch}


def quantize_int8(onnx_path: Path, out_path: Path, *, calibration: Sequence[np.ndarray]) -> Path:
    """Statically quantize (QDQ, per-channel weights) calibrated on training images."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory(dir=out_path.parent) as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(onnx_path), str(prepared), skip_symbolic_shape=True)
        staged = Path(tmp) / "int8.onnx"
        quantize_static(
            str(prepared),
            str(staged),
            _CalibrationReader(calibration),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            # Not CalibMaxIntermediateOutputs: in onnxruntime 1.32 it discards the collected
            # outputs instead of merging their ranges (calibration on a fraction, or none at all).
        )
        staged.replace(out_path)
    return out_path


@dataclass
class ExportReport:
    """What ``catsdogs export`` did to a bundle."""

    onnx_path: Path
    parity: ParityReport
    int8_path: Path | None = None
    int8: dict[str, Any] | None = None


def _split_arrays(samples: Sequence[Any], config: Any) -> np.ndarray:
    from catsdogs.training.features import image_batches

    batches = list(image_batches([s.path for s in samples], config, batch_size=64))
    return (
        np.concatenate(batches)
        if batches
        else np.zeros((0, 3, config.image_size, config.image_size), np.float32)
    )


def _accuracies(
    paths: Sequence[Path], samples: Sequence[Any], labels: np.ndarray, config: Any
) -> list[float]:
    """Accuracy of several ONNX models on the same images, streamed batch by batch (bounded memory)."""
    from catsdogs.training.features import image_batches

    sessions = [open_session(path) for path in paths]
    correct = np.zeros(len(paths), dtype=np.int64)
    batches = image_batches([s.path for s in samples], config, batch_size=64)
    for start, batch in zip(range(0, len(samples), 64), batches, strict=True):
        truth = labels[start : start + 64]
        for k, session in enumerate(sessions):
            correct[k] += int((onnx_logits(session, batch).argmax(1) == truth).sum())
    return [float(c) / max(len(samples), 1) for c in correct]


def export_bundle(bundle: Any, *, settings: Any, int8: bool = False, out: Path | None = None) -> ExportReport:
    """Re-export a bundle's weights to ``model.onnx`` (parity-checked) and optionally ``model.int8.onnx``.

    Parity runs on the bundle's own sample images plus validation images from the manifest (when
    the dataset is present). The INT8 model is calibrated on training images and refused when it
    loses more than ``settings.int8_max_accuracy_drop`` validation accuracy.

    With ``out``, the bundle is copied there and exported in the copy (the source is left as it
    was: the DVC ``export`` stage's output is separate from ``train``'s); the copy replaces ``out``
    only once everything passed.
    """
    from catsdogs.bundle import ModelBundle
    from catsdogs.files import replace_folder

    if out is None:
        return _export_in_place(bundle, settings=settings, int8=int8)
    out = Path(out)
    if out.resolve() == Path(bundle.root).resolve():
        return _export_in_place(bundle, settings=settings, int8=int8)
    staging = out.with_name(f".{out.name}.staging")
    shutil.rmtree(staging, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(bundle.root, staging)
    try:
        report = _export_in_place(ModelBundle(staging), settings=settings, int8=int8)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    replace_folder(staging, out)
    report.onnx_path = out / report.onnx_path.name
    if report.int8_path is not None:
        report.int8_path = out / report.int8_path.name
    return report


def _export_in_place(bundle: Any, *, settings: Any, int8: bool) -> ExportReport:
    from catsdogs import bundle as bundle_files
    from catsdogs.preprocessing import preprocess
    from catsdogs.training.features import load_image, read_manifest, split_samples
    from catsdogs.training.models import load_model

    config = bundle.preprocessing
    model = load_model(bundle)  # built for config.image_size, exported at it below
    shipped = [preprocess(load_image(path), config) for path, _ in bundle.samples()]
    samples = read_manifest(settings.data_dir) if settings.manifest_path.is_file() else []
    val = split_samples(samples, "val", limit=settings.max_eval_images)
    parts = [np.stack(shipped)] if shipped else []
    parts.append(_split_arrays(val[: settings.parity_images], config))
    onnx_path = bundle.path(bundle_files.ONNX)
    parity = export_verified(
        model, onnx_path, image_size=config.image_size, parity_batch=np.concatenate(parts)
    )
    report = ExportReport(onnx_path, parity)
    metadata = {**bundle.metadata, "onnx": report.parity.to_dict()}
    # Same weights, same features: a detector the bundle has still fits the re-exported graph.
    has_detector = bundle.metadata.get("ood") and bundle.path(bundle_files.OOD).is_file()
    if not has_detector and any(s.split == "train" for s in samples) and val:
        metadata["ood"] = _refit_unknown(bundle, settings=settings, samples=samples)
    try:
        if int8:
            report.int8_path, report.int8 = _export_int8(bundle, settings=settings, samples=samples)
            metadata["int8"] = report.int8
        bundle_files.write_json_atomic(bundle.path(bundle_files.METADATA), metadata)
    finally:  # model.onnx is new even when INT8 is refused: the manifest describes what is there
        bundle_files.write_manifest(bundle.root)
    return report


def _refit_unknown(bundle: Any, *, settings: Any, samples: Sequence[Any]) -> dict[str, Any] | None:
    """Fit the unknown detector of the graph and measure it on the test split: a bundle trained
    before the detector existed gets one (with the dataset at hand: about a minute)."""
    from catsdogs import bundle as bundle_files
    from catsdogs.bundle import OOD
    from catsdogs.ood import FeatureDensity, UnknownDetector
    from catsdogs.training.evaluate import evaluate_session
    from catsdogs.training.features import split_samples
    from catsdogs.training.unknown import fit_unknown_detector, split_rate, to_images

    config = bundle.preprocessing
    splits = {name: split_samples(samples, name, limit=settings.max_eval_images) for name in ("val", "test")}
    splits["train"] = split_samples(samples, "train")
    record = fit_unknown_detector(bundle.root, config, splits, settings)
    if record is not None and splits["test"]:
        detector = UnknownDetector.from_record(FeatureDensity.load(bundle.path(OOD)), record)
        session = open_session(bundle.path(bundle_files.ONNX))
        metrics = evaluate_session(
            session, config, to_images(splits["test"]), detector=detector, progress=False
        ).metrics
        record["test"] = split_rate(metrics)
    return record


def _export_int8(bundle: Any, *, settings: Any, samples: Sequence[Any]) -> tuple[Path, dict[str, Any]]:
    from catsdogs import bundle as bundle_files
    from catsdogs.training.features import split_samples

    config = bundle.preprocessing
    train = split_samples(samples, "train", limit=settings.int8_calibration_images)
    val = split_samples(samples, "val", limit=settings.max_eval_images)
    test = split_samples(samples, "test", limit=settings.max_eval_images)
    if not train or not val:
        raise CatsdogsError(
            f"--int8 needs the dataset (train images to calibrate, val images to check): "
            f"{settings.manifest_path} has none; run `catsdogs data ingest` or pass --data-dir"
        )
    index = {name: i for i, name in enumerate(config.class_names)}
    calibration = _split_arrays(train, config)
    out = bundle.path(bundle_files.ONNX_INT8)
    chunks = [calibration[i : i + 32] for i in range(0, len(calibration), 32)]
    quantize_int8(bundle.path(bundle_files.ONNX), out, calibration=chunks)
    result: dict[str, Any] = {
        "calibration_images": len(train),
        "max_accuracy_drop": settings.int8_max_accuracy_drop,
    }
    for name, split in (("val", val), ("test", test)):
        if not split:
            continue
        labels = np.asarray([index[s.label] for s in split])
        fp32, q8 = _accuracies([bundle.path(bundle_files.ONNX), out], split, labels, config)
        result[name] = {"n_images": len(split), "fp32_accuracy": fp32, "int8_accuracy": q8, "drop": fp32 - q8}
    result["accepted"] = result["val"]["drop"] <= settings.int8_max_accuracy_drop
    if not result["accepted"]:
        out.unlink(missing_ok=True)
        raise CatsdogsError(
            f"INT8 model refused: it loses {100 * result['val']['drop']:.2f} points of validation accuracy "
            f"(limit {100 * settings.int8_max_accuracy_drop:.2f}); serve the float model"
        )
    logger.info("INT8 model %s: %s", out, result)
    return out, result
