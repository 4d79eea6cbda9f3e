"""`catsdogs export`: a parity-checked ONNX graph, and an INT8 variant guarded by its accuracy drop."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from catsdogs import CatsdogsError
from catsdogs.bundle import verify_manifest
from catsdogs.cli import app
from catsdogs.training.export import check_parity, export_onnx, export_verified
from catsdogs.training.models import SimpleCNN

pytestmark = pytest.mark.slow


def _bundle_copy(cnn_run, tmp_path: Path) -> Path:
    result, _ = cnn_run
    copy = tmp_path / "bundle"
    shutil.copytree(result.bundle_dir, copy)
    return copy


def test_export_rewrites_model_onnx_and_records_parity_on_real_images(cnn_run, tmp_path: Path) -> None:
    bundle = _bundle_copy(cnn_run, tmp_path)
    (bundle / "model.onnx").unlink()
    _, settings = cnn_run
    run = CliRunner().invoke(
        app, ["export", "--model-uri", str(bundle), "--data-dir", str(settings.data_dir)]
    )
    assert run.exit_code == 0, run.output
    parity = json.loads((bundle / "metadata.json").read_text())["onnx"]
    assert (bundle / "model.onnx").is_file()
    assert parity["passed"] and parity["labels_identical"] and parity["max_abs_prob_diff"] <= 1e-4
    # With the dataset at hand the unknown detector is fitted anew (the CNN has no ImageNet head).
    ood = json.loads((bundle / "metadata.json").read_text())["ood"]
    assert ood["distance_threshold"] > 0 and ood["pet_mass_floor"] is None
    assert ood["val"]["n_images"] == 40 and ood["test"]["n_images"] == 40
    verify_manifest(bundle)
    assert parity["n_images"] == 8 + 32  # the bundle's samples and 32 validation images
    assert verify_manifest(bundle) is not None  # the manifest names the new graph and metadata


def test_int8_export_reports_its_accuracy_drop_on_val_and_test(cnn_run, tmp_path: Path, monkeypatch) -> None:
    bundle = _bundle_copy(cnn_run, tmp_path)
    _, settings = cnn_run
    monkeypatch.setenv("CATSDOGS_INT8_MAX_ACCURACY_DROP", "1.0")  # accept any drop: this checks the report
    monkeypatch.setenv("CATSDOGS_INT8_CALIBRATION_IMAGES", "64")
    run = CliRunner().invoke(
        app, ["export", "--model-uri", str(bundle), "--int8", "--data-dir", str(settings.data_dir)]
    )
    assert run.exit_code == 0, run.output
    report = json.loads((bundle / "metadata.json").read_text())["int8"]
    assert (bundle / "model.int8.onnx").is_file()
    assert report["accepted"] and report["calibration_images"] == 64
    for split in ("val", "test"):
        assert report[split]["drop"] == pytest.approx(
            report[split]["fp32_accuracy"] - report[split]["int8_accuracy"]
        )


def test_int8_export_is_refused_when_it_loses_too_much_accuracy(cnn_run, tmp_path: Path, monkeypatch) -> None:
    bundle = _bundle_copy(cnn_run, tmp_path)
    _, settings = cnn_run
    monkeypatch.setenv("CATSDOGS_INT8_MAX_ACCURACY_DROP", "-1.0")  # no model can gain 100 points
    monkeypatch.setenv("CATSDOGS_INT8_CALIBRATION_IMAGES", "32")
    run = CliRunner().invoke(
        app, ["export", "--model-uri", str(bundle), "--int8", "--data-dir", str(settings.data_dir)]
    )
    assert isinstance(run.exception, CatsdogsError)
    assert "INT8 model refused" in str(run.exception)
    assert not (bundle / "model.int8.onnx").exists()
    assert verify_manifest(bundle) is not None  # model.onnx was re-exported before the refusal


def _export_to_folder(cnn_run, tmp_path: Path, monkeypatch, *, max_drop: str, previous: str):
    """Export a copy of the trained bundle with --int8 --out into a folder holding an older export."""
    bundle = _bundle_copy(cnn_run, tmp_path)
    _, settings = cnn_run
    monkeypatch.setenv("CATSDOGS_INT8_MAX_ACCURACY_DROP", max_drop)
    monkeypatch.setenv("CATSDOGS_INT8_CALIBRATION_IMAGES", "32")
    out = tmp_path / "exported"
    out.mkdir()
    (out / "previous.txt").write_text(previous)
    args = [
        "export",
        "--model-uri",
        str(bundle),
        "--int8",
        "--data-dir",
        str(settings.data_dir),
        "--out",
        str(out),
    ]
    return bundle, out, CliRunner().invoke(app, args)


def test_export_to_another_folder_leaves_the_source_bundle_untouched(
    cnn_run, tmp_path: Path, monkeypatch
) -> None:
    bundle, out, run = _export_to_folder(cnn_run, tmp_path, monkeypatch, max_drop="1.0", previous="stale")
    assert run.exit_code == 0, run.output
    trained = {p.name: p.read_bytes() for p in cnn_run[0].bundle_dir.iterdir() if p.is_file()}
    assert {p.name: p.read_bytes() for p in bundle.iterdir() if p.is_file()} == trained
    assert (out / "model.int8.onnx").is_file() and not (out / "previous.txt").exists()
    assert json.loads((out / "metadata.json").read_text())["int8"]["accepted"]
    assert verify_manifest(out) is not None and "model.int8.onnx" in (out / "manifest.json").read_text()
    assert json.loads(run.output)["int8"]["accepted"] and not list(tmp_path.glob(".exported*"))


def test_a_refused_export_to_another_folder_keeps_the_previous_output(
    cnn_run, tmp_path: Path, monkeypatch
) -> None:
    # no model can gain 100 points, so the INT8 gate refuses
    _, out, run = _export_to_folder(
        cnn_run, tmp_path, monkeypatch, max_drop="-1.0", previous="last good export"
    )
    assert isinstance(run.exception, CatsdogsError)
    assert (out / "previous.txt").read_text() == "last good export"
    assert not list(tmp_path.glob(".exported*"))


def test_a_graph_that_disagrees_with_pytorch_is_refused(tmp_path: Path) -> None:
    torch.manual_seed(0)
    exported, other = SimpleCNN().eval(), SimpleCNN().eval()
    batch = np.random.default_rng(0).normal(size=(4, 3, 64, 64)).astype(np.float32)
    export_onnx(exported, tmp_path / "a.onnx", image_size=64)
    assert not check_parity(other, tmp_path / "a.onnx", batch).passed
    assert check_parity(exported, tmp_path / "a.onnx", batch).passed


def test_export_verified_deletes_a_failing_graph(tmp_path: Path, monkeypatch) -> None:
    from catsdogs.training import export as export_module

    model = SimpleCNN().eval()
    batch = np.zeros((2, 3, 64, 64), np.float32)
    real_check = export_module.check_parity

    def tampered(m, path, b):  # the graph is compared with a different model
        return real_check(SimpleCNN().eval(), path, b + 1)

    monkeypatch.setattr(export_module, "check_parity", tampered)
    with pytest.raises(CatsdogsError, match="ONNX parity failed"):
        export_verified(model, tmp_path / "m.onnx", image_size=64, parity_batch=batch)
    assert not (tmp_path / "m.onnx").exists()
