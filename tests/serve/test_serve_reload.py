"""Hot reload: a new model swaps in atomically, under concurrent load, with zero failed requests."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from serve_testing import expected_probabilities

from catsdogs.bundle import ModelBundle
from catsdogs.registry.model_source import local_version
from fakes import WEIGHTS_A, WEIGHTS_B, build_bundle


def _point(link: Path, target: Path) -> None:
    """Atomically repoint a symlink (what a deploy does when it promotes a bundle folder)."""
    tmp = link.with_name(link.name + ".tmp")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target)
    os.replace(tmp, link)


@pytest.fixture
def two_bundles(tmp_path: Path) -> tuple[Path, Path, Path]:
    a = build_bundle(tmp_path / "a", WEIGHTS_A)
    b = build_bundle(tmp_path / "b", WEIGHTS_B)
    link = tmp_path / "current"
    _point(link, a)
    return link, a, b


def test_poll_notices_a_new_model_and_swaps_it_in(
    make_client: Callable[..., TestClient], two_bundles: tuple[Path, Path, Path]
) -> None:
    link, a, b = two_bundles
    client = make_client(model_uri=str(link), reload_interval_s=0.2)
    assert client.get("/ready").json()["model_version"] == local_version(ModelBundle(a))
    _point(link, b)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if client.get("/ready").json()["model_version"] == local_version(ModelBundle(b)):
            break
        time.sleep(0.05)
    assert client.get("/ready").json()["model_version"] == local_version(ModelBundle(b))
    assert 'catsdogs_model_reloads_total{result="success"} 1.0' in client.get("/metrics").text


def test_a_broken_new_model_is_refused_and_the_old_one_keeps_serving(
    make_client: Callable[..., TestClient],
    two_bundles: tuple[Path, Path, Path],
    tmp_path: Path,
    cat_jpeg: bytes,
) -> None:
    link, a, _ = two_bundles
    client = make_client(model_uri=str(link), admin_token="t")
    broken = build_bundle(tmp_path / "broken", WEIGHTS_A)
    (broken / "model.onnx").write_bytes(b"not an onnx graph")
    _point(link, broken)
    result = client.post("/admin/reload", headers={"X-Admin-Token": "t"}).json()
    assert result["reloaded"] is False
    response = client.post("/predict", files={"file": ("c.jpg", cat_jpeg)})
    assert response.status_code == 200
    assert response.json()["model_version"] == local_version(ModelBundle(a))
    assert 'catsdogs_model_reloads_total{result="failure"} 1.0' in client.get("/metrics").text


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize("batch_max_size", [1, 8])
def test_hot_reload_under_concurrent_load_fails_nothing_and_versions_match(
    start_server: Callable[..., object],
    two_bundles: tuple[Path, Path, Path],
    images: list[tuple[str, str, bytes]],
    batch_max_size: int,
) -> None:
    link, a, b = two_bundles
    versions = {local_version(ModelBundle(a)): WEIGHTS_A, local_version(ModelBundle(b)): WEIGHTS_B}
    expected = {
        (version, name): expected_probabilities(weights, data)
        for version, weights in versions.items()
        for name, _, data in images
    }
    server = start_server(
        {
            "CATSDOGS_MODEL_URI": str(link),
            "CATSDOGS_ADMIN_TOKEN": "t",
            "CATSDOGS_BATCH_MAX_SIZE": str(batch_max_size),
        }
    )
    answers: list[tuple[int, str, dict]] = []
    errors: list[str] = []
    stop = threading.Event()

    def hammer(offset: int) -> None:
        with httpx.Client(base_url=server.url, timeout=10) as http:
            i = offset
            while not stop.is_set():
                name, _, data = images[i % len(images)]
                try:
                    response = http.post("/predict", files={"file": (name, data)})
                    answers.append((response.status_code, name, response.json()))
                except httpx.HTTPError as exc:
                    errors.append(repr(exc))
                i += 1

    threads = [threading.Thread(target=hammer, args=(k,)) for k in range(6)]
    for thread in threads:
        thread.start()
    with httpx.Client(base_url=server.url, headers={"X-Admin-Token": "t"}, timeout=30) as admin:
        for target in (b, a, b):
            time.sleep(0.7)
            _point(link, target)
            assert admin.post("/admin/reload").json()["reloaded"] is True
        time.sleep(0.7)
    stop.set()
    for thread in threads:
        thread.join()

    assert errors == []
    assert len(answers) > 50
    assert [a for a in answers if a[0] != 200] == []
    seen = set()
    for _, name, body in answers:
        seen.add(body["model_version"])
        want = expected[(body["model_version"], name)]
        assert body["probabilities"]["cat"] == pytest.approx(float(want[0]), abs=1e-5)
    assert seen == set(versions)
