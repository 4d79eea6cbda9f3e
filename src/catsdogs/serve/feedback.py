"""Live accuracy from user feedback, without keeping images or a shared database.

A ``prediction_id`` is a signed token (HMAC-SHA256 with ``settings.feedback_secret``) that carries
the model version, the predicted label, its confidence and the time. Any worker or replica holding
the same secret can therefore join a feedback label to the prediction it corrects.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import itertools
import json
import logging
import secrets
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass

logger = logging.getLogger(__name__)

_SEEN_MAX = 100_000


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class InvalidTokenError(ValueError):
    """The prediction id was not issued by a service holding this secret, or is expired."""


@dataclass(frozen=True)
class PredictionClaim:
    """What a prediction id says about the prediction it names."""

    model_version: str
    label: str
    confidence: float
    issued_at: float
    nonce: str


def resolve_secret(configured: str | None) -> bytes:
    """The signing key; a random one (valid for this process only) when none is configured."""
    if configured:
        return configured.encode()
    logger.warning(
        "CATSDOGS_FEEDBACK_SECRET is not set: prediction ids are signed with a random per-process key, "
        "so /feedback only works on this very worker; set it when running several workers or replicas"
    )
    return secrets.token_bytes(32)


class PredictionSigner:
    """Issues and verifies prediction ids."""

    def __init__(self, secret: bytes, *, max_age_s: float) -> None:
        self._secret = secret
        self.max_age_s = max_age_s
        # Nonces only need to be unique (the HMAC makes ids unforgeable): a random per-signer prefix
        # and a counter, instead of an os.urandom system call per prediction.
        self._nonce_prefix = secrets.token_hex(4)
        self._nonce_counter = itertools.count()

    def _sign(self, body: str) -> str:
        return _b64(hmac.new(self._secret, body.encode("ascii"), hashlib.sha256).digest())

    def issue(self, *, model_version: str, label: str, confidence: float) -> str:
        payload = {
            "v": model_version,
            "l": label,
            "c": round(confidence, 6),
            "t": int(time.time()),
            "n": f"{self._nonce_prefix}{next(self._nonce_counter):x}",
        }
        body = _b64(json.dumps(payload, separators=(",", ":")).encode())
        return f"{body}.{self._sign(body)}"

    def verify(self, token: str) -> PredictionClaim:
        if not token.isascii():  # ids are base64url: anything else is not one (and cannot be signed)
            raise InvalidTokenError("prediction_id is not a prediction id issued by this service")
        body, _, signature = token.partition(".")
        if not body or not signature or not hmac.compare_digest(self._sign(body), signature):
            raise InvalidTokenError("prediction_id is not a prediction id issued by this service")
        try:
            payload = json.loads(_unb64(body))
            claim = PredictionClaim(
                model_version=str(payload["v"]),
                label=str(payload["l"]),
                confidence=float(payload["c"]),
                issued_at=float(payload["t"]),
                nonce=str(payload["n"]),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise InvalidTokenError(f"prediction_id payload is malformed: {exc}") from None
        if time.time() - claim.issued_at > self.max_age_s:
            raise InvalidTokenError("prediction_id has expired")
        return claim


class LiveAccuracy:
    """Sliding window over the most recent feedback; refuses a second label for the same prediction."""

    def __init__(self, window: int) -> None:
        self._window: deque[bool] = deque(maxlen=window)
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, claim: PredictionClaim, true_label: str) -> bool | None:
        """Record one label; ``None`` when this prediction already got feedback in this process."""
        with self._lock:
            if claim.nonce in self._seen:
                return None
            self._seen[claim.nonce] = None
            if len(self._seen) > _SEEN_MAX:
                self._seen.popitem(last=False)
            correct = claim.label == true_label
            self._window.append(correct)
            return correct

    @property
    def accuracy(self) -> float | None:
        with self._lock:
            return sum(self._window) / len(self._window) if self._window else None

    @property
    def size(self) -> int:
        return len(self._window)
