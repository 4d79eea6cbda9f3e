"""Assemble a model bundle after training: weights, preprocessing, verified ONNX, test metrics, card.

The bundle is built in a temporary folder next to its destination and moved into place by
:func:`catsdogs.files.replace_folder`, so a reader never sees half a bundle. Test metrics come
from the exported ONNX graph, opened and run as evaluation and serving do.
"""

from __future__ import annotations

import datetime as dt
import logging
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from catsdogs import __version__
from catsdogs import bundle as bundle_files
from catsdogs.bundle import OOD
from catsdogs.files import atomic_path, file_sha256, replace_folder
from catsdogs.ood import FeatureDensity, UnknownDetector
from catsdogs.preprocessing import PreprocessConfig, decode_image
from catsdogs.registry.lineage import git_commit
from catsdogs.runtime import open_model
from catsdogs.settings import Settings
from catsdogs.training.backbones import BACKBONES
from catsdogs.training.evaluate import EvaluationResult, evaluate_session, write_predictions_csv
from catsdogs.training.export import export_verified
from catsdogs.training.features import Sample, image_batches
from catsdogs.training.loop import selection_loss
from catsdogs.training.models import ModelSpec
from catsdogs.training.reports import (
    model_card,
    plot_confusion_matrix,
    plot_misclassified,
    plot_roc_pr,
    plot_training_curves,
)
from catsdogs.training.unknown import fit_unknown_detector, split_rate, to_images

logger = logging.getLogger(__name__)

SIMPLE_CNN_LICENCE = "Apache-2.0 (trained from scratch by catsdogs)"


def pick_samples(test: Sequence[Sample], class_names: Sequence[str], *, per_class: int) -> list[Sample]:
    """The first ``per_class`` test images of each class (manifest order is by hash: arbitrary but fixed)."""
    chosen: list[Sample] = []
    for name in class_names:
        chosen += [s for s in test if s.label == name][:per_class]
    return chosen


def parity_images(samples: Sequence[Sample], config: PreprocessConfig) -> np.ndarray:
    return np.concatenate(list(image_batches([s.path for s in samples], config, batch_size=64)))


def _save_weights(model: nn.Module, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(model.state_dict(), tmp)


def write_bundle(
    model: nn.Module,
    bundle_dir: Path,
    *,
    artifacts_dir: Path,
    spec: ModelSpec,
    strategy: str,
    config: PreprocessConfig,
    settings: Settings,
    history: list[dict[str, float]],
    samples: dict[str, list[Sample]],
    temperature: float | list[float] | None = None,
    val_metrics: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write the complete bundle to ``bundle_dir`` (replacing an older one) and return test metrics.

    ``temperature``: the calibration already folded into ``model``'s last layer (each member's, for
    an ensemble), if any (recorded). ``val_metrics``: what the model was chosen on; by default the
    history's best epoch.
    """
    staging = bundle_dir.with_name(f".{bundle_dir.name}.staging")
    shutil.rmtree(staging, ignore_errors=True)
    model = model.cpu().eval()
    shipped = _write_model_inputs(model, staging, config, samples["test"], settings)
    parity = export_verified(
        model,
        staging / bundle_files.ONNX,
        image_size=config.image_size,
        parity_batch=parity_images(shipped + list(samples["val"][: settings.parity_images]), config),
    )
    ood = fit_unknown_detector(staging, config, samples, settings)
    detector = None if ood is None else UnknownDetector.from_record(FeatureDensity.load(staging / OOD), ood)
    result = _evaluate_test(staging, config, samples["test"], detector)
    if ood is not None:
        ood["test"] = split_rate(result.metrics)
    bundle_files.write_json_atomic(staging / bundle_files.METRICS, result.metrics)
    best = val_metrics if val_metrics is not None else min(history, key=selection_loss) if history else {}
    metadata = {
        **_metadata(spec, strategy, config, settings),
        "onnx": parity.to_dict(),
        "epochs_trained": len(history),
        "best_epoch": best.get("epoch"),
        "val_metrics": best,
        "temperature": temperature,
        "ood": ood,
    }
    _write_descriptions(staging, metadata, result, samples, settings, strategy)
    bundle_files.write_manifest(staging)
    replace_folder(staging, bundle_dir)
    _write_artifacts(artifacts_dir, result.predictions, result.metrics, history, config.class_names)
    _write_explained_errors(artifacts_dir / "explained_errors.png", bundle_dir, config, result.predictions)
    accuracy = result.metrics["accuracy"]
    logger.info("bundle %s: test accuracy %.4f %s", bundle_dir, accuracy, result.metrics["accuracy_ci95"])
    return result.metrics


def _write_model_inputs(
    model: nn.Module, staging: Path, config: PreprocessConfig, test: Sequence[Sample], settings: Settings
) -> list[Sample]:
    """Weights, ``preprocessing.json`` and the shipped sample images; returns those samples."""
    (staging / bundle_files.SAMPLES).mkdir(parents=True)
    _save_weights(model, staging / bundle_files.WEIGHTS)
    config.save(staging / bundle_files.PREPROCESSING)
    shipped = pick_samples(test, config.class_names, per_class=settings.bundle_samples_per_class)
    for sample in shipped:
        name = f"{sample.label}.{sample.sha256[:12]}{sample.path.suffix}"
        shutil.copyfile(sample.path, staging / bundle_files.SAMPLES / name)
    return shipped


def _evaluate_test(
    staging: Path, config: PreprocessConfig, test: Sequence[Sample], detector: UnknownDetector | None
) -> EvaluationResult:
    """Test metrics of the exported graph, opened and run exactly as ``catsdogs evaluate`` does."""
    session = open_model(staging / bundle_files.ONNX, config)
    return evaluate_session(session, config, to_images(test), detector=detector, split="test")


def _metadata(spec: ModelSpec, strategy: str, config: PreprocessConfig, settings: Settings) -> dict[str, Any]:
    """What the model is and where it came from (the input size is in ``preprocessing.json`` only)."""
    manifest = settings.manifest_path
    return {
        **spec.to_dict(),
        "strategy": strategy,
        "profile": settings.profile,
        "num_classes": len(config.class_names),
        "class_names": list(config.class_names),
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "package_version": __version__,
        "git_commit": git_commit(cwd=Path(__file__).resolve().parent),  # the source tree's
        "data_version": file_sha256(manifest) if manifest.is_file() else None,
        "run_id": None,
        "ema_decay": settings.ema_decay,  # the weights are this moving average of the trained ones
        "weights_licence": BACKBONES[spec.architecture].licence
        if spec.architecture in BACKBONES
        else SIMPLE_CNN_LICENCE,
    }


def _write_descriptions(
    staging: Path,
    metadata: dict[str, Any],
    result: EvaluationResult,
    samples: dict[str, list[Sample]],
    settings: Settings,
    strategy: str,
) -> None:
    """``metadata.json``, the model card and the drift reference."""
    bundle_files.write_json_atomic(staging / bundle_files.METADATA, metadata)
    data_info = {
        "n_train": len(samples["train"]),
        "n_val": len(samples["val"]),
        "views": _training_views(settings, strategy),
    }
    card = model_card(metadata=metadata, metrics=result.metrics, data=data_info)
    (staging / bundle_files.MODEL_CARD).write_text(card)
    class_names = metadata["class_names"]
    reference = drift_reference(
        samples["train"], result.predictions, class_names, limit=settings.drift_reference_images
    )
    bundle_files.write_json_atomic(staging / bundle_files.DRIFT_REFERENCE, reference)


def drift_reference(
    train: Sequence[Sample], predictions: list[dict[str, Any]], class_names: Sequence[str], *, limit: int
) -> dict[str, Any]:
    """Reference statistics for drift monitoring: inputs from training images (a deterministic
    sample by content hash), outputs from the held-out test predictions (not the training images,
    on which the model is overconfident)."""
    from catsdogs.drift import build_reference, image_stats

    picked = sorted(train, key=lambda sample: sample.sha256)[:limit]
    stats = [image_stats(decode_image(sample.path.read_bytes())) for sample in picked]
    probabilities = np.asarray([[row[f"p_{name}"] for name in class_names] for row in predictions])
    return build_reference(stats, probabilities=probabilities, class_names=class_names)


def _write_artifacts(
    folder: Path,
    predictions: list[dict[str, Any]],
    metrics: dict[str, Any],
    history: list[dict[str, float]],
    class_names: Sequence[str],
    *,
    gallery: int = 12,
) -> None:
    """Figures and per-image predictions for the tracker and for humans."""
    folder.mkdir(parents=True, exist_ok=True)
    write_predictions_csv(folder / "predictions.csv", predictions)
    plot_confusion_matrix(folder / "confusion_matrix.png", metrics["confusion_matrix"], class_names)
    y = np.asarray([class_names.index(p["label"]) for p in predictions])
    score = np.asarray([p[f"p_{class_names[-1]}"] for p in predictions])
    plot_roc_pr(
        folder / "roc_curve.png", folder / "pr_curve.png", (y == len(class_names) - 1).astype(int), score
    )
    plot_training_curves(folder / "training_curves.png", history)
    errors = sorted((p for p in predictions if not p["correct"]), key=lambda p: -p[f"p_{p['predicted']}"])[
        :gallery
    ]
    plot_misclassified(
        folder / "misclassified.png",
        [
            (Path(p["image"]).read_bytes(), p["label"], p["predicted"], p[f"p_{p['predicted']}"])
            for p in errors
        ],
    )


def _write_explained_errors(
    path: Path,
    bundle_dir: Path,
    config: PreprocessConfig,
    predictions: list[dict[str, Any]],
    *,
    gallery: int = 12,
) -> None:
    """The worst test errors with their evidence maps over them: what the model looked at when it
    was most confidently wrong (for linear heads, whose graph has activation maps)."""
    from catsdogs.explain import explain_upload
    from catsdogs.runtime import CAM_NAME, output_names

    session = open_model(bundle_dir / bundle_files.ONNX, config)
    if CAM_NAME not in output_names(session):
        return
    errors = sorted((p for p in predictions if not p["correct"]), key=lambda p: -p[f"p_{p['predicted']}"])
    shown = []
    for row in errors[:gallery]:
        _, png = explain_upload(session, config, Path(row["image"]).read_bytes())
        shown.append((png, row["label"], row["predicted"], row[f"p_{row['predicted']}"]))
    plot_misclassified(path, shown)


def _training_views(settings: Settings, strategy: str) -> list[str]:
    """Which fixed views of each training image the model saw (random augmentation for scratch)."""
    if strategy == "finetune" and not settings.finetune_augment:
        return list(settings.finetune_views)
    if strategy == "head":
        return ["orig", "flip"] if settings.flip_features else ["orig"]
    return ["random augmentation"]
