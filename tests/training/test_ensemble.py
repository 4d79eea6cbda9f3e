"""Ensembles: each member trains with its own seed in its own folder, the bundle serves them as one
graph whose probabilities are the members' mean, and the run records every member."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from catsdogs import CatsdogsError
from catsdogs.bundle import ModelBundle
from catsdogs.preprocessing import PreprocessConfig
from catsdogs.runtime import INPUT_NAME, open_session
from catsdogs.settings import Settings
from catsdogs.training.loop import CHECKPOINT
from catsdogs.training.models import Ensemble, ModelSpec, build_model, load_model

SIZE_224 = PreprocessConfig(image_size=224)


def test_the_ensemble_outputs_logits_whose_softmax_is_the_mean_of_its_members() -> None:
    torch.manual_seed(0)
    members = [nn.Sequential(nn.Flatten(), nn.Linear(12, 2)) for _ in range(3)]
    x = torch.randn(5, 3, 2, 2)
    expected = torch.stack([torch.softmax(member(x), dim=1) for member in members]).mean(dim=0)
    torch.testing.assert_close(torch.softmax(Ensemble(members)(x), dim=1), expected)


def test_a_spec_with_several_members_builds_an_ensemble_and_survives_its_round_trip() -> None:
    spec = ModelSpec("efficientnet_lite0", members=2)
    assert ModelSpec.from_dict(spec.to_dict()) == spec
    model = build_model(spec, SIZE_224, pretrained=False)
    assert isinstance(model, Ensemble) and len(model.members) == 2
    # Bundles written before ensembles existed hold one model.
    assert ModelSpec.from_dict({"architecture": "simple_cnn", "image_size": 128}).members == 1


def test_members_of_different_backbones_are_built_each_as_its_own_model() -> None:
    archs = ("efficientnet_lite0", "efficientnet_lite1")
    spec = ModelSpec("efficientnet_lite0", members=2, member_architectures=archs)
    assert ModelSpec.from_dict(spec.to_dict()) == spec
    assert [spec.member(i).architecture for i in (0, 1)] == list(archs)
    model = build_model(spec, SIZE_224, pretrained=False)
    for member, arch in zip(model.members, archs, strict=True):
        alone = build_model(ModelSpec(arch), SIZE_224, pretrained=False)
        assert member.state_dict().keys() == alone.state_dict().keys()
        assert all(v.shape == alone.state_dict()[k].shape for k, v in member.state_dict().items())
    with pytest.raises(CatsdogsError, match="do not fit"):
        ModelSpec("efficientnet_lite0", members=3, member_architectures=archs)


def test_member_architectures_set_the_ensemble_and_refuse_a_contradicting_member_count() -> None:
    from catsdogs.training.config import preprocess_config_for, resolve_spec

    archs = ["efficientnet_lite2", "efficientnet_lite1"]
    settings = Settings(ensemble_architectures=archs, image_size=256)
    spec, strategy = resolve_spec(settings)
    assert (spec.architecture, spec.members, spec.member_architectures) == (archs[0], 2, tuple(archs))
    assert strategy == "finetune" and preprocess_config_for(settings).image_size == 256  # one input for all
    same, _ = resolve_spec(Settings(ensemble_architectures=["efficientnet_lite0"] * 2))
    assert (same.members, same.member_architectures) == (2, ())  # plain seeds of one model
    with pytest.raises(CatsdogsError, match="3 ensemble members but 2"):
        resolve_spec(Settings(ensemble_architectures=archs, ensemble_members=3))
    with pytest.raises(CatsdogsError, match="from scratch"):
        resolve_spec(Settings(ensemble_architectures=["simple_cnn", "efficientnet_lite0"]))


def test_the_cli_trains_one_member_per_comma_separated_model(monkeypatch) -> None:
    from typer.testing import CliRunner

    from catsdogs.cli import app
    from catsdogs.training import train as train_module
    from catsdogs.training.config import resolve_spec

    seen: list[Settings] = []

    def fake_train(settings: Settings, **_: object) -> SimpleNamespace:
        seen.append(settings)
        return SimpleNamespace(test_metrics={})

    monkeypatch.setattr(train_module, "train", fake_train)
    args = ["train", "--model", "efficientnet_lite2, efficientnet_lite1", "--no-track"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    spec, _ = resolve_spec(seen[0])
    assert spec.member_architectures == ("efficientnet_lite2", "efficientnet_lite1")


@pytest.mark.slow
def test_members_train_with_their_own_seeds_and_the_bundle_serves_their_mean(ensemble_run) -> None:
    result, _, _ = ensemble_run
    assert result.params["ensemble_members"] == 2 and result.test_metrics["accuracy"] >= 0.9
    assert all((result.run_dir / f"member{i}" / CHECKPOINT).is_file() for i in (0, 1))
    bundle = ModelBundle.open(result.bundle_dir)
    assert bundle.metadata["members"] == 2 and bundle.metadata["onnx"]["passed"]
    assert bundle.metadata["val_metrics"]["member_best_epochs"] == [2, 2]
    assert "An ensemble of 2 efficientnet_lite0 models" in (result.bundle_dir / "model_card.md").read_text()
    model = _load(result.bundle_dir)
    first, second = (member.head[-1].weight for member in model.members)
    assert not torch.equal(first, second)  # seeds 7 and 8

    x = np.random.default_rng(0).normal(size=(4, 3, 224, 224)).astype(np.float32)
    with torch.inference_mode():
        mean = torch.stack([torch.softmax(m(torch.from_numpy(x)), 1) for m in model.members]).mean(0)
    served = torch.softmax(
        torch.from_numpy(open_session(bundle.onnx_path()).run(None, {INPUT_NAME: x})[0]), 1
    )
    np.testing.assert_allclose(served.numpy(), mean.numpy(), atol=1e-4)


@pytest.mark.slow
def test_the_recorded_validation_is_what_the_ensemble_computes_on_validation(ensemble_run) -> None:
    """It is combined from the members' validation logits of training, not by running them again."""
    from catsdogs.training.config import apply_profile, preprocess_config_for
    from catsdogs.training.features import read_manifest, split_samples
    from catsdogs.training.loop import validate
    from catsdogs.training.strategy_sources import image_sources

    result, _, settings = ensemble_run
    settings = apply_profile(settings)
    val_s = split_samples(read_manifest(settings.data_dir), "val")
    _, val_src = image_sources(settings, preprocess_config_for(settings), [], val_s)
    computed = validate(
        _load(result.bundle_dir),
        val_src,
        batch_size=16,
        device=torch.device("cpu"),
        class_names=settings.classes,
    )
    recorded = ModelBundle.open(result.bundle_dir).metadata["val_metrics"]
    assert recorded["val_accuracy"] == computed["val_accuracy"]
    assert recorded["val_loss"] == pytest.approx(computed["val_loss"], abs=1e-5)


@pytest.mark.slow
def test_the_tracker_sees_each_members_epochs_in_turn_then_the_ensembles_validation(ensemble_run) -> None:
    result, tracker, _ = ensemble_run
    members = [(step, metrics["member"]) for step, metrics in tracker.epochs if "member" in metrics]
    assert members == [(1, 0.0), (2, 0.0), (3, 1.0), (4, 1.0)]
    final_step, final = tracker.epochs[-1]
    assert final_step == 4 and 0 < final["ensemble_val_loss"] < 0.7
    assert final["ensemble_val_accuracy"] >= 0.9
    assert [row["step"] for row in result.history] == [1, 2, 3, 4]


@pytest.mark.slow
def test_resuming_a_finished_ensemble_trains_nothing_and_gives_the_same_model(
    ensemble_run, monkeypatch
) -> None:
    from catsdogs.training import loop
    from catsdogs.training.train import train

    result, _, settings = ensemble_run

    def refuse(*args, **kwargs):
        raise AssertionError("every member had finished: nothing should train again")

    monkeypatch.setattr(loop, "train_one_epoch", refuse)
    resumed = train(settings, resume=True)
    assert resumed.test_metrics["accuracy"] == result.test_metrics["accuracy"]
    assert resumed.test_metrics["log_loss"] == pytest.approx(result.test_metrics["log_loss"], abs=1e-6)


@pytest.mark.slow
def test_each_member_is_the_model_a_single_run_with_its_seed_trains(ensemble_run, tmp_path) -> None:
    from catsdogs.training.train import train

    result, _, settings = ensemble_run
    alone = train(settings.model_copy(update={"ensemble_members": 1, "seed": 8, "runs_dir": tmp_path}))
    member = _load(result.bundle_dir).members[1].state_dict()
    single = _load(alone.bundle_dir).state_dict()
    assert member.keys() == single.keys()
    assert all(torch.equal(member[key], single[key]) for key in member)


@pytest.mark.slow
def test_a_time_budget_too_short_for_more_still_trains_every_member_one_epoch(ensemble_run, tmp_path) -> None:
    from catsdogs.training.train import train

    _, _, settings = ensemble_run
    result = train(settings.model_copy(update={"time_budget_minutes": 1e-3, "runs_dir": tmp_path}))
    assert [(row["member"], row["epoch"]) for row in result.history] == [(0, 1), (1, 1)]
    bundle = ModelBundle.open(result.bundle_dir)
    assert bundle.metadata["members"] == 2 and bundle.metadata["val_metrics"]["member_best_epochs"] == [1, 1]
    assert result.params["time_budget_minutes"] == 1e-3


def _load(bundle_dir):
    bundle = ModelBundle.open(bundle_dir)
    return load_model(bundle)


@pytest.mark.slow
def test_an_ensemble_of_two_backbones_trains_each_on_its_own_features(ensemble_run, tmp_path) -> None:
    from catsdogs.training.train import train

    _, _, settings = ensemble_run
    archs = ["efficientnet_lite0", "efficientnet_lite1"]
    result = train(
        settings.model_copy(update={"ensemble_architectures": archs, "epochs": 1, "runs_dir": tmp_path})
    )
    bundle = ModelBundle.open(result.bundle_dir)
    assert bundle.metadata["member_architectures"] == archs and bundle.metadata["onnx"]["passed"]
    assert (
        "An ensemble of efficientnet_lite0, efficientnet_lite1 models"
        in (result.bundle_dir / "model_card.md").read_text()
    )
    assert result.test_metrics["accuracy"] >= 0.9
    lite1 = _load(result.bundle_dir).members[1].backbone.state_dict()
    pretrained = build_model(ModelSpec("efficientnet_lite1"), SIZE_224).backbone.state_dict()
    assert all(torch.equal(lite1[key], pretrained[key]) for key in pretrained)  # frozen Lite1
