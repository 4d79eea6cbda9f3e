"""``train_and_register``: what `catsdogs train` runs after parsing its flags. Training itself is
replaced by a stand-in that writes a fake bundle; the tracking and registration are real (MLflow on
a SQLite store in tmp_path)."""

from __future__ import annotations

from pathlib import Path

import pytest

from catsdogs.settings import Settings
from catsdogs.training import train as train_module
from catsdogs.training.train import TrainResult
from catsdogs.training.workflow import train_and_register
from fakes import build_bundle, metrics_payload


@pytest.fixture
def trained(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[object]:
    """Replace training by a stand-in; the list receives the tracker each call was given."""
    trackers: list[object] = []

    def fake_train(settings: Settings, *, tracker: object = None, resume: bool = False) -> TrainResult:
        trackers.append(tracker)
        metrics = metrics_payload(0.98, {"cat": 0.97, "dog": 0.99})
        bundle = build_bundle(tmp_path / "run" / "bundle", metrics=metrics)
        return TrainResult(
            bundle_dir=bundle, history=[{"epoch": 1}], test_metrics=metrics, params={},
            artifacts_dir=tmp_path / "run" / "artifacts", elapsed_s=1.0, run_dir=tmp_path / "run",
        )  # fmt: skip

    monkeypatch.setattr(train_module, "train", fake_train)
    return trackers


def test_a_tracked_run_is_registered_as_the_challenger(settings: Settings, trained: list[object]) -> None:
    from mlflow import MlflowClient

    from catsdogs.registry.tracking import MlflowTracker

    result, version = train_and_register(settings)
    assert version == 1 and isinstance(trained[0], MlflowTracker)
    uri = settings.mlflow_tracking_uri
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    challenger = client.get_model_version_by_alias(settings.model_name, "challenger")
    assert int(challenger.version) == 1 and challenger.run_id == trained[0].run_id
    assert client.get_run(challenger.run_id).data.metrics["test_accuracy"] == result.test_metrics["accuracy"]


@pytest.mark.parametrize("how", ["--no-track", "torchrun rank 1"])
def test_an_untracked_run_creates_no_mlflow_run(
    settings: Settings, trained: list[object], monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    if how == "torchrun rank 1":
        monkeypatch.setenv("RANK", "1")
    result, version = train_and_register(settings, track=how != "--no-track")
    assert version is None and trained == [None] and result.test_metrics["accuracy"] == 0.98
    assert not Path(settings.mlflow_tracking_uri.removeprefix("sqlite:///")).exists()  # no store opened


def test_a_second_training_into_the_same_run_folder_is_refused(
    settings: Settings, trained: list[object]
) -> None:
    """Another process (a first ``catsdogs train``) holds the run folder's lock: this one stops at
    once with a one-line error, before training or opening MLflow."""
    import subprocess
    import sys

    from catsdogs import CatsdogsError

    settings = settings.model_copy(update={"run_name": "shared"})
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(settings.runs_dir / "shared")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(CatsdogsError, match="already running") as refused:
            train_and_register(settings)
        assert "\n" not in str(refused.value)
        assert trained == []
        assert not Path(settings.mlflow_tracking_uri.removeprefix("sqlite:///")).exists()
    finally:
        holder.communicate("", timeout=30)
    train_and_register(settings, track=False)  # the lock went with its holder
    assert trained == [None]


HOLD_LOCK = """
import sys
from pathlib import Path
from catsdogs.files import exclusive_lock
with exclusive_lock(Path(sys.argv[1]), what="a training"):
    print("held", flush=True)
    sys.stdin.read()
"""
