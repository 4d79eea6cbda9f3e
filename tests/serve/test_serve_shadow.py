"""Shadow testing: a share of live requests is also scored by a challenger, off the request path,
kept in the feedback store and counted; the answers never depend on it."""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient
from serve_testing import expected_probabilities

from catsdogs.serve.shadow import CpuBudget
from fakes import WEIGHTS_A, WEIGHTS_B, build_bundle

CLASSES = ("cat", "dog")


def _count(metrics: str, name: str) -> float:
    return sum(float(v) for v in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", metrics, re.M))


def _settled(client: TestClient, sent: int, timeout: float = 30.0) -> str:
    """/metrics once every offered upload was scored, skipped or failed."""
    deadline = time.monotonic() + timeout
    while True:
        metrics = client.get("/metrics").text
        done = sum(
            _count(metrics, name)
            for name in (
                "catsdogs_shadow_predictions_total",
                "catsdogs_shadow_skipped_total",
                "catsdogs_shadow_failures_total",
            )
        )
        if done >= sent or time.monotonic() > deadline:
            return metrics
        time.sleep(0.05)


def _rows(store: Path) -> list[sa.Row]:
    with sa.create_engine(f"sqlite:///{store}").connect() as connection:
        query = "SELECT champion_label, challenger_label, challenger_version FROM shadow_predictions"
        return connection.execute(sa.text(query)).all()


@pytest.fixture
def shadowed(make_client: Callable[..., TestClient], tmp_path: Path) -> tuple[TestClient, Path]:
    """The service on model A, shadowed on every request by B, the model whose answers all flip."""
    challenger = build_bundle(tmp_path / "challenger", WEIGHTS_B)
    store = tmp_path / "feedback.db"
    client = make_client(
        shadow_fraction=1.0, shadow_model_uri=str(challenger), feedback_store_url=f"sqlite:///{store}"
    )
    deadline = time.monotonic() + 60  # the worker process starts, imports and loads B
    while client.app.state.service.shadow.version is None and time.monotonic() < deadline:  # type: ignore[attr-defined]
        time.sleep(0.05)
    return client, store


def test_shadow_answers_are_kept_and_counted_and_the_answers_are_the_champions(
    shadowed: tuple[TestClient, Path], images: list[tuple[str, str, bytes]]
) -> None:
    client, store = shadowed
    for _, _, data in images[:6]:
        answer = client.post("/predict", files={"file": ("x.jpg", data)}).json()
        assert answer["label"] == CLASSES[int(np.argmax(expected_probabilities(WEIGHTS_A, data)))]
        _settled(client, 1)
    metrics = _settled(client, 6)
    rows = _rows(store)
    scored = _count(metrics, "catsdogs_shadow_predictions_total")
    assert scored == len(rows) >= 1
    assert scored + _count(metrics, "catsdogs_shadow_skipped_total") == 6
    assert all(champion != challenger for champion, challenger, _ in rows)  # B flips every answer
    assert 'catsdogs_shadow_predictions_total{agree="false"}' in metrics
    assert _count(metrics, "catsdogs_shadow_confidence_count") == scored


def test_feedback_on_a_shadowed_request_counts_both_models(
    shadowed: tuple[TestClient, Path], cat_jpeg: bytes
) -> None:
    client, _ = shadowed
    answer = client.post("/predict", files={"file": ("x.jpg", cat_jpeg)}).json()
    _settled(client, 1)
    assert (
        client.post(
            "/feedback", json={"prediction_id": answer["prediction_id"], "label": answer["label"]}
        ).status_code
        == 200
    )
    metrics = client.get("/metrics").text
    assert 'catsdogs_shadow_feedback_total{correct="true",model="champion"} 1.0' in metrics
    assert 'catsdogs_shadow_feedback_total{correct="false",model="challenger"} 1.0' in metrics


def test_a_failing_shadow_never_touches_the_answer(
    shadowed: tuple[TestClient, Path], images: list[tuple[str, str, bytes]], monkeypatch: pytest.MonkeyPatch
) -> None:
    client, _ = shadowed
    service = client.app.state.service  # type: ignore[attr-defined]

    def broken(record: object) -> None:
        raise RuntimeError("the store went away")

    monkeypatch.setattr(service.feedback_log, "record_shadow", broken)
    statuses = [client.post("/predict", files={"file": ("x", d)}).status_code for _, _, d in images[:3]]
    assert statuses == [200, 200, 200]
    assert _count(_settled(client, 3), "catsdogs_shadow_failures_total") >= 1


def test_no_shadow_model_loads_without_a_fraction_and_a_missing_one_costs_nothing(
    make_client: Callable[..., TestClient], cat_jpeg: bytes, tmp_path: Path
) -> None:
    assert make_client().app.state.service.shadow is None  # type: ignore[attr-defined]
    client = make_client(shadow_fraction=1.0, shadow_model_uri=str(tmp_path / "no-such-bundle"))
    assert client.post("/predict", files={"file": ("x.jpg", cat_jpeg)}).status_code == 200
    assert _count(client.get("/metrics").text, "catsdogs_shadow_predictions_total") == 0


def test_the_shadow_runs_in_its_own_process_at_the_lowest_cpu_priority(
    shadowed: tuple[TestClient, Path],
) -> None:
    """A process, not a thread: a parked low-priority thread holding the GIL would stall answers."""
    client, _ = shadowed
    worker = client.app.state.service.shadow.worker  # type: ignore[attr-defined]
    assert worker.pid is not None and worker.pid != os.getpid()
    assert os.getpriority(os.PRIO_PROCESS, worker.pid) == 19
    assert os.getpriority(os.PRIO_PROCESS, 0) < 19  # the answers keep their priority


def test_a_crashed_worker_is_replaced_and_answers_never_notice(
    shadowed: tuple[TestClient, Path], images: list[tuple[str, str, bytes]]
) -> None:
    client, store = shadowed
    scorer = client.app.state.service.shadow  # type: ignore[attr-defined]
    killed = scorer.worker.pid
    os.kill(killed, signal.SIGKILL)
    statuses = [client.post("/predict", files={"file": ("x", d)}).status_code for _, _, d in images[:4]]
    assert statuses == [200] * 4
    deadline = time.monotonic() + 60
    while not _rows(store) and time.monotonic() < deadline:  # a replacement loads B and scores again
        assert client.post("/predict", files={"file": ("x", images[4][2])}).status_code == 200
        time.sleep(0.2)
    assert _rows(store)
    assert scorer.worker.pid is not None and scorer.worker.pid != killed
    assert _count(client.get("/metrics").text, "catsdogs_shadow_failures_total") <= 1  # the one it died with


def test_the_cpu_budget_refills_at_its_share_and_empties_by_what_was_used() -> None:
    budget = CpuBudget(0.5, 2, burst_s=0.05)  # 1 CPU-second per second
    assert budget.available()
    budget.charge(0.1)  # a pass that used more than the burst
    assert not budget.available()
    time.sleep(0.08)  # 0.05 s of debt refilled in 0.05 s
    assert budget.available()


def test_past_its_cpu_budget_the_shadow_skips_samples_and_counts_them(
    shadowed: tuple[TestClient, Path], images: list[tuple[str, str, bytes]]
) -> None:
    client, store = shadowed
    client.app.state.service.shadow.budget = CpuBudget(1e-9, 1, burst_s=0.0)  # type: ignore[attr-defined]
    for _, _, data in images[:3]:
        assert client.post("/predict", files={"file": ("x.jpg", data)}).status_code == 200
    metrics = _settled(client, 3)
    assert _count(metrics, "catsdogs_shadow_skipped_total") == 3
    assert _count(metrics, "catsdogs_shadow_predictions_total") == 0 and not _rows(store)
