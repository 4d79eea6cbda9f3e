"""Data validation: every odd or broken file kind from issue 3, made on the fly, plus the CLI contract."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from datafiles import broken_files, convertible_files, decode, kaggle_members, read_manifest, write_zip
from PIL import Image

from catsdogs.data import ingest
from catsdogs.settings import Settings

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def mixed_zip(tmp_path: Path, real_photos: dict[str, list[bytes]]) -> tuple[Path, dict[str, str]]:
    """Ten real photos, six convertible odd images and five broken files, in the Kaggle layout."""
    members = kaggle_members(real_photos, 5)
    for name, data in convertible_files(real_photos["dog"][10:16]).items():
        members[f"train/dog.{name}"] = data
    expected_rejections = {}
    for name, (data, reason) in broken_files(real_photos["cat"][20]).items():
        members[f"train/cat.{name}"] = data
        expected_rejections[f"train/cat.{name}"] = reason
    return write_zip(tmp_path / "mixed.zip", members), expected_rejections


def test_every_broken_file_is_listed_with_its_reason(settings: Settings, mixed_zip) -> None:
    archive, expected = mixed_zip
    report = ingest(settings, source=str(archive), show_progress=False).report
    assert {r["source"]: r["reason"] for r in report["rejections"]} == expected
    assert all(r["detail"] for r in report["rejections"])
    assert report["rejections_by_reason"] == {reason: 1 for reason in expected.values()}
    assert report["counts"]["rejected"] == len(expected)


def test_every_valid_and_convertible_image_is_kept(settings: Settings, mixed_zip) -> None:
    archive, _ = mixed_zip
    report = ingest(settings, source=str(archive), show_progress=False).report
    assert report["counts"]["files"] == 21
    assert report["counts"]["accepted"] == 16
    assert report["counts"]["manifest_rows"] == 16
    assert report["per_class"]["cat"]["total"] == 5
    assert report["per_class"]["dog"]["total"] == 11


def test_store_holds_8bit_rgb_jpegs_whatever_the_input_mode(settings: Settings, mixed_zip) -> None:
    archive, _ = mixed_zip
    ingest(settings, source=str(archive), show_progress=False)
    for row in read_manifest(settings):
        stored = Image.open(settings.data_dir / row["path"])
        assert stored.format == "JPEG"
        assert stored.mode == "RGB"
        assert stored.size == (int(row["width"]), int(row["height"]))


def test_baseline_rgb_jpeg_is_stored_byte_for_byte(settings: Settings, real_photos, tmp_path: Path) -> None:
    photo = real_photos["cat"][0]
    archive = write_zip(tmp_path / "one.zip", {"train/cat.0.jpg": photo})
    ingest(settings, source=str(archive), show_progress=False)
    (row,) = read_manifest(settings)
    assert (settings.data_dir / row["path"]).read_bytes() == photo


def test_large_image_is_downscaled_to_store_max_side(tmp_path: Path, real_photos) -> None:
    big = decode(real_photos["dog"][0]).resize((900, 600))
    from datafiles import encode

    archive = write_zip(tmp_path / "big.zip", {"dog/big.png": encode(big, "PNG")})
    settings = Settings(data_dir=tmp_path / "data", store_max_side=300)
    ingest(settings, source=str(archive), show_progress=False)
    (row,) = read_manifest(settings)
    assert (int(row["width"]), int(row["height"])) == (300, 200)
    assert Image.open(settings.data_dir / row["path"]).size == (300, 200)


def test_oversized_member_is_rejected_without_reading(tmp_path: Path, real_photos) -> None:
    archive = write_zip(
        tmp_path / "a.zip", {"cat/a.jpg": real_photos["cat"][0], "cat/b.jpg": real_photos["cat"][1]}
    )
    limit = min(len(real_photos["cat"][0]), len(real_photos["cat"][1])) - 1
    settings = Settings(data_dir=tmp_path / "data", max_image_bytes=limit)
    report = ingest(settings, source=str(archive), show_progress=False).report
    assert report["rejections_by_reason"] == {"file_too_large": 2}


def test_crc_corrupted_member_is_rejected_not_fatal(tmp_path: Path, settings: Settings, real_photos) -> None:
    archive = write_zip(
        tmp_path / "crc.zip", {"cat/a.jpg": real_photos["cat"][0], "cat/b.jpg": real_photos["cat"][1]}
    )
    raw = bytearray(archive.read_bytes())
    with zipfile.ZipFile(archive) as zf:
        info = zf.getinfo("cat/b.jpg")
    data_start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    raw[data_start + 500] ^= 0xFF  # stored uncompressed: flips one byte of the image, CRC now wrong
    archive.write_bytes(bytes(raw))
    report = ingest(settings, source=str(archive), show_progress=False).report
    assert report["rejections_by_reason"] == {"unreadable": 1}
    assert report["counts"]["manifest_rows"] == 1


def _mark_encrypted(archive: Path, name: str) -> None:
    """Set the "encrypted" flag bit of one member in its local and central headers."""
    raw = bytearray(archive.read_bytes())
    with zipfile.ZipFile(archive) as zf:
        local = zf.getinfo(name).header_offset
    raw[local + 6] |= 0x1
    central = raw.find(b"PK\x01\x02")
    while central != -1:
        name_length = int.from_bytes(raw[central + 28 : central + 30], "little")
        if raw[central + 46 : central + 46 + name_length] == name.encode():
            raw[central + 8] |= 0x1
        central = raw.find(b"PK\x01\x02", central + 4)
    archive.write_bytes(bytes(raw))


def test_encrypted_member_is_rejected_not_fatal(tmp_path: Path, settings: Settings, real_photos) -> None:
    archive = write_zip(
        tmp_path / "enc.zip", {"cat/a.jpg": real_photos["cat"][0], "cat/b.jpg": real_photos["cat"][1]}
    )
    _mark_encrypted(archive, "cat/b.jpg")  # reading it now needs a password we do not have
    report = ingest(settings, source=str(archive), show_progress=False).report
    assert [(r["source"], r["reason"]) for r in report["rejections"]] == [("cat/b.jpg", "unreadable")]
    assert "encrypted" in report["rejections"][0]["detail"]
    assert report["counts"]["manifest_rows"] == 1


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    return subprocess.run(
        [sys.executable, "-m", "catsdogs", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_ingests_mixed_archive_with_exit_code_zero(tmp_path: Path, mixed_zip) -> None:
    archive, expected = mixed_zip
    result = _cli(
        "data", "ingest", "--source", str(archive), "--data-dir", str(tmp_path / "out"), cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert "16 valid, 5 rejected" in " ".join(result.stderr.split())
    report = json.loads((tmp_path / "out" / "data_report.json").read_text())
    assert {r["source"] for r in report["rejections"]} == set(expected)


def test_cli_refuses_zip_slip_with_nonzero_exit_and_one_line_error(tmp_path: Path, real_photos) -> None:
    archive = write_zip(
        tmp_path / "evil.zip", {"train/cat.1.jpg": real_photos["cat"][0], "../evil.txt": b"x"}
    )
    work = tmp_path / "work"
    work.mkdir()
    result = _cli("data", "ingest", "--source", str(archive), "--data-dir", str(work / "out"), cwd=work)
    assert result.returncode == 1
    assert "error:" in result.stderr
    assert "'../evil.txt'" in result.stderr
    assert "Traceback" not in result.stderr
    assert list(work.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil.zip", "work"]
