"""What `model.onnx` computes besides the logits: pooled features, ImageNet pet mass, activation maps."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from catsdogs.preprocessing import PreprocessConfig
from catsdogs.runtime import CAM_NAME, FEATURES_NAME, OUTPUT_NAME, PET_MASS_NAME, open_session, output_names
from catsdogs.training.export import export_model
from catsdogs.training.models import ModelSpec, build_model

SIZE = 96


def _export(
    spec: ModelSpec, tmp_path: Path
) -> tuple[torch.nn.Module, dict[str, np.ndarray], tuple[str, ...]]:
    torch.manual_seed(0)
    model = build_model(spec, PreprocessConfig(image_size=SIZE), pretrained=False).eval()
    path = export_model(model, tmp_path / "model.onnx", image_size=SIZE)
    session = open_session(path)
    batch = np.random.default_rng(0).normal(size=(3, 3, SIZE, SIZE)).astype(np.float32)
    names = output_names(session)
    return model, dict(zip(names, session.run(list(names), {"input": batch}), strict=True)), names


def test_a_linear_head_exports_exact_activation_maps_whose_mean_is_the_logits(tmp_path: Path) -> None:
    _, out, names = _export(ModelSpec("efficientnet_lite0", head="linear"), tmp_path)
    assert names == (OUTPUT_NAME, FEATURES_NAME, PET_MASS_NAME, CAM_NAME)
    assert out[FEATURES_NAME].shape == (3, 1280) and out[CAM_NAME].shape == (3, 2, 3, 3)
    np.testing.assert_allclose(out[CAM_NAME].mean(axis=(2, 3)), out[OUTPUT_NAME], atol=1e-4)
    assert ((out[PET_MASS_NAME] >= 0) & (out[PET_MASS_NAME] <= 1)).all()


def test_an_ensemble_averages_its_members_maps_and_concatenates_their_features(tmp_path: Path) -> None:
    _, out, names = _export(ModelSpec("efficientnet_lite0", members=2), tmp_path)
    assert CAM_NAME in names and out[FEATURES_NAME].shape == (3, 2 * 1280)
    assert out[CAM_NAME].shape == (3, 2, 3, 3)


@pytest.mark.parametrize(("spec", "expected"), [
    (ModelSpec("efficientnet_lite0", head="mlp"), (OUTPUT_NAME, FEATURES_NAME, PET_MASS_NAME)),
    (ModelSpec("simple_cnn"), (OUTPUT_NAME, FEATURES_NAME)),
])  # fmt: skip
def test_models_without_a_linear_head_on_pretrained_features_export_no_maps(
    spec: ModelSpec, expected: tuple[str, ...], tmp_path: Path
) -> None:
    model, out, names = _export(spec, tmp_path)
    assert names == expected
    batch = torch.from_numpy(np.random.default_rng(0).normal(size=(3, 3, SIZE, SIZE)).astype(np.float32))
    with torch.inference_mode():
        np.testing.assert_allclose(model(batch).numpy(), out[OUTPUT_NAME], atol=1e-4)
