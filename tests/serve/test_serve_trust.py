"""Serving refuses a model whose files are not the registered ones, does not take a reset registry's
"v1" for the old one, and survives a failing download: counted, logged, backed off, model kept."""

from __future__ import annotations

import errno
import logging
import os
import re
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from serve_testing import REGISTERED_NAME, expected_probabilities, register_bundle, wait_ready

from catsdogs.bundle import ModelBundle, write_manifest
from catsdogs.registry import model_source
from catsdogs.registry.model_source import local_version
from catsdogs.serve.model_store import NO_MODEL_BACKOFF_MAX_S, backoff
from catsdogs.settings import Settings
from fakes import WEIGHTS_A, WEIGHTS_B, build_bundle, tiny_onnx

ADMIN = {"X-Admin-Token": "t"}
CHAMPION = f"models:/{REGISTERED_NAME}@champion"


def _signed_bundle(root: Path, weights: object) -> Path:
    bundle = build_bundle(root, weights)
    write_manifest(bundle)
    return bundle


def _flip_one_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _point(link: Path, target: Path) -> None:
    tmp = link.with_name(link.name + ".tmp")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target)
    os.replace(tmp, link)


def _failures(client: TestClient) -> float:
    match = re.search(r'catsdogs_model_reloads_total\{result="failure"\} (\S+)', client.get("/metrics").text)
    return float(match.group(1)) if match else 0.0


def test_the_wait_doubles_per_failure_up_to_the_cap_and_never_drops_below_the_interval() -> None:
    assert [backoff(2.0, n, cap=NO_MODEL_BACKOFF_MAX_S) for n in range(6)] == [2, 4, 8, 16, 30, 30]
    assert backoff(30.0, 0, cap=600) == 30 and backoff(30.0, 10, cap=600) == 600
    assert backoff(900.0, 3, cap=600) == 900  # an interval longer than the cap is kept


def test_a_tampered_model_at_start_is_refused_with_a_one_line_reason(
    make_client: Callable[..., TestClient], tmp_path: Path
) -> None:
    bundle = _signed_bundle(tmp_path / "signed", WEIGHTS_A)
    _flip_one_byte(bundle / "model.onnx")
    client = make_client(ready=False, model_uri=str(bundle))
    store = client.app.state.service.store  # type: ignore[attr-defined]
    deadline = time.monotonic() + 10
    while store.last_error is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert client.get("/ready").status_code == 503
    assert store.last_error is not None and "\n" not in store.last_error
    assert "model.onnx does not match manifest.json" in store.last_error


def test_a_bundle_without_manifest_loads_with_a_warning(
    make_client: Callable[..., TestClient], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    bundle = build_bundle(tmp_path / "old", WEIGHTS_A)  # as written before manifests existed
    with caplog.at_level(logging.WARNING, logger="catsdogs.registry.model_source"):
        client = make_client(model_uri=str(bundle))
    assert client.get("/ready").json()["model_version"] == local_version(ModelBundle(bundle))
    assert "cannot be verified" in caplog.text


def test_a_tampered_new_model_is_refused_the_poll_backs_off_and_recovers(
    make_client: Callable[..., TestClient], tmp_path: Path
) -> None:
    a = _signed_bundle(tmp_path / "a", WEIGHTS_A)
    b = _signed_bundle(tmp_path / "b", WEIGHTS_B)
    link = tmp_path / "current"
    _point(link, a)
    client = make_client(model_uri=str(link), reload_interval_s=0.05)
    tiny_onnx(b / "model.onnx", 2 * WEIGHTS_B)  # a valid graph, but not the one the manifest names
    _point(link, b)
    time.sleep(1.5)
    # Every attempt fails and is counted; without the backoff a 0.05 s poll would try ~30 times.
    assert 1 <= _failures(client) <= 6
    assert client.get("/ready").json()["model_version"] == local_version(ModelBundle(a))

    write_manifest(b)  # the operator re-signs the bundle (a local folder: no registry digest)
    deadline = time.monotonic() + 8
    while time.monotonic() < deadline:
        if client.get("/ready").json()["model_version"] == local_version(ModelBundle(b)):
            break
        time.sleep(0.05)
    assert client.get("/ready").json()["model_version"] == local_version(ModelBundle(b))


@pytest.mark.integration
def test_a_full_disk_during_a_download_is_a_reload_failure_and_the_model_stays(
    make_client: Callable[..., TestClient],
    settings: Settings,
    tmp_path: Path,
    cat_jpeg: bytes,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    uri, art = settings.mlflow_tracking_uri, tmp_path / "art"
    v1 = register_bundle(uri, _signed_bundle(tmp_path / "b1", WEIGHTS_A), art)
    client = make_client(ready=False, model_uri=CHAMPION, admin_token="t")
    wait_ready(client, timeout=30)
    register_bundle(uri, _signed_bundle(tmp_path / "b2", WEIGHTS_B), art)

    def disk_full(*_: object) -> Path:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(model_source, "download_files", disk_full)
    with caplog.at_level(logging.ERROR, logger="catsdogs.serve.model_store"):
        result = client.post("/admin/reload", headers=ADMIN).json()
    assert (result["reloaded"], result["version"]) == (False, v1)
    assert "No space left on device" in result["detail"]
    assert _failures(client) == 1.0
    [line] = [r.getMessage() for r in caplog.records if "model load failed" in r.getMessage()]
    assert f"still serving version {v1}" in line and "\n" not in line
    response = client.post("/predict", files={"file": ("c.jpg", cat_jpeg)})
    assert (response.status_code, response.json()["model_version"]) == (200, v1)


@pytest.mark.integration
def test_a_reset_registry_whose_v1_is_another_run_is_swapped_in(
    make_client: Callable[..., TestClient], settings: Settings, tmp_path: Path, cat_jpeg: bytes
) -> None:
    from mlflow import MlflowClient

    uri, art = settings.mlflow_tracking_uri, tmp_path / "art"
    assert register_bundle(uri, _signed_bundle(tmp_path / "b1", WEIGHTS_A), art) == "1"
    client = make_client(ready=False, model_uri=CHAMPION, admin_token="t")
    wait_ready(client, timeout=30)
    MlflowClient(uri).delete_registered_model(REGISTERED_NAME)  # the registry starts over ...
    assert register_bundle(uri, _signed_bundle(tmp_path / "b2", WEIGHTS_B), art) == "1"  # ... at v1
    result = client.post("/admin/reload", headers=ADMIN).json()
    assert (result["reloaded"], result["previous"], result["version"]) == (True, "1", "1")
    answer = client.post("/predict", files={"file": ("c.jpg", cat_jpeg)}).json()
    expected = expected_probabilities(WEIGHTS_B, cat_jpeg)
    assert answer["probabilities"]["cat"] == pytest.approx(float(expected[0]), abs=1e-5)
