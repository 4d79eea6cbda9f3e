"""Small real datasets built from the dataset archive in a temporary folder, and one trained bundle shared by
the model tests (training once keeps the suite within its time budget)."""

from __future__ import annotations

import csv
import hashlib
import os
from pathlib import Path

import pytest

from catsdogs.settings import Settings
from support import dataset_photos

COLUMNS = ["path", "label", "sha256", "phash", "width", "height", "split"]


def build_dataset(zip_path: Path, data_dir: Path, *, per_class: dict[str, int], offset: int = 0) -> Path:
    """Write ``data_dir/images/<label>/<sha256>.jpg`` and a manifest.csv in the ingest's layout.

    ``per_class`` gives the number of images per class and split, e.g. {"train": 80, "val": 20, "test": 20}.
    """
    rows = []
    total = sum(per_class.values())
    for label in ("cat", "dog"):
        photos = dataset_photos(zip_path, label, total, offset=offset)
        splits = [split for split, count in per_class.items() for _ in range(count)]
        for data, split in zip(photos, splits, strict=True):
            sha = hashlib.sha256(data).hexdigest()
            rel = Path("images") / label / f"{sha}.jpg"
            (data_dir / rel).parent.mkdir(parents=True, exist_ok=True)
            (data_dir / rel).write_bytes(data)
            rows.append({"path": str(rel), "label": label, "sha256": sha, "phash": "0" * 16,
                         "width": 0, "height": 0, "split": split})  # fmt: skip
    rows.sort(key=lambda row: row["sha256"])
    with (data_dir / "manifest.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return data_dir


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
