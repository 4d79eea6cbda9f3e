"""Which model and strategy a configuration resolves to, and the clear refusals."""

from __future__ import annotations

import pytest

from catsdogs import CatsdogsError
from catsdogs.preprocessing import DEFAULT_DECODE_DRAFT_FACTOR
from catsdogs.settings import Settings, get_settings
from catsdogs.training.config import (
    BEST_PROFILE,
    DEFAULT_EPOCHS,
    apply_profile,
    preprocess_config_for,
    resolve_spec,
    train_params,
)


def test_the_default_fine_tunes_lite2s_last_two_blocks_for_one_epoch_above_its_native_size() -> None:
    settings = Settings()
    spec, strategy = resolve_spec(settings)
    assert (spec.architecture, strategy, spec.head, preprocess_config_for(settings).image_size) == (
        "efficientnet_lite2",
        "finetune",
        "linear",
        280,
    )
    resolved = apply_profile(settings)
    assert (resolved.finetune_blocks, resolved.finetune_views, resolved.epochs) == (2, ("orig", "flip"), 1)


def test_an_unset_epoch_count_becomes_the_strategys_own() -> None:
    assert apply_profile(Settings(strategy="head")).epochs == DEFAULT_EPOCHS["head"] == 30
    assert apply_profile(Settings(architecture="simple_cnn")).epochs == DEFAULT_EPOCHS["scratch"]
    assert apply_profile(Settings(strategy="head", epochs=7)).epochs == 7


def test_simple_cnn_always_trains_from_scratch() -> None:
    settings = Settings(architecture="simple_cnn")
    _, strategy = resolve_spec(settings)
    assert strategy == "scratch" and preprocess_config_for(settings).image_size == 128


def test_a_pretrained_backbone_is_not_trained_from_scratch() -> None:
    with pytest.raises(CatsdogsError, match="--strategy head"):
        resolve_spec(Settings(architecture="efficientnet_lite0", strategy="scratch"))


def test_an_unknown_architecture_lists_the_choices() -> None:
    with pytest.raises(CatsdogsError, match="efficientnet_lite0, efficientnet_lite1"):
        resolve_spec(Settings(architecture="resnet50"))


def test_the_best_profile_fine_tunes_with_its_own_settings() -> None:
    settings = apply_profile(Settings(profile="best", strategy="head", finetune_blocks=0))
    assert {key: getattr(settings, key) for key in BEST_PROFILE} == BEST_PROFILE
    assert resolve_spec(Settings(profile="best"))[1] == "finetune"


def test_flags_given_explicitly_win_over_the_profile_and_the_profile_over_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CATSDOGS_EPOCHS", "9")
    settings = apply_profile(get_settings(profile="best", ensemble_members=2, seed=7, batch_size=None))
    assert (settings.ensemble_members, settings.seed) == (2, 7)
    assert settings.epochs == BEST_PROFILE["epochs"]  # the environment is a layer below the profile
    assert settings.batch_size == BEST_PROFILE["batch_size"]  # an unset flag is not explicit
    assert settings.finetune_blocks == BEST_PROFILE["finetune_blocks"]


def test_the_best_profile_trains_smaller_than_it_serves_on_random_augmentations() -> None:
    settings = apply_profile(Settings(profile="best"))
    assert (
        settings.finetune_augment and settings.train_image_size < preprocess_config_for(settings).image_size
    )
    assert settings.calibrate_temperature and settings.lr_schedule == "one_cycle"
    assert settings.ema_decay is not None  # it serves the moving average of its weights


def test_a_training_size_is_refused_where_features_are_cached() -> None:
    with pytest.raises(CatsdogsError, match="train_image_size"):
        resolve_spec(Settings(strategy="head", train_image_size=224))
    with pytest.raises(CatsdogsError, match="train_image_size"):
        resolve_spec(Settings(strategy="finetune", train_image_size=224))
    assert resolve_spec(Settings(finetune_augment=True, train_image_size=224))[1] == "finetune"
    assert resolve_spec(Settings(architecture="simple_cnn", train_image_size=96))[1] == "scratch"


def test_the_default_profile_leaves_the_settings_alone() -> None:
    settings = Settings(strategy="finetune", finetune_blocks=3, epochs=4)
    assert apply_profile(settings) == settings


def test_the_best_profile_refuses_the_from_scratch_baseline() -> None:
    with pytest.raises(CatsdogsError, match="pretrained backbone"):
        resolve_spec(Settings(architecture="simple_cnn", profile="best"))


def test_preprocessing_follows_the_architecture_and_the_size_override() -> None:
    assert preprocess_config_for(Settings(architecture="efficientnet_lite1")).image_size == 240
    assert preprocess_config_for(Settings(image_size=260)).image_size == 260
    config = preprocess_config_for(Settings(architecture="efficientnet_lite0", image_size=192))
    assert config.image_size == 192 and config.mean == config.std == (0.5, 0.5, 0.5)
    assert config.decode_draft_factor == DEFAULT_DECODE_DRAFT_FACTOR  # what serving will decode with


def test_the_image_size_is_resolved_once_into_the_preprocessing_not_the_model_spec() -> None:
    """The network is built from the preprocessing config; neither the spec nor the run's
    parameters hold a second, independent copy of the size."""
    settings = Settings(profile="best")  # the profile sets image_size 280 and trains at 224
    spec, strategy = resolve_spec(settings)
    config = preprocess_config_for(settings)
    assert "image_size" not in spec.to_dict() and config.image_size == 280
    params = train_params(apply_profile(settings), spec, strategy, config)
    assert params["image_size"] == config.image_size and params["train_image_size"] == 224


def test_the_cli_passes_its_schedule_flags_past_the_profile(monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    from typer.testing import CliRunner

    from catsdogs.cli import app
    from catsdogs.training import train as train_module

    seen: list[Settings] = []
    monkeypatch.setattr(
        train_module, "train", lambda s, **_: seen.append(s) or SimpleNamespace(test_metrics={})
    )
    args = ["train", "--profile", "best", "--epochs", "2", "--lr-schedule-epochs", "3", "--members", "2"]
    result = CliRunner().invoke(app, [*args, "--no-track"])
    assert result.exit_code == 0, result.output
    settings = apply_profile(seen[0])
    assert (settings.epochs, settings.lr_schedule_epochs, settings.ensemble_members) == (2, 3, 2)
    assert settings.finetune_blocks == BEST_PROFILE["finetune_blocks"]
