"""Kubernetes manifests: every overlay renders, validates against the Kubernetes schemas offline,
passes checkov, and keeps the API's contract (probes, hardening, replicas, images)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from catsdogs import CatsdogsError
from catsdogs.deploy import PLACEHOLDER_DIGEST, Kubectl, render
from catsdogs.serve.smoke import INTERNAL_PATHS, PUBLIC_PATHS

from .conftest import PINNED_IMAGES, REPO, find, local_tool, pin_production, require_tool

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
        ("CronJob", "catsdogs-retrain"),
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
    assert len(workloads) == 5
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


# --- closed by default, drained before killed, denied egress, no placeholder digests -------------


def _k8s_files() -> list[Path]:
    return sorted((REPO / "deploy" / "k8s").rglob("*.yaml"))


def test_committed_overlays_hold_no_placeholder_digest(rendered: dict[str, list[dict]]) -> None:
    """The pipeline pins real digests; a committed all-zero one would be pulled (and fail) or be taken
    for a release."""
    placeholders = [str(path) for path in _k8s_files() if PLACEHOLDER_DIGEST.search(path.read_text())]
    assert placeholders == []
    images = {c["image"] for d in rendered["production-committed"] for c in _all_containers(d)}
    assert images and not [image for image in images if PLACEHOLDER_DIGEST.search(image)]
    # Every image production runs is one the pipeline pins (cd.yml: "Pin the images").
    assert {image.split("@")[0].rsplit(":", 1)[0] for image in images} <= set(PINNED_IMAGES)


def test_deploy_refuses_to_render_a_placeholder_digest(tmp_path: Path) -> None:
    overlay = pin_production(tmp_path)
    kustomization = yaml.safe_load((overlay / "kustomization.yaml").read_text())
    kustomization["images"][1]["digest"] = "sha256:" + "0" * 64  # the train image
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    good = "ghcr.io/catsdogs/catsdogs-serve@sha256:" + "ab" * 32
    with pytest.raises(CatsdogsError, match="placeholder image digests"):
        render(overlay, good, kubectl=Kubectl(require_tool("kubectl")))
    with pytest.raises(CatsdogsError, match="placeholder image digests"):  # the API's own, given by hand
        render(pin_production(tmp_path / "again"), good.split("@")[0] + "@sha256:" + "0" * 64)


def _all_containers(doc: dict) -> list[dict]:
    spec = doc.get("spec", {})
    if doc["kind"] == "CronJob":
        spec = spec["jobTemplate"]["spec"]
    return spec.get("template", {}).get("spec", {}).get("containers", [])


def _matches(rule_path: str, path_type: str, path: str) -> bool:
    """Kubernetes Ingress path matching (Exact, or Prefix by path elements)."""
    if path_type == "Exact":
        return path == rule_path
    prefix = rule_path.rstrip("/")
    return path == rule_path or path.startswith(prefix + "/") or (prefix == "" and path.startswith("/"))


def test_public_ingress_routes_only_the_public_api(rendered: dict[str, list[dict]]) -> None:
    from fastapi.testclient import TestClient

    from catsdogs.serve.app import create_app
    from catsdogs.settings import Settings

    ingress = find(rendered["production"], "Ingress", "catsdogs-api")
    rules = [(p["path"], p["pathType"]) for rule in ingress["spec"]["rules"] for p in rule["http"]["paths"]]
    assert {path for path, _ in rules} == set(PUBLIC_PATHS)
    assert all(kind == "Exact" or path == "/samples" for path, kind in rules)
    # Every routed path is one the app answers (no model loaded here: 503 and 405 are answers too).
    client = TestClient(create_app(Settings(model_uri="unused", feedback_secret="s")))
    for path in [*PUBLIC_PATHS, "/samples/cat.0.jpg"]:
        assert 404 not in {client.get(path).status_code, client.post(path).status_code}, path
    internal = [*INTERNAL_PATHS, "/admin", "/stats", "/metrics/", "/docs/oauth2-redirect"]
    routed = [path for path in internal for rule, kind in rules if _matches(rule, kind, path)]
    assert routed == []


#: The Secrets pods read: the stack's, and the weekly retraining's own (a git token and the DVC
#: remote's configuration, which nothing else needs).
SECRETS = ("catsdogs-secrets", "catsdogs-retrain")


def _secret_refs(docs: list[dict]) -> list[dict]:
    return [
        env["valueFrom"]["secretKeyRef"]
        for doc in docs
        for container in _all_containers(doc)
        for env in container.get("env", [])
        if "secretKeyRef" in env.get("valueFrom", {})
    ]


def test_secret_references_are_required_and_every_key_is_documented(rendered: dict[str, list[dict]]) -> None:
    """A misnamed Secret or key stops the pod (never an open API); the guide creates every key."""
    guide = (REPO / "docs" / "deployment.md").read_text()
    for overlay in ("local", "production"):
        refs = _secret_refs(rendered[overlay])
        assert {ref["key"] for ref in refs if ref["name"] == "catsdogs-secrets"} >= {
            "api-keys",
            "admin-token",
            "feedback-secret",
            "feedback-store-url",
            "eval-api-key",
        }
        assert {ref["key"] for ref in refs if ref["name"] == "catsdogs-retrain"} == {
            "git-token",
            "dvc-config",
        }
        for ref in refs:
            assert ref.get("optional") is not True, ref
            assert ref["name"] in SECRETS
            assert f"--from-literal={ref['key']}=" in guide or f"--from-file={ref['key']}=" in guide, (
                f"docs/deployment.md does not create {ref['key']}"
            )


def _documented_secret_commands(guide: str, secret: str = "catsdogs-secrets") -> list[set[str]]:
    """The keys each ``kubectl create secret generic <secret>`` command of the guide creates."""
    lines = guide.replace("\\\n", " ").splitlines()  # shell continuation lines joined
    commands = [line for line in lines if f"create secret generic {secret} " in line + " "]
    return [set(re.findall(r"--from-(?:literal|file)=([\w.-]+)=", command)) for command in commands]


@pytest.mark.parametrize("secret", SECRETS)
def test_the_documented_secret_command_creates_every_referenced_key(
    rendered: dict[str, list[dict]], secret: str
) -> None:
    """Copying the guide's command gives the pods every key they reference, and no stray one."""
    referenced = {
        ref["key"]
        for overlay in OVERLAY_NAMES
        for ref in _secret_refs(rendered[overlay])
        if ref["name"] == secret
    }
    guide = (REPO / "docs" / "deployment.md").read_text()
    commands = _documented_secret_commands(guide, secret)
    assert commands, f"docs/deployment.md has no `kubectl create secret generic {secret}`"
    for keys in commands:
        assert keys == referenced
    for key in referenced:
        assert f"| `{key}` |" in guide, f"the table of docs/deployment.md does not explain {key}"


def test_the_secret_check_reads_a_command_over_continuation_lines() -> None:
    guide = (
        "kubectl -n catsdogs create secret generic catsdogs-secrets \\\n"
        "  --from-literal=api-keys=x \\\n"
        "  --from-literal=admin-token=y\n"
        "--from-literal=not-in-the-command=z\n"
    )
    assert _documented_secret_commands(guide) == [{"api-keys", "admin-token"}]
    other = (
        "kubectl create secret generic catsdogs-retrain --from-file=dvc-config=c --from-literal=git-token=t"
    )
    assert _documented_secret_commands(other, "catsdogs-retrain") == [{"dvc-config", "git-token"}]
    assert _documented_secret_commands(other) == []


@pytest.mark.parametrize("overlay", OVERLAY_NAMES)
def test_api_pods_drain_before_they_are_killed(rendered: dict[str, list[dict]], overlay: str) -> None:
    from catsdogs.settings import Settings

    pod = find(rendered[overlay], "Deployment", "catsdogs-api")["spec"]["template"]["spec"]
    container = pod["containers"][0]
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    env = {item["name"]: item.get("value") for item in container["env"]}
    drain = float(env.get("CATSDOGS_GRACEFUL_TIMEOUT_S") or Settings().graceful_timeout_s)
    assert drain >= Settings().request_timeout_s  # a request admitted before SIGTERM can finish
    assert pod["terminationGracePeriodSeconds"] > float(command[1]) + drain


PRIVATE_RANGES = ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16")


def _egress_destinations(docs: list[dict], pod_labels: dict[str, str]) -> set[tuple[str, int]]:
    """What a pod with these labels may reach: ``(app name, "dns" or "internet", port)``; an ipBlock
    other than "anywhere outside the private ranges" fails the test."""
    allowed = set()
    for policy in (d for d in docs if d["kind"] == "NetworkPolicy"):
        selector = policy["spec"]["podSelector"].get("matchLabels", {})
        if not selector.items() <= pod_labels.items():
            continue
        for rule in policy["spec"].get("egress", []):
            for peer in rule["to"]:
                if "ipBlock" in peer:  # only "outside the cluster", every private range excepted
                    block = peer["ipBlock"]
                    assert block["cidr"] == "0.0.0.0/0", policy["metadata"]["name"]
                    assert set(block["except"]) >= set(PRIVATE_RANGES), policy["metadata"]["name"]
                    allowed |= {("internet", port["port"]) for port in rule["ports"]}
                    continue
                labels = peer.get("podSelector", {}).get("matchLabels", {})
                name = "dns" if labels.get("k8s-app") == "kube-dns" else labels["app.kubernetes.io/name"]
                allowed |= {(name, port["port"]) for port in rule["ports"]}
    return allowed


@pytest.mark.parametrize("overlay", OVERLAY_NAMES)
def test_egress_is_denied_by_default_with_a_few_destinations(
    rendered: dict[str, list[dict]], overlay: str
) -> None:
    docs = rendered[overlay]
    deny = [
        d
        for d in docs
        if d["kind"] == "NetworkPolicy"
        and d["spec"]["podSelector"] == {}
        and "Egress" in d["spec"]["policyTypes"]
        and not d["spec"].get("egress")
    ]
    assert deny, "no default-deny egress policy"
    dns = {("dns", 53)}
    expected = {
        "catsdogs-api": dns | {("catsdogs-mlflow", 5000), ("catsdogs-postgres", 5432)},
        "catsdogs-mlflow": dns,
        "catsdogs-evaluate": dns | {("catsdogs-api", 8000), ("catsdogs-mlflow", 5000)},
        "catsdogs-train": dns | {("catsdogs-mlflow", 5000)},
        # git host and DVC remote over HTTPS; nothing else reaches outside the cluster
        "catsdogs-retrain": dns | {("catsdogs-mlflow", 5000), ("catsdogs-postgres", 5432), ("internet", 443)},
    }
    seen = set()
    for doc in (d for d in docs if d["kind"] in {"Deployment", "Job", "CronJob"}):
        spec = doc["spec"]["jobTemplate"]["spec"] if doc["kind"] == "CronJob" else doc["spec"]
        labels = spec["template"]["metadata"]["labels"]
        name = labels["app.kubernetes.io/name"]
        seen.add(name)
        assert _egress_destinations(docs, labels) == expected[name], name
    assert seen == set(expected)
