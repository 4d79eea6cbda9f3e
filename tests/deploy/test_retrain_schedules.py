"""The two schedules of `catsdogs retrain`: the Kubernetes CronJob and the GitHub Actions workflow.

actionlint and checkov run on the workflow with the others (test_lint.py), kubernetes-validate and
checkov on the CronJob with every rendered overlay (test_manifests.py); here: what they run, in which
order, with which rights.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

from .conftest import REPO, find, require_tool

pytestmark = pytest.mark.integration

WORKFLOW = REPO / ".github" / "workflows" / "retrain.yml"
RETRAIN = "catsdogs --log-level INFO retrain --pull storage --push storage --commit"
SHA_PIN = re.compile(r"^[\w.-]+/[\w.-]+@[0-9a-f]{40}$")


def is_weekly(cron: str) -> bool:
    minute, hour, day, month, weekday = cron.split()
    return minute.isdigit() and hour.isdigit() and day == month == "*" and weekday.isdigit()


def in_order(text: str, *needles: str) -> bool:
    positions = [text.find(needle) for needle in needles]
    return -1 not in positions and positions == sorted(positions)


@pytest.mark.parametrize("overlay", ["local", "production"])
def test_cronjob_promotes_a_shadowed_challenger_then_retrains_weekly_one_at_a_time_and_pushes(
    rendered: dict[str, list[dict]], overlay: str
) -> None:
    cronjob = find(rendered[overlay], "CronJob", "catsdogs-retrain")
    spec = cronjob["spec"]
    assert is_weekly(spec["schedule"]) and spec["concurrencyPolicy"] == "Forbid"
    assert spec["suspend"] is True  # enabled by hand once the repository, token and remote exist
    job = spec["jobTemplate"]["spec"]
    assert job["backoffLimit"] == 0  # a half-done run (data or commit pushed) is not replayed
    pod = job["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"].split("/")[-1].startswith("catsdogs-train")
    script = container["args"][0]
    assert in_order(
        script,
        "git clone",
        ".dvc/config.local",
        "catsdogs promote --require-shadow 500",
        RETRAIN,
        "git push origin",
    )
    env = {item["name"]: item for item in container["env"]}
    # The pipeline writes into the checkout (dvc.yaml's paths), whatever the image's defaults say.
    assert env["CATSDOGS_DATA_DIR"]["value"] == "data" and env["CATSDOGS_RUNS_DIR"]["value"] == "runs"
    assert env["GIT_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "catsdogs-retrain", "key": "git-token"}
    assert "GIT_TOKEN" not in script  # only git's credential helper reads it
    assert [mount["mountPath"] for mount in container["volumeMounts"]] == ["/tmp"]


def test_cronjob_script_is_valid_shell(rendered: dict[str, list[dict]], tmp_path: Path) -> None:
    container = find(rendered["production"], "CronJob", "catsdogs-retrain")["spec"]["jobTemplate"]["spec"]
    command = container["template"]["spec"]["containers"][0]["command"]
    assert command[:2] == ["/bin/sh", "-eu"]
    script = tmp_path / "retrain.sh"
    script.write_text(container["template"]["spec"]["containers"][0]["args"][0])
    done = subprocess.run([require_tool("sh"), "-n", str(script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def _workflow() -> dict:
    workflow = yaml.safe_load(WORKFLOW.read_text())
    workflow["on"] = workflow.pop(True)  # YAML 1.1 reads the key `on` as true
    return workflow


def test_workflow_runs_weekly_and_by_hand_with_least_privilege() -> None:
    workflow = _workflow()
    assert [is_weekly(entry["cron"]) for entry in workflow["on"]["schedule"]] == [True]
    assert "workflow_dispatch" in workflow["on"]
    assert workflow["permissions"] == {}
    jobs = workflow["jobs"]
    assert jobs["retrain"]["permissions"] == {"contents": "write"}  # it pushes the dvc.lock commit
    assert jobs["promote"]["permissions"] == {"contents": "read"}
    assert jobs["retrain"]["needs"] == "promote"  # last week's challenger first, then a new one
    runs = [step.get("run", "") for step in jobs["retrain"]["steps"]]
    assert RETRAIN in runs[runs.index(next(run for run in runs if RETRAIN in run))]
    assert in_order("\n".join(runs), RETRAIN, "push origin")
    promote = "\n".join(step.get("run", "") for step in jobs["promote"]["steps"])
    assert in_order(promote, "dvc pull --remote storage ingest", "catsdogs promote --require-shadow 500")
    (gate,) = [step for step in jobs["promote"]["steps"] if "catsdogs promote" in step.get("run", "")]
    assert gate["continue-on-error"] is True  # a refused challenger does not stop the retraining


def test_workflow_secrets_come_from_secrets_and_actions_are_pinned_like_cd() -> None:
    text = WORKFLOW.read_text()
    for name in ("CATSDOGS_MLFLOW_TRACKING_URI", "CATSDOGS_FEEDBACK_STORE_URL", "DVC_CONFIG"):
        assert "${{ secrets." + name + " }}" in text
    cd = (REPO / ".github" / "workflows" / "cd.yml").read_text()
    pinned_in_cd = dict(re.findall(r"uses: ([\w.-]+/[\w.-]+)@([0-9a-f]{40})", cd))
    uses = [step["uses"] for job in _workflow()["jobs"].values() for step in job["steps"] if "uses" in step]
    assert uses
    for ref in uses:
        assert SHA_PIN.match(ref), ref
        action, sha = ref.split("@")
        assert pinned_in_cd.get(action, sha) == sha, f"{action} is pinned to another SHA than in cd.yml"
    # Every checkout leaves no token behind; the push hands git the token through a helper.
    checkouts = [
        s for j in _workflow()["jobs"].values() for s in j["steps"] if "checkout" in s.get("uses", "")
    ]
    assert all(step["with"]["persist-credentials"] is False for step in checkouts)


def test_workflow_scripts_are_valid_bash(tmp_path: Path) -> None:
    bash = require_tool("bash")
    for job in _workflow()["jobs"].values():
        for index, step in enumerate(job["steps"]):
            if "run" not in step:
                continue
            script = tmp_path / f"step{index}.sh"
            script.write_text(step["run"])
            done = subprocess.run([bash, "-n", str(script)], capture_output=True, text=True)
            assert done.returncode == 0, (step.get("name"), done.stderr)
