"""The DVC pipeline as shipped (dvc.yaml, params.yaml, .dvc/config), run for real on a small archive."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import yaml
from datafiles import kaggle_members, write_zip

from support import dvc_project, run_in_project

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture
def project(tmp_path: Path, real_photos) -> Path:
    """A fresh git repo holding this project's DVC files and sources, ingesting a 40-photo archive."""
    archive = write_zip(tmp_path / "train.zip", kaggle_members(real_photos, 20))
    return dvc_project(tmp_path / "project", data_source=str(archive))


def test_dvc_repro_tracks_data_and_push_pull_round_trip_offline(project: Path) -> None:
    run_in_project("dvc", "repro", "ingest", cwd=project)
    manifest = (project / "data" / "manifest.csv").read_bytes()
    assert manifest.count(b"\n") == 41
    archive = (project / "data" / "raw" / "dataset").read_bytes()  # the fetch stage's copy
    params = yaml.safe_load((project / "params.yaml").read_text())
    assert archive == Path(params["data_source"]).read_bytes()
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    assert [out["path"] for out in lock["stages"]["fetch"]["outs"]] == ["data/raw/dataset"]
    assert {dep["path"] for dep in lock["stages"]["ingest"]["deps"]} >= {"data/raw/dataset"}
    assert {out["path"] for out in lock["stages"]["ingest"]["outs"]} >= {"data/images", "data/manifest.csv"}
    assert "Stage 'ingest' didn't change, skipping" in run_in_project("dvc", "repro", "ingest", cwd=project)
    git_status = run_in_project("git", "status", "--porcelain", "--untracked-files=all", cwd=project)
    assert "data/" not in git_status  # DVC tracks data/, git does not
    assert "dvc.lock" in git_status

    run_in_project("dvc", "push", "fetch", "feedback", "ingest", cwd=project)
    assert (project / "dvc-remote" / "files" / "md5").is_dir()
    shutil.rmtree(project / "data")
    shutil.rmtree(project / ".dvc" / "cache")
    run_in_project("dvc", "pull", "fetch", "feedback", "ingest", cwd=project)
    assert (project / "data" / "manifest.csv").read_bytes() == manifest
    assert (project / "data" / "raw" / "dataset").read_bytes() == archive
    assert len(list((project / "data" / "images").rglob("*.jpg"))) == 40
    assert "Data and pipelines are up to date" in run_in_project(
        "dvc", "status", "fetch", "feedback", "ingest", cwd=project
    )


def test_changing_a_parameter_reruns_the_stage(project: Path) -> None:
    run_in_project("dvc", "repro", "ingest", cwd=project)
    before = (project / "data" / "manifest.csv").read_text()
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["seed"] = 7
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    assert "ingest" in run_in_project("dvc", "status", cwd=project)
    run_in_project("dvc", "repro", "ingest", cwd=project)
    after = (project / "data" / "manifest.csv").read_text()
    assert sorted(before.splitlines()[1:]) != sorted(after.splitlines()[1:])
    assert [line.split(",")[2] for line in before.splitlines()] == [
        line.split(",")[2] for line in after.splitlines()
    ]


def test_the_pipeline_runs_fetch_ingest_train_export_evaluate(project: Path) -> None:
    """Every stage's parameters exist in params.yaml and the stages chain through their outputs."""
    dag = run_in_project("dvc", "dag", "--md", cwd=project)
    nodes = dict(re.findall(r'(node\d+)\["(\w+)"\]', dag))
    edges = {(nodes[a], nodes[b]) for a, b in re.findall(r"(node\d+)-->(node\d+)", dag)}
    assert {
        ("fetch", "ingest"),
        ("feedback", "ingest"),
        ("ingest", "train"),
        ("train", "export"),
        ("export", "evaluate"),
        ("ingest", "evaluate"),
    } <= edges
    status = run_in_project("dvc", "status", cwd=project)  # parses dvc.yaml and resolves every params entry
    assert all(stage in status for stage in ("fetch", "train", "export", "evaluate"))
