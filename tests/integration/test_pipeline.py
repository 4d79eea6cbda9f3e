"""The whole lifecycle on a small real subset, through the real CLI: ingest → train (tracked and
registered) → promote → serve `models:/…@champion` → HTTP answers equal `catsdogs evaluate`."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from mlflow import MlflowClient

from catsdogs.bundle import find_bundle, verify_manifest
from catsdogs.registry.bundle_cache import MANIFEST_TAG
from catsdogs.settings import Settings
from catsdogs.training.evaluate import evaluate_bundle
from support import dataset_photos

pytestmark = [pytest.mark.integration, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]
PER_CLASS = 80


def _catsdogs(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    run = subprocess.run(
        [sys.executable, "-m", "catsdogs", *args], env=env, capture_output=True, text=True, timeout=900
    )
    assert run.returncode == 0, (
        f"catsdogs {' '.join(args)} failed:\n{run.stdout[-2000:]}\n{run.stderr[-4000:]}"
    )
    return run


@pytest.fixture(scope="module")
def pipeline(dataset_zip: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """Run the real commands once; the tests below read what they left behind."""
    root = tmp_path_factory.mktemp("pipeline")
    archive = root / "subset.zip"
    with zipfile.ZipFile(archive, "w") as dst:
        for label in ("cat", "dog"):
            for i, data in enumerate(dataset_photos(dataset_zip, label, PER_CLASS)):
                dst.writestr(f"train/{label}.{i}.jpg", data)
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO / "src"),
        "CATSDOGS_DATA_DIR": str(root / "data"),
        "CATSDOGS_RUNS_DIR": str(root / "runs"),
        "CATSDOGS_CACHE_DIR": str(root / "cache"),
        "CATSDOGS_MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlruns.db'}",
        "CATSDOGS_MLFLOW_ARTIFACT_LOCATION": str(root / "mlartifacts"),
        # A 16-image test split cannot show 97%: the gate's floors are exercised in tests/registry.
        "CATSDOGS_PROMOTION_MIN_ACCURACY": "0.5",
        "CATSDOGS_PROMOTION_MIN_CLASS_RECALL": "0.5",
        # One photo of 16 is 6 %: the unknown ceiling is exercised in tests/registry.
        "CATSDOGS_PROMOTION_MAX_UNKNOWN_RATE": "1.0",
        "CATSDOGS_DRIFT_REFERENCE_IMAGES": "100",
    }
    ingest = _catsdogs("data", "ingest", "--source", str(archive), env=env)
    train = _catsdogs("train", "--model", "efficientnet_lite0", "--epochs", "4", env=env)
    promote = _catsdogs("promote", "--reason", "pipeline test", env=env)
    return {"root": root, "env": env, "ingest": ingest, "train": train, "promote": promote}


def _settings(pipeline: dict[str, object], **overrides: object) -> Settings:
    env = pipeline["env"]
    assert isinstance(env, dict)
    return Settings(
        data_dir=Path(env["CATSDOGS_DATA_DIR"]),
        cache_dir=Path(env["CATSDOGS_CACHE_DIR"]) / "serving",
        mlflow_tracking_uri=env["CATSDOGS_MLFLOW_TRACKING_URI"],
        **overrides,
    )


def test_training_registers_a_challenger_that_promotion_makes_champion(pipeline: dict[str, object]) -> None:
    assert "registered catsdogs-classifier v1 as challenger" in str(pipeline["train"].stdout)
    client = MlflowClient(tracking_uri=_settings(pipeline).mlflow_tracking_uri)
    version = client.get_model_version_by_alias("catsdogs-classifier", "champion")
    assert str(version.version) == "1"
    run = client.get_run(version.run_id)
    assert run.data.params["architecture"] == "efficientnet_lite0"
    assert len(client.get_metric_history(run.info.run_id, "val_loss")) >= 1
    assert 0.5 <= run.data.metrics["test_accuracy"] <= 1.0
    logged = {item.path for item in client.list_artifacts(run.info.run_id)}
    assert {"confusion_matrix.png", "roc_curve.png", "pr_curve.png", "misclassified.png"} <= logged
    # The registered digest is the trained bundle's manifest, and every file matches it.
    trained = Path(pipeline["root"]) / "runs" / "efficientnet_lite0-finetune" / "bundle"
    assert verify_manifest(trained, expected_sha256=version.tags[MANIFEST_TAG]) is not None


def test_every_bundle_carries_onnx_metrics_samples_and_a_drift_reference(pipeline: dict[str, object]) -> None:
    bundle = find_bundle(Path(pipeline["root"]) / "runs" / "efficientnet_lite0-finetune" / "bundle")
    assert bundle.onnx_path().is_file()
    assert bundle.metrics["n_images"] > 0 and len(bundle.metrics["accuracy_ci95"]) == 2
    assert {label for _, label in bundle.samples()} == {"cat", "dog"}
    reference = bundle.drift_reference
    assert reference["n_images"] == 100 and "brightness" in reference["features"]
    assert reference["features"]["width"]["kind"] == "range"  # every image is 200 px wide


def test_http_predictions_of_the_champion_equal_catsdogs_evaluate(pipeline: dict[str, object]) -> None:
    settings = _settings(pipeline, reload_interval_s=0.0)
    from catsdogs.serve.app import create_app

    with TestClient(create_app(settings)) as client:
        deadline = time.monotonic() + 60
        while client.get("/ready").status_code != 200:
            assert time.monotonic() < deadline, "the service never became ready"
            time.sleep(0.1)
        info = client.get("/model-info").json()
        assert str(info["version"]) == "1"
        bundle = find_bundle(Path(pipeline["root"]) / "runs" / "efficientnet_lite0-finetune" / "bundle")
        offline = evaluate_bundle(bundle, settings.manifest_path, split="test", progress=False)
        assert offline.predictions
        for row in offline.predictions:
            path = (
                settings.data_dir / row["image"]
                if not Path(row["image"]).is_absolute()
                else Path(row["image"])
            )
            answer = client.post("/predict", files={"file": ("x.jpg", path.read_bytes())}).json()
            assert answer["predicted"] == row["predicted"]  # the argmax, which evaluate judges
            assert answer["label"] in (row["predicted"], "unknown")
            assert answer["probabilities"]["dog"] == pytest.approx(row["p_dog"], abs=1e-4)
