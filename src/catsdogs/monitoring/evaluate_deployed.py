"""Post-deploy evaluation: send a labelled set to a running service and measure what it answers.

Each image goes to ``POST /predict``; the answers give the metrics of :mod:`catsdogs.metrics`, with
the names and meanings they have offline (``precision`` is that of the positive class,
``macro_precision`` the mean over classes), and the client-side latency percentiles. Accuracy judges
the predicted class (``predicted``) as the promotion gate does; every labelled image is a cat or a
dog, so the share answered ``unknown`` is reported apart, as ``unknown_rate`` (false unknowns; only
when the served model has an unknown detector, as offline). Images are
read by :mod:`catsdogs.data.labelled`, with the label rule of ingest and ``evaluate``. The true
label of every prediction is sent back to ``POST /feedback`` (so the service's live accuracy
reflects the run), and the result is logged as an MLflow run tagged with the ``model_version``
the service reported.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import requests

from catsdogs import CatsdogsError
from catsdogs.data.labelled import read_labelled
from catsdogs.metrics import label_metrics
from catsdogs.settings import Settings

logger = logging.getLogger(__name__)

LATENCY_PERCENTILES = (50, 95, 99)
#: Tries of one request the service keeps answering 429 (rate limited) before it counts as failed.
RATE_LIMIT_RETRIES = 10
SCALAR_METRICS = ("accuracy", "precision", "recall", "f1", "macro_precision", "macro_recall", "macro_f1")


@dataclass
class DeployedEvaluation:
    """What ``evaluate-deployed`` measured."""

    url: str
    n_images: int
    n_failed: int
    metrics: dict[str, Any]
    latency_ms: dict[str, float]
    model_versions: dict[str, int]
    feedback_sent: int
    failures: dict[str, int] = field(default_factory=dict)
    run_id: str | None = None

    @property
    def model_version(self) -> str | None:
        """The version that answered most requests (a rollout can mix two)."""
        if not self.model_versions:
            return None
        return max(self.model_versions.items(), key=lambda item: item[1])[0]

    def as_dict(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "n_images": self.n_images,
            "n_failed": self.n_failed,
            "metrics": self.metrics,
            "latency_ms": self.latency_ms,
            "model_version": self.model_version,
            "model_versions": self.model_versions,
            "feedback_sent": self.feedback_sent,
            "failures": self.failures,
            "run_id": self.run_id,
        }


def latency_percentiles(latencies_ms: Sequence[float]) -> dict[str, float]:
    """p50/p95/p99 and mean of the client-side latencies, in milliseconds."""
    if not latencies_ms:
        return {}
    values = np.asarray(latencies_ms, dtype=np.float64)
    result = {f"p{p}": float(np.percentile(values, p)) for p in LATENCY_PERCENTILES}
    result["mean"] = float(values.mean())
    return result


def _headers(api_key: str | None) -> dict[str, str]:
    return {"X-API-Key": api_key} if api_key else {}


def _error_code(response: requests.Response) -> str:
    try:
        return str(response.json().get("error", response.status_code))
    except ValueError:
        return str(response.status_code)


def post_within_rate_limit(session: requests.Session, url: str, **kwargs: Any) -> requests.Response:
    """POST, waiting out a 429's ``Retry-After`` (the service's per-key rate limit, docs/serving.md)
    up to ``RATE_LIMIT_RETRIES`` times: an evaluation runs slower, it does not fail."""
    for _ in range(RATE_LIMIT_RETRIES):
        response = session.post(url, **kwargs)
        if response.status_code != 429:
            return response
        wait = float(response.headers.get("Retry-After", "1"))
        logger.info("rate limited by %s: waiting %.0f s", url, wait)
        time.sleep(min(wait, 60.0))
    return response


def _send_feedback(
    session: requests.Session, base: str, prediction_id: str, label: str, timeout_s: float
) -> str | None:
    """Tell the service the true label of one of its answers; the failure's key, or None."""
    response = post_within_rate_limit(
        session, f"{base}/feedback", json={"prediction_id": prediction_id, "label": label}, timeout=timeout_s
    )
    return None if response.status_code == 200 else f"feedback:{_error_code(response)}"


def evaluate_deployed(
    url: str,
    source: Path,
    *,
    classes: Sequence[str] = ("cat", "dog"),
    limit: int | None = None,
    api_key: str | None = None,
    send_feedback: bool = True,
    timeout_s: float = 30.0,
) -> DeployedEvaluation:
    """Send every labelled image of ``source`` to the service at ``url`` and measure the answers.

    Raises:
        CatsdogsError: the source has no labelled image, or the service cannot be reached.
    """
    images = read_labelled(source, classes, limit=limit)
    base = url.rstrip("/")
    session = requests.Session()
    session.headers.update(_headers(api_key))
    y_true: list[str] = []
    y_pred: list[str] = []
    latencies: list[float] = []
    versions: Counter[str] = Counter()
    failures: Counter[str] = Counter()
    feedback_sent = n_unknown = judged = 0
    for image in images:
        data = image.read()
        try:
            response = post_within_rate_limit(
                session, f"{base}/predict", files={"file": (Path(image.name).name, data)}, timeout=timeout_s
            )
        except requests.RequestException as exc:
            raise CatsdogsError(f"cannot reach the service at {base}: {exc}; is it running?") from None
        latencies.append(response.elapsed.total_seconds() * 1000.0)  # the answered attempt only
        if response.status_code != 200:
            failures[f"predict:{_error_code(response)}"] += 1
            logger.warning("%s: %s %s", image.name, response.status_code, response.text[:200])
            continue
        answer = response.json()
        y_true.append(image.label)
        y_pred.append(str(answer.get("predicted", answer["label"])))  # services before `unknown`: label
        n_unknown += answer["label"] == "unknown"
        judged += answer.get("ood_score") is not None  # the served model has an unknown detector
        versions[str(answer.get("model_version"))] += 1
        if send_feedback:
            failure = _send_feedback(session, base, answer["prediction_id"], image.label, timeout_s)
            if failure is None:
                feedback_sent += 1
            else:
                failures[failure] += 1
    labels = list(classes)
    unknown = sorted(set(y_pred) - set(labels))
    if unknown:
        raise CatsdogsError(f"the service answered labels {unknown} outside {labels}: pass its classes")
    metrics = label_metrics([labels.index(y) for y in y_true], [labels.index(y) for y in y_pred], labels)
    if judged:
        metrics["unknown_rate"] = n_unknown / len(y_pred)
    return DeployedEvaluation(
        url=base,
        n_images=len(images),
        n_failed=len(images) - len(y_pred),
        metrics=metrics,
        latency_ms=latency_percentiles(latencies),
        model_versions=dict(versions),
        feedback_sent=feedback_sent,
        failures=dict(failures),
    )


def mlflow_metrics(result: DeployedEvaluation) -> dict[str, float]:
    """The MLflow metrics of a run: the offline names (``accuracy``, ``precision``, ``macro_f1``…),
    ``<class>_precision``…, ``latency_p95_ms``… and the counts."""
    metrics = result.metrics
    values = {name: metrics[name] for name in (*SCALAR_METRICS, "unknown_rate") if name in metrics}
    values.update(
        {
            f"{label}_{key}": stats[key]
            for label, stats in metrics["per_class"].items()
            for key in ("precision", "recall", "f1")
        }
    )
    values.update({f"latency_{name}_ms": value for name, value in result.latency_ms.items()})
    values.update(
        {"n_images": result.n_images, "n_failed": result.n_failed, "feedback_sent": result.feedback_sent}
    )
    return {name: float(value) for name, value in values.items()}


def log_to_mlflow(result: DeployedEvaluation, settings: Settings, *, data_source: str) -> str:
    """Log the evaluation as an MLflow run tagged with the model version; returns the run id.

    Goes through an explicit client, never MLflow's process-wide tracking URI.
    """
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=settings.mlflow_tracking_uri)
    experiment = client.get_experiment_by_name(settings.mlflow_experiment)
    experiment_id = (
        experiment.experiment_id
        if experiment is not None
        else client.create_experiment(
            settings.mlflow_experiment, artifact_location=settings.mlflow_artifact_location
        )
    )
    values = mlflow_metrics(result)
    tags = {
        "kind": "post-deploy-evaluation",
        "model_version": result.model_version or "unknown",
        "service_url": result.url,
        "data_source": data_source,
    }
    run_id = client.create_run(experiment_id, run_name="evaluate-deployed", tags=tags).info.run_id
    try:
        for name, value in values.items():
            client.log_metric(run_id, name, value)
        result.run_id = run_id
        client.log_dict(run_id, result.as_dict() | {"run_id": run_id}, "evaluate_deployed.json")
    except Exception:
        client.set_terminated(run_id, status="FAILED")
        raise
    client.set_terminated(run_id)
    return result.run_id
