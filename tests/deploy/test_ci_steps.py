"""scripts/ci_steps.py: the pipelines' shell steps, extracted to run outside their CI
(scripts/ci-in-container.sh), and the runner it writes."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from .conftest import REPO

WORKFLOW = REPO / ".github" / "workflows" / "ci.yml"
OUTSIDE = {"CATSDOGS_DATA_SOURCE": "http://127.0.0.1:1/train.zip", "CATSDOGS_DATA_SHA256": "ab" * 32}


@pytest.fixture(scope="module")
def ci_steps() -> ModuleType:
    spec = importlib.util.spec_from_file_location("ci_steps", REPO / "scripts" / "ci_steps.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_github_test_job_is_the_readme_commands_with_a_stand_in_per_action(ci_steps: ModuleType) -> None:
    env, steps = ci_steps.github_steps(WORKFLOW, "test", OUTSIDE)
    assert [s.script for s in steps if s.script is not None] == ["make setup", "make test"]
    stand_ins = [s.title for s in steps if s.script is None]
    assert [title.split("@")[0] for title in stand_ins] == [
        "uses: actions/checkout",
        "uses: actions/setup-python",
        "uses: actions/cache",
        "uses: actions/upload-artifact",
    ]
    assert env["CATSDOGS_DATA_SOURCE"] == OUTSIDE["CATSDOGS_DATA_SOURCE"]  # ${{ secrets.* }} from outside
    assert env["CATSDOGS_DATA_SHA256"] == OUTSIDE["CATSDOGS_DATA_SHA256"]


def test_jenkins_setup_and_test_stages_are_the_readme_commands(ci_steps: ModuleType) -> None:
    env, steps = ci_steps.jenkins_steps(REPO / "Jenkinsfile", ["Setup", "Test"], OUTSIDE)
    assert [s.script for s in steps if s.script is not None] == ["make setup", "make test"]
    assert env["CATSDOGS_DATA_SOURCE"] == OUTSIDE["CATSDOGS_DATA_SOURCE"]  # a build parameter
    assert env["CI"] == "true"
    assert "--cov=catsdogs" in steps[1].env["PYTEST_ADDOPTS"]
    assert [s.title for s in steps if s.script is None] == [
        "stage Build images",
        "stage Scan",
        "stage Push",
        "stage Deploy",
    ]


def test_an_action_without_a_stand_in_is_refused(ci_steps: ModuleType, tmp_path: Path) -> None:
    workflow = tmp_path / "ci.yml"
    workflow.write_text("jobs:\n  x:\n    steps:\n      - uses: docker/setup-buildx-action@v3\n")
    with pytest.raises(ValueError, match="docker/setup-buildx-action@v3, which has no stand-in"):
        ci_steps.github_steps(workflow, "x", OUTSIDE)


def test_an_expression_only_github_knows_is_refused(ci_steps: ModuleType) -> None:
    with pytest.raises(ValueError, match=r"github\.sha"):
        ci_steps.resolve("echo ${{ github.sha }}", {}, {})


def test_runner_runs_steps_in_order_and_stops_at_the_first_failure(
    ci_steps: ModuleType, tmp_path: Path
) -> None:
    workflow = tmp_path / "ci.yml"
    workflow.write_text(
        "env:\n  GREETING: hello\njobs:\n  test:\n    env:\n      WHO: ${{ vars.WHO }}\n    steps:\n"
        "      - uses: actions/checkout@v4\n"
        '      - run: echo "$GREETING $WHO" > first.txt\n'
        "      - run: |\n          false | cat\n          echo not reached > second.txt\n"
        "      - run: echo never > third.txt\n"
    )
    env, steps = ci_steps.github_steps(workflow, "test", {"WHO": "runner"})
    plan = ci_steps.write_runner(tmp_path / "steps", env, steps, through=None)
    assert len(plan) == 4
    done = subprocess.run(
        [str(tmp_path / "steps" / "run.sh")], cwd=tmp_path, capture_output=True, text=True, timeout=30
    )
    assert (tmp_path / "first.txt").read_text() == "hello runner\n"
    assert done.returncode == 1  # pipefail, as GitHub's bash -eo pipefail
    assert "::: FAILED (exit 1)" in done.stdout
    assert not (tmp_path / "second.txt").exists()
    assert not (tmp_path / "third.txt").exists()


def test_runner_stops_after_the_step_named_by_through(ci_steps: ModuleType, tmp_path: Path) -> None:
    _, steps = ci_steps.github_steps(WORKFLOW, "test", OUTSIDE)
    plan = ci_steps.write_runner(tmp_path, {}, steps, through="make setup")
    assert plan[-2].endswith("Set up the runner: run")
    assert "make test" not in "".join(p.read_text() for p in tmp_path.glob("step-*.sh"))
