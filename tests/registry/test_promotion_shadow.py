"""`promote --require-shadow N`: the challenger must have scored N live requests in shadow and be
right at least as often as the champion on the shadowed requests that got a label."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable

import pytest

from catsdogs.feedback.store import FeedbackStore, PredictionClaim, ShadowRecord, store_url
from catsdogs.registry import promote
from catsdogs.settings import Settings

GOOD = {"cat": 0.99, "dog": 0.99}
_NONCES = itertools.count()


@pytest.fixture
def shadow_settings(settings: Settings, tmp_path) -> Settings:
    return Settings(**{**settings.model_dump(), "feedback_store_url": f"sqlite:///{tmp_path / 'fb.db'}"})


def _shadow(settings: Settings, version: int, answers: list[tuple[str, str, str | None]]) -> None:
    """One shadowed request per ``(champion label, challenger label, feedback label or None)``."""
    store = FeedbackStore(store_url(settings))
    store.open()
    for champion_label, challenger_label, truth in answers:
        nonce = f"n{next(_NONCES)}"
        store.record_shadow(ShadowRecord(nonce, "1", champion_label, str(version), challenger_label, 0.9))
        if truth is not None:
            claim = PredictionClaim("1", champion_label, 0.9, time.time(), nonce, "k")
            assert store.record(claim, label=truth)
    store.close()


def _two_versions(settings: Settings, register_version: Callable) -> int:
    register_version(accuracy=0.98, recall=GOOD)
    assert promote(settings).accepted
    return register_version(accuracy=0.985, recall=GOOD)


def test_too_few_shadowed_requests_is_refused_and_enough_passes(
    shadow_settings: Settings, register_version: Callable
) -> None:
    challenger = _two_versions(shadow_settings, register_version)
    _shadow(shadow_settings, challenger, [("cat", "cat", None)] * 3)
    _shadow(shadow_settings, challenger + 1, [("cat", "cat", None)] * 10)  # another version's
    refused = promote(shadow_settings, require_shadow=5)
    assert not refused.accepted
    assert "shadowed requests 3.0000 < required 5.0000" in refused.message
    _shadow(shadow_settings, challenger, [("cat", "dog", "dog"), ("dog", "dog", None)])
    accepted = promote(shadow_settings, require_shadow=5)
    assert accepted.accepted, accepted.message
    assert "agreement with the champion 0.800" in accepted.table()


def test_a_challenger_wrong_more_often_than_the_champion_on_labelled_requests_is_refused(
    shadow_settings: Settings, register_version: Callable
) -> None:
    challenger = _two_versions(shadow_settings, register_version)
    _shadow(shadow_settings, challenger, [("cat", "dog", "cat"), ("dog", "dog", "dog")] * 3)
    decision = promote(shadow_settings, require_shadow=5)
    assert not decision.accepted
    assert "shadow live accuracy 0.5000 < required 1.0000" in decision.message


def test_without_the_option_the_shadow_record_is_not_read(
    shadow_settings: Settings, register_version: Callable
) -> None:
    _two_versions(shadow_settings, register_version)
    assert promote(shadow_settings).accepted  # no shadowed request at all
