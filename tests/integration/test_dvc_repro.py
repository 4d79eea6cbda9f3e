"""`dvc repro` of the whole shipped pipeline (fetch, feedback → ingest → train → export → evaluate)
on a small real subset, then a second `dvc repro` that finds nothing to do."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
import yaml

from support import TINY_PIPELINE, dataset_photos, dvc_project, run_in_project

pytestmark = [pytest.mark.integration, pytest.mark.slow]
PER_CLASS = 40
STAGES = ("fetch", "feedback", "ingest", "train", "export", "evaluate")


@pytest.fixture
def subset(dataset_zip: Path, tmp_path: Path) -> Path:
    """40 real photos per class, in the public archive's PetImages layout."""
    archive = tmp_path / "subset.zip"
    with zipfile.ZipFile(archive, "w") as handle:
        for label in ("cat", "dog"):
            for i, data in enumerate(dataset_photos(dataset_zip, label, PER_CLASS)):
                handle.writestr(f"PetImages/{label.title()}/{i}.jpg", data)
    return archive


def test_dvc_repro_runs_every_stage_once_and_then_nothing(subset: Path, tmp_path: Path) -> None:
    project = dvc_project(tmp_path / "project", data_source=str(subset), **TINY_PIPELINE)
    first = run_in_project("dvc", "repro", cwd=project, timeout=600)
    assert [f"Running stage '{stage}'" in first for stage in STAGES] == [True] * len(STAGES), first

    assert (project / "data" / "raw" / "dataset").read_bytes() == subset.read_bytes()
    report = json.loads((project / "data" / "data_report.json").read_text())
    assert report["layout"] == "petimages" and report["counts"]["manifest_rows"] == 2 * PER_CLASS
    assert (project / "runs" / "dvc" / "bundle" / "model.onnx").is_file()
    assert {"model.onnx", "model.int8.onnx"} <= {
        p.name for p in (project / "runs" / "dvc" / "export").iterdir()
    }
    metrics = json.loads((project / "reports" / "evaluation" / "metrics.json").read_text())
    test_rows = sum(counts["test"] for counts in report["per_class"].values())
    assert metrics["n_images"] == test_rows > 0 and 0.0 <= metrics["accuracy"] <= 1.0
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    assert set(lock["stages"]) == set(STAGES)

    second = run_in_project("dvc", "repro", cwd=project, timeout=300)
    assert "Running stage" not in second, second
    assert "Data and pipelines are up to date" in second
