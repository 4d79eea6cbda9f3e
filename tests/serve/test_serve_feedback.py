"""Feedback joins a true label to its prediction through the signed prediction id."""

from __future__ import annotations

import re
import time
from collections.abc import Callable

import pytest
from fastapi.testclient import TestClient

from catsdogs.serve.feedback import InvalidTokenError, PredictionSigner


def _predict(client: TestClient, data: bytes) -> dict:
    return client.post("/predict", files={"file": ("x.jpg", data)}).json()


def test_feedback_counts_correct_and_wrong_and_updates_live_accuracy(
    client: TestClient, images: list[tuple[str, str, bytes]]
) -> None:
    answers = [_predict(client, data) for _, _, data in images[:4]]
    truths = [
        answers[0]["label"],
        answers[1]["label"],
        answers[2]["label"],
        "cat" if answers[3]["label"] == "dog" else "dog",
    ]
    results = [
        client.post("/feedback", json={"prediction_id": a["prediction_id"], "label": t}).json()
        for a, t in zip(answers, truths, strict=True)
    ]
    assert [r["correct"] for r in results] == [True, True, True, False]
    assert results[-1]["live_accuracy"] == pytest.approx(0.75)
    assert results[0]["model_version"] == answers[0]["model_version"]
    metrics = client.get("/metrics").text
    version = answers[0]["model_version"]
    assert f'catsdogs_feedback_total{{correct="true",model_version="{version}"}} 3.0' in metrics
    assert f'catsdogs_feedback_total{{correct="false",model_version="{version}"}} 1.0' in metrics
    assert re.search(r"^catsdogs_live_accuracy 0.75$", metrics, re.M)
    assert client.get("/stats").json()["live_accuracy"] == pytest.approx(0.75)


def test_second_feedback_for_the_same_prediction_is_409(client: TestClient, cat_jpeg: bytes) -> None:
    pid = _predict(client, cat_jpeg)["prediction_id"]
    assert client.post("/feedback", json={"prediction_id": pid, "label": "cat"}).status_code == 200
    again = client.post("/feedback", json={"prediction_id": pid, "label": "dog"})
    assert again.status_code == 409
    assert again.json()["error"] == "duplicate_feedback"


def test_tampered_prediction_id_is_400(client: TestClient, cat_jpeg: bytes) -> None:
    pid = _predict(client, cat_jpeg)["prediction_id"]
    kid, body, signature = pid.split(".")
    forged = f"{kid}.{body[:-2] + ('AA' if body[-2:] != 'AA' else 'BB')}.{signature}"
    response = client.post("/feedback", json={"prediction_id": forged, "label": "cat"})
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_prediction_id"


@pytest.mark.parametrize(
    "prediction_id",
    [
        "é" * 12 + ".x",
        "abcdefghij.é",
        "\u0000" * 5 + "." + "\u0000" * 5,
        "no-dot-at-all-here",
        "abcdefghij.kl.mn",
    ],
)
def test_non_ascii_or_malformed_prediction_ids_are_400_not_500(
    client: TestClient, prediction_id: str
) -> None:
    response = client.post("/feedback", json={"prediction_id": prediction_id, "label": "cat"})
    assert response.status_code == 400, response.text
    assert response.json()["error"] == "invalid_prediction_id"


def test_unknown_label_is_422(client: TestClient, cat_jpeg: bytes) -> None:
    pid = _predict(client, cat_jpeg)["prediction_id"]
    response = client.post("/feedback", json={"prediction_id": pid, "label": "hamster"})
    assert response.status_code == 422
    assert response.json()["error"] == "unknown_label"


def test_malformed_feedback_body_is_422_with_error_body(client: TestClient) -> None:
    response = client.post("/feedback", json={"label": "cat"})
    assert response.status_code == 422
    assert response.json()["error"] == "invalid_request"


def test_ids_from_another_worker_with_the_same_secret_are_accepted(
    make_client: Callable[..., TestClient], cat_jpeg: bytes
) -> None:
    first = make_client(feedback_secret="shared-secret")
    second = make_client(feedback_secret="shared-secret")
    other = make_client(feedback_secret="different")
    pid = _predict(first, cat_jpeg)["prediction_id"]
    assert second.post("/feedback", json={"prediction_id": pid, "label": "cat"}).status_code == 200
    assert other.post("/feedback", json={"prediction_id": pid, "label": "cat"}).status_code == 400


def test_signer_refuses_expired_ids() -> None:
    signer = PredictionSigner([("k1", b"k")], max_age_s=-1)
    token = signer.issue(model_version="3", label="cat", confidence=0.9)
    with pytest.raises(InvalidTokenError, match="expired"):
        signer.verify(token)


def test_signer_round_trips_the_claim() -> None:
    signer = PredictionSigner([("k1", b"k")], max_age_s=60)
    claim = signer.verify(signer.issue(model_version="7", label="dog", confidence=0.8125))
    assert (claim.model_version, claim.label, claim.confidence, claim.kid) == ("7", "dog", 0.8125, "k1")
    assert abs(claim.issued_at - time.time()) < 5
