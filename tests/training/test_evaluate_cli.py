"""`catsdogs evaluate` on a trained bundle: a labelled folder, a zip archive and a manifest split."""

from __future__ import annotations

import csv
import json
import shutil
import zipfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from catsdogs.cli import app
from catsdogs.training.evaluate import evaluate_bundle
from catsdogs.training.features import read_manifest, split_samples

pytestmark = pytest.mark.slow


def test_evaluate_a_labelled_folder_writes_metrics_and_predictions(head_run, tmp_path: Path) -> None:
    result, _, settings = head_run
    folder = tmp_path / "photos"
    for sample in split_samples(read_manifest(settings.data_dir), "test")[:12]:
        (folder / sample.label).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(sample.path, folder / sample.label / sample.path.name)
    out = tmp_path / "eval"
    run = CliRunner().invoke(
        app, ["evaluate", "--model-uri", str(result.bundle_dir), "--data", str(folder), "--out", str(out)]
    )
    assert run.exit_code == 0, run.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_images"] == 12 and len(metrics["accuracy_ci95"]) == 2
    with (out / "predictions.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 12 and {"image", "label", "predicted", "p_cat", "p_dog"} <= set(rows[0])


def test_evaluate_an_archive_with_flip_tta(head_run, tmp_path: Path) -> None:
    result, _, settings = head_run
    archive = tmp_path / "photos.zip"
    with zipfile.ZipFile(archive, "w") as handle:
        for i, sample in enumerate(split_samples(read_manifest(settings.data_dir), "test")[:10]):
            handle.write(sample.path, f"set/{sample.label}.{i}.jpg")
        handle.writestr("set/notes.txt", "not an image")
        handle.writestr("set/cat.broken.jpg", b"\xff\xd8\xff\xe0 truncated jpeg")
    from catsdogs.bundle import find_bundle

    evaluation = evaluate_bundle(find_bundle(result.bundle_dir), archive, tta=True, progress=False)
    assert evaluation.metrics["tta"] == "hflip"
    assert evaluation.metrics["n_images"] == 10
    assert evaluation.skipped == ["set/cat.broken.jpg"]


def test_evaluate_the_manifest_test_split_reproduces_the_bundle_metrics(head_run) -> None:
    result, _, settings = head_run
    from catsdogs.bundle import find_bundle

    evaluation = evaluate_bundle(
        find_bundle(result.bundle_dir), settings.data_dir, split="test", progress=False
    )
    assert evaluation.metrics["accuracy"] == result.test_metrics["accuracy"]
    assert evaluation.metrics["confusion_matrix"] == result.test_metrics["confusion_matrix"]


def test_evaluate_refuses_a_folder_without_labels(head_run, tmp_path: Path) -> None:
    result, _, _ = head_run
    (tmp_path / "unlabelled").mkdir()
    (tmp_path / "unlabelled" / "photo.jpg").write_bytes(b"x")
    run = CliRunner().invoke(
        app, ["evaluate", "--model-uri", str(result.bundle_dir), "--data", str(tmp_path / "unlabelled")]
    )
    assert run.exit_code != 0
    assert "no labelled images" in str(run.exception)
