"""`catsdogs quickstart` keeps to its demo folder whatever the environment or params.yaml say."""

from __future__ import annotations

from pathlib import Path

import pytest

from catsdogs.quickstart import DEMO_MIN_ACCURACY, demo_settings, page_url


def test_demo_settings_override_paths_store_profile_and_address(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    elsewhere = tmp_path / "users-own"
    for name, value in {
        "DATA_DIR": str(elsewhere / "data"),
        "RUNS_DIR": str(elsewhere / "runs"),
        "CACHE_DIR": str(elsewhere / "cache"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{elsewhere / 'mlruns.db'}",
        "MLFLOW_REGISTRY_URI": "http://127.0.0.1:5000",
        "PROFILE": "best",
        "STRATEGY": "finetune",
        "PROMOTION_MIN_ACCURACY": "0.99",
        "HOST": "0.0.0.0",
        "WORKERS": "4",
        "DATA_SOURCE": "/somewhere/train.zip",
    }.items():
        monkeypatch.setenv(f"CATSDOGS_{name}", value)

    settings = demo_settings(tmp_path / "demo", port=8123)

    root = (tmp_path / "demo").resolve()
    assert {settings.data_dir, settings.runs_dir, settings.cache_dir, settings.upload_dir} == {
        root / "data",
        root / "runs",
        root / "cache",
        root / "uploads",
    }
    assert settings.mlflow_tracking_uri == settings.mlflow_registry_uri == f"sqlite:///{root / 'mlruns.db'}"
    assert settings.mlflow_artifact_location == str(root / "mlartifacts")
    assert (settings.profile, settings.strategy) == ("default", "head")
    assert settings.promotion_min_accuracy == DEMO_MIN_ACCURACY
    assert (settings.host, settings.port, settings.workers) == ("127.0.0.1", 8123, 1)
    assert settings.model_uri == "models:/catsdogs-classifier@champion"
    assert page_url(settings) == "http://127.0.0.1:8123/"
    assert settings.data_source == "/somewhere/train.zip"  # where the data come from stays the user's choice
