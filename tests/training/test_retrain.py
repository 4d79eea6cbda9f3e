"""`catsdogs retrain` for real: real dvc and git on a tiny DVC project of shell one-liners.

The project's stages stand in for the real ones: `feedback` copies a folder standing in for the
feedback store (no dependencies, `persist: true`, as on main), `ingest` lists it into the manifest,
`train` writes a "model" (and, in one test, registers it as the challenger in a real MLflow registry).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from catsdogs import CatsdogsError
from catsdogs.settings import Settings
from catsdogs.training.retrain import commit_message, retrain
from support import REPO, require_tool

IDENTITY = "catsdogs-retrain-bot <catsdogs-retrain-bot@users.noreply.github.com>"

STAGES = {
    "feedback": {
        "cmd": "mkdir -p data/feedback && cp -R {store}/. data/feedback/",
        "outs": [{"data/feedback": {"persist": True}}],
    },
    "ingest": {
        "cmd": "ls data/feedback | sort > data/manifest.csv",
        "deps": ["data/feedback"],
        "outs": ["data/manifest.csv"],
    },
    "train": {
        "cmd": "wc -l < data/manifest.csv > model.txt",
        "deps": ["data/manifest.csv"],
        "outs": ["model.txt"],
    },
}

REGISTER = """\
import os, sys
from mlflow import MlflowClient
client = MlflowClient(tracking_uri=os.environ["CATSDOGS_MLFLOW_TRACKING_URI"])
name = "catsdogs-classifier"
if not client.search_registered_models(filter_string=f"name = '{name}'"):
    client.create_registered_model(name)
version = client.create_model_version(name, source=os.path.abspath("model.txt"))
client.set_registered_model_alias(name, "challenger", version.version)
"""


def sh(*args: str, cwd: Path) -> str:
    done = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"{args} failed: {done.stdout}{done.stderr}"
    return done.stdout


def make_project(root: Path, store: Path, *, stages: dict | None = None) -> Path:
    """A git repository with DVC initialised, the stages above and a first commit (as someone else)."""
    require_tool("git")
    root.mkdir()
    store.mkdir(exist_ok=True)
    stages = stages if stages is not None else STAGES
    text = yaml.safe_dump({"stages": stages}, sort_keys=False).replace("{store}", str(store))
    (root / "dvc.yaml").write_text(text)
    (root / ".gitignore").write_text("/data/\n/model.txt\n")
    (root / "README").write_text("tiny\n")
    sh("git", "init", "-q", cwd=root)
    sh(sys.executable, "-m", "dvc", "init", "-q", cwd=root)
    sh(sys.executable, "-m", "dvc", "config", "core.analytics", "false", cwd=root)
    sh("git", "add", "-A", cwd=root)
    sh("git", "-c", "user.name=dev", "-c", "user.email=dev@example.com", "commit", "-qm", "init", cwd=root)
    return root


def add_feedback(store: Path, *names: str) -> None:
    for name in names:
        (store / name).write_text(name)


@pytest.fixture(autouse=True)
def _dvc_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DVC_SITE_CACHE_DIR", str(tmp_path / "dvc-site"))
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")


@pytest.fixture
def store(tmp_path: Path) -> Path:
    store = tmp_path / "store"
    store.mkdir()
    add_feedback(store, "cat.1.jpg", "dog.1.jpg")
    return store


@pytest.fixture
def project(tmp_path: Path, store: Path) -> Path:
    return make_project(tmp_path / "project", store)


@pytest.fixture
def settings() -> Settings:
    return Settings()


def lines() -> tuple[list[str], object]:
    seen: list[str] = []
    return seen, seen.append


def test_new_feedback_changes_the_data_version_and_is_committed_as_the_bot(
    project: Path, store: Path, settings: Settings
) -> None:
    seen, echo = lines()
    first = retrain(settings, project=project, commit=True, echo=echo)
    assert first.feedback_refreshed and first.data_version_before is None
    assert first.data_version and first.data_changed and first.commit
    assert (project / "data" / "manifest.csv").read_text() == "cat.1.jpg\ndog.1.jpg\n"
    assert any("Running stage 'ingest'" in line for line in seen)  # dvc's output is streamed

    add_feedback(store, "dog.2.jpg")
    (project / "README").write_text("changed and staged by someone\n")
    sh("git", "add", "README", cwd=project)
    second = retrain(settings, project=project, commit=True, echo=echo)
    assert second.data_changed and second.data_version_before == first.data_version
    assert (project / "data" / "manifest.csv").read_text().count("\n") == 3
    log = sh("git", "log", "-1", "--format=%an <%ae>|%cn <%ce>|%s", cwd=project).strip()
    assert log.split("|")[:2] == [IDENTITY, IDENTITY]
    assert log.split("|")[2] == f"Retrain: data {second.data_version[:12]}, no challenger"
    assert sh("git", "show", "--name-only", "--format=", "HEAD", cwd=project).split() == ["dvc.lock"]
    assert "M  README" in sh("git", "status", "--porcelain", cwd=project)  # still staged, not committed
    lock = yaml.safe_load(sh("git", "show", "HEAD:dvc.lock", cwd=project))
    manifest = next(o for o in lock["stages"]["ingest"]["outs"] if o["path"] == "data/manifest.csv")
    assert manifest["md5"] == second.data_version


def test_nothing_new_means_nothing_to_commit(project: Path, settings: Settings) -> None:
    _, echo = lines()
    retrain(settings, project=project, commit=True, echo=echo)
    head = sh("git", "rev-parse", "HEAD", cwd=project)
    again = retrain(settings, project=project, commit=True, echo=echo)
    assert not again.data_changed and again.data_version
    assert again.commit is None
    assert sh("git", "rev-parse", "HEAD", cwd=project) == head


def test_the_configured_identity_signs_the_commit(project: Path) -> None:
    settings = Settings(retrain_git_name="Ops Bot", retrain_git_email="ops@example.com")
    _, echo = lines()
    assert retrain(settings, project=project, commit=True, echo=echo).commit
    assert sh("git", "log", "-1", "--format=%an <%ae>", cwd=project).strip() == "Ops Bot <ops@example.com>"


def test_push_lands_the_data_in_the_named_remote(project: Path, tmp_path: Path, settings: Settings) -> None:
    remote = tmp_path / "remote"
    sh(sys.executable, "-m", "dvc", "remote", "add", "backup", str(remote), cwd=project)
    _, echo = lines()
    result = retrain(settings, project=project, push="backup", echo=echo)
    assert result.pushed_to == "backup"
    md5 = result.data_version
    assert (remote / "files" / "md5" / md5[:2] / md5[2:]).read_text() == "cat.1.jpg\ndog.1.jpg\n"

    # A fresh clone restores the pushed data from that remote instead of rebuilding it.
    sh("git", "add", "dvc.lock", cwd=project)
    sh("git", "-c", "user.name=t", "-c", "user.email=t@e", "commit", "-qm", "lock", cwd=project)
    clone = tmp_path / "clone"
    sh("git", "clone", "-q", str(project), str(clone), cwd=tmp_path)
    sh(sys.executable, "-m", "dvc", "remote", "add", "--local", "backup", str(remote), cwd=clone)
    pulled = retrain(settings, project=clone, pull="backup", echo=echo)
    assert pulled.data_version == md5 and not pulled.data_changed
    assert (clone / "data" / "manifest.csv").read_text() == "cat.1.jpg\ndog.1.jpg\n"


def test_the_challenger_train_registered_is_reported(tmp_path: Path, store: Path, settings: Settings) -> None:
    stages = {**STAGES, "train": {**STAGES["train"]}}
    stages["train"]["cmd"] = (
        f"wc -l < data/manifest.csv > model.txt && {sys.executable} {tmp_path / 'register.py'}"
    )
    (tmp_path / "register.py").write_text(REGISTER)
    project = make_project(tmp_path / "project", store, stages=stages)
    _, echo = lines()
    first = retrain(settings, project=project, commit=True, echo=echo)
    assert (first.challenger_before, first.challenger, first.new_challenger) == (None, 1, True)
    assert (
        sh("git", "log", "-1", "--format=%s", cwd=project)
        .strip()
        .endswith("challenger catsdogs-classifier v1")
    )
    add_feedback(store, "cat.2.jpg")
    second = retrain(settings, project=project, echo=echo)
    assert (second.challenger_before, second.challenger) == (1, 2)
    unchanged = retrain(settings, project=project, echo=echo)  # nothing new: train does not run
    assert (unchanged.challenger, unchanged.new_challenger) == (2, False)


def test_a_pipeline_without_a_feedback_stage_says_so_and_still_runs(
    tmp_path: Path, store: Path, settings: Settings
) -> None:
    stages = {name: stage for name, stage in STAGES.items() if name != "feedback"}
    stages["ingest"] = {
        "cmd": f"mkdir -p data && ls {store} > data/manifest.csv",
        "outs": ["data/manifest.csv"],
    }
    project = make_project(tmp_path / "project", store, stages=stages)
    seen, echo = lines()
    result = retrain(settings, project=project, echo=echo)
    assert not result.feedback_refreshed and result.data_version
    assert any("no `feedback` stage" in line for line in seen)


def one_line_error(excinfo: pytest.ExceptionInfo[CatsdogsError]) -> str:
    message = str(excinfo.value)
    assert "\n" not in message and message
    return message


def test_a_failing_stage_is_one_line_naming_it(tmp_path: Path, store: Path, settings: Settings) -> None:
    stages = {**STAGES, "ingest": {**STAGES["ingest"], "cmd": "echo 'no space left' >&2; exit 3"}}
    project = make_project(tmp_path / "project", store, stages=stages)
    _, echo = lines()
    with pytest.raises(CatsdogsError) as excinfo:
        retrain(settings, project=project, commit=True, echo=echo)
    message = one_line_error(excinfo)
    assert message.startswith("`dvc repro` failed (exit ") and "ingest" in message, message


def test_an_unknown_remote_is_one_line(project: Path, settings: Settings) -> None:
    _, echo = lines()
    with pytest.raises(CatsdogsError) as excinfo:
        retrain(settings, project=project, push="nowhere", echo=echo)
    assert "nowhere" in one_line_error(excinfo)


def test_a_folder_that_is_no_dvc_project_is_refused(tmp_path: Path, settings: Settings) -> None:
    with pytest.raises(CatsdogsError, match="not a DVC project") as excinfo:
        retrain(settings, project=tmp_path)
    one_line_error(excinfo)


def test_commit_outside_git_is_refused_before_reproducing(tmp_path: Path, settings: Settings) -> None:
    root = tmp_path / "nogit"
    root.mkdir()
    sh(sys.executable, "-m", "dvc", "init", "-q", "--no-scm", cwd=root)
    (root / "dvc.yaml").write_text("stages:\n  make:\n    cmd: touch ran\n")
    with pytest.raises(CatsdogsError, match="git") as excinfo:
        retrain(settings, project=root, commit=True)
    one_line_error(excinfo)
    assert not (root / "ran").exists()


def test_the_commit_message_states_data_and_challenger() -> None:
    from catsdogs.training.retrain import RetrainResult

    result = RetrainResult(Path("."), "a" * 32, "b" * 32, 3, 4, feedback_refreshed=True, pushed_to="storage")
    message = commit_message(result, Settings())
    assert message.splitlines()[0] == f"Retrain: data {'b' * 12}, challenger catsdogs-classifier v4"
    assert "pushed to DVC remote: storage" in message and f"{'a' * 32} -> {'b' * 32}" in message


def test_cli_prints_the_summary_and_errors_on_one_line(project: Path, tmp_path: Path) -> None:
    env_path = f"{Path(sys.executable).parent}:{os.environ['PATH']}"
    command = [sys.executable, "-m", "catsdogs", "retrain", "--commit"]
    env = {**os.environ, "PATH": env_path, "PYTHONPATH": str(REPO / "src")}
    done = subprocess.run(command, cwd=project, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "data version:" in done.stdout and "committed dvc.lock:" in done.stdout
    assert "$ dvc repro" in done.stderr
    failed = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert failed.returncode == 1
    assert failed.stderr.strip().startswith("error:") and "not a DVC project" in failed.stderr
    assert len(failed.stderr.strip().splitlines()) == 1
