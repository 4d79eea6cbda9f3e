"""One training run end to end: train, then log it to MLflow and register it as the new challenger.

What ``catsdogs train`` runs; scripts and tests call :func:`train_and_register` directly. MLflow is
imported only when the run is tracked, so ``--no-track`` runs need no tracking server or MLflow.
"""

from __future__ import annotations

import os
from typing import NamedTuple

from catsdogs.files import exclusive_lock
from catsdogs.settings import Settings
from catsdogs.training import train as training  # looked up at call time: tests replace train()
from catsdogs.training.train import TrainResult


class TrainedModel(NamedTuple):
    """A finished run and the model version it was registered as (``None`` when not tracked)."""

    result: TrainResult
    version: int | None


def is_main_process() -> bool:
    """Rank 0 of a torchrun job, or a plain process: the one that logs and registers."""
    return int(os.environ.get("RANK", "0")) == 0


def train_and_register(settings: Settings, *, resume: bool = False, track: bool = True) -> TrainedModel:
    """Train a model (its bundle: ONNX, test metrics, drift reference); when ``track``, log the run
    to MLflow and register the bundle as a new version of ``settings.model_name`` with the
    ``challenger`` alias (``catsdogs promote`` decides whether it becomes the champion).

    Under torchrun only rank 0 tracks; the other ranks return a result without test metrics.
    Two trainings into one run folder would overwrite each other's checkpoints and bundle: the
    second is refused while the first runs (rank 0 holds the folder's lock).
    """
    if not is_main_process():
        return TrainedModel(training.train(settings, tracker=None, resume=resume), None)
    run_dir = training.run_dir_for(settings)
    with exclusive_lock(run_dir, what=f"a training into {run_dir}"):
        return _train_and_track(settings, resume=resume, track=track)


def _train_and_track(settings: Settings, *, resume: bool, track: bool) -> TrainedModel:
    if not track:
        return TrainedModel(training.train(settings, tracker=None, resume=resume), None)
    from catsdogs.registry.tracking import MlflowTracker

    with MlflowTracker(settings, run_name=settings.run_name) as tracker:
        result = training.train(settings, tracker=tracker, resume=resume)
        version = tracker.finish(
            bundle_dir=result.bundle_dir,
            test_metrics=result.test_metrics,
            artifacts_dir=result.artifacts_dir,
            manifest_path=settings.manifest_path,
            report_path=settings.report_path,
        )
    return TrainedModel(result, version)
