"""Store policy details: which files are copied byte for byte and which are re-encoded, and why."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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
