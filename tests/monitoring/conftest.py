"""Fixtures of the rollback guard's tests: a fresh migrated MLflow store and a feedback store."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from guard_support import GUARD_N, open_store

from catsdogs.feedback.store import FeedbackStore
from catsdogs.settings import Settings


@pytest.fixture
def guard_settings(settings: Settings, tmp_path: Path, _migrated_db: Path) -> Settings:
    """A fresh migrated MLflow store and a feedback store in tmp_path; N = 10, X = 10 points."""
    shutil.copy(_migrated_db, tmp_path / "mlruns.db")
    overrides = {
        "guard_min_labels": GUARD_N,
        "guard_max_drop": 0.1,
        "guard_cooldown_s": 600.0,
        "guard_interval_s": 3600.0,
        "feedback_store_url": f"sqlite:///{tmp_path / 'feedback.sqlite3'}",
    }
    return Settings(**{**settings.model_dump(), **overrides})


@pytest.fixture
def feedback_store(guard_settings: Settings) -> Iterator[FeedbackStore]:
    assert guard_settings.feedback_store_url is not None
    store = open_store(guard_settings.feedback_store_url.get_secret_value())
    yield store
    store.close()
