"""Signed prediction ids, and live accuracy from the feedback that names them.

A ``prediction_id`` is ``kid.body.signature``: the body carries the model version, the predicted
label, its confidence, the time, a nonce and, while feedback images are kept, the upload's SHA-256
(an image sent with the label must be the one classified); the signature is HMAC-SHA256 over
``kid.body`` with the key named ``kid`` (``settings.feedback_keys``). Any worker or replica holding
the key can join a feedback label to the prediction it corrects, and a rotated key keeps verifying
the ids it signed while it stays in the list. Ids of the older ``body.signature`` form (no kid) are
checked against every key. That a prediction gets one label only is the feedback store's job
(``catsdogs.feedback.store``).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import itertools
import json
import logging
import secrets
import threading
import time
from collections import deque

from catsdogs.feedback.store import PredictionClaim

logger = logging.getLogger(__name__)

#: The key id of the random per-process key used when no key is configured.
EPHEMERAL_KID = "ephemeral"
_INVALID = "prediction_id is not a prediction id issued by this service"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class InvalidTokenError(ValueError):
    """The prediction id was not issued by a service holding one of these keys, or is expired."""


def resolve_keys(configured: list[tuple[str, str]]) -> list[tuple[str, bytes]]:
    """The signing keys, the signing one first; a random one (this process only) when none is set."""
    if configured:
        return [(kid, secret.encode()) for kid, secret in configured]
    logger.warning(
        "CATSDOGS_FEEDBACK_SECRETS is not set: prediction ids are signed with a random per-process key, "
        "so /feedback only works on this very worker; set it when running several workers or replicas"
    )
    return [(EPHEMERAL_KID, secrets.token_bytes(32))]


class PredictionSigner:
    """Issues prediction ids with the first key and verifies them with any of the keys."""

    def __init__(self, keys: list[tuple[str, bytes]], *, max_age_s: float) -> None:
        if not keys:
            raise ValueError("PredictionSigner needs at least one key")
        self._kid, self._secret = keys[0]
        self._keys = dict(keys)
        self.max_age_s = max_age_s
        # Nonces only need to be unique (the HMAC makes ids unforgeable): a random per-signer prefix
        # (64 bits: no two workers ever share one) and a counter, not an os.urandom call per prediction.
        self._nonce_prefix = secrets.token_hex(8)
        self._nonce_counter = itertools.count()

    @staticmethod
    def _mac(secret: bytes, message: str) -> str:
        return _b64(hmac.new(secret, message.encode("ascii"), hashlib.sha256).digest())

    def issue(
        self, *, model_version: str, label: str, confidence: float, image_sha256: str | None = None
    ) -> str:
        """A signed id for this prediction; ``image_sha256`` (of the upload) binds a feedback image to it."""
        payload: dict[str, object] = {
            "v": model_version,
            "l": label,
            "c": round(confidence, 6),
            "t": int(time.time()),
            "n": f"{self._nonce_prefix}{next(self._nonce_counter):x}",
        }
        if image_sha256 is not None:
            payload["h"] = image_sha256
        body = _b64(json.dumps(payload, separators=(",", ":")).encode())
        return f"{self._kid}.{body}.{self._mac(self._secret, f'{self._kid}.{body}')}"

    def _signed_body(self, token: str) -> tuple[str, str]:
        """``(kid, body)`` of a token whose signature one of the keys verifies."""
        if not token.isascii():  # ids are base64url: anything else is not one (and cannot be signed)
            raise InvalidTokenError(_INVALID)
        parts = token.split(".")
        if len(parts) == 3:
            kid, body, signature = parts
            secret = self._keys.get(kid)
            if secret is None:
                raise InvalidTokenError(f"prediction_id is signed with an unknown key id {kid[:32]!r}")
            if body and hmac.compare_digest(self._mac(secret, f"{kid}.{body}"), signature):
                return kid, body
        elif len(parts) == 2 and parts[0]:  # issued before ids carried a kid
            body, signature = parts
            for kid, secret in self._keys.items():
                if hmac.compare_digest(self._mac(secret, body), signature):
                    return kid, body
        raise InvalidTokenError(_INVALID)

    def verify(self, token: str) -> PredictionClaim:
        kid, body = self._signed_body(token)
        try:
            payload = json.loads(_unb64(body))
            claim = PredictionClaim(
                model_version=str(payload["v"]),
                label=str(payload["l"]),
                confidence=float(payload["c"]),
                issued_at=float(payload["t"]),
                nonce=str(payload["n"]),
                kid=kid,
                image_sha256=str(payload["h"]) if "h" in payload else None,
            )
        except (ValueError, KeyError, TypeError, binascii.Error) as exc:
            raise InvalidTokenError(f"prediction_id payload is malformed: {type(exc).__name__}") from None
        if time.time() - claim.issued_at > self.max_age_s:
            raise InvalidTokenError("prediction_id has expired")
        return claim


class LiveAccuracy:
    """Sliding window over this process's most recent feedback (the ``catsdogs_live_accuracy`` gauge)."""

    def __init__(self, window: int) -> None:
        self._window: deque[bool] = deque(maxlen=window)
        self._lock = threading.Lock()

    def add(self, correct: bool) -> None:
        with self._lock:
            self._window.append(correct)

    @property
    def accuracy(self) -> float | None:
        with self._lock:
            return sum(self._window) / len(self._window) if self._window else None

    @property
    def size(self) -> int:
        return len(self._window)
