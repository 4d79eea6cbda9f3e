"""Shared fixtures: settings isolated in tmp_path, and access to the real dataset archive.

Importing ``support`` here reads the dataset variables (CATSDOGS_TEST_DATASET, CATSDOGS_DATA_SOURCE,
...) before :func:`_isolated_settings` hides every CATSDOGS_* variable from the tests."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from catsdogs.settings import Settings
from pg_cluster import create_database, postgres_cluster
from support import build_dataset, dataset_archive, require_tool  # noqa: F401  (re-exported for older imports)


@pytest.fixture(autouse=True)
def _isolated_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No test reads the developer's params.yaml or CATSDOGS_* variables by accident, and none leaks
    process-wide environment (the service bounds MLflow's HTTP client through it) into the next."""
    saved = dict(os.environ)
    for key in list(os.environ):
        if key.startswith("CATSDOGS_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("CATSDOGS_PARAMS_FILE", str(tmp_path / "no-params.yaml"))
    # Whatever a test (or a CLI subprocess it starts) tracks lands in tmp_path, never in the checkout.
    monkeypatch.setenv("CATSDOGS_MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlruns.db'}")
    monkeypatch.setenv("CATSDOGS_MLFLOW_ARTIFACT_LOCATION", str(tmp_path / "mlartifacts"))
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(
        data_dir=tmp_path / "data",
        runs_dir=tmp_path / "runs",
        cache_dir=tmp_path / "cache",
        mlflow_tracking_uri=f"sqlite:///{tmp_path / 'mlruns.db'}",
        mlflow_artifact_location=str(tmp_path / "mlartifacts"),
    )


@pytest.fixture(scope="session")
def _migrated_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty, fully migrated MLflow SQLite store: copying it is much faster than migrating anew."""
    from mlflow import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-template") / "mlruns.db"
    client = MlflowClient(tracking_uri=f"sqlite:///{path}", registry_uri=f"sqlite:///{path}")
    client.search_experiments()
    client.search_registered_models()
    return path


@pytest.fixture(scope="session")
def dataset_zip(request: pytest.FixtureRequest) -> Path:
    """The real dataset archive (:func:`support.dataset_archive`); pick photos from it with
    :func:`support.dataset_photos`, never by member name (layouts differ)."""
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():  # a first download shows its progress
        return dataset_archive()


_databases = itertools.count()


@pytest.fixture(scope="session")
def postgres() -> Iterator[str]:
    """A throwaway PostgreSQL cluster on loopback (Debian's server binaries), one per test run."""
    with postgres_cluster() as base_url:
        yield base_url


@pytest.fixture
def postgres_url(postgres: str) -> str:
    """A fresh database in that cluster."""
    return create_database(postgres, f"feedback_{next(_databases)}")


@pytest.fixture(scope="session")
def isolated_env():
    """Session fixtures run before the autouse isolation: isolate them the same way."""
    with pytest.MonkeyPatch.context() as patch:
        for key in list(os.environ):
            if key.startswith("CATSDOGS_"):
                patch.delenv(key)
        patch.setenv("CATSDOGS_PARAMS_FILE", "/nonexistent/params.yaml")
        yield


@pytest.fixture(scope="session")
def trust_run(isolated_env, dataset_zip: Path, tmp_path_factory: pytest.TempPathFactory):
    """A real model with its unknown detector and activation maps: a linear head on frozen
    EfficientNet-Lite2 features (the default backbone), trained by the real ``train()`` on 200
    photos per class, its detector calibrated on 500 validation photos per class and tested on 200
    others."""
    from catsdogs.training.train import train

    data_dir = build_dataset(
        dataset_zip, tmp_path_factory.mktemp("trust-data"), per_class={"train": 200, "val": 500, "test": 200},
        offset=300,
    )  # fmt: skip
    settings = Settings(
        architecture="efficientnet_lite2", strategy="head", data_dir=data_dir,
        runs_dir=tmp_path_factory.mktemp("trust-runs"), cache_dir=tmp_path_factory.mktemp("trust-cache"),
        epochs=5, batch_size=32,
    )  # fmt: skip
    return train(settings), settings
