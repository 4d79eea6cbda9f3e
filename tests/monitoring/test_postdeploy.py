"""evaluate-deployed's parts that need no running server: latency, its source errors, its MLflow names.

Its reader and its metrics are the shared ones: see ``tests/data/test_labelled.py`` and
``tests/test_metrics.py`` (which also checks that offline and deployed figures agree).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from catsdogs import CatsdogsError
from catsdogs.metrics import label_metrics
from catsdogs.monitoring.evaluate_deployed import (
    DeployedEvaluation,
    evaluate_deployed,
    latency_percentiles,
    mlflow_metrics,
)


def test_latency_percentiles() -> None:
    result = latency_percentiles([float(v) for v in range(1, 101)])
    assert result["p50"] == pytest.approx(50.5)
    assert result["p95"] == pytest.approx(95.05)
    assert result["mean"] == pytest.approx(50.5)
    assert latency_percentiles([]) == {}


def test_missing_source_is_a_clear_error_before_any_request(tmp_path: Path) -> None:
    with pytest.raises(CatsdogsError, match="neither a folder nor a zip"):
        evaluate_deployed("http://127.0.0.1:9", tmp_path / "nope")


def test_source_without_labelled_images_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "birds").mkdir()
    (tmp_path / "birds" / "b.jpg").write_bytes(b"x")
    with pytest.raises(CatsdogsError, match="no labelled image"):
        evaluate_deployed("http://127.0.0.1:9", tmp_path)


def test_mlflow_metric_names() -> None:
    result = DeployedEvaluation(
        url="http://service",
        n_images=3,
        n_failed=0,
        metrics=label_metrics([0, 1, 1], [0, 1, 0], ["cat", "dog"]),
        latency_ms={"p50": 3.0},
        model_versions={"2": 3},
        feedback_sent=3,
    )
    values = mlflow_metrics(result)
    assert values["precision"] == 1.0 and values["recall"] == 0.5  # of the dogs
    assert values["macro_recall"] == pytest.approx(0.75)
    assert values["cat_recall"] == 1.0 and values["latency_p50_ms"] == 3.0 and values["n_images"] == 3.0


def test_a_rate_limited_request_waits_for_retry_after_and_is_sent_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import requests

    from catsdogs.monitoring import evaluate_deployed as module

    answers = [429, 429, 200]
    waits: list[float] = []

    class Session:
        def post(self, url: str, **kwargs: object) -> requests.Response:
            response = requests.Response()
            response.status_code = answers.pop(0)
            response.headers["Retry-After"] = "2"
            return response

    monkeypatch.setattr(module.time, "sleep", waits.append)
    response = module.post_within_rate_limit(Session(), "http://service/predict")  # type: ignore[arg-type]
    assert response.status_code == 200 and waits == [2.0, 2.0]
