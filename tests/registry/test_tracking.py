"""MlflowTracker: one run holds every item the training issue lists, and registers a challenger."""

from __future__ import annotations

import base64
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import mlflow
import numpy as np
import onnxruntime as ort
import pytest
import yaml
from mlflow import MlflowClient
from registry_fakes import hashes, registry_bundle, write_manifest, write_plots

from catsdogs import CatsdogsError, __version__
from catsdogs.files import file_sha256
from catsdogs.preprocessing import PreprocessConfig, decode_for_model, preprocess_batch, softmax
from catsdogs.registry import CHALLENGER, MlflowTracker, alias_log, flatten_metrics
from catsdogs.registry.lineage import dvc_data_version, split_fingerprint
from catsdogs.runtime import INPUT_NAME, OUTPUT_NAME
from catsdogs.settings import Settings
from fakes import metrics_payload

EPOCH_METRICS = [
    "train_loss",
    "val_loss",
    "val_accuracy",
    "val_precision",
    "val_recall",
    "val_f1",
    "val_roc_auc",
]


OOD_RECORD = {
    "distance_threshold": 3.25,
    "pet_mass_floor": 0.117,
    "min_side": 64,
    "val": {"n_images": 2077, "false_unknown_rate": 0.0053},
    "test": {"n_images": 1998, "false_unknown_rate": 0.008},
}


def _client(settings: Settings) -> MlflowClient:
    return MlflowClient(tracking_uri=settings.mlflow_tracking_uri, registry_uri=settings.mlflow_tracking_uri)


@pytest.fixture(scope="module")
def logged(
    tmp_path_factory: pytest.TempPathFactory, sample_jpegs: dict[str, list[bytes]], _migrated_db: Path
) -> Iterator[dict]:
    """One complete training run as the training helper drives the tracker (shared by this module's
    read-only checks, so the run is logged once)."""
    root = tmp_path_factory.mktemp("logged")
    shutil.copy(_migrated_db, root / "mlruns.db")
    with pytest.MonkeyPatch.context() as patch:
        for key in [key for key in os.environ if key.startswith("CATSDOGS_")]:
            patch.delenv(key)
        patch.setenv("CATSDOGS_PARAMS_FILE", str(root / "no-params.yaml"))
        patch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
        settings = Settings(
            data_dir=root / "data",
            runs_dir=root / "runs",
            cache_dir=root / "cache",
            mlflow_tracking_uri=f"sqlite:///{root / 'mlruns.db'}",
            mlflow_artifact_location=str(root / "mlartifacts"),
        )
        manifest = write_manifest(settings, hashes("t1", "t2", "t3"))
        report = settings.data_dir / "data_report.json"
        report.write_text(json.dumps({"counts": {"cat": 2, "dog": 2}}))
        bundle = registry_bundle(
            root / "trained", sample_jpegs, accuracy=0.981, recall={"cat": 0.975, "dog": 0.987}
        )
        metadata = json.loads((bundle / "metadata.json").read_text())
        metadata["ood"] = OOD_RECORD  # what training records for a model with an unknown detector
        (bundle / "metadata.json").write_text(json.dumps(metadata))
        metrics = json.loads((bundle / "metrics.json").read_text())
        # Evaluation code hands over NumPy values; they must log like plain numbers.
        metrics["confusion_matrix"] = np.array(metrics["confusion_matrix"])
        metrics["roc_auc"] = np.float32(metrics["roc_auc"])
        with MlflowTracker(settings, run_name="unit") as tracker:
            params = {
                "architecture": "tiny",
                "epochs": 3,
                "optimizer": {"lr": 0.001},
                "classes": ["cat", "dog"],
            }
            tracker.log_params(params)
            for epoch in range(3):
                tracker.log_epoch(epoch, {name: 0.5 + epoch / 10 for name in EPOCH_METRICS})
            version = tracker.finish(
                bundle_dir=bundle,
                test_metrics=metrics,
                artifacts_dir=write_plots(root / "evaluation"),
                manifest_path=manifest,
                report_path=report,
            )
        yield {
            "run_id": tracker.run_id,
            "version": version,
            "bundle": bundle,
            "manifest": manifest,
            "settings": settings,
        }


def test_run_logs_every_parameter_flattened(logged: dict) -> None:
    settings = logged["settings"]
    params = _client(settings).get_run(logged["run_id"]).data.params
    assert params["architecture"] == "tiny"
    assert params["epochs"] == "3"
    assert params["optimizer.lr"] == "0.001"
    assert json.loads(params["classes"]) == ["cat", "dog"]


def test_run_holds_a_history_per_epoch_metric(logged: dict) -> None:
    settings = logged["settings"]
    client = _client(settings)
    for name in EPOCH_METRICS:
        history = client.get_metric_history(logged["run_id"], name)
        assert [point.step for point in history] == [0, 1, 2]
        assert [round(point.value, 6) for point in history] == [0.5, 0.6, 0.7]


def test_run_holds_final_test_metrics_per_class(logged: dict) -> None:
    settings = logged["settings"]
    metrics = _client(settings).get_run(logged["run_id"]).data.metrics
    assert metrics["test_accuracy"] == pytest.approx(0.981)
    assert metrics["test_accuracy_ci95_low"] == pytest.approx(0.971)
    assert metrics["test_per_class_cat_recall"] == pytest.approx(0.975)
    assert metrics["test_per_class_dog_recall"] == pytest.approx(0.987)
    assert metrics["test_roc_auc"] == pytest.approx(0.99)
    assert metrics["test_n_images"] == 200


def test_run_holds_plots_gallery_report_and_full_test_metrics(logged: dict) -> None:
    settings = logged["settings"]
    client = _client(settings)
    run_id = logged["run_id"]
    top = {item.path for item in client.list_artifacts(run_id)}
    assert {"confusion_matrix.png", "roc_curve.png", "pr_curve.png", "training_curves.png"} <= top
    assert {"misclassified", "data", "test_metrics.json"} <= top
    assert [item.path for item in client.list_artifacts(run_id, "misclassified")] == [
        "misclassified/gallery.png"
    ]
    assert [item.path for item in client.list_artifacts(run_id, "data")] == ["data/data_report.json"]
    local = Path(client.download_artifacts(run_id, "test_metrics.json", str(settings.runs_dir)))
    assert json.loads(local.read_text())["confusion_matrix"] == [[90, 10], [5, 95]]


def test_run_holds_the_unknown_detectors_thresholds_and_rates(logged: dict) -> None:
    settings = logged["settings"]
    client = _client(settings)
    metrics = client.get_run(logged["run_id"]).data.metrics
    assert metrics["unknown_distance_threshold"] == pytest.approx(3.25)
    assert metrics["unknown_pet_mass_floor"] == pytest.approx(0.117)
    assert metrics["unknown_val_false_unknown_rate"] == pytest.approx(0.0053)
    assert metrics["unknown_test_false_unknown_rate"] == pytest.approx(0.008)
    local = Path(client.download_artifacts(logged["run_id"], "unknown_detector.json", str(settings.runs_dir)))
    assert json.loads(local.read_text()) == OOD_RECORD


def test_run_is_tagged_with_lineage(logged: dict) -> None:
    settings = logged["settings"]
    run = _client(settings).get_run(logged["run_id"])
    manifest_sha = file_sha256(logged["manifest"])
    assert run.data.tags["package_version"] == __version__
    commit = run.data.tags["git_commit"]
    assert commit == "unknown" or len(commit.removesuffix("+dirty")) == 40
    assert run.data.tags["manifest_sha256"] == manifest_sha
    assert run.data.params["manifest_sha256"] == manifest_sha
    # No DVC file tracks this tmp data folder, so the manifest hash is the data version.
    assert run.data.tags["data_version"] == manifest_sha
    assert run.data.tags["data_version_source"] == "manifest_sha256"
    assert run.data.tags["test_split_sha256"] == split_fingerprint(logged["manifest"])
    assert run.data.tags["registered_version"] == str(logged["version"])
    assert run.info.status == "FINISHED"


def test_finish_registers_a_challenger_and_records_who_when_why(logged: dict) -> None:
    settings = logged["settings"]
    client = _client(settings)
    version = client.get_model_version_by_alias(settings.model_name, CHALLENGER)
    assert int(version.version) == logged["version"] == 1
    assert version.run_id == logged["run_id"]
    assert version.tags["test_split_sha256"] == split_fingerprint(logged["manifest"])
    assert version.tags["test_accuracy"] == "0.981000"
    assert version.tags["alias.challenger.by"]
    assert version.tags["alias.challenger.at"].startswith("20")
    assert logged["run_id"] in version.tags["alias.challenger.why"]
    [event] = alias_log(client, settings.model_name)
    assert event["alias"] == CHALLENGER and event["version"] == "1" and event["previous"] == ""


def test_finish_writes_the_run_id_into_the_bundle_metadata(logged: dict) -> None:
    metadata = json.loads((logged["bundle"] / "metadata.json").read_text())
    assert metadata["run_id"] == logged["run_id"]
    assert metadata["architecture"] == "tiny"  # the training helper's keys are kept


def _download_model(settings: Settings, version: int) -> Path:
    client = _client(settings)
    location = client.get_model_version_download_uri(settings.model_name, str(version))
    path = mlflow.artifacts.download_artifacts(
        artifact_uri=location,
        dst_path=str(settings.runs_dir / "model"),
        tracking_uri=settings.mlflow_tracking_uri,
    )
    return Path(path)


def test_logged_model_is_code_plus_bundle_with_no_pickle(logged: dict) -> None:
    settings = logged["settings"]
    model_dir = _download_model(settings, logged["version"])
    mlmodel = yaml.safe_load((model_dir / "MLmodel").read_text())
    flavor = mlmodel["flavors"]["python_function"]
    assert flavor["loader_module"] == "mlflow.pyfunc.loaders.code_model"
    assert flavor["model_code_path"].endswith("pyfunc_model.py")
    assert "python_model" not in flavor  # the key of a cloudpickled PythonModel
    assert (model_dir / "artifacts" / "bundle" / "model.onnx").is_file()
    for path in model_dir.rglob("*"):
        if path.is_file():
            assert path.suffix not in {".pkl", ".pickle", ".pt"}, path
            assert path.read_bytes()[:1] != b"\x80", f"{path} looks like a pickle"
    inputs = json.loads(mlmodel["signature"]["inputs"])
    assert inputs == [{"type": "binary", "name": "image", "required": True}]
    outputs = {column["name"] for column in json.loads(mlmodel["signature"]["outputs"])}
    assert outputs == {"label", "confidence", "p_cat", "p_dog"}
    requirements = (model_dir / "requirements.txt").read_text().split()
    assert f"catsdogs=={__version__}" in requirements
    assert any(line.startswith("onnxruntime==") for line in requirements)
    assert all("==" in line for line in requirements)
    assert not any(line.startswith("torch") for line in requirements)


def test_logged_pyfunc_predicts_like_onnxruntime_on_real_images(
    logged: dict, sample_jpegs: dict[str, list[bytes]], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = logged["settings"]
    import pandas as pd

    monkeypatch.setenv("MLFLOW_TRACKING_URI", settings.mlflow_tracking_uri)
    model = mlflow.pyfunc.load_model(f"models:/{settings.model_name}@{CHALLENGER}")
    images = sample_jpegs["cat"] + sample_jpegs["dog"]
    result = model.predict(pd.DataFrame({"image": images}))
    # The same numbers straight from ONNX Runtime on the same preprocessing (JPEG draft included).
    config = PreprocessConfig.load(logged["bundle"] / "preprocessing.json")
    batch = preprocess_batch([decode_for_model(blob, config) for blob in images], config)
    session = ort.InferenceSession(str(logged["bundle"] / "model.onnx"))
    expected = softmax(session.run([OUTPUT_NAME], {INPUT_NAME: batch})[0].astype(np.float64))
    assert list(result.columns) == ["label", "confidence", "p_cat", "p_dog"]
    np.testing.assert_allclose(result[["p_cat", "p_dog"]].to_numpy(), expected, atol=1e-6)
    assert list(result["label"]) == [("cat", "dog")[i] for i in expected.argmax(axis=1)]
    # base64 strings (the JSON-friendly form) give the same answer as raw bytes.
    as_text = model.predict(pd.DataFrame({"image": [base64.b64encode(blob).decode() for blob in images]}))
    np.testing.assert_allclose(as_text["p_dog"].to_numpy(), expected[:, 1], atol=1e-6)


def test_logged_pyfunc_refuses_an_empty_upload_with_the_image_error_code(
    logged: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = logged["settings"]
    import pandas as pd

    monkeypatch.setenv("MLFLOW_TRACKING_URI", settings.mlflow_tracking_uri)
    model = mlflow.pyfunc.load_model(f"models:/{settings.model_name}@{CHALLENGER}")
    with pytest.raises(Exception, match="empty"):
        model.predict(pd.DataFrame({"image": [b""]}))


def test_tracker_marks_the_run_failed_when_training_raises(settings: Settings) -> None:
    with pytest.raises(RuntimeError, match="boom"), MlflowTracker(settings) as tracker:
        tracker.log_epoch(0, {"train_loss": 1.0})
        raise RuntimeError("boom")
    assert _client(settings).get_run(tracker.run_id).info.status == "FAILED"


def test_tracker_leaves_no_global_mlflow_uri_behind(settings: Settings) -> None:
    before = os.environ.get("MLFLOW_TRACKING_URI"), os.environ.get("MLFLOW_REGISTRY_URI")
    with MlflowTracker(settings) as tracker:
        assert mlflow.get_tracking_uri() == settings.mlflow_tracking_uri
    assert (os.environ.get("MLFLOW_TRACKING_URI"), os.environ.get("MLFLOW_REGISTRY_URI")) == before
    assert mlflow.get_tracking_uri() != settings.mlflow_tracking_uri
    assert tracker.run_id


def test_tracker_creates_the_experiment_at_the_configured_artifact_location(settings: Settings) -> None:
    with MlflowTracker(settings):
        pass
    experiment = _client(settings).get_experiment_by_name(settings.mlflow_experiment)
    assert experiment.artifact_location.endswith(str(settings.mlflow_artifact_location))


def test_finish_outside_the_context_is_an_error(settings: Settings, tmp_path: Path) -> None:
    with pytest.raises(CatsdogsError, match="inside"):
        MlflowTracker(settings).finish(
            bundle_dir=tmp_path, test_metrics={}, artifacts_dir=tmp_path, manifest_path=None, report_path=None
        )


def test_flatten_metrics_names_nested_values_and_skips_matrices() -> None:
    flat = flatten_metrics(metrics_payload(0.9, {"cat": 0.8, "dog": 1.0}) | {"roc_auc": np.float32(0.5)})
    assert flat["test_per_class_cat_recall"] == 0.8
    assert flat["test_roc_auc"] == 0.5
    assert flat["test_accuracy_ci95_high"] == pytest.approx(0.91)
    assert not any("confusion" in key or key == "test_split" for key in flat)


def test_split_fingerprint_depends_on_test_images_only(settings: Settings, tmp_path: Path) -> None:
    first = split_fingerprint(write_manifest(settings, hashes("x", "y")))
    same = split_fingerprint(write_manifest(settings, hashes("y", "x")))
    grown = split_fingerprint(write_manifest(settings, hashes("x", "y", "z")))
    assert first == same != grown
    assert split_fingerprint(tmp_path / "missing.csv") is None


def test_data_version_is_the_dvc_md5_when_dvc_tracks_the_data(settings: Settings, tmp_path: Path) -> None:
    manifest = write_manifest(settings, hashes("x"))
    assert dvc_data_version(settings.data_dir, manifest, search_dirs=(tmp_path,)) is None
    lock = {"schema": "2.0", "stages": {"ingest": {"outs": [{"path": "data", "md5": "abc123.dir"}]}}}
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump(lock))
    assert dvc_data_version(settings.data_dir, manifest, search_dirs=(tmp_path,)) == "abc123.dir"
    (tmp_path / "data" / "manifest.csv.dvc").write_text(
        yaml.safe_dump({"outs": [{"path": "manifest.csv", "md5": "m5"}]})
    )
    assert dvc_data_version(settings.data_dir, manifest) == "m5"


def test_logged_pyfunc_input_accepts_data_urls() -> None:
    from catsdogs.registry.pyfunc_model import _as_bytes

    payload = base64.b64encode(b"abc").decode()
    assert _as_bytes(f"data:image/jpeg;base64,{payload}") == b"abc"
    assert _as_bytes(bytearray(b"abc")) == b"abc"
    with pytest.raises(ValueError, match="base64"):
        _as_bytes("not base64 !!")
    with pytest.raises(ValueError, match="bytes or a base64"):
        _as_bytes(12)


def test_an_int8_export_is_recorded_on_its_training_run(logged: dict, tmp_path: Path) -> None:
    from catsdogs.registry.tracking import log_export

    settings = logged["settings"]
    client = _client(settings)
    run_id = client.create_run(client.get_run(logged["run_id"]).info.experiment_id).info.run_id
    int8_file = tmp_path / "model.int8.onnx"
    int8_file.write_bytes(b"quantized graph")
    report = {
        "accepted": True,
        "val": {"int8_accuracy": 0.99, "drop": 0.001},
        "test": {"int8_accuracy": 0.985, "drop": 0.002},
    }
    log_export(settings, run_id, int8_path=int8_file, int8=report)
    run = client.get_run(run_id)
    assert run.data.metrics["int8_val_accuracy"] == pytest.approx(0.99)
    assert run.data.metrics["int8_test_drop"] == pytest.approx(0.002)
    assert run.data.tags["export.int8"] == "accepted"
    assert [a.path for a in client.list_artifacts(run_id, "export")] == ["export/model.int8.onnx"]


def test_exporting_a_bundle_whose_run_is_elsewhere_says_which_store(logged: dict) -> None:
    from catsdogs.registry.tracking import log_export

    with pytest.raises(CatsdogsError, match="--no-log"):
        log_export(logged["settings"], "0" * 32, int8_path=None, int8={"accepted": True})
