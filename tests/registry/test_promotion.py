"""The quality gate: champion moves only to a version at least as good; rollback goes back."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from mlflow import MlflowClient
from registry_fakes import hashes, write_manifest

from catsdogs import CatsdogsError
from catsdogs.registry import CHAMPION, alias_log, champion_history, list_versions, promote, rollback
from catsdogs.settings import Settings
from fakes import metrics_payload

GOOD = {"cat": 0.98, "dog": 0.98}


def _client(settings: Settings) -> MlflowClient:
    return MlflowClient(tracking_uri=settings.mlflow_tracking_uri, registry_uri=settings.mlflow_tracking_uri)


def _champion(settings: Settings) -> int:
    return int(_client(settings).get_model_version_by_alias(settings.model_name, CHAMPION).version)


def test_first_promotion_needs_only_the_floors(settings: Settings, register_version: Callable) -> None:
    version = register_version(accuracy=0.975, recall={"cat": 0.96, "dog": 0.99})
    decision = promote(settings, reason="first model")
    assert decision.accepted, decision.message
    assert decision.champion_version is None
    assert _champion(settings) == version
    assert champion_history(_client(settings), settings.model_name) == [version]


def test_first_promotion_below_the_accuracy_floor_is_refused(
    settings: Settings, register_version: Callable
) -> None:
    register_version(accuracy=0.95, recall={"cat": 0.96, "dog": 0.96})
    decision = promote(settings)
    assert not decision.accepted
    assert "accuracy 0.9500 < required 0.9700" in decision.message
    assert _client(settings).get_registered_model(settings.model_name).aliases.get(CHAMPION) is None


def test_a_class_recall_under_the_floor_is_refused(settings: Settings, register_version: Callable) -> None:
    register_version(accuracy=0.98, recall={"cat": 0.94, "dog": 0.99})
    decision = promote(settings)
    assert not decision.accepted
    assert "recall[cat] 0.9400 < required 0.9500" in decision.message
    assert "recall[dog]" not in decision.message


def test_a_challenger_calling_too_many_test_pets_unknown_is_refused(
    settings: Settings, register_version: Callable
) -> None:
    register_version(accuracy=0.99, recall=GOOD, unknown_rate=0.05)
    decision = promote(settings)
    assert not decision.accepted
    assert "unknown_rate 0.0500" in decision.message and "0.0200" in decision.message
    assert "unknown_rate" in decision.table()


def test_an_unknown_rate_under_the_ceiling_passes_and_is_shown(
    settings: Settings, register_version: Callable
) -> None:
    version = register_version(accuracy=0.99, recall=GOOD, unknown_rate=0.008)
    decision = promote(settings)
    assert decision.accepted, decision.message
    row = next(check for check in decision.checks if check.metric == "unknown_rate")
    assert row.challenger == pytest.approx(0.008) and row.required == 0.02 and row.passed
    assert _champion(settings) == version


def test_a_challenger_less_accurate_than_the_champion_is_refused(
    settings: Settings, register_version: Callable
) -> None:
    first = register_version(accuracy=0.985, recall=GOOD)
    assert promote(settings).accepted
    register_version(accuracy=0.980, recall=GOOD)
    decision = promote(settings, reason="try a worse one")
    assert not decision.accepted
    assert decision.champion_version == first
    assert "accuracy 0.9800 < required 0.9850" in decision.message
    assert _champion(settings) == first
    table = decision.table()
    assert "0.9800" in table and "0.9850" in table and "FAIL" in table


def test_a_recall_drop_of_more_than_one_point_is_refused_even_with_better_accuracy(
    settings: Settings, register_version: Callable
) -> None:
    register_version(accuracy=0.980, recall={"cat": 0.990, "dog": 0.970})
    assert promote(settings).accepted
    register_version(accuracy=0.985, recall={"cat": 0.975, "dog": 0.995})
    decision = promote(settings)
    assert not decision.accepted
    assert "recall[cat] 0.9750 < required 0.9800" in decision.message
    assert [check.metric for check in decision.checks if not check.passed] == ["recall[cat]"]


def test_a_recall_drop_within_one_point_is_accepted(settings: Settings, register_version: Callable) -> None:
    register_version(accuracy=0.980, recall={"cat": 0.990, "dog": 0.970})
    assert promote(settings).accepted
    better = register_version(accuracy=0.981, recall={"cat": 0.9805, "dog": 0.981})
    decision = promote(settings)
    assert decision.accepted, decision.message
    assert _champion(settings) == better


def test_a_better_challenger_is_promoted_and_the_change_is_recorded(
    settings: Settings, register_version: Callable
) -> None:
    settings = settings.model_copy(update={"actor": "release-bot"})
    first = register_version(accuracy=0.975, recall=GOOD)
    promote(settings, reason="baseline")
    second = register_version(accuracy=0.990, recall={"cat": 0.99, "dog": 0.99})
    decision = promote(settings, reason="better model")
    assert decision.accepted
    assert decision.message == f"promoted {settings.model_name} v{second} to champion (was v{first})"
    tags = _client(settings).get_model_version(settings.model_name, str(second)).tags
    assert tags["alias.champion.by"] == "release-bot"
    assert tags["alias.champion.why"] == "better model"
    assert tags["alias.champion.at"].startswith("20")
    champion_events = [e for e in alias_log(_client(settings), settings.model_name) if e["alias"] == CHAMPION]
    assert [(e["version"], e["previous"], e["why"]) for e in champion_events] == [
        (str(first), "", "baseline"),
        (str(second), str(first), "better model"),
    ]


def test_promoting_the_current_champion_again_is_an_error(
    settings: Settings, register_version: Callable
) -> None:
    version = register_version(accuracy=0.98, recall=GOOD)
    promote(settings)
    with pytest.raises(CatsdogsError, match="already the champion"):
        promote(settings, version=version)


def test_promoting_an_unknown_version_is_an_error(settings: Settings, register_version: Callable) -> None:
    register_version(accuracy=0.98, recall=GOOD)
    with pytest.raises(CatsdogsError, match="no version 42"):
        promote(settings, version=42)


def test_promote_without_any_registered_model_says_to_train(settings: Settings) -> None:
    with pytest.raises(CatsdogsError, match="catsdogs train"):
        promote(settings)


def test_rollback_restores_the_previous_champion_step_by_step(
    settings: Settings, register_version: Callable
) -> None:
    v1 = register_version(accuracy=0.975, recall=GOOD)
    promote(settings)
    v2 = register_version(accuracy=0.980, recall=GOOD)
    promote(settings)
    v3 = register_version(accuracy=0.985, recall=GOOD)
    promote(settings)
    assert rollback(settings, reason="v3 misbehaves in production") == v2
    assert _champion(settings) == v2
    tags = _client(settings).get_model_version(settings.model_name, str(v2)).tags
    assert tags["alias.champion.why"] == "v3 misbehaves in production"
    assert rollback(settings) == v1
    assert champion_history(_client(settings), settings.model_name) == [v1]
    with pytest.raises(CatsdogsError, match="no previous champion"):
        rollback(settings)
    assert _champion(settings) == v1
    assert v3 > v2


def test_rollback_without_a_champion_is_refused(settings: Settings, register_version: Callable) -> None:
    register_version(accuracy=0.98, recall=GOOD)
    with pytest.raises(CatsdogsError, match="no previous champion"):
        rollback(settings)


def test_a_champion_tested_on_another_split_is_not_compared_without_re_evaluation(
    settings: Settings, register_version: Callable
) -> None:
    register_version(accuracy=0.99, recall=GOOD, test_split=hashes("old1", "old2"))
    promote(settings)
    register_version(accuracy=0.98, recall=GOOD, test_split=hashes("old1", "old2", "new3"))
    with pytest.raises(CatsdogsError, match="not comparable"):
        promote(settings)


def test_the_champion_is_re_evaluated_on_the_grown_test_split(
    settings: Settings, register_version: Callable
) -> None:
    old = register_version(accuracy=0.99, recall=GOOD, test_split=hashes("old1", "old2"))
    promote(settings)
    new = register_version(accuracy=0.98, recall=GOOD, test_split=hashes("old1", "old2", "new3"))
    evaluated: list[Path] = []

    def evaluate(bundle: Path) -> dict:
        evaluated.append(bundle)
        return metrics_payload(0.975, {"cat": 0.97, "dog": 0.98})

    decision = promote(settings, evaluate=evaluate)
    assert decision.accepted, decision.message
    assert decision.champion_reevaluated
    assert [check.champion for check in decision.checks] == [0.975, 0.97, 0.98]
    # The champion's own bundle was re-tested, fetched from the registry.
    assert json.loads((evaluated[0] / "metadata.json").read_text())["run_id"]
    assert evaluated[0].is_relative_to(settings.cache_dir)
    tags = _client(settings).get_model_version(settings.model_name, str(old)).tags
    assert any(key.startswith("retest.") for key in tags)
    assert _champion(settings) == new


def test_re_evaluation_refuses_when_the_local_data_is_not_the_challengers_split(
    settings: Settings, register_version: Callable
) -> None:
    register_version(accuracy=0.99, recall=GOOD, test_split=hashes("old1"))
    promote(settings)
    register_version(accuracy=0.995, recall=GOOD, test_split=hashes("old1", "new2"))
    write_manifest(settings, hashes("something", "else"))
    with pytest.raises(CatsdogsError, match="cannot re-test the champion"):
        promote(settings, evaluate=lambda bundle: metrics_payload(0.9, GOOD))


def test_list_versions_shows_aliases_and_metrics(settings: Settings, register_version: Callable) -> None:
    v1 = register_version(accuracy=0.975, recall={"cat": 0.97, "dog": 0.98})
    promote(settings)
    v2 = register_version(accuracy=0.96, recall=GOOD)
    rows = list_versions(settings)
    assert [row.version for row in rows] == [v2, v1]
    assert rows[0].aliases == ("challenger",)
    assert rows[1].aliases == ("champion",)
    assert rows[1].accuracy == pytest.approx(0.975)
    assert rows[1].recall == pytest.approx({"cat": 0.97, "dog": 0.98})


def test_promote_against_a_hung_tracking_server_fails_within_seconds(settings: Settings) -> None:
    import socket
    import time

    from mlflow.exceptions import MlflowException

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(4)
        offline = settings.model_copy(
            update={
                "mlflow_tracking_uri": f"http://127.0.0.1:{server.getsockname()[1]}",
                "registry_timeout_s": 1,
            }
        )
        started = time.monotonic()
        with pytest.raises(MlflowException):
            promote(offline)
        assert time.monotonic() - started < 10


def test_the_alias_log_drops_its_oldest_entries_to_stay_under_the_tag_size_limit() -> None:
    from catsdogs.registry.client import ALIAS_LOG_MAX_CHARS, append_bounded

    log: list = []
    for index in range(400):
        log = append_bounded(log, {"alias": "champion", "version": str(index), "why": "x" * 500})
    assert len(json.dumps(log)) <= ALIAS_LOG_MAX_CHARS
    assert log[-1]["version"] == "399" and log[0]["version"] != "0"


def test_a_very_long_reason_is_truncated_when_recorded(
    settings: Settings, register_version: Callable
) -> None:
    version = register_version(accuracy=0.98, recall=GOOD)
    promote(settings, reason="y" * 5000)
    tags = _client(settings).get_model_version(settings.model_name, str(version)).tags
    assert tags["alias.champion.why"] == "y" * 500
