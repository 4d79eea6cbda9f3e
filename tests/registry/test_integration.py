"""Against a real `mlflow server` on loopback, and the zero-setup SQLite default with no server at all."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests
from mlflow import MlflowClient
from registry_fakes import hashes, run_id_of, write_manifest

from catsdogs.registry import CHALLENGER, MlflowTracker, download_bundle, promote
from catsdogs.settings import Settings
from support import free_port

CHAMPION_URI = "models:/catsdogs-classifier@champion"


def _stop(process: subprocess.Popen) -> None:
    """Stop the server and its workers: the process group led by the PID we started."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=5)


@pytest.fixture
def mlflow_server(tmp_path: Path, _migrated_db: Path) -> Iterator[tuple[str, subprocess.Popen]]:
    """`mlflow server` on 127.0.0.1 with a SQLite store and proxied artifacts in tmp_path."""
    store = tmp_path / "server"
    store.mkdir()
    shutil.copy(_migrated_db, store / "mlflow.db")
    port = free_port()
    command = [
        *(sys.executable, "-m", "mlflow", "server"),
        *("--host", "127.0.0.1", "--port", str(port), "--workers", "1"),
        *("--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}"),
        *("--artifacts-destination", str(store / "artifacts")),
    ]
    # No background job workers (seven huey processes by default): registering needs none of them.
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    log = (store / "server.log").open("wb")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            if process.poll() is not None:
                pytest.fail(f"mlflow server exited: {(store / 'server.log').read_text()[-2000:]}")
            try:
                if requests.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                pytest.fail("mlflow server did not become healthy within 90 s")
            time.sleep(0.5)
        yield url, process
    finally:
        _stop(process)
        log.close()


@pytest.mark.integration
@pytest.mark.slow
def test_log_register_promote_and_serve_through_a_real_tracking_server(
    mlflow_server: tuple[str, subprocess.Popen],
    settings: Settings,
    make_bundle: Callable,
    artifacts_dir: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    url, process = mlflow_server
    remote = settings.model_copy(
        update={"mlflow_tracking_uri": url, "mlflow_artifact_location": None, "registry_timeout_s": 2.0}
    )
    manifest = write_manifest(remote, hashes("s1", "s2"))
    bundle = make_bundle("remote", accuracy=0.985, recall={"cat": 0.98, "dog": 0.99})
    with MlflowTracker(remote, run_name="through-server") as tracker:
        tracker.log_params({"epochs": 2})
        for epoch in range(2):
            tracker.log_epoch(epoch, {"train_loss": 1.0 / (epoch + 1)})
        version = tracker.finish(
            bundle_dir=bundle,
            test_metrics=json.loads((bundle / "metrics.json").read_text()),
            artifacts_dir=artifacts_dir,
            manifest_path=manifest,
            report_path=None,
        )
    client = MlflowClient(tracking_uri=url)
    assert client.get_model_version_by_alias(remote.model_name, CHALLENGER).version == str(version)
    assert "confusion_matrix.png" in {item.path for item in client.list_artifacts(tracker.run_id)}
    assert promote(remote, reason="integration").accepted

    served = download_bundle(CHAMPION_URI, remote)
    assert (served / "model.onnx").read_bytes() == (bundle / "model.onnx").read_bytes()
    assert served.is_relative_to(remote.cache_dir)

    _stop(process)
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="catsdogs.registry.model_source"):
        assert download_bundle(CHAMPION_URI, remote) == served
    elapsed = time.monotonic() - started
    assert elapsed < 10, f"fallback took {elapsed:.1f} s"
    assert "unreachable" in caplog.text


@pytest.mark.integration
def test_the_default_sqlite_store_needs_no_server(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    make_bundle: Callable,
    _migrated_db: Path,
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CATSDOGS_MLFLOW_TRACKING_URI", raising=False)  # the real default, not the tests'
    monkeypatch.delenv("CATSDOGS_MLFLOW_ARTIFACT_LOCATION", raising=False)
    shutil.copy(_migrated_db, tmp_path / "mlruns.db")  # the migrated schema; the URI stays the default
    settings = Settings(data_dir=tmp_path / "data", cache_dir=tmp_path / "cache")
    assert settings.mlflow_tracking_uri == "sqlite:///mlruns.db"
    bundle = make_bundle("default", accuracy=0.98)
    with MlflowTracker(settings) as tracker:
        version = tracker.finish(
            bundle_dir=bundle,
            test_metrics=json.loads((bundle / "metrics.json").read_text()),
            artifacts_dir=tmp_path / "none",
            manifest_path=None,
            report_path=None,
        )
    client = MlflowClient(tracking_uri="sqlite:///mlruns.db")
    assert client.get_run(tracker.run_id).info.status == "FINISHED"
    assert (tmp_path / "mlruns").is_dir()  # artifacts land in ./mlruns next to the database
    assert promote(settings).accepted
    assert download_bundle(CHAMPION_URI, settings).parts[-3] == run_id_of(settings, version)
