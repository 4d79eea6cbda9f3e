"""Fake-but-real model bundles (a tiny ONNX graph, real sample JPEGs) and a fresh MLflow store per test."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from registry_fakes import hashes, registry_bundle, write_manifest, write_plots

from catsdogs.settings import Settings
from support import dataset_photos


@pytest.fixture(autouse=True)
def _quiet_offline_mlflow(monkeypatch: pytest.MonkeyPatch) -> None:
    """No usage telemetry leaves the machine from tests, and no progress bars in their output."""
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


@pytest.fixture(scope="session")
def sample_jpegs(dataset_zip: Path) -> dict[str, list[bytes]]:
    """A few real cat and dog JPEGs from the dataset archive."""
    return {label: dataset_photos(dataset_zip, label, 4) for label in ("cat", "dog")}


@pytest.fixture
def make_bundle(tmp_path: Path, sample_jpegs: dict[str, list[bytes]]) -> Callable[..., Path]:
    """Build a bundle folder with chosen test metrics."""

    def build(
        name: str,
        *,
        accuracy: float = 0.98,
        recall: dict[str, float] | None = None,
        bias: tuple[float, float] = (0.0, 0.0),
    ) -> Path:
        root = tmp_path / "bundles" / name
        return registry_bundle(root, sample_jpegs, accuracy=accuracy, recall=recall, bias=bias)

    return build


@pytest.fixture
def settings(settings: Settings, tmp_path: Path, _migrated_db: Path) -> Settings:
    """The shared settings fixture, on a fresh copy of a migrated SQLite store."""
    shutil.copy(_migrated_db, tmp_path / "mlruns.db")
    return settings


@pytest.fixture
def artifacts_dir(tmp_path: Path) -> Path:
    """Evaluation plots as the training helper writes them (small real PNGs)."""
    return write_plots(tmp_path / "evaluation")


@pytest.fixture
def register_version(
    settings: Settings, make_bundle: Callable[..., Path], tmp_path: Path
) -> Callable[..., int]:
    """Run the real tracker end to end for a bundle with chosen metrics; returns the new version."""
    from catsdogs.registry import MlflowTracker

    counter = iter(range(1, 1000))

    def register(
        *,
        accuracy: float,
        recall: dict[str, float] | None = None,
        test_split: list[str] | None = None,
        bias: tuple[float, float] = (0.0, 0.0),
        unknown_rate: float | None = None,
    ) -> int:
        index = next(counter)
        manifest = write_manifest(settings, test_split or hashes("a", "b", "c"))
        bundle = make_bundle(f"v{index}", accuracy=accuracy, recall=recall, bias=bias)
        metrics = json.loads((bundle / "metrics.json").read_text())
        if unknown_rate is not None:  # what evaluation reports for a model with an unknown detector
            metrics["unknown_rate"] = unknown_rate
        with MlflowTracker(settings, run_name=f"test-{index}") as tracker:
            tracker.log_params({"epochs": 1})
            return tracker.finish(
                bundle_dir=bundle,
                test_metrics=metrics,
                artifacts_dir=tmp_path / "no-artifacts",
                manifest_path=manifest,
                report_path=None,
            )

    return register
