"""Assemble a model bundle after training: weights, preprocessing, verified ONNX, test metrics, card.

The bundle is built in a temporary folder next to its destination and renamed into place, so a
reader never sees half a bundle. Test metrics come from the exported ONNX graph through ONNX
Runtime: exactly what serving runs.
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
from catsdogs.data.download import file_sha256
from catsdogs.data.labelled import LabelledImage
from catsdogs.preprocessing import PreprocessConfig, decode_image
from catsdogs.registry.lineage import git_commit
from catsdogs.settings import Settings
from catsdogs.training.evaluate import evaluate_session, write_predictions_csv
from catsdogs.training.export import export_verified
from catsdogs.training.features import Sample, image_batches, ort_session
from catsdogs.training.loop import selection_loss
from catsdogs.training.models import BACKBONES, ModelSpec
from catsdogs.training.reports import (
    model_card,
    plot_confusion_matrix,
    plot_misclassified,
    plot_roc_pr,
    plot_training_curves,
)

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
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(model.state_dict(), tmp)
    tmp.replace(path)


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
    (staging / bundle_files.SAMPLES).mkdir(parents=True)
    artifacts_dir.mkdir(parents=True, exist_ok=True)
    model = model.cpu().eval()
    _save_weights(model, staging / bundle_files.WEIGHTS)
    config.save(staging / bundle_files.PREPROCESSING)

    shipped = pick_samples(samples["test"], config.class_names, per_class=settings.bundle_samples_per_class)
    for sample in shipped:
        shutil.copyfile(
            sample.path,
            staging / bundle_files.SAMPLES / f"{sample.label}.{sample.sha256[:12]}{sample.path.suffix}",
        )
    parity_set = shipped + list(samples["val"][: settings.parity_images])
    parity = export_verified(
        model,
        staging / bundle_files.ONNX,
        image_size=config.image_size,
        parity_batch=parity_images(parity_set, config),
    )

    test_images = [LabelledImage(str(s.path), s.label, s.path.read_bytes) for s in samples["test"]]
    result = evaluate_session(ort_session(staging / bundle_files.ONNX), config, test_images, split="test")
    metrics = result.metrics
    bundle_files.write_json_atomic(staging / bundle_files.METRICS, metrics)

    manifest = settings.manifest_path
    best = val_metrics if val_metrics is not None else min(history, key=selection_loss) if history else {}
    metadata = {
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
        "onnx": parity.to_dict(),
        "epochs_trained": len(history),
        "best_epoch": best.get("epoch"),
        "val_metrics": best,
        "temperature": temperature,
        "ema_decay": settings.ema_decay,  # the weights are this moving average of the trained ones
        "weights_licence": BACKBONES[spec.architecture].licence
        if spec.architecture in BACKBONES
        else SIMPLE_CNN_LICENCE,
    }
    bundle_files.write_json_atomic(staging / bundle_files.METADATA, metadata)
    data_info = {
        "n_train": len(samples["train"]),
        "n_val": len(samples["val"]),
        "views": _training_views(settings, strategy),
    }
    (staging / bundle_files.MODEL_CARD).write_text(
        model_card(metadata=metadata, metrics=metrics, data=data_info)
    )

    bundle_files.write_json_atomic(
        staging / bundle_files.DRIFT_REFERENCE,
        drift_reference(
            samples["train"], result.predictions, config.class_names, limit=settings.drift_reference_images
        ),
    )

    if bundle_dir.exists():
        shutil.rmtree(bundle_dir)
    staging.replace(bundle_dir)
    _write_artifacts(artifacts_dir, result.predictions, metrics, history, config.class_names)
    logger.info("bundle %s: test accuracy %.4f %s", bundle_dir, metrics["accuracy"], metrics["accuracy_ci95"])
    return metrics


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


def _training_views(settings: Settings, strategy: str) -> list[str]:
    """Which fixed views of each training image the model saw (random augmentation for scratch)."""
    if strategy == "finetune" and not settings.finetune_augment:
        return list(settings.finetune_views)
    if strategy == "head":
        return ["orig", "flip"] if settings.flip_features else ["orig"]
    return ["random augmentation"]
