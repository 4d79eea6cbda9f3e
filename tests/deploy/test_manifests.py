"""Kubernetes manifests: every overlay renders, validates against the Kubernetes schemas offline,
passes checkov, and keeps the API's contract (probes, hardening, replicas, images)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from .conftest import REPO, find, local_tool, require_tool

pytestmark = pytest.mark.integration

CUSTOM_KINDS = {"ServiceMonitor", "PrometheusRule"}
OVERLAY_NAMES = ("local", "production")


def write_docs(docs: list[dict], path: Path) -> Path:
    path.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    return path


def api_container(docs: list[dict]) -> dict:
    return find(docs, "Deployment", "catsdogs-api")["spec"]["template"]["spec"]["containers"][0]


@pytest.mark.parametrize("overlay", OVERLAY_NAMES)
def test_overlay_renders_the_whole_stack(rendered: dict[str, list[dict]], overlay: str) -> None:
    kinds = {(d["kind"], d["metadata"]["name"]) for d in rendered[overlay]}
    for expected in [
        ("Namespace", "catsdogs"),
        ("Deployment", "catsdogs-api"),
        ("Service", "catsdogs-api"),
        ("HorizontalPodAutoscaler", "catsdogs-api"),
        ("PodDisruptionBudget", "catsdogs-api"),
        ("ConfigMap", "catsdogs-config"),
        ("Deployment", "catsdogs-mlflow"),
        ("PersistentVolumeClaim", "catsdogs-mlflow"),
        ("Service", "mlflow"),
        ("Job", "catsdogs-train"),
        ("CronJob", "catsdogs-evaluate-deployed"),
    ]:
        assert expected in kinds
    assert all(
        d["metadata"].get("namespace") == "catsdogs" for d in rendered[overlay] if d["kind"] != "Namespace"
    )


@pytest.mark.parametrize("overlay", OVERLAY_NAMES)
def test_api_probes_health_and_readiness(rendered: dict[str, list[dict]], overlay: str) -> None:
    container = api_container(rendered[overlay])
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert container["startupProbe"]["httpGet"]["path"] == "/health"
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["resources"]["requests"] and container["resources"]["limits"]


@pytest.mark.parametrize("overlay", OVERLAY_NAMES)
def test_every_workload_is_non_root_read_only_without_capabilities(
    rendered: dict[str, list[dict]], overlay: str
) -> None:
    workloads = [d for d in rendered[overlay] if d["kind"] in {"Deployment", "Job", "CronJob"}]
    assert len(workloads) == 4
    for doc in workloads:
        spec = doc["spec"]["jobTemplate"]["spec"] if doc["kind"] == "CronJob" else doc["spec"]
        pod = spec["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["automountServiceAccountToken"] is False
        for container in pod["containers"]:
            security = container["securityContext"]
            assert security["readOnlyRootFilesystem"] is True, doc["metadata"]["name"]
            assert security["allowPrivilegeEscalation"] is False
            assert security["capabilities"]["drop"] == ["ALL"]


def test_local_overlay_is_one_replica_behind_a_node_port(rendered: dict[str, list[dict]]) -> None:
    docs = rendered["local"]
    assert find(docs, "Deployment", "catsdogs-api")["spec"]["replicas"] == 1
    service = find(docs, "Service", "catsdogs-api")
    assert service["spec"]["type"] == "NodePort"
    assert service["spec"]["ports"][0]["nodePort"] == 30080
    assert api_container(docs)["imagePullPolicy"] == "IfNotPresent"


def test_production_overlay_scales_out_behind_an_ingress_with_images_by_digest(
    rendered: dict[str, list[dict]],
) -> None:
    docs = rendered["production"]
    assert find(docs, "Deployment", "catsdogs-api")["spec"]["replicas"] >= 3
    assert find(docs, "HorizontalPodAutoscaler", "catsdogs-api")["spec"]["minReplicas"] >= 3
    assert find(docs, "Ingress", "catsdogs-api")["spec"]["tls"]
    images = [
        c["image"]
        for d in docs
        if d["kind"] in {"Deployment", "Job"}
        for c in d["spec"]["template"]["spec"]["containers"]
    ]
    assert images and all("@sha256:" in image for image in images)


@pytest.mark.parametrize("overlay", OVERLAY_NAMES)
def test_builtin_objects_validate_strictly_against_kubernetes_schemas(
    rendered: dict[str, list[dict]], overlay: str, tmp_path: Path
) -> None:
    validate = require_tool("kubernetes-validate")
    builtin = [d for d in rendered[overlay] if d["kind"] not in CUSTOM_KINDS]
    path = write_docs(builtin, tmp_path / f"{overlay}.yaml")
    done = subprocess.run([validate, "--strict", "--quiet", str(path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_strict_schema_validation_rejects_an_unknown_field(
    rendered: dict[str, list[dict]], tmp_path: Path
) -> None:
    validate = require_tool("kubernetes-validate")
    api = find(rendered["local"], "Deployment", "catsdogs-api")
    broken = json.loads(json.dumps(api))
    broken["spec"]["template"]["spec"]["containers"][0]["livenessProbes"] = {}
    path = write_docs([broken], tmp_path / "broken.yaml")
    done = subprocess.run([validate, "--strict", str(path)], capture_output=True, text=True)
    assert done.returncode != 0
    assert "livenessProbes" in done.stdout + done.stderr


def test_service_monitor_scrapes_the_api_service(rendered: dict[str, list[dict]]) -> None:
    docs = rendered["production"]
    monitor = find(docs, "ServiceMonitor", "catsdogs-api")
    service = find(docs, "Service", "catsdogs-api")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    port_names = {p["name"] for p in service["spec"]["ports"]}
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["port"] in port_names
        assert endpoint["path"] == "/metrics"


def test_prometheus_rule_is_well_formed(rendered: dict[str, list[dict]]) -> None:
    rule = find(rendered["production"], "PrometheusRule", "catsdogs")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    rules = [r for group in rule["spec"]["groups"] for r in group["rules"]]
    assert len(rules) >= 5
    for r in rules:
        assert set(r) <= {"alert", "expr", "for", "keep_firing_for", "labels", "annotations"}
        assert r["alert"].startswith("Catsdogs") and r["expr"].strip()
        assert r["labels"]["severity"] in {"warning", "critical"}
        assert r["annotations"]["summary"]


def test_prometheus_rule_passes_promtool(rendered: dict[str, list[dict]], tmp_path: Path) -> None:
    promtool = require_tool("promtool")
    rule = find(rendered["production"], "PrometheusRule", "catsdogs")
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    done = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout + done.stderr


def test_prometheus_rule_is_generated_from_the_prometheus_rule_files() -> None:
    """One source of alert rules: deploy/prometheus/rules (monitoring); the PrometheusRule wraps them."""
    done = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "sync-prometheusrule.py"), "--check"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr


def test_local_overlay_needs_no_prometheus_operator(rendered: dict[str, list[dict]]) -> None:
    assert not [d for d in rendered["local"] if d["kind"] in CUSTOM_KINDS]


@pytest.mark.parametrize("overlay", OVERLAY_NAMES)
def test_checkov_finds_no_failed_check_and_every_skip_is_justified(
    rendered: dict[str, list[dict]], overlay: str, tmp_path: Path
) -> None:
    checkov = local_tool("checkov")
    path = write_docs(rendered[overlay], tmp_path / f"{overlay}.yaml")
    done = subprocess.run(
        [checkov, "--skip-download", "--framework", "kubernetes", "-o", "json", "-f", str(path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    report = json.loads(done.stdout)
    results = report["results"]
    failed = [(c["check_id"], c["resource"]) for c in results["failed_checks"]]
    assert failed == [], failed
    assert report["summary"]["passed"] > 100
    for skipped in results["skipped_checks"]:
        reason = skipped["check_result"].get("suppress_comment", "")
        assert len(reason) > 20, f"{skipped['check_id']} on {skipped['resource']} is skipped without a reason"
    assert done.returncode == 0
