"""Store policy details: which files are copied byte for byte and which are re-encoded, and why."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from datafiles import decode, encode, read_manifest, write_zip
from PIL import Image

from catsdogs.data import ingest
from catsdogs.settings import Settings

REPO = Path(__file__).resolve().parents[2]


def test_progressive_jpeg_is_re_encoded_as_baseline(tmp_path: Path, settings: Settings, real_photos) -> None:
    progressive = encode(decode(real_photos["dog"][0]), "JPEG", quality=90, progressive=True)
    ingest(
        settings, source=str(write_zip(tmp_path / "p.zip", {"dog/p.jpg": progressive})), show_progress=False
    )
    (row,) = read_manifest(settings)
    stored = (settings.data_dir / row["path"]).read_bytes()
    assert stored != progressive
    assert not Image.open(settings.data_dir / row["path"]).info.get("progressive")


def test_sha256_names_the_original_bytes_not_the_stored_ones(
    tmp_path: Path, settings: Settings, real_photos
) -> None:
    import hashlib

    png = encode(decode(real_photos["cat"][0]), "PNG")
    ingest(settings, source=str(write_zip(tmp_path / "s.zip", {"cat/a.png": png})), show_progress=False)
    (row,) = read_manifest(settings)
    assert row["sha256"] == hashlib.sha256(png).hexdigest()


def test_exif_rotated_photo_is_stored_upright(tmp_path: Path, settings: Settings, real_photos) -> None:
    image = decode(real_photos["cat"][0]).resize((200, 120))
    exif = Image.Exif()
    exif[0x0112] = 6  # camera held sideways: viewers rotate 90° clockwise
    rotated = encode(image, "JPEG", quality=92, exif=exif.tobytes())
    ingest(settings, source=str(write_zip(tmp_path / "r.zip", {"cat/r.jpg": rotated})), show_progress=False)
    (row,) = read_manifest(settings)
    assert (row["width"], row["height"]) == ("120", "200")
    stored = Image.open(settings.data_dir / row["path"])
    assert stored.size == (120, 200)
    assert stored.getexif().get(0x0112, 1) == 1


def test_data_package_never_imports_torch() -> None:
    code = (
        "import sys, catsdogs.data, catsdogs.data.ingest; assert 'torch' not in sys.modules, 'torch imported'"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        env={"PYTHONPATH": str(REPO / "src")},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


def test_unexpected_decoder_exception_rejects_one_file(tmp_path: Path, real_photos, monkeypatch) -> None:
    from catsdogs.data import validate

    def exploding_decoder(data: bytes, **kwargs: object) -> Image.Image:
        raise IndexError("list index out of range")  # what a Pillow plugin bug on a hostile file looks like

    monkeypatch.setattr(validate, "decode_image", exploding_decoder)
    config = validate.StoreConfig(tmp_path / "images", 50_000_000, 32, 512, 1 << 20)
    result = validate.process("cat/x.jpg", "cat", real_photos["cat"][0], config)
    assert result == validate.Rejected(
        "cat/x.jpg", "cat", "decode_failed", "IndexError: list index out of range"
    )
    assert not (tmp_path / "images").exists()


def test_failed_ingest_keeps_the_previous_data_set(
    tmp_path: Path, settings: Settings, real_photos, monkeypatch
) -> None:
    import importlib

    from datafiles import kaggle_members

    ingest(
        settings,
        source=str(write_zip(tmp_path / "a.zip", kaggle_members(real_photos, 3))),
        show_progress=False,
    )
    before = settings.manifest_path.read_bytes()
    module = importlib.import_module("catsdogs.data.ingest")

    def fail(*args: object, **kwargs: object) -> None:
        raise RuntimeError("disk full")

    monkeypatch.setattr(module, "_organize", fail)
    with pytest.raises(RuntimeError, match="disk full"):
        ingest(
            settings,
            source=str(write_zip(tmp_path / "b.zip", kaggle_members(real_photos, 8))),
            show_progress=False,
        )
    assert settings.manifest_path.read_bytes() == before
    assert len(list(settings.images_dir.rglob("*.jpg"))) == 6
    assert sorted(p.name for p in settings.data_dir.iterdir()) == [
        "data_report.json",
        "images",
        "manifest.csv",
    ]


def test_leftovers_of_an_interrupted_run_are_removed(tmp_path: Path, settings: Settings, real_photos) -> None:
    (settings.data_dir / ".ingest-dead" / "images").mkdir(parents=True)
    (settings.data_dir / ".old-images-123").mkdir()
    ingest(
        settings,
        source=str(write_zip(tmp_path / "a.zip", {"cat/a.jpg": real_photos["cat"][0]})),
        show_progress=False,
    )
    assert sorted(p.name for p in settings.data_dir.iterdir()) == [
        "data_report.json",
        "images",
        "manifest.csv",
    ]


def test_a_second_ingest_into_the_same_folder_is_refused_while_one_runs(
    tmp_path: Path, settings: Settings, real_photos
) -> None:
    from datafiles import kaggle_members

    from catsdogs import CatsdogsError
    from catsdogs.files import exclusive_lock

    source = str(write_zip(tmp_path / "a.zip", kaggle_members(real_photos, 3)))
    with (
        exclusive_lock(settings.data_dir, what="an ingest"),
        pytest.raises(CatsdogsError, match="already running"),
    ):
        ingest(settings, source=source, show_progress=False)
    assert not settings.manifest_path.exists()
    ingest(settings, source=source, show_progress=False)  # the lock went with the holder
    assert len(read_manifest(settings)) == 6


def test_a_crashed_ingest_leaves_no_lock_behind(tmp_path: Path, settings: Settings) -> None:
    code = (
        "import os, sys; from pathlib import Path; from catsdogs.files import exclusive_lock\n"
        f"with exclusive_lock(Path({str(settings.data_dir)!r}), what='x'):\n    os._exit(3)\n"
    )
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 3
    from catsdogs.files import exclusive_lock

    with exclusive_lock(settings.data_dir, what="an ingest"):
        pass
