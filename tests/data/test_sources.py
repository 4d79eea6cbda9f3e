"""Sources: layouts and labels, and refusal of archives or folders that could escape the output."""

from __future__ import annotations

import os
import stat
import zipfile
from pathlib import Path

import pytest
from datafiles import generated_photos, kaggle_members, read_manifest, write_folder, write_zip

from catsdogs import CatsdogsError
from catsdogs.data import UnsafeSourceError, ingest
from catsdogs.data.labelled import label_for
from catsdogs.data.sources import open_source
from catsdogs.settings import Settings

#: Unsafe sources are refused whatever their pictures show.
PHOTO = generated_photos(1)["cat"][0]

CLASSES = ("cat", "dog")


@pytest.mark.parametrize(
    ("name", "label"),
    [
        ("train/cat.123.jpg", "cat"),
        ("train/dog.45.jpg", "dog"),
        ("PetImages/Cat/1.jpg", "cat"),
        ("PetImages/Dog/99.jpg", "dog"),
        ("DOG/photo.png", "dog"),
        ("cat/dog.1.jpg", "cat"),  # the folder is closer evidence than the file name
        ("readme.txt", None),
        ("train/catalog.jpg", None),
    ],
)
def test_label_comes_from_nearest_class_folder_or_file_prefix(name: str, label: str | None) -> None:
    assert label_for(name, CLASSES) == label


def _zip_slip_archive(path: Path, photo: bytes, evil_name: str) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("train/cat.1.jpg", photo)
        archive.writestr(evil_name, b"pwned")
    return path


@pytest.mark.parametrize("evil_name", ["../evil.txt", "train/../../evil.txt", "/tmp/evil.txt", "C:/evil.txt"])
def test_zip_slip_member_refuses_the_whole_archive_and_writes_nothing(
    tmp_path: Path, settings: Settings, evil_name: str
) -> None:
    archive = _zip_slip_archive(tmp_path / "evil.zip", PHOTO, evil_name)
    with pytest.raises(UnsafeSourceError, match="escape the output folder"):
        ingest(settings, source=str(archive), show_progress=False)
    assert not settings.data_dir.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil.zip"]


def test_symlink_member_in_zip_is_refused(tmp_path: Path, settings: Settings) -> None:
    archive_path = tmp_path / "link.zip"
    with zipfile.ZipFile(archive_path, "w") as archive:
        archive.writestr("train/cat.1.jpg", PHOTO)
        link = zipfile.ZipInfo("train/dog.1.jpg")
        link.create_system = 3  # Unix, as `zip --symlinks` writes
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        archive.writestr(link, "/etc/passwd")
    with pytest.raises(UnsafeSourceError, match="symbolic link"):
        ingest(settings, source=str(archive_path), show_progress=False)
    assert not settings.data_dir.exists()


def test_symlink_in_source_folder_is_refused(tmp_path: Path, settings: Settings) -> None:
    root = write_folder(tmp_path / "src", {"cat/a.jpg": PHOTO})
    (tmp_path / "secret.txt").write_text("outside")
    os.symlink(tmp_path / "secret.txt", root / "cat" / "b.jpg")
    with pytest.raises(UnsafeSourceError, match="symbolic link"):
        ingest(settings, source=str(root), show_progress=False)
    assert not settings.data_dir.exists()


def test_fifo_in_source_folder_is_refused_instead_of_blocking(tmp_path: Path, settings: Settings) -> None:
    root = write_folder(tmp_path / "src", {"cat/a.jpg": PHOTO})
    os.mkfifo(root / "cat" / "b.jpg")
    with pytest.raises(UnsafeSourceError, match="not a regular file"):
        ingest(settings, source=str(root), show_progress=False)
    assert not settings.data_dir.exists()


def test_missing_source_is_a_clear_error(tmp_path: Path, settings: Settings) -> None:
    with pytest.raises(CatsdogsError, match="does not exist"):
        ingest(settings, source=str(tmp_path / "nope.zip"), show_progress=False)


def test_corrupt_zip_is_a_clear_error(tmp_path: Path, settings: Settings) -> None:
    bad = tmp_path / "bad.zip"
    bad.write_bytes(b"PK\x03\x04 definitely not a zip")
    with pytest.raises(CatsdogsError, match="not a readable zip"):
        ingest(settings, source=str(bad), show_progress=False)


def test_source_without_labelled_files_is_a_clear_error(tmp_path: Path, settings: Settings) -> None:
    archive = write_zip(tmp_path / "x.zip", {"photos/1.jpg": PHOTO})
    with pytest.raises(CatsdogsError, match="no file labelled cat/dog"):
        ingest(settings, source=str(archive), show_progress=False)


def test_kaggle_zip_layout(tmp_path: Path, settings: Settings, real_photos) -> None:
    archive = write_zip(tmp_path / "train.zip", kaggle_members(real_photos, 5))
    result = ingest(settings, source=str(archive), show_progress=False)
    assert result.report["layout"] == "kaggle"
    assert {row["label"] for row in read_manifest(settings)} == {"cat", "dog"}
    assert result.report["per_class"]["cat"]["total"] == 5
    assert result.report["per_class"]["dog"]["total"] == 5


@pytest.mark.parametrize("zipped", [True, False])
def test_petimages_layout_zipped_or_unpacked(tmp_path: Path, settings: Settings, real_photos, zipped) -> None:
    members = {f"PetImages/Cat/{i}.jpg": real_photos["cat"][i] for i in range(4)}
    members |= {f"PetImages/Dog/{i}.jpg": real_photos["dog"][i] for i in range(3)}
    members["PetImages/Cat/Thumbs.db"] = b"\x00" * 64  # Windows litter: skipped
    members["readme[1].txt"] = b"licence text"
    source = write_zip(tmp_path / "pets.zip", members) if zipped else write_folder(tmp_path / "pets", members)
    result = ingest(settings, source=str(source), show_progress=False)
    assert result.report["layout"] == "petimages"
    assert result.report["per_class"]["cat"]["total"] == 4
    assert result.report["per_class"]["dog"]["total"] == 3
    assert [(r["source"], r["reason"]) for r in result.report["rejections"]] == [
        ("readme[1].txt", "no_label")
    ]


def test_generic_class_folders_are_case_insensitive(tmp_path: Path, settings: Settings, real_photos) -> None:
    members = {f"Cat/c{i}.jpg": real_photos["cat"][i] for i in range(3)}
    members |= {f"DOG/d{i}.jpg": real_photos["dog"][i] for i in range(2)}
    source = write_folder(tmp_path / "folders", members)
    result = ingest(settings, source=str(source), show_progress=False)
    assert result.report["layout"] == "class-folders"
    rows = read_manifest(settings)
    assert sorted(row["label"] for row in rows) == ["cat", "cat", "cat", "dog", "dog"]
    for row in rows:
        assert (settings.data_dir / row["path"]).is_file()
        assert row["path"] == f"images/{row['label']}/{row['sha256']}.jpg"


def test_open_source_lists_members_in_name_order(tmp_path: Path, real_photos) -> None:
    archive = write_zip(tmp_path / "t.zip", {"train/dog.2.jpg": b"x", "train/cat.9.jpg": b"y"})
    source = open_source(archive, classes=CLASSES)
    assert [m.name for m in source.members] == ["train/cat.9.jpg", "train/dog.2.jpg"]
    assert [m.label for m in source.members] == ["cat", "dog"]
