"""Model source: a real MLflow registry (sqlite), the on-disk cache, and a registry outage."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from serve_testing import free_port, register_bundle, registered_run_id, wait_ready

from catsdogs.registry.bundle_cache import REFS_FILE
from catsdogs.registry.model_source import parse_models_uri
from catsdogs.settings import Settings
from fakes import WEIGHTS_A, WEIGHTS_B, build_bundle

NAME = "catsdogs-classifier"


def _closed_port_uri() -> str:
    return f"http://127.0.0.1:{free_port()}"  # nothing listens there


def _fill_cache(cache_dir: Path, version: str, bundle: Path, run_id: str = "run-a") -> None:
    import shutil

    target = cache_dir / "bundles" / NAME / run_id
    shutil.copytree(bundle, target)
    refs = {f"models:/{NAME}@champion": {"version": int(version), "key": run_id}}
    (cache_dir / "bundles" / NAME / REFS_FILE).write_text(json.dumps(refs))


def _register(settings: Settings, bundle: Path, tmp_path: Path) -> str:
    return register_bundle(settings.mlflow_tracking_uri, bundle, tmp_path / "art")


def test_models_uri_forms_are_parsed() -> None:
    assert parse_models_uri("models:/m@champion").alias == "champion"
    assert parse_models_uri("models:/m/4").version == 4
    assert parse_models_uri("/some/path") is None


def test_registry_down_starts_from_the_cache_within_seconds(
    make_client: Callable[..., TestClient], settings: Settings, bundle_a: Path
) -> None:
    _fill_cache(settings.cache_dir, "3", bundle_a)
    started = time.monotonic()
    client = make_client(
        ready=False,
        model_uri=f"models:/{NAME}@champion",
        mlflow_tracking_uri=_closed_port_uri(),
        registry_timeout_s=2.0,
    )
    wait_ready(client, timeout=10)
    assert time.monotonic() - started < 5.0
    info = client.get("/model-info").json()
    assert (info["source"], info["version"], info["alias"]) == ("cache", "3", "champion")
    assert "unreachable" in info["note"]


def test_registry_down_without_cache_is_not_ready_and_says_why(
    make_client: Callable[..., TestClient],
) -> None:
    client = make_client(
        ready=False,
        model_uri=f"models:/{NAME}@champion",
        mlflow_tracking_uri=_closed_port_uri(),
        registry_timeout_s=1.0,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and "no bundle is cached" not in client.get("/ready").text:
        time.sleep(0.1)
    response = client.get("/ready")
    assert response.status_code == 503
    assert "no bundle is cached" in response.json()["detail"]


@pytest.mark.integration
def test_real_registry_download_cache_and_alias_move(
    make_client: Callable[..., TestClient], settings: Settings, tmp_path: Path, cat_jpeg: bytes
) -> None:
    v1 = _register(settings, build_bundle(tmp_path / "b1", WEIGHTS_A), tmp_path)
    client = make_client(ready=False, model_uri=f"models:/{NAME}@champion", admin_token="t")
    wait_ready(client, timeout=30)
    info = client.get("/model-info").json()
    assert (info["source"], info["version"], info["alias"]) == ("registry", v1, "champion")
    run_id = registered_run_id(settings.mlflow_tracking_uri, v1)
    assert (settings.cache_dir / "bundles" / NAME / run_id / "artifacts" / "bundle" / "model.onnx").is_file()
    before = client.post("/predict", files={"file": ("c.jpg", cat_jpeg)}).json()

    v2 = _register(settings, build_bundle(tmp_path / "b2", WEIGHTS_B), tmp_path)
    reload = client.post("/admin/reload", headers={"X-Admin-Token": "t"}).json()
    assert (reload["reloaded"], reload["previous"], reload["version"]) == (True, v1, v2)
    after = client.post("/predict", files={"file": ("c.jpg", cat_jpeg)}).json()
    assert after["model_version"] == v2
    assert after["probabilities"]["cat"] == pytest.approx(before["probabilities"]["dog"], abs=1e-5)
    metrics = client.get("/metrics").text
    assert 'catsdogs_model_reloads_total{result="success"} 1.0' in metrics
    info_line = f'alias="champion",architecture="tiny_gap_linear",name="{NAME}",version="{v2}"'
    assert f"catsdogs_model_info{{{info_line}}} 1.0" in metrics


@pytest.mark.integration
def test_poll_notices_the_alias_move_in_the_registry(
    make_client: Callable[..., TestClient], settings: Settings, tmp_path: Path
) -> None:
    v1 = _register(settings, build_bundle(tmp_path / "b1", WEIGHTS_A), tmp_path)
    client = make_client(ready=False, model_uri=f"models:/{NAME}@champion", reload_interval_s=0.3)
    wait_ready(client, timeout=30)
    assert client.get("/ready").json()["model_version"] == v1
    v2 = _register(settings, build_bundle(tmp_path / "b2", WEIGHTS_B), tmp_path)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and client.get("/ready").json()["model_version"] != v2:
        time.sleep(0.1)
    assert client.get("/ready").json()["model_version"] == v2
