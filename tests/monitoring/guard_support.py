"""A real MLflow SQLite registry with champion history, and a real feedback store, for the guard's tests."""

from __future__ import annotations

import itertools
import time
from pathlib import Path

from mlflow import MlflowClient

from catsdogs.feedback.store import FeedbackStore, PredictionClaim
from catsdogs.registry.client import CHAMPION, alias_log, champion_history
from catsdogs.registry.model_source import make_client
from catsdogs.registry.promotion import move_champion
from catsdogs.settings import Settings
from fakes import REGISTERED_NAME, WEIGHTS_A, WEIGHTS_B, build_bundle, register_bundle

#: The guard's window in these tests (N): small, so a test labels a few dozen predictions.
GUARD_N = 10
_NONCES = itertools.count()


def champions(settings: Settings, tmp_path: Path, count: int) -> MlflowClient:
    """Register ``count`` versions (alternately WEIGHTS_A and WEIGHTS_B) and promote them in turn
    through the promotion gate's own function, so the champion history allows rollbacks."""
    client = make_client(settings)
    for index in range(1, count + 1):
        weights = WEIGHTS_A if index % 2 else WEIGHTS_B
        bundle = build_bundle(tmp_path / f"bundle-v{index}", weights)
        version = int(register_bundle(settings.mlflow_tracking_uri, bundle, tmp_path / "art", alias=None))
        assert version == index
        move_champion(client, settings, version, history=list(range(1, index + 1)), reason=f"test v{index}")
    return client


def champion(client: MlflowClient) -> int:
    return int(client.get_model_version_by_alias(REGISTERED_NAME, CHAMPION).version)


def history(client: MlflowClient) -> list[int]:
    return champion_history(client, REGISTERED_NAME)


def last_alias_change(client: MlflowClient) -> dict[str, str]:
    return alias_log(client, REGISTERED_NAME)[-1]


def open_store(url: str) -> FeedbackStore:
    from sqlalchemy.engine import make_url

    store = FeedbackStore(make_url(url))
    store.open()
    return store


def label(store: FeedbackStore, version: int, *, right: int = 0, wrong: int = 0) -> None:
    """Record ``right`` correct then ``wrong`` incorrect labels for predictions of ``version``."""
    for correct in [True] * right + [False] * wrong:
        claim = PredictionClaim(str(version), "cat", 0.9, time.time(), f"nonce-{next(_NONCES)}", "kid")
        assert store.record(claim, label="cat" if correct else "dog")
