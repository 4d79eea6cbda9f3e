"""Training fits each model's unknown detector on its training photos, calibrates it on validation
and reports it on test (``trust_run``: a linear head on frozen Lite2 features, real photos)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from catsdogs.bundle import OOD, ModelBundle, verify_manifest
from catsdogs.ood import FeatureDensity
from catsdogs.training.evaluate import evaluate_bundle


def test_the_bundle_records_the_detector_calibrated_on_validation(trust_run) -> None:
    result, settings = trust_run
    bundle = ModelBundle.open(result.bundle_dir)
    record = bundle.metadata["ood"]
    assert record["fit_images"] == 400 and record["components"] == 100  # a quarter of the images
    assert record["distance_threshold"] > 0 and 0 < record["pet_mass_floor"] < 1
    assert record["target_false_unknown_rate"] == settings.unknown_target_rate
    assert record["val"]["n_images"] == 1000
    assert record["val"]["false_unknown_rate"] <= settings.unknown_target_rate  # what it was set for
    assert record["test"] == {"n_images": 400, "false_unknown_rate": result.test_metrics["unknown_rate"]}
    verify_manifest(bundle.root)  # ood.npz is covered by the manifest like every other file
    assert OOD in json.loads((bundle.root / "manifest.json").read_text())["files"]


def test_the_density_file_holds_arrays_only_and_round_trips(trust_run, tmp_path) -> None:
    result, _ = trust_run
    density = FeatureDensity.load(result.bundle_dir / OOD)
    with np.load(result.bundle_dir / OOD, allow_pickle=False) as arrays:
        assert all(arrays[name].dtype != object for name in arrays.files)
    density.save(tmp_path / "copy.npz")
    again = FeatureDensity.load(tmp_path / "copy.npz")
    features = np.random.default_rng(0).normal(size=(5, density.dim))
    np.testing.assert_allclose(again.distance(features), density.distance(features), rtol=1e-5)


def test_evaluate_reports_the_same_unknown_rate_as_training(trust_run) -> None:
    result, settings = trust_run
    metrics = evaluate_bundle(
        ModelBundle.open(result.bundle_dir), settings.manifest_path, split="test", progress=False
    ).metrics
    assert metrics["unknown_rate"] == pytest.approx(result.test_metrics["unknown_rate"])
    assert metrics["accuracy"] == pytest.approx(result.test_metrics["accuracy"])  # argmax, as before


def test_a_corrupt_density_file_is_refused_in_one_line(tmp_path) -> None:
    from catsdogs import CatsdogsError

    path = tmp_path / OOD
    path.write_bytes(b"not an npz")
    with pytest.raises(CatsdogsError, match="is not a feature density file"):
        FeatureDensity.load(path)
