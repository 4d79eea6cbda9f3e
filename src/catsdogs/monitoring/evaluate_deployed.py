"""Post-deploy evaluation: send a labelled set to a running service and measure what it answers.

Each image goes to ``POST /predict``; the answers give accuracy, precision, recall and F1, and the
client-side latency percentiles. The true label of every prediction is sent back to
``POST /feedback`` (so the service's live accuracy reflects the run), and the result is logged as
an MLflow run tagged with the ``model_version`` the service reported.
"""

from __future__ import annotations

import logging
import re
import time
import zipfile
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import requests

from catsdogs import CatsdogsError
from catsdogs.settings import Settings

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
LATENCY_PERCENTILES = (50, 95, 99)


@dataclass(frozen=True)
class LabelledImage:
    """One image of the evaluation set; bytes are read only when sent."""

    name: str
    label: str
    read: Callable[[], bytes]


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


def _label_of(name: str, classes: Sequence[str]) -> str | None:
    """Kaggle layout ``cat.12.jpg``, or a class folder ``cat/xyz.jpg``; ``None`` when neither."""
    parts = re.split(r"[\\/]", name)
    prefix = parts[-1].split(".", 1)[0].lower()
    if prefix in classes:
        return prefix
    if len(parts) > 1 and parts[-2].lower() in classes:
        return parts[-2].lower()
    return None


def _balanced(items: list[LabelledImage], classes: Sequence[str], limit: int | None) -> list[LabelledImage]:
    """Round-robin over the classes (each sorted by name), so a limit keeps the classes balanced."""
    by_class = {
        label: sorted((i for i in items if i.label == label), key=lambda i: i.name) for label in classes
    }
    ordered: list[LabelledImage] = []
    for index in range(max((len(group) for group in by_class.values()), default=0)):
        ordered.extend(group[index] for group in by_class.values() if index < len(group))
    return ordered[:limit] if limit is not None else ordered


def load_labelled(source: Path, *, classes: Sequence[str], limit: int | None = None) -> list[LabelledImage]:
    """The labelled images of a folder (``cat/``, ``dog/``) or of a zip in the Kaggle layout.

    Raises:
        CatsdogsError: the source is missing or holds no labelled image.
    """
    classes = [label.lower() for label in classes]
    items: list[LabelledImage] = []
    if source.is_dir():
        for path in source.rglob("*"):
            label = _label_of(str(path.relative_to(source)), classes)
            if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and label:
                items.append(LabelledImage(str(path.relative_to(source)), label, path.read_bytes))
    elif source.is_file() and zipfile.is_zipfile(source):
        with zipfile.ZipFile(source) as archive:
            names = [n for n in archive.namelist() if n.lower().endswith(IMAGE_SUFFIXES)]
        for name in names:
            label = _label_of(name, classes)
            if label:
                items.append(LabelledImage(name, label, _zip_reader(source, name)))
    else:
        raise CatsdogsError(
            f"{source} is neither a folder nor a zip: give a labelled folder (cat/, dog/) or zip"
        )
    chosen = _balanced(items, classes, limit)
    if not chosen:
        raise CatsdogsError(
            f"no labelled image in {source}: expected {'/, '.join(classes)}/ folders "
            "or files named like cat.1.jpg"
        )
    return chosen


def _zip_reader(archive: Path, name: str) -> Callable[[], bytes]:
    def read() -> bytes:
        with zipfile.ZipFile(archive) as zf:
            return zf.read(name)

    return read


def classification_metrics(
    y_true: Sequence[str], y_pred: Sequence[str], classes: Sequence[str]
) -> dict[str, Any]:
    """Accuracy, per-class and macro precision/recall/F1, and the confusion matrix (rows = truth).

    A class never predicted has precision 0 (not NaN), so the macro average stays defined.
    """
    index = {label: i for i, label in enumerate(classes)}
    matrix = np.zeros((len(classes), len(classes)), dtype=np.int64)
    for truth, predicted in zip(y_true, y_pred, strict=True):
        matrix[index[truth], index[predicted]] += 1
    total = int(matrix.sum())
    per_class: dict[str, dict[str, float | int]] = {}
    for label, i in index.items():
        tp = int(matrix[i, i])
        predicted_n, support = int(matrix[:, i].sum()), int(matrix[i, :].sum())
        precision = tp / predicted_n if predicted_n else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[label] = {"precision": precision, "recall": recall, "f1": f1, "support": support}
    return {
        "accuracy": float(np.trace(matrix) / total) if total else 0.0,
        "precision": float(np.mean([c["precision"] for c in per_class.values()])),
        "recall": float(np.mean([c["recall"] for c in per_class.values()])),
        "f1": float(np.mean([c["f1"] for c in per_class.values()])),
        "per_class": per_class,
        "confusion_matrix": matrix.tolist(),
        "classes": list(classes),
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
    images = load_labelled(source, classes=classes, limit=limit)
    base = url.rstrip("/")
    session = requests.Session()
    session.headers.update(_headers(api_key))
    y_true: list[str] = []
    y_pred: list[str] = []
    latencies: list[float] = []
    versions: Counter[str] = Counter()
    failures: Counter[str] = Counter()
    feedback_sent = 0
    for image in images:
        data = image.read()
        started = time.perf_counter()
        try:
            response = session.post(
                f"{base}/predict", files={"file": (Path(image.name).name, data)}, timeout=timeout_s
            )
        except requests.RequestException as exc:
            raise CatsdogsError(f"cannot reach the service at {base}: {exc}; is it running?") from None
        latencies.append((time.perf_counter() - started) * 1000.0)
        if response.status_code != 200:
            failures[f"predict:{_error_code(response)}"] += 1
            logger.warning("%s: %s %s", image.name, response.status_code, response.text[:200])
            continue
        answer = response.json()
        y_true.append(image.label)
        y_pred.append(str(answer["label"]))
        versions[str(answer.get("model_version"))] += 1
        if send_feedback:
            feedback = session.post(
                f"{base}/feedback",
                json={"prediction_id": answer["prediction_id"], "label": image.label},
                timeout=timeout_s,
            )
            if feedback.status_code == 200:
                feedback_sent += 1
            else:
                failures[f"feedback:{_error_code(feedback)}"] += 1
    labels = list(classes)
    unknown = sorted(set(y_pred) - set(labels))
    if unknown:
        raise CatsdogsError(f"the service answered labels {unknown} outside {labels}: pass its classes")
    return DeployedEvaluation(
        url=base,
        n_images=len(images),
        n_failed=len(images) - len(y_pred),
        metrics=classification_metrics(y_true, y_pred, labels),
        latency_ms=latency_percentiles(latencies),
        model_versions=dict(versions),
        feedback_sent=feedback_sent,
        failures=dict(failures),
    )


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
    metrics = result.metrics
    values = {name: metrics[name] for name in ("accuracy", "precision", "recall", "f1")}
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
    tags = {
        "kind": "post-deploy-evaluation",
        "model_version": result.model_version or "unknown",
        "service_url": result.url,
        "data_source": data_source,
    }
    run_id = client.create_run(experiment_id, run_name="evaluate-deployed", tags=tags).info.run_id
    try:
        for name, value in values.items():
            client.log_metric(run_id, name, float(value))
        result.run_id = run_id
        client.log_dict(run_id, result.as_dict() | {"run_id": run_id}, "evaluate_deployed.json")
    except Exception:
        client.set_terminated(run_id, status="FAILED")
        raise
    client.set_terminated(run_id)
    return result.run_id
