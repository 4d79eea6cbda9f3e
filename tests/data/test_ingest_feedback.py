"""Feedback images join the data set in train, without moving any image already in it, and never as
a look-alike of a validation or test image (it would leak into the evaluation)."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from datafiles import kaggle_members, read_manifest, write_folder, write_zip
from PIL import Image

from catsdogs.data import ingest
from catsdogs.data.feedback import export_feedback
from catsdogs.feedback.store import FeedbackStore, PredictionClaim, store_url
from catsdogs.preprocessing import decode_image, store_jpeg
from catsdogs.settings import Settings

BASE = 20  # photos per class in the data set; the next ones are the staff's feedback


def _look_alike(data: bytes) -> bytes:
    """The same photo shrunk and re-encoded (another file, a near-duplicate by perceptual hash)."""
    with Image.open(io.BytesIO(data)) as image:
        smaller = image.convert("RGB").resize((image.width * 3 // 4, image.height * 3 // 4))
    buffer = io.BytesIO()
    smaller.save(buffer, format="JPEG", quality=80)
    return buffer.getvalue()


@pytest.fixture
def base(settings: Settings, real_photos: dict[str, list[bytes]], tmp_path: Path) -> list[dict[str, str]]:
    ingest(settings, source=str(write_zip(tmp_path / "base.zip", kaggle_members(real_photos, BASE))))
    return read_manifest(settings)


def test_feedback_goes_to_train_and_no_existing_image_moves(
    settings: Settings, base: list[dict[str, str]], real_photos: dict[str, list[bytes]], tmp_path: Path
) -> None:
    evaluation = next(row for row in base if row["split"] == "test")
    with (settings.data_dir / evaluation["path"]).open("rb") as handle:
        look_alike = _look_alike(handle.read())
    new = {
        f"{label}/{label}-{i}.jpg": real_photos[label][BASE + i] for label in ("cat", "dog") for i in range(3)
    }
    folder = write_folder(tmp_path / "feedback", {**new, f"{evaluation['label']}/look-alike.jpg": look_alike})

    result = ingest(settings, source=str(tmp_path / "base.zip"), feedback=folder)
    rows = read_manifest(settings)
    by_sha = {row["sha256"]: row for row in rows}
    assert {row["sha256"]: row["split"] for row in base} == {
        sha: by_sha[sha]["split"] for sha in (row["sha256"] for row in base)
    }  # the data set's own images keep their splits
    added = [row for row in rows if row["sha256"] not in {b["sha256"] for b in base}]
    assert len(added) == 6 and {row["split"] for row in added} == {"train"}
    assert sorted(row["label"] for row in added) == ["cat"] * 3 + ["dog"] * 3
    assert all((settings.data_dir / row["path"]).is_file() for row in added)
    section = result.report["feedback"]
    assert (section["files"], section["added"]) == (7, 6)
    assert [e["reason"] for e in section["excluded"]] == ["near_duplicate_of_evaluation_image"]
    stored = {path.stem for path in (settings.data_dir / "images").rglob("*.jpg")}
    assert stored == set(by_sha)  # the excluded look-alike left no file behind


def test_feedback_that_contradicts_the_data_set_is_left_out(
    settings: Settings, base: list[dict[str, str]], tmp_path: Path
) -> None:
    cat = next(row for row in base if row["label"] == "cat")
    photo = (settings.data_dir / cat["path"]).read_bytes()
    folder = write_folder(tmp_path / "feedback", {"dog/relabelled.jpg": photo, "cat/same.jpg": photo})
    result = ingest(settings, source=str(tmp_path / "base.zip"), feedback=folder)
    assert [e["reason"] for e in result.report["feedback"]["excluded"]] == ["conflicting_label"]
    assert read_manifest(settings) == base
    assert not (settings.data_dir / "images" / "dog" / f"{cat['sha256']}.jpg").exists()


def test_an_empty_feedback_folder_changes_nothing(
    settings: Settings, base: list[dict[str, str]], tmp_path: Path
) -> None:
    (tmp_path / "feedback").mkdir()
    result = ingest(settings, source=str(tmp_path / "base.zip"), feedback=tmp_path / "feedback")
    assert read_manifest(settings) == base
    assert result.report["feedback"]["added"] == 0


def test_export_copies_each_kept_image_once_and_never_creates_a_store(
    settings: Settings, real_photos: dict[str, list[bytes]], tmp_path: Path
) -> None:
    out = tmp_path / "data" / "feedback"
    assert export_feedback(settings, out).seen == 0
    assert not (settings.cache_dir / "feedback.sqlite3").exists()
    store = FeedbackStore(store_url(settings))
    store.open()
    for i, label in enumerate(["cat", "dog", "dog"]):
        image = store_jpeg(decode_image(real_photos[label][i]), max_side=512)
        claim = PredictionClaim(
            model_version="1", label="cat", confidence=0.9, issued_at=1.8e9, nonce=f"n{i}", kid="k"
        )
        store.record(claim, label=label, image=image)
    store.close()
    first = export_feedback(settings, out)
    assert (first.seen, first.added) == (3, {"cat": 1, "dog": 2})
    assert sorted(p.relative_to(out).parts[0] for p in out.rglob("*.jpg")) == ["cat", "dog", "dog"]
    again = export_feedback(settings, out)
    assert (again.seen, again.added) == (3, {"cat": 0, "dog": 0})
