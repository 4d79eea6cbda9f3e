"""A bundle folder replaced in place (what ``catsdogs train`` does to ``runs/<run>/bundle``) while
the service answers from it: no request fails during the swap, and the reload serves the new model."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

from fastapi.testclient import TestClient

from catsdogs.bundle import ModelBundle
from catsdogs.files import replace_folder
from catsdogs.registry.model_source import local_version
from fakes import WEIGHTS_A, WEIGHTS_B, build_bundle


def test_a_bundle_replaced_in_place_is_served_after_reload(
    make_client: Callable[..., TestClient], tmp_path: Path, cat_jpeg: bytes
) -> None:
    stable = build_bundle(tmp_path / "run" / "bundle", WEIGHTS_A)
    old_version = local_version(ModelBundle(stable))
    client = make_client(model_uri=str(stable), admin_token="t")
    statuses: list[int] = []
    stop = threading.Event()

    def predict_until_stopped() -> None:
        while not stop.is_set():
            statuses.append(client.post("/predict", files={"file": ("c.jpg", cat_jpeg)}).status_code)

    loader = threading.Thread(target=predict_until_stopped)
    loader.start()
    try:
        for weights in (WEIGHTS_B, WEIGHTS_A, WEIGHTS_B):
            replace_folder(build_bundle(tmp_path / "run" / ".bundle.staging", weights), stable)
            assert client.post("/admin/reload", headers={"X-Admin-Token": "t"}).json()["reloaded"] is True
    finally:
        stop.set()
        loader.join(timeout=30)
    new_version = local_version(ModelBundle(stable))
    assert new_version != old_version
    assert client.get("/ready").json()["model_version"] == new_version
    assert statuses and set(statuses) == {200}
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["bundle"]
