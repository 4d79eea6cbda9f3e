"""The feedback store keeps images only for their retention period, hands them out oldest first, and
answers a model version's first and latest outcomes (what the rollback guard compares)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa

from catsdogs.feedback.store import FeedbackStore, PredictionClaim, store_url
from catsdogs.settings import Settings


def _claim(nonce: str, *, version: str = "3", predicted: str = "cat") -> PredictionClaim:
    return PredictionClaim(
        model_version=version, label=predicted, confidence=0.9, issued_at=1.8e9, nonce=nonce, kid="k1"
    )


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path) -> Iterator[FeedbackStore]:
    url = (
        f"sqlite:///{tmp_path / 'f.db'}"
        if request.param == "sqlite"
        else request.getfixturevalue("postgres_url")
    )
    opened = FeedbackStore(store_url(Settings(feedback_store_url=url)))
    opened.open()
    yield opened
    opened.close()


def _age_images(store: FeedbackStore, days: float) -> None:
    """Make every kept image look ``days`` old."""
    assert store._engine is not None
    with store._engine.begin() as connection:
        connection.execute(
            sa.text("UPDATE feedback_images SET received_at = :when"),
            {"when": datetime.now(UTC) - timedelta(days=days)},
        )


def test_images_come_back_oldest_first_in_batches_after_a_given_id(store: FeedbackStore) -> None:
    for i in range(5):
        assert store.record(_claim(f"n{i}"), label="dog" if i % 2 else "cat", image=b"jpeg%d" % i)
    assert store.record(_claim("no-image"), label="cat")  # a label without an image keeps nothing
    kept = list(store.images(batch=2))
    assert [image.data for image in kept] == [b"jpeg%d" % i for i in range(5)]
    assert [image.label for image in kept] == ["cat", "dog", "cat", "dog", "cat"]
    assert all(image.received_at.tzinfo is not None for image in kept)
    assert [image.data for image in store.images(after_id=kept[2].id)] == [b"jpeg3", b"jpeg4"]


def test_images_past_their_retention_are_deleted_by_the_next_write_or_a_purge(store: FeedbackStore) -> None:
    store.record(_claim("old"), label="cat", image=b"old")
    _age_images(store, days=31)
    store.record(_claim("new"), label="dog", image=b"new", image_retention=timedelta(days=30))
    assert [image.data for image in store.images()] == [b"new"]
    _age_images(store, days=2)
    assert store.purge_images(older_than=timedelta(days=1)) == 1
    assert list(store.images()) == []
    assert store.record(_claim("old"), label="cat") is False  # the labels stay: replays still refused


def test_outcomes_are_a_versions_first_or_latest_labels_in_arrival_order(store: FeedbackStore) -> None:
    truths = ["cat", "cat", "dog", "cat", "dog", "dog"]  # predicted "cat" every time
    for i, truth in enumerate(truths):
        store.record(_claim(f"v3-{i}"), label=truth)
        store.record(_claim(f"v4-{i}", version="4"), label="cat")
    assert store.outcomes("3", limit=3, newest=False) == [True, True, False]
    assert store.outcomes("3", limit=3, newest=True) == [False, False, True]  # newest first
    assert store.outcomes("4", limit=10, newest=True) == [True] * 6
    assert store.outcomes("5", limit=10, newest=True) == []
