"""The closed loop on a small real subset: staff feedback (images kept by the feedback store) →
`catsdogs retrain` (the DVC pipeline: feedback → ingest → train → export → evaluate) → `catsdogs
promote` (the quality gate), as the schedules run it."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from mlflow import MlflowClient
from PIL import Image

from catsdogs.feedback.store import FeedbackStore, PredictionClaim, store_url
from catsdogs.preprocessing import decode_image, store_jpeg
from catsdogs.registry.lineage import dvc_data_version
from catsdogs.settings import Settings
from support import TINY_PIPELINE, dataset_photos, dvc_project

pytestmark = [pytest.mark.integration, pytest.mark.slow]
PER_CLASS = 30
NAME = "catsdogs-classifier"
#: A gate a 2-epoch model on 60 photos can pass: the challenger must still match the champion.
GATE = {
    "CATSDOGS_PROMOTION_MIN_ACCURACY": "0.5",
    "CATSDOGS_PROMOTION_MIN_CLASS_RECALL": "0.5",
    # One photo of a dozen is 8 %: the unknown ceiling is exercised in tests/registry.
    "CATSDOGS_PROMOTION_MAX_UNKNOWN_RATE": "1.0",
    "CATSDOGS_PROMOTION_MAX_RECALL_DROP": "1.0",
}


def _catsdogs(project: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "catsdogs", *args],
        cwd=project,
        env={**os.environ, "PYTHONPATH": str(project / "src")},
        capture_output=True,
        text=True,
        timeout=900,
    )


def _manifest(project: Path) -> dict[str, dict[str, str]]:
    with (project / "data" / "manifest.csv").open(newline="") as handle:
        return {row["sha256"]: row for row in csv.DictReader(handle)}


def _keep(store: FeedbackStore, nonce: str, label: str, photo: bytes) -> str:
    """What /feedback does with a kept image; returns the stored JPEG's SHA-256."""
    claim = PredictionClaim(
        model_version="1", label="cat", confidence=0.6, issued_at=1.8e9, nonce=nonce, kid="k"
    )
    image = store_jpeg(decode_image(photo), max_side=512)
    assert store.record(claim, label=label, image=image)
    return hashlib.sha256(image).hexdigest()


def _look_alike(path: Path) -> bytes:
    with Image.open(path) as image:
        smaller = image.convert("RGB").resize((image.width * 3 // 4, image.height * 3 // 4))
    buffer = io.BytesIO()
    smaller.save(buffer, format="JPEG", quality=80)
    return buffer.getvalue()


def test_feedback_retrain_promote(dataset_zip: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    archive = tmp_path / "subset.zip"
    with zipfile.ZipFile(archive, "w") as handle:
        for label in ("cat", "dog"):
            for i, data in enumerate(dataset_photos(dataset_zip, label, PER_CLASS)):
                handle.writestr(f"PetImages/{label.title()}/{i}.jpg", data)
    url = f"sqlite:///{tmp_path / 'feedback.sqlite3'}"
    for key, value in {"CATSDOGS_FEEDBACK_STORE_URL": url, **GATE}.items():
        monkeypatch.setenv(key, value)
    project = dvc_project(tmp_path / "project", data_source=str(archive), **TINY_PIPELINE)

    first = _catsdogs(project, "retrain")
    assert first.returncode == 0, first.stderr
    assert _catsdogs(project, "promote").returncode == 0  # v1: the first champion
    before = _manifest(project)
    version_before = dvc_data_version(project / "data", project / "data" / "manifest.csv")
    test_image = next(row for row in before.values() if row["split"] == "test")

    store = FeedbackStore(store_url(Settings(feedback_store_url=url)))
    store.open()
    corrected = [
        _keep(store, f"{label}{i}", label, photo)
        for label in ("cat", "dog")
        for i, photo in enumerate(dataset_photos(dataset_zip, label, 3, offset=1000))
    ]
    leaked = _keep(
        store, "look-alike", test_image["label"], _look_alike(project / "data" / test_image["path"])
    )
    store.close()

    second = _catsdogs(project, "retrain")
    assert second.returncode == 0, second.stderr
    after = _manifest(project)
    assert {sha: after[sha]["split"] for sha in corrected} == dict.fromkeys(corrected, "train")
    assert leaked not in after
    assert {sha: row["split"] for sha, row in before.items()} == {sha: after[sha]["split"] for sha in before}
    report = json.loads((project / "data" / "data_report.json").read_text())
    assert [e["reason"] for e in report["feedback"]["excluded"]] == ["near_duplicate_of_evaluation_image"]
    version_after = dvc_data_version(project / "data", project / "data" / "manifest.csv")
    assert version_after is not None and version_after != version_before

    client = MlflowClient(tracking_uri=os.environ["CATSDOGS_MLFLOW_TRACKING_URI"])
    challenger = client.get_model_version_by_alias(NAME, "challenger")
    assert str(challenger.version) == "2"
    assert client.get_run(challenger.run_id).data.tags["data_version"] == version_after

    promoted = _catsdogs(project, "promote")
    champion = str(client.get_model_version_by_alias(NAME, "champion").version)
    assert "v2" in promoted.stdout + promoted.stderr  # the gate judged the new challenger
    assert (promoted.returncode, champion) in {(0, "2"), (1, "1")}, promoted.stdout
