"""Small real datasets built from the dataset archive in a temporary folder, and one trained bundle shared by
the model tests (training once keeps the suite within its time budget)."""

from __future__ import annotations

from pathlib import Path

import pytest

from catsdogs.settings import Settings
from support import build_dataset


@pytest.fixture(scope="session")
def small_data_dir(dataset_zip: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """240 real images: 80 train, 20 val, 20 test per class."""
    return build_dataset(
        dataset_zip, tmp_path_factory.mktemp("data"), per_class={"train": 80, "val": 20, "test": 20}
    )


@pytest.fixture(scope="session")
def session_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One feature/backbone cache for the session (extraction is the slow part)."""
    return tmp_path_factory.mktemp("cache")


class RecordingTracker:
    """A tracker that remembers every call (the Tracker protocol)."""

    def __init__(self) -> None:
        self.params: list[dict] = []
        self.epochs: list[tuple[int, dict]] = []
        self.artifacts: list[tuple[Path, str | None]] = []

    def log_params(self, params):
        self.params.append(params)

    def log_epoch(self, epoch, metrics):
        self.epochs.append((epoch, metrics))

    def log_artifact(self, path, artifact_path=None):
        self.artifacts.append((path, artifact_path))


@pytest.fixture(scope="session")
def head_run(
    isolated_env, small_data_dir: Path, session_cache: Path, tmp_path_factory: pytest.TempPathFactory
):
    """The real ``train()`` with a frozen EfficientNet-Lite0 and a linear head, 3 epochs."""
    from catsdogs.training.train import train

    settings = Settings(
        architecture="efficientnet_lite0",
        strategy="head",
        data_dir=small_data_dir,
        runs_dir=tmp_path_factory.mktemp("runs"),
        cache_dir=session_cache,
        epochs=3,
        batch_size=32,
        flip_features=True,  # exercise the mirror-image view of the cache too
    )
    tracker = RecordingTracker()
    return train(settings, tracker=tracker), tracker, settings


@pytest.fixture(scope="session")
def ensemble_run(isolated_env, small_data_dir, session_cache, tmp_path_factory):
    """The real ``train()``: two linear heads on frozen Lite0 features, two epochs each."""
    from catsdogs.training.train import train

    settings = Settings(
        architecture="efficientnet_lite0", strategy="head", data_dir=small_data_dir,
        runs_dir=tmp_path_factory.mktemp("runs"), cache_dir=session_cache, epochs=2, batch_size=32,
        ensemble_members=2, seed=7,
    )  # fmt: skip
    tracker = RecordingTracker()
    return train(settings, tracker=tracker), tracker, settings


@pytest.fixture
def make_dataset(dataset_zip: Path):
    """Factory: ``make_dataset(data_dir, per_class={...}, offset=0)`` builds a small real dataset."""

    def make(data_dir: Path, *, per_class: dict[str, int], offset: int = 0) -> Path:
        return build_dataset(dataset_zip, data_dir, per_class=per_class, offset=offset)

    return make


@pytest.fixture(scope="session")
def cnn_run(isolated_env, small_data_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """The from-scratch baseline trained for one epoch (a small, fast model for export tests)."""
    from catsdogs.training.train import train

    settings = Settings(
        architecture="simple_cnn",
        data_dir=small_data_dir,
        runs_dir=tmp_path_factory.mktemp("runs"),
        cache_dir=tmp_path_factory.mktemp("cache"),
        epochs=1,
        batch_size=32,
    )
    return train(settings), settings
