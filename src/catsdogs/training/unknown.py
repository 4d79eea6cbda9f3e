"""Fitting a model's unknown detector: the density on training images, thresholds on validation.

Runs on the exported graph (what serving runs), after export and before the test evaluation, so
the test split reports the detector as calibrated, never tunes it. Writes ``ood.npz`` into the
bundle and returns the ``ood`` record of ``metadata.json`` (thresholds, floors, validation rate).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from catsdogs import CatsdogsError
from catsdogs.bundle import OOD
from catsdogs.data.labelled import LabelledImage
from catsdogs.ood import UnknownDetector, calibrate_threshold, fit_density
from catsdogs.preprocessing import PreprocessConfig
from catsdogs.runtime import FEATURES_NAME, open_model, output_names
from catsdogs.settings import Settings
from catsdogs.training.evaluate import Outputs, predict_outputs
from catsdogs.training.features import Sample

logger = logging.getLogger(__name__)


def to_images(samples: Sequence[Sample]) -> list[LabelledImage]:
    """Manifest samples as the labelled images evaluation reads."""
    return [LabelledImage(str(s.path), s.label, s.path.read_bytes) for s in samples]


def _outputs(
    session: Any, config: PreprocessConfig, samples: Sequence[Sample], settings: Settings
) -> Outputs:
    images = to_images(samples)
    floors = (settings.unknown_min_side, settings.unknown_flat_std, settings.unknown_min_smoothness)
    return predict_outputs(session, config, images, quality_floors=floors, progress=False)


def fit_unknown_detector(
    bundle_dir: Path, config: PreprocessConfig, samples: dict[str, list[Sample]], settings: Settings
) -> dict[str, Any] | None:
    """Fit and calibrate the detector of the graph in ``bundle_dir``; ``None`` when it has no features.

    The validation budget ``unknown_target_rate`` (of the photos that pass the quality checks) is
    split evenly between the feature distance and the ImageNet pet mass when the graph has both.
    """
    session = open_model(bundle_dir / "model.onnx", config)
    if FEATURES_NAME not in output_names(session):
        return None
    train = sorted(samples["train"], key=lambda sample: sample.sha256)[: settings.unknown_fit_images]
    if not train or not samples["val"]:
        raise CatsdogsError("the unknown detector needs training and validation images")
    fit = _outputs(session, config, train, settings)
    labels = np.asarray([config.class_names.index(s.label) for s in train if str(s.path) not in fit.skipped])
    usable = np.asarray([reason is None for reason in fit.quality])
    assert fit.features is not None
    density = fit_density(fit.features[usable], labels[usable], components=settings.unknown_components)
    val = _outputs(session, config, samples["val"], settings)
    assert val.features is not None
    judged = np.asarray([reason is None for reason in val.quality])
    # Each signal gets half the budget when there are two (a photo flagged by both counts once).
    signals = 2 if val.pet_mass is not None else 1
    rate = settings.unknown_target_rate / signals
    distance_threshold = calibrate_threshold(density.distance(val.features[judged]), false_unknown_rate=rate)
    floor = None
    if val.pet_mass is not None:
        floor = -calibrate_threshold(-val.pet_mass[judged], false_unknown_rate=rate)
    record: dict[str, Any] = {
        "distance_threshold": distance_threshold,
        "pet_mass_floor": floor,
        "min_side": settings.unknown_min_side,
        "flat_std": settings.unknown_flat_std,
        "min_smoothness": settings.unknown_min_smoothness,
        "components": int(density.components.shape[1]),
        "feature_dim": density.dim,
        "fit_images": int(usable.sum()),
        "target_false_unknown_rate": settings.unknown_target_rate,
    }
    _, reasons = UnknownDetector.from_record(density, record).judge(val.features, val.pet_mass, val.quality)
    flagged = sum(reason is not None for reason in reasons)
    record["val"] = {"n_images": len(reasons), "false_unknown_rate": flagged / max(len(reasons), 1)}
    density.save(bundle_dir / OOD)
    logger.info("unknown detector: %s", record)
    return record


def split_rate(metrics: dict[str, Any]) -> dict[str, Any]:
    """The ``unknown`` share an evaluation measured, as the ``ood`` record keeps it per split."""
    return {"n_images": metrics.get("n_images"), "false_unknown_rate": metrics.get("unknown_rate")}
