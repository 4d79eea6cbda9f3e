"""The rollback guard on a real MLflow SQLite registry and a real SQLite feedback store: when it acts,
when it holds, and its Alertmanager webhook (token, bad payloads, firing vs resolved, one step)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from guard_support import GUARD_N, champion, champions, history, label, last_alias_change
from mlflow import MlflowClient
from typer.testing import CliRunner

from catsdogs import CatsdogsError
from catsdogs.cli import app as cli_app
from catsdogs.feedback.store import FeedbackStore
from catsdogs.monitoring.guard import LAST_ROLLBACK_TAG, check, last_rollback, on_alert
from catsdogs.monitoring.guard_app import check_exposure, create_guard_app
from catsdogs.registry.promotion import rollback
from catsdogs.settings import Settings
from fakes import REGISTERED_NAME

N = GUARD_N
TOKEN = "guard-token-for-the-test"


@pytest.fixture
def settings(guard_settings: Settings) -> Settings:
    return guard_settings


@pytest.fixture
def store(feedback_store: FeedbackStore) -> FeedbackStore:
    return feedback_store


def _with(settings: Settings, **overrides: object) -> Settings:
    return Settings(**{**settings.model_dump(), **overrides})


# --- the decision --------------------------------------------------------------------------------


def test_too_few_labels_for_its_own_baseline_changes_nothing(
    settings: Settings, store: FeedbackStore, tmp_path: Path
) -> None:
    client = champions(settings, tmp_path, 2)
    label(store, 2, right=N, wrong=N - 1)  # 2N - 1: the first N and the latest N would overlap
    label(store, 1, wrong=N)  # another version's labels do not count
    decision = check(settings, store=store)
    assert (decision.action, decision.result, decision.champion_version) == ("none", "too_few_labels", 2)
    assert "needs 20" in decision.reason
    assert champion(client) == 2


def test_steady_accuracy_is_healthy_and_a_drop_of_exactly_the_limit_is_tolerated(
    settings: Settings, store: FeedbackStore, tmp_path: Path
) -> None:
    client = champions(settings, tmp_path, 2)
    label(store, 2, right=N)
    label(store, 2, right=N - 1, wrong=1)  # 1.0 → 0.9: a drop of 0.1, not more than 0.1
    decision = check(settings, store=store)
    assert (decision.action, decision.result) == ("none", "healthy")
    assert (decision.baseline, decision.live_accuracy, decision.labels) == (1.0, 0.9, N)
    assert champion(client) == 2


def test_a_drop_below_its_own_baseline_rolls_back_and_records_why(
    settings: Settings, store: FeedbackStore, tmp_path: Path
) -> None:
    client = champions(settings, tmp_path, 2)
    label(store, 2, right=N, wrong=N)
    now = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
    decision = check(settings, store=store, now=now)
    assert (decision.action, decision.result, decision.rolled_back_to) == ("rollback", "rolled_back", 1)
    assert (decision.baseline, decision.live_accuracy, decision.baseline_labels) == (1.0, 0.0, N)
    assert champion(client) == 1
    assert history(client) == [1]
    change = last_alias_change(client)
    assert (change["version"], change["previous"]) == ("1", "2")
    assert change["why"].startswith(
        "automatic rollback by catsdogs guard (live_accuracy): live accuracy of v2"
    )
    record = last_rollback(settings)
    assert record is not None
    assert (record["from"], record["to"], record["trigger"]) == (2, 1, "live_accuracy")
    assert record["at"] == "2030-01-02T03:04:05+00:00"
    assert "0.000" in record["reason"] and "1.000" in record["reason"]


def test_a_configured_floor_replaces_the_baseline_and_needs_only_n_labels(
    settings: Settings, store: FeedbackStore, tmp_path: Path
) -> None:
    client = champions(settings, tmp_path, 2)
    floored = _with(settings, guard_accuracy_floor=0.9, guard_max_drop=0.05)
    label(store, 2, right=N - 1)
    assert check(floored, store=store).result == "too_few_labels"
    label(store, 2, wrong=1)  # latest 10: 9 right → 0.9, at the floor
    assert check(floored, store=store).result == "healthy"
    label(store, 2, wrong=1)  # latest 10: 8 right → 0.8, 0.1 under the floor
    decision = check(floored, store=store)
    assert (decision.result, decision.baseline, decision.live_accuracy) == ("rolled_back", 0.9, 0.8)
    assert "(the floor;" in decision.reason
    assert champion(client) == 1


def test_no_earlier_champion_means_no_move_and_says_so(
    settings: Settings, store: FeedbackStore, tmp_path: Path
) -> None:
    client = champions(settings, tmp_path, 1)
    label(store, 1, right=N, wrong=N)
    decision = check(settings, store=store)
    assert (decision.action, decision.result) == ("none", "no_previous")
    assert "no previous champion" in decision.reason
    assert champion(client) == 1
    assert last_rollback(settings) is None


def test_one_automatic_step_then_hold_until_a_human_acts_then_the_cooldown(
    settings: Settings, store: FeedbackStore, tmp_path: Path
) -> None:
    client = champions(settings, tmp_path, 3)
    for version in (3, 2):
        label(store, version, right=N, wrong=N)
    start = datetime.now(UTC)
    assert check(settings, store=store, now=start).rolled_back_to == 2
    # v2 is as bad, but the guard took its one step: it holds, however long it waits.
    held = check(settings, store=store, now=start + timedelta(days=30))
    assert (held.action, held.result) == ("none", "held")
    assert "a human has not acted" in held.reason and "would roll back" in held.reason
    assert on_alert(settings, alert="CatsdogsHighErrorRate", now=start + timedelta(days=30)).result == "held"
    assert champion(client) == 2
    # A human rolls back to v1 by hand: the guard is re-armed, but waits out its cooldown.
    assert rollback(settings, reason="human: v2 is bad too") == 1
    label(store, 1, right=N, wrong=N)
    cooling = check(settings, store=store, now=start + timedelta(seconds=599))
    assert (cooling.result, champion(client)) == ("held", 1)
    assert "cooling down" in cooling.reason
    after = check(settings, store=store, now=start + timedelta(seconds=601))
    assert after.result == "no_previous"  # it acts again (v1 has nothing older to go back to)


def test_a_firing_error_alert_rolls_back_with_the_alert_in_the_reason(
    settings: Settings, tmp_path: Path
) -> None:
    client = champions(settings, tmp_path, 2)
    decision = on_alert(settings, alert="CatsdogsHighErrorRate", detail="12% of requests failed")
    assert (decision.action, decision.rolled_back_to) == ("rollback", 1)
    assert champion(client) == 1
    record = last_rollback(settings)
    assert record is not None and record["trigger"] == "alert"
    assert "alert CatsdogsHighErrorRate is firing: 12% of requests failed" in record["reason"]


def test_the_guard_holds_from_memory_when_its_tag_is_lost(
    settings: Settings, store: FeedbackStore, tmp_path: Path
) -> None:
    """The alias moved but the tag was not written (a registry hiccup): the same process still holds."""
    client = champions(settings, tmp_path, 3)
    label(store, 3, right=N, wrong=N)
    label(store, 2, right=N, wrong=N)
    assert check(settings, store=store).rolled_back_to == 2
    client.delete_registered_model_tag(REGISTERED_NAME, LAST_ROLLBACK_TAG)
    assert check(settings, store=store).result == "held"
    assert champion(client) == 2


def test_a_broken_guard_tag_is_ignored(settings: Settings, store: FeedbackStore, tmp_path: Path) -> None:
    client = champions(settings, tmp_path, 2)
    client.set_registered_model_tag(REGISTERED_NAME, LAST_ROLLBACK_TAG, "{not json")
    label(store, 2, right=N, wrong=N)
    assert check(settings, store=store).result == "rolled_back"


# --- the webhook ---------------------------------------------------------------------------------


def _payload(*alerts: tuple[str, str]) -> dict[str, object]:
    """Alertmanager's webhook body (version 4) for (alertname, status) pairs."""
    return {
        "version": "4",
        "groupKey": '{}:{alertname="x"}',
        "status": "firing" if any(status == "firing" for _, status in alerts) else "resolved",
        "receiver": "catsdogs-guard",
        "groupLabels": {},
        "commonLabels": {},
        "commonAnnotations": {},
        "externalURL": "http://alertmanager:9093",
        "truncatedAlerts": 0,
        "alerts": [
            {
                "status": status,
                "labels": {"alertname": name, "severity": "critical"},
                "annotations": {"description": "6% of requests failed with a 5xx status"},
                "startsAt": "2030-01-01T00:00:00Z",
                "endsAt": "0001-01-01T00:00:00Z",
                "generatorURL": "http://prometheus:9090/graph",
                "fingerprint": "abc",
            }
            for name, status in alerts
        ],
    }


@pytest.fixture
def guard(settings: Settings) -> Iterator[TestClient]:
    app = create_guard_app(_with(settings, guard_webhook_token=TOKEN))
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client


AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}, {"Authorization": TOKEN}],
)
def test_webhook_refuses_a_missing_or_wrong_token(
    guard: TestClient, settings: Settings, tmp_path: Path, headers: dict[str, str]
) -> None:
    client = champions(settings, tmp_path, 2)
    response = guard.post(
        "/alertmanager", json=_payload(("CatsdogsHighErrorRate", "firing")), headers=headers
    )
    assert response.status_code == 401
    assert champion(client) == 2


@pytest.mark.parametrize(
    "body",
    [b"{not json", b"[]", json.dumps({"version": "4", "status": "firing"}).encode(), b'{"alerts": 3}'],
    ids=["not-json", "a-list", "no-alerts", "alerts-not-a-list"],
)
def test_webhook_answers_a_malformed_payload_with_422(guard: TestClient, body: bytes) -> None:
    headers = {**AUTH, "Content-Type": "application/json"}
    assert guard.post("/alertmanager", content=body, headers=headers).status_code == 422


def test_webhook_refuses_an_oversized_body(guard: TestClient) -> None:
    body = b'{"pad": "' + b"x" * (1024 * 1024) + b'"}'
    headers = {**AUTH, "Content-Type": "application/json"}
    assert guard.post("/alertmanager", content=body, headers=headers).status_code == 413
    chunked = iter([body[i : i + 65536] for i in range(0, len(body), 65536)])  # no Content-Length
    assert guard.post("/alertmanager", content=chunked, headers=headers).status_code == 413


def test_webhook_reads_no_body_before_the_token(guard: TestClient) -> None:
    sent = []

    def chunks():
        for _ in range(64):
            sent.append(1)
            yield b"x" * 65536

    response = guard.post("/alertmanager", content=chunks(), headers={"Content-Type": "application/json"})
    assert response.status_code == 401
    assert len(sent) < 64  # refused before the 4 MiB body was read


def test_webhook_ignores_resolved_and_unknown_alerts(
    guard: TestClient, settings: Settings, tmp_path: Path
) -> None:
    client = champions(settings, tmp_path, 2)
    payload = _payload(("CatsdogsHighErrorRate", "resolved"), ("CatsdogsInputDrift", "firing"))
    response = guard.post("/alertmanager", json=payload, headers=AUTH)
    assert response.status_code == 200
    assert response.json() == {"decisions": []}
    assert champion(client) == 2


def test_webhook_rolls_back_once_then_holds(guard: TestClient, settings: Settings, tmp_path: Path) -> None:
    client = champions(settings, tmp_path, 3)
    first = guard.post("/alertmanager", json=_payload(("CatsdogsHighErrorRate", "firing")), headers=AUTH)
    assert first.status_code == 200
    [decision] = first.json()["decisions"]
    assert (decision["action"], decision["champion_version"], decision["rolled_back_to"]) == (
        "rollback",
        3,
        2,
    )
    assert "alert CatsdogsHighErrorRate is firing: 6% of requests failed" in decision["reason"]
    assert champion(client) == 2
    again = guard.post("/alertmanager", json=_payload(("CatsdogsHighErrorRate", "firing")), headers=AUTH)
    assert [d["result"] for d in again.json()["decisions"]] == ["held"]
    assert champion(client) == 2
    metrics = guard.get("/metrics").text
    assert 'catsdogs_guard_rollbacks_total{trigger="alert"} 1.0' in metrics
    assert 'catsdogs_guard_rollbacks_total{trigger="live_accuracy"} 0.0' in metrics
    assert 'catsdogs_guard_checks_total{result="held"} 1.0' in metrics


def test_webhook_without_a_registered_model_is_a_409(guard: TestClient) -> None:
    response = guard.post("/alertmanager", json=_payload(("CatsdogsHighErrorRate", "firing")), headers=AUTH)
    assert response.status_code == 409
    assert "no registered model" in response.json()["detail"]


def test_a_failing_background_check_is_counted_and_the_guard_stays_up(guard: TestClient) -> None:
    # No registered model yet: the loop's first check fails, is logged and counted, and it lives on.
    deadline = time.monotonic() + 10
    while 'catsdogs_guard_checks_total{result="error"} 1.0' not in guard.get("/metrics").text:
        assert time.monotonic() < deadline, guard.get("/metrics").text
        time.sleep(0.05)
    assert guard.get("/healthz").json() == {"status": "ok", "last_check": None}


def test_the_background_check_reports_its_decision(settings: Settings, tmp_path: Path) -> None:
    champions(settings, tmp_path, 2)
    with TestClient(create_guard_app(settings)) as guard:
        deadline = time.monotonic() + 10
        while (last := guard.get("/healthz").json()["last_check"]) is None:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert (last["result"], last["champion_version"]) == ("too_few_labels", 2)
        assert 'catsdogs_guard_checks_total{result="too_few_labels"} 1.0' in guard.get("/metrics").text


@pytest.mark.parametrize("host", ["0.0.0.0", "10.1.2.3", "guard.example.org"])
def test_a_public_webhook_needs_a_token(settings: Settings, host: str) -> None:
    with pytest.raises(CatsdogsError, match="CATSDOGS_GUARD_WEBHOOK_TOKEN"):
        check_exposure(settings, host)
    check_exposure(_with(settings, guard_webhook_token=TOKEN), host)
    check_exposure(settings, "127.0.0.1")


def test_cli_once_prints_the_decision_and_acts(
    settings: Settings, store: FeedbackStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    client: MlflowClient = champions(settings, tmp_path, 2)
    label(store, 2, right=N, wrong=N)
    for key, value in {
        "CATSDOGS_MLFLOW_TRACKING_URI": settings.mlflow_tracking_uri,
        "CATSDOGS_FEEDBACK_STORE_URL": settings.feedback_store_url.get_secret_value(),  # type: ignore[union-attr]
        "CATSDOGS_GUARD_MIN_LABELS": str(N),
        "CATSDOGS_CACHE_DIR": str(settings.cache_dir),
    }.items():
        monkeypatch.setenv(key, value)
    result = CliRunner().invoke(cli_app, ["guard", "--once"])
    assert result.exit_code == 0, result.output
    decision = json.loads(result.output)
    assert (decision["action"], decision["rolled_back_to"]) == ("rollback", 1)
    assert champion(client) == 1
    refused = CliRunner().invoke(cli_app, ["guard", "--host", "0.0.0.0"])
    assert isinstance(refused.exception, CatsdogsError)  # `catsdogs` prints it in one line, exit 1
    assert "CATSDOGS_GUARD_WEBHOOK_TOKEN" in str(refused.exception)
