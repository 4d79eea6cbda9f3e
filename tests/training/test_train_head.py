"""Smoke training with the real code: a frozen EfficientNet-Lite0, cached features, a linear head,
a complete bundle with a verified ONNX graph and test metrics from that graph."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from catsdogs.bundle import ModelBundle
from catsdogs.files import default_file_mode
from catsdogs.runtime import INPUT_NAME, OUTPUT_NAME, open_session
from catsdogs.training.models import load_model

pytestmark = pytest.mark.slow

METADATA_KEYS = {
    "architecture", "strategy", "profile", "num_classes", "class_names", "created_at",
    "package_version", "git_commit", "data_version", "run_id", "onnx",
}  # fmt: skip
METRICS_KEYS = {
    "accuracy", "accuracy_ci95", "precision", "recall", "f1", "log_loss", "roc_auc", "per_class",
    "confusion_matrix", "n_images", "split",
}  # fmt: skip


def test_smoke_training_learns_cats_and_dogs_from_frozen_features(head_run) -> None:
    result, _, _ = head_run
    assert len(result.history) == 3
    assert result.history[-1]["val_accuracy"] >= 0.9
    assert result.test_metrics["accuracy"] >= 0.9
    assert result.test_metrics["n_images"] == 40


def test_bundle_holds_every_file_of_the_contract(head_run) -> None:
    result, _, _ = head_run
    bundle = ModelBundle.open(result.bundle_dir)
    for name in (
        "weights.pt",
        "model.onnx",
        "preprocessing.json",
        "metadata.json",
        "metrics.json",
        "model_card.md",
    ):
        assert (result.bundle_dir / name).is_file(), name
    assert set(bundle.metadata) >= METADATA_KEYS
    assert set(bundle.metrics) >= METRICS_KEYS
    assert bundle.metrics == result.test_metrics
    low, high = bundle.metrics["accuracy_ci95"]
    assert low <= bundle.metrics["accuracy"] <= high
    labels = sorted({label for _, label in bundle.samples()})
    assert labels == ["cat", "dog"]
    card = (result.bundle_dir / "model_card.md").read_text()
    for section in ("## Data", "## Metrics", "## Intended use", "## Limits", "## Licences"):
        assert section in card


def test_every_bundle_file_has_the_mode_the_umask_gives(head_run) -> None:
    """Another user (the serving image's uid 10001, a read-only mount) can read every file."""
    result, _, _ = head_run
    files = [p for p in result.bundle_dir.rglob("*") if p.is_file()]
    assert files
    modes = {p.relative_to(result.bundle_dir).as_posix(): oct(p.stat().st_mode & 0o777) for p in files}
    assert set(modes.values()) == {oct(default_file_mode())}, modes


def test_evaluation_artifacts_are_written(head_run) -> None:
    result, _, _ = head_run
    for name in ("confusion_matrix.png", "roc_curve.png", "pr_curve.png", "training_curves.png",
                 "misclassified.png", "explained_errors.png", "predictions.csv"):  # fmt: skip
        assert (result.artifacts_dir / name).stat().st_size > 0, name
    rows = (result.artifacts_dir / "predictions.csv").read_text().splitlines()
    assert len(rows) == 1 + result.test_metrics["n_images"]


def test_tracker_receives_params_every_epoch_and_artifacts(head_run) -> None:
    result, tracker, _ = head_run
    assert tracker.params == [result.params]
    assert [epoch for epoch, _ in tracker.epochs] == [1, 2, 3]
    keys = {
        f"{split}_{m}"
        for split in ("train", "val")
        for m in ("loss", "accuracy", "precision", "recall", "f1", "roc_auc")
    }
    assert keys <= set(tracker.epochs[0][1])
    # The figures are the run's artifacts; MlflowTracker.finish logs them (tests/registry).
    assert {path.name for path in result.artifacts_dir.iterdir()} >= {
        "predictions.csv",
        "confusion_matrix.png",
    }


def test_weights_reload_with_weights_only_and_match_the_onnx_graph(head_run) -> None:
    result, _, _ = head_run
    bundle = ModelBundle.open(result.bundle_dir)
    model = load_model(bundle)
    size = bundle.preprocessing.image_size
    x = np.random.default_rng(0).normal(size=(3, 3, size, size)).astype(np.float32)
    with torch.inference_mode():
        expected = model(torch.from_numpy(x)).numpy()
    session = open_session(bundle.onnx_path())
    np.testing.assert_allclose(session.run(None, {INPUT_NAME: x})[0], expected, atol=1e-4)


def test_onnx_graph_has_named_io_and_a_dynamic_batch_axis(head_run) -> None:
    result, _, _ = head_run
    graph = onnx.load(result.bundle_dir / "model.onnx").graph
    assert [i.name for i in graph.input] == [INPUT_NAME] == ["input"]  # the names clients rely on
    # The logits first; then what the unknown detector and /explain read from the same pass.
    assert [o.name for o in graph.output] == [OUTPUT_NAME, "features", "pet_mass", "cam"]
    assert OUTPUT_NAME == "logits"
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param  # symbolic, not a fixed number
    parity = json.loads((result.bundle_dir / "metadata.json").read_text())["onnx"]
    assert parity["passed"] and parity["max_abs_prob_diff"] <= 1e-4 and parity["labels_identical"]
    session = open_session(result.bundle_dir / "model.onnx")
    for batch in (1, 5):
        x = np.zeros((batch, 3, 224, 224), np.float32)
        assert session.run(None, {INPUT_NAME: x})[0].shape == (batch, 2)


def test_second_run_reuses_the_feature_cache(head_run, monkeypatch) -> None:
    from catsdogs.training import strategy_sources as sources_module
    from catsdogs.training.config import preprocess_config_for
    from catsdogs.training.loop import Dist

    _, _, settings = head_run

    def refuse(*args, **kwargs):
        raise AssertionError("features should come from the cache")

    monkeypatch.setattr(sources_module, "feature_extractor", lambda *a, **k: refuse)
    sources = sources_module.head_sources(
        settings, preprocess_config_for(settings), *_splits(settings), Dist()
    )
    assert len(sources[0]) == 2 * 160  # each training image and its mirror image


def _splits(settings):
    from catsdogs.training.features import read_manifest, split_samples

    samples = read_manifest(settings.data_dir)
    return split_samples(samples, "train"), split_samples(samples, "val")
