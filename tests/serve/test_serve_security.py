"""Auth rules: optional API keys on prediction endpoints, a required admin token for /admin/*."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from fastapi.testclient import TestClient


@pytest.fixture
def keyed(make_client: Callable[..., TestClient]) -> TestClient:
    return make_client(api_keys=["key-one", "key-two"], admin_token="admin-secret")


def test_prediction_without_key_is_401(keyed: TestClient, cat_jpeg: bytes) -> None:
    response = keyed.post("/predict", files={"file": ("cat.jpg", cat_jpeg)})
    assert response.status_code == 401
    assert response.json()["error"] == "unauthorized"


def test_prediction_with_wrong_key_is_403(keyed: TestClient, cat_jpeg: bytes) -> None:
    response = keyed.post("/predict", files={"file": ("cat.jpg", cat_jpeg)}, headers={"X-API-Key": "nope"})
    assert response.status_code == 403
    assert response.json()["error"] == "forbidden"


@pytest.mark.parametrize(
    "headers", [{"X-API-Key": "key-one"}, {"X-API-Key": "key-two"}, {"Authorization": "Bearer key-one"}]
)
def test_prediction_with_a_valid_key_is_answered(keyed: TestClient, cat_jpeg: bytes, headers: dict) -> None:
    assert keyed.post("/predict", files={"file": ("cat.jpg", cat_jpeg)}, headers=headers).status_code == 200


def test_batch_and_feedback_need_the_key_too(keyed: TestClient, cat_jpeg: bytes) -> None:
    assert keyed.post("/predict/batch", files=[("files", ("a.jpg", cat_jpeg))]).status_code == 401
    assert keyed.post("/feedback", json={"prediction_id": "x" * 20, "label": "cat"}).status_code == 401


def test_operational_endpoints_stay_open(keyed: TestClient) -> None:
    for path in ("/health", "/ready", "/metrics", "/model-info", "/stats", "/"):
        assert keyed.get(path).status_code == 200, path


def test_without_keys_predictions_are_open(client: TestClient, cat_jpeg: bytes) -> None:
    assert client.post("/predict", files={"file": ("cat.jpg", cat_jpeg)}).status_code == 200


def test_admin_without_token_is_401(keyed: TestClient) -> None:
    response = keyed.post("/admin/reload")
    assert response.status_code == 401
    assert response.json()["error"] == "unauthorized"


def test_admin_with_wrong_token_is_403(keyed: TestClient) -> None:
    # An API key is not an admin token.
    assert keyed.post("/admin/reload", headers={"X-Admin-Token": "key-one"}).status_code == 403


def test_admin_with_token_reloads(keyed: TestClient) -> None:
    response = keyed.post("/admin/reload", headers={"X-Admin-Token": "admin-secret"})
    assert response.status_code == 200
    body = response.json()
    assert body["reloaded"] is False and body["version"] == body["previous"]
    forced = keyed.post("/admin/reload?force=true", headers={"Authorization": "Bearer admin-secret"}).json()
    assert forced["reloaded"] is True


def test_admin_is_disabled_entirely_without_a_configured_token(client: TestClient) -> None:
    assert client.post("/admin/reload", headers={"X-Admin-Token": "anything"}).status_code == 404
    assert "/admin/reload" not in client.get("/openapi.json").json()["paths"]
