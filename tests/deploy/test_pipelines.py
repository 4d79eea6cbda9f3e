"""The delivery pipelines, read statically: a fork cannot drive the CD workflow, every shell step
fails on a failing pipe, every third-party action is pinned by commit SHA, an empty digest stops the
deploy, and Jenkins publishes images from main only."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from .conftest import PINNED_IMAGES, REPO

WORKFLOWS = REPO / ".github" / "workflows"
CD = WORKFLOWS / "cd.yml"
#: ``owner/repo[/path]@<40 hex> # <tag>``: a commit SHA, and the release it was taken from.
PINNED_USE = re.compile(r"^[\w.-]+/[\w./-]+@[0-9a-f]{40} # v?\d+(\.\d+)*$")


def _workflow(path: Path) -> dict:
    # PyYAML reads the key `on` as True (YAML 1.1).
    doc = yaml.safe_load(path.read_text())
    doc["on"] = doc.pop(True, doc.get("on"))
    return doc


def _uses_lines(path: Path) -> list[str]:
    return [
        line.split("uses:", 1)[1].strip()
        for line in path.read_text().splitlines()
        if re.match(r"^\s*(- )?uses:", line)
    ]


def _deploy_job() -> dict:
    return _workflow(CD)["jobs"]["deploy"]


def _step(name_start: str) -> dict:
    steps = [s for s in _deploy_job()["steps"] if s.get("name", "").startswith(name_start)]
    assert len(steps) == 1, name_start
    return steps[0]


def test_cd_deploys_only_pushes_to_main_of_this_repository() -> None:
    workflow = _workflow(CD)
    assert workflow["on"]["workflow_run"] == {
        "workflows": ["CI"],
        "types": ["completed"],
        "branches": ["main"],
    }
    condition = " ".join(_deploy_job()["if"].split())
    for clause in (
        "github.event.workflow_run.conclusion == 'success'",
        "github.event.workflow_run.event == 'push'",
        "github.event.workflow_run.head_branch == 'main'",
        "github.event.workflow_run.head_repository.full_name == github.repository",
        "github.event_name == 'workflow_dispatch' && github.ref == 'refs/heads/main'",
    ):
        assert clause in condition, clause
    # The workflow_run branch (the trigger itself) carries every check: no `||` inside it.
    run_branch = condition.split("||", 1)[1]
    assert "||" not in run_branch and run_branch.count("&&") == 4
    assert workflow["permissions"] == {"contents": "read", "packages": "read"}
    checkout = _deploy_job()["steps"][0]
    assert (
        checkout["uses"].startswith("actions/checkout@") and checkout["with"]["persist-credentials"] is False
    )


@pytest.mark.parametrize("path", sorted(WORKFLOWS.glob("*.yml")), ids=lambda p: p.name)
def test_every_shell_step_runs_with_pipefail(path: Path) -> None:
    workflow = _workflow(path)
    default = workflow["defaults"]["run"]["shell"]
    assert default.startswith("bash ") and "pipefail" in default and "-e" in default
    for job in workflow["jobs"].values():
        assert "pipefail" in job.get("defaults", {}).get("run", {}).get("shell", default)
        for step in job["steps"]:
            if "run" in step:
                assert "pipefail" in step.get("shell", default), step.get("name", step["run"][:40])


@pytest.mark.parametrize("path", sorted(WORKFLOWS.glob("*.yml")), ids=lambda p: p.name)
def test_every_third_party_action_is_pinned_by_commit_sha(path: Path) -> None:
    uses = _uses_lines(path)
    assert uses
    unpinned = [use for use in uses if not use.startswith("./") and not PINNED_USE.match(use)]
    assert unpinned == []
    # One SHA per action throughout the repository's workflows (a bump updates every use).
    shas: dict[str, set[str]] = {}
    for workflow in WORKFLOWS.glob("*.yml"):
        for use in _uses_lines(workflow):
            action, _, rest = use.partition("@")
            shas.setdefault(action, set()).add(rest)
    assert {action: refs for action, refs in shas.items() if len(refs) > 1} == {}


def test_an_empty_or_placeholder_digest_stops_the_deploy() -> None:
    names = [step.get("name", step.get("uses", "")) for step in _deploy_job()["steps"]]
    check = _step("Check the digests")
    assert names.index(check["name"]) < names.index(_step("Pin the images")["name"])
    assert names.index(check["name"]) < names.index(_step("Apply")["name"])
    assert "@sha256:[0-9a-f]{64}$" in check["run"] and "exit 1" in check["run"]
    assert set(check["env"]) == {"SERVE", "TRAIN", "MLFLOW"}


@pytest.mark.parametrize(
    ("ref", "stops"),
    [
        ("ghcr.io/o/catsdogs-serve@", True),
        ("", True),
        ("ghcr.io/o/catsdogs-serve@sha256:" + "0" * 64, True),
        ("ghcr.io/o/catsdogs-serve@sha256:" + "ab" * 32, False),
    ],
)
def test_the_digest_check_step_really_stops(ref: str, stops: bool, tmp_path: Path) -> None:
    """Run the step's own script under the workflow's shell."""
    import subprocess

    shell = _workflow(CD)["defaults"]["run"]["shell"]
    script = tmp_path / "step.sh"
    script.write_text(_step("Check the digests")["run"])
    good = "ghcr.io/o/x@sha256:" + "cd" * 32
    env = {"PATH": "/usr/bin:/bin", "SERVE": ref, "TRAIN": good, "MLFLOW": good}
    done = subprocess.run(shell.format(script).split(), env=env, capture_output=True, text=True)
    assert (done.returncode != 0) is stops, done.stderr


def test_the_pipeline_pins_every_image_the_production_overlay_runs() -> None:
    pin = _step("Pin the images")
    assert pin["working-directory"] == "deploy/k8s/overlays/production"
    assert "kustomize edit set image" in pin["run"]
    pinned = set(re.findall(r'"(ghcr\.io/catsdogs/catsdogs-[a-z]+)=\$\w+"', pin["run"]))
    assert pinned == set(PINNED_IMAGES)
    render = _step("Render the production overlay")
    assert _deploy_job()["steps"].index(pin) < _deploy_job()["steps"].index(render)
    assert "--public-smoke" in _step("Apply")["run"]


def test_jenkins_pushes_images_from_main_only() -> None:
    text = (REPO / "Jenkinsfile").read_text()
    push = text[text.index("stage('Push')") : text.index("stage('Deploy')")]
    assert re.search(r"when\s*\{\s*branch 'main'\s*\}", push)
    assert push.index("when") < push.index("withCredentials")
    assert "serve.digest" in push and "sha256:[0-9a-f]{64}" in push
