"""Prediction ids carry a key id: rotating the signing key keeps outstanding ids valid, and a
malformed id (bad base64, bad JSON, unknown kid) is the client's error (400), never a 500."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Callable

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from catsdogs.access import derived_kid
from catsdogs.serve.feedback import InvalidTokenError, PredictionSigner
from catsdogs.settings import Settings

OLD, NEW = "old-secret-0123456789", "new-secret-9876543210"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _mac(secret: str, message: str) -> str:
    return _b64(hmac.new(secret.encode(), message.encode(), hashlib.sha256).digest())


def _signed(kid: str, secret: str, body: str) -> str:
    """An id signed with a real key around any body: what only a key holder (or a bug) can make."""
    return f"{kid}.{body}.{_mac(secret, f'{kid}.{body}')}"


def _payload(**changes: object) -> str:
    payload = {"v": "3", "l": "cat", "c": 0.9, "t": 2_000_000_000, "n": "abc1", **changes}
    return _b64(json.dumps(payload).encode())


def _predict(client: TestClient, data: bytes) -> str:
    return client.post("/predict", files={"file": ("x.jpg", data)}).json()["prediction_id"]


def _feedback(client: TestClient, prediction_id: str) -> int:
    return client.post("/feedback", json={"prediction_id": prediction_id, "label": "cat"}).status_code


def test_rotated_key_still_verifies_the_ids_it_signed(
    make_client: Callable[..., TestClient], cat_jpeg: bytes, tmp_path
) -> None:
    before = make_client(feedback_secrets=f"k1:{OLD}")
    after = make_client(feedback_secrets=f"k2:{NEW},k1:{OLD}")
    retired = make_client(feedback_secrets=f"k2:{NEW}")
    outstanding = _predict(before, cat_jpeg)
    fresh = _predict(after, cat_jpeg)
    assert outstanding.startswith("k1.") and fresh.startswith("k2.")  # the first key signs
    assert _feedback(after, outstanding) == 200
    assert _feedback(retired, fresh) == 200
    other = _predict(before, cat_jpeg)
    response = retired.post("/feedback", json={"prediction_id": other, "label": "cat"})
    assert response.status_code == 400
    assert "unknown key id 'k1'" in response.json()["detail"]


@pytest.mark.parametrize(
    "prediction_id",
    [
        _signed("k1", OLD, "!!!not*base64!!!"),
        _signed("k1", OLD, "QQ"),  # base64 of "A": not JSON
        _signed("k1", OLD, _b64(b"\xff\xfe not utf-8")),
        _signed("k1", OLD, _b64(b"[1, 2, 3]")),  # JSON, but not an object
        _signed("k1", OLD, _b64(b'{"v": "3"}')),  # fields missing
        _signed("k1", OLD, _payload(c="high")),
        _signed("k1", OLD, _payload(t=None)),
        _signed("k1", OLD, "A"),  # one base64 character decodes to nothing valid
        _signed("nokid", OLD, _payload()),  # unknown kid
        f"k1.{_payload()}.",  # no signature
        f"k1..{_mac(OLD, 'k1.')}",  # empty body
        f".{_payload()}.{_mac(OLD, '.' + _payload())}",  # empty kid
        "k1.abcdef.ghijkl.mnopqr",
        "." * 12,
    ],
)
def test_malformed_prediction_ids_are_400(make_client: Callable[..., TestClient], prediction_id: str) -> None:
    client = make_client(feedback_secrets=f"k1:{OLD}")
    response = client.post("/feedback", json={"prediction_id": prediction_id, "label": "cat"})
    assert response.status_code == 400, response.text
    assert response.json()["error"] == "invalid_prediction_id"


def test_ids_issued_before_key_ids_are_still_accepted() -> None:
    body = _payload(t=2_000_000_000)
    legacy = f"{body}.{_mac(OLD, body)}"  # the former form: body.signature with the bare secret
    signer = PredictionSigner([("k2", NEW.encode()), ("k1", OLD.encode())], max_age_s=1e12)
    claim = signer.verify(legacy)
    assert (claim.kid, claim.nonce, claim.label) == ("k1", "abc1", "cat")
    with pytest.raises(InvalidTokenError):
        PredictionSigner([("k2", NEW.encode())], max_age_s=1e12).verify(legacy)


def test_one_secret_gets_the_same_derived_kid_in_either_setting() -> None:
    single = Settings(feedback_secret=OLD).feedback_keys
    listed = Settings(feedback_secrets=f"k9:{NEW},{OLD}").feedback_keys
    assert single == [(derived_kid(OLD), OLD)]
    assert listed == [("k9", NEW), (derived_kid(OLD), OLD)]
    assert Settings().feedback_keys == []


def test_keys_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CATSDOGS_FEEDBACK_SECRETS", f"k2:{NEW}, k1:{OLD}")
    assert Settings().feedback_keys == [("k2", NEW), ("k1", OLD)]


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"feedback_secret": OLD, "feedback_secrets": f"k1:{NEW}"}, "not both"),
        ({"feedback_secrets": f"k1:{OLD},k1:{NEW}"}, "key id twice"),
        ({"feedback_secrets": f"bad kid!:{OLD}"}, "kid:secret"),
        ({"feedback_secrets": "k1:"}, "kid:secret"),
    ],
)
def test_contradictory_or_malformed_key_settings_are_refused(values: dict[str, str], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        Settings(**values)
