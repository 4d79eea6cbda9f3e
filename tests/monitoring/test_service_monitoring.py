"""The monitoring stack against the real running service.

One real service (uvicorn on the ``catsdogs.serve.app`` factory, a tiny real ONNX bundle with a
drift reference) is shared by the module:

* metric-name coverage: every name read by a dashboard panel or an alert exists in the service's
  real ``/metrics`` output, or in the small kube-state-metrics / cAdvisor list below;
* ``evaluate-deployed`` sends 200 real labelled images, with feedback, and logs an MLflow run;
* a real Prometheus on loopback scrapes the service, evaluates every alert rule, and the series
  read back through its HTTP API match what was sent: the live accuracy equals the accuracy
  computed by hand from the model's weights.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import requests
from monitor_support import (
    RULES,
    alert_rules,
    architecture_metrics,
    dashboard_exprs,
    free_port,
    grafana_to_promql,
    metric_names,
    prom_query,
    src_dir,
    start_prometheus,
    start_service,
    stop,
    wait_for,
)
from PIL import Image
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from catsdogs.drift import PSI_DRIFT
from catsdogs.monitoring.evaluate_deployed import DeployedEvaluation, evaluate_deployed, log_to_mlflow
from catsdogs.monitoring.guard_app import GuardMetrics
from catsdogs.preprocessing import PreprocessConfig, decode_image, preprocess_batch
from catsdogs.settings import Settings
from fakes import IMAGE_SIZE, WEIGHTS_A
from support import dataset_photos
from tiny_bundle import build_tiny_bundle

pytestmark = pytest.mark.integration

#: Kubernetes metric names the alerts use, with where each comes from (they are not the service's).
KUBERNETES_METRICS = {
    "kube_pod_status_ready": "kube-state-metrics, docs/metrics/workload/pod-metrics.md",
    "kube_pod_container_status_waiting_reason": "kube-state-metrics, docs/metrics/workload/pod-metrics.md",
    "kube_pod_container_status_restarts_total": "kube-state-metrics, docs/metrics/workload/pod-metrics.md",
    "kube_pod_container_resource_limits": "kube-state-metrics, docs/metrics/workload/pod-metrics.md",
    "kube_deployment_spec_replicas": "kube-state-metrics, docs/metrics/workload/deployment-metrics.md",
    "kube_deployment_status_replicas_available": (
        "kube-state-metrics, docs/metrics/workload/deployment-metrics.md"
    ),
    "kube_horizontalpodautoscaler_spec_max_replicas": (
        "kube-state-metrics, docs/metrics/workload/horizontalpodautoscaler-metrics.md"
    ),
    "kube_horizontalpodautoscaler_status_current_replicas": (
        "kube-state-metrics, docs/metrics/workload/horizontalpodautoscaler-metrics.md"
    ),
    "container_cpu_usage_seconds_total": "cAdvisor (kubelet /metrics/cadvisor), docs/storage/prometheus.md",
    "container_memory_working_set_bytes": "cAdvisor (kubelet /metrics/cadvisor), docs/storage/prometheus.md",
}
#: Series Prometheus makes itself for every scrape target.
PROMETHEUS_METRICS = {"up": "Prometheus, one series per scrape target (1 when the scrape succeeded)"}
SERVICE_GROUPS = {"catsdogs-service", "catsdogs-model-quality"}
GUARD_GROUP = "catsdogs-guard"
PANELS_WITH_DATA = {
    "Model version",
    "Model ready",
    "Targets up",
    "Request rate",
    "Error rate",
    "Latency percentiles (predict)",
    "Batch size and queue",
    "Class distribution",
    "Confidence",
    "Input and output drift",
    "Live accuracy",
    "Feedback rate",
}
N_PER_CLASS = 100


def _images(archive: Path, label: str, n: int, *, offset: int) -> list[tuple[str, bytes]]:
    return [
        (f"{label}.{i}.jpg", data) for i, data in enumerate(dataset_photos(archive, label, n, offset=offset))
    ]


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory, dataset_zip: Path) -> Iterator[str]:
    workdir = tmp_path_factory.mktemp("service")
    reference = [
        Image.open(io.BytesIO(data)).convert("RGB")
        for label in ("cat", "dog")
        for _, data in _images(dataset_zip, label, 150, offset=0)
    ]
    bundle = build_tiny_bundle(workdir / "bundle", reference_images=reference)
    url, process = start_service(bundle, workdir)
    yield url
    stop(process)


@pytest.fixture(scope="module")
def labelled(tmp_path_factory: pytest.TempPathFactory, dataset_zip: Path) -> Path:
    """100 real cats and 100 real dogs (not in the drift reference), as a cat/ dog/ folder: 200
    images, the service's default minimum before it publishes drift scores."""
    root = tmp_path_factory.mktemp("labelled")
    for label in ("cat", "dog"):
        (root / label).mkdir()
        for name, data in _images(dataset_zip, label, N_PER_CLASS, offset=9000):
            (root / label / name).write_bytes(data)
    return root


@pytest.fixture(scope="module")
def hand_accuracy(labelled: Path) -> float:
    """The tiny model's accuracy on the labelled set, computed without the service."""
    config = PreprocessConfig(image_size=IMAGE_SIZE)
    correct = 0
    files = sorted(labelled.glob("*/*.jpg"))
    for path in files:
        batch = preprocess_batch([decode_image(path.read_bytes())], config)
        predicted = ("cat", "dog")[int(np.argmax(batch.mean(axis=(2, 3)) @ WEIGHTS_A))]
        correct += predicted == path.parent.name
    return correct / len(files)


@pytest.fixture(scope="module")
def evaluation(service: str, labelled: Path) -> DeployedEvaluation:
    return evaluate_deployed(service, labelled, classes=("cat", "dog"))


def _exported_names(metrics_text: str) -> set[str]:
    """Every sample name the exposition can carry, from its HELP/TYPE lines (a labelled metric
    with no child yet has no sample, but it is declared)."""
    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "summary": ("", "_sum", "_count", "_created"),
        "gauge": ("",),
        "info": ("_info",),
        "untyped": ("",),
    }
    names = set()
    for family in text_string_to_metric_families(metrics_text):
        names.update(family.name + suffix for suffix in suffixes.get(family.type, ("",)))
        names.update(sample.name for sample in family.samples)
    return names


@pytest.fixture(scope="module")
def exported(service: str) -> set[str]:
    response = requests.get(f"{service}/metrics", timeout=10)
    assert response.status_code == 200
    return _exported_names(response.text)


def test_every_dashboard_query_reads_only_exported_metrics(exported: set[str]) -> None:
    known = exported | set(PROMETHEUS_METRICS)
    for title, expr in dashboard_exprs():
        missing = metric_names(expr) - known
        assert not missing, f"panel {title!r} reads {missing}, which the service does not export"


def test_every_alert_reads_only_exported_or_kubernetes_metrics(exported: set[str]) -> None:
    for rule in alert_rules():
        names = metric_names(rule["expr"])
        assert names, f"{rule['alert']}: no metric found in its expression"
        if rule["group"] in SERVICE_GROUPS:
            missing = names - exported - set(PROMETHEUS_METRICS)
        elif rule["group"] == GUARD_GROUP:  # the rollback guard's own /metrics
            missing = names - _exported_names(generate_latest(GuardMetrics().registry).decode())
        else:
            missing = names - set(KUBERNETES_METRICS)
        assert not missing, f"{rule['alert']} reads {missing}, which its source does not export"


def test_every_metric_of_the_contract_is_exported_and_shown(exported: set[str]) -> None:
    contract = architecture_metrics()
    assert len(contract) >= 15
    shown = set().union(*(metric_names(expr) for _, expr in dashboard_exprs()))
    for name, kind in contract.items():
        family = {"counter": name, "histogram": f"{name}_bucket"}.get(kind, name)
        assert family in exported, f"{name} ({kind}) is in docs/architecture.md but not on /metrics"
        assert any(used.startswith(name) for used in shown), f"{name} is on no dashboard panel"


def test_evaluate_deployed_measures_the_real_service(
    evaluation: DeployedEvaluation, hand_accuracy: float
) -> None:
    assert evaluation.n_images == 2 * N_PER_CLASS
    assert evaluation.n_failed == 0
    assert evaluation.feedback_sent == 2 * N_PER_CLASS
    assert evaluation.metrics["accuracy"] == pytest.approx(hand_accuracy)
    assert sum(c["support"] for c in evaluation.metrics["per_class"].values()) == 2 * N_PER_CLASS
    assert 0 < evaluation.latency_ms["p50"] <= evaluation.latency_ms["p95"] <= evaluation.latency_ms["p99"]


def test_evaluate_deployed_logs_an_mlflow_run_tagged_with_the_model_version(
    evaluation: DeployedEvaluation, service: str, settings: Settings
) -> None:
    import mlflow

    served = requests.get(f"{service}/model-info", timeout=5).json()["version"]
    run_id = log_to_mlflow(evaluation, settings, data_source="labelled-test-set")
    run = mlflow.MlflowClient(tracking_uri=settings.mlflow_tracking_uri).get_run(run_id)
    assert run.data.tags["model_version"] == served == evaluation.model_version
    assert run.data.metrics["accuracy"] == pytest.approx(evaluation.metrics["accuracy"])
    assert run.data.metrics["latency_p95_ms"] == pytest.approx(evaluation.latency_ms["p95"])


def test_cli_refuses_an_unreachable_service(labelled: Path, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CATSDOGS_")}
    env.update(PYTHONPATH=str(src_dir()), CATSDOGS_PARAMS_FILE=str(tmp_path / "none.yaml"))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "catsdogs",
            "evaluate-deployed",
            "--data",
            str(labelled),
            "--limit",
            "2",
            "--url",
            f"http://127.0.0.1:{free_port()}",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
        cwd=tmp_path,
    )
    assert result.returncode == 1
    assert "cannot reach the service" in result.stderr


@pytest.mark.slow
def test_real_prometheus_scrapes_the_service_and_evaluates_every_rule(
    service: str, evaluation: DeployedEvaluation, hand_accuracy: float, tmp_path: Path
) -> None:
    # A second target on a port nobody listens on: CatsdogsServiceDown must go pending for it only.
    dead = f"127.0.0.1:{free_port()}"
    target = service.removeprefix("http://")
    url, process = start_prometheus(target, tmp_path, rule_files=[RULES], extra_targets=(dead,))
    try:
        n = evaluation.n_images
        wait_for(
            lambda: [float(r["value"][1]) for r in prom_query(url, "sum(catsdogs_predictions_total)")] == [n],
            timeout_s=30,
            what=f"{n} predictions visible in Prometheus",
        )
        assert _value(url, f'up{{instance="{target}"}}') == 1.0
        assert _value(url, "catsdogs_model_ready") == 1.0
        assert _value(url, "catsdogs_live_accuracy") == pytest.approx(hand_accuracy)
        assert _value(url, 'sum(catsdogs_feedback_total{correct="true"})') == pytest.approx(hand_accuracy * n)
        assert _value(url, "sum(catsdogs_prediction_confidence_count)") == n

        drift = {
            r["metric"]["feature"]: float(r["value"][1]) for r in prom_query(url, "catsdogs_drift_score")
        }
        assert {"brightness", "saturation", "sharpness", "width"} <= set(drift), drift
        assert max(drift.values()) < PSI_DRIFT, f"in-distribution traffic flagged as drift: {drift}"

        # Every dashboard query runs on the real series (promtool only parses them); the panels
        # fed by the traffic above show data once rate() has a few scrapes to work with.
        scrapes = f'count_over_time(up{{instance="{target}"}}[1m])'
        wait_for(lambda: _value(url, scrapes) >= 3, timeout_s=20, what="three scrapes")
        for title, expr in dashboard_exprs():
            result = prom_query(url, grafana_to_promql(expr))
            if title in PANELS_WITH_DATA:
                assert result, f"panel {title!r} shows no data: {expr}"

        wait_for(lambda: _rules_evaluated(url), timeout_s=20, what="every rule evaluated")
        rules = _rules(url)
        assert len(rules) == len(alert_rules())
        assert all(rule["health"] == "ok" for rule in rules), [r for r in rules if r["health"] != "ok"]

        down = f'ALERTS{{alertname="CatsdogsServiceDown", instance="{dead}"}}'
        wait_for(
            lambda: bool(prom_query(url, down)), timeout_s=20, what="ServiceDown pending for the dead target"
        )
        assert not prom_query(url, f'ALERTS{{alertname="CatsdogsServiceDown", instance="{target}"}}')
    finally:
        stop(process)


def _value(url: str, promql: str) -> float:
    result = prom_query(url, promql)
    assert len(result) == 1, f"{promql}: {result}"
    return float(result[0]["value"][1])


def _rules(url: str) -> list[dict]:
    body = requests.get(f"{url}/api/v1/rules", timeout=5).json()
    return [rule for group in body["data"]["groups"] for rule in group["rules"]]


def _rules_evaluated(url: str) -> bool:
    rules = _rules(url)
    return bool(rules) and all(not rule["lastEvaluation"].startswith("0001") for rule in rules)
