"""The one reader of labelled images: every layout, one label rule for every caller, lazy bytes."""

from __future__ import annotations

import os
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from catsdogs import CatsdogsError
from catsdogs.bundle import find_bundle
from catsdogs.data.labelled import UnsafeSourceError, label_for, read_labelled
from catsdogs.monitoring.evaluate_deployed import evaluate_deployed
from catsdogs.settings import Settings
from catsdogs.training.evaluate import evaluate_bundle
from tiny_bundle import BLUE, build_tiny_bundle, service_in_process, write_images

CLASSES = ("cat", "dog")


def _touch(path: Path, data: bytes = b"not decoded here") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def test_kaggle_zip_layout(tmp_path: Path) -> None:
    archive = _zip(
        tmp_path / "train.zip",
        {"train/cat.1.jpg": b"cat bytes", "train/dog.7.jpg": b"dog bytes", "train/readme.md": b"skip me"},
    )
    items = read_labelled(archive, CLASSES)
    assert [(item.name, item.label, item.read()) for item in items] == [
        ("train/cat.1.jpg", "cat", b"cat bytes"),
        ("train/dog.7.jpg", "dog", b"dog bytes"),
    ]


@pytest.mark.parametrize("zipped", [True, False])
def test_petimages_layout_zipped_or_unpacked(tmp_path: Path, zipped: bool) -> None:
    members = {"PetImages/Cat/1.jpg": b"c1", "PetImages/Dog/2.jpg": b"d2", "PetImages/Cat/Thumbs.db": b"x"}
    if zipped:
        source = _zip(tmp_path / "pets.zip", members)
    else:
        source = tmp_path / "pets"
        for name, data in members.items():
            _touch(source / name, data)
    items = read_labelled(source, CLASSES)
    assert [(item.name, item.label, item.read()) for item in items] == [
        ("PetImages/Cat/1.jpg", "cat", b"c1"),
        ("PetImages/Dog/2.jpg", "dog", b"d2"),
    ]


def test_class_folders_are_case_insensitive_and_labels_keep_the_configured_spelling(tmp_path: Path) -> None:
    _touch(tmp_path / "Cat" / "a.jpg")
    _touch(tmp_path / "DOG" / "b.PNG")
    assert [(item.name, item.label) for item in read_labelled(tmp_path, CLASSES)] == [
        ("Cat/a.jpg", "cat"),
        ("DOG/b.PNG", "dog"),
    ]
    assert [item.label for item in read_labelled(tmp_path, ("Cat", "Dog"))] == ["Cat", "Dog"]


@pytest.mark.parametrize(
    ("name", "label"),
    [
        ("dog/cat.1.jpg", "dog"),  # the folder wins over the file-name prefix
        ("cat/dog.1.jpg", "cat"),
        ("PetImages/Dog/cat.2.jpg", "dog"),
        ("train/cat.3.jpg", "cat"),
        ("dog\\cat.4.jpg", "dog"),  # an archive written on Windows
        ("train/catalog.jpg", None),
        ("cat", None),
    ],
)
def test_one_label_rule(name: str, label: str | None) -> None:
    assert label_for(name, CLASSES) == label


def test_non_image_and_system_files_are_skipped(tmp_path: Path) -> None:
    _touch(tmp_path / "cat" / "a.jpg")
    for name in ("cat/notes.txt", "dog/readme.md", "dog/Thumbs.db", "dog/.DS_Store", "__MACOSX/dog/._b.jpg"):
        _touch(tmp_path / name)
    assert [item.name for item in read_labelled(tmp_path, CLASSES)] == ["cat/a.jpg"]


def test_a_limit_keeps_the_classes_balanced(tmp_path: Path) -> None:
    for i in range(5):
        _touch(tmp_path / "cat" / f"c{i}.jpg")
    for i in range(2):
        _touch(tmp_path / "dog" / f"d{i}.png")
    _touch(tmp_path / "dog" / "notes.txt")
    items = read_labelled(tmp_path, CLASSES, limit=4)
    assert [(item.label, Path(item.name).name) for item in items] == [
        ("cat", "c0.jpg"),
        ("dog", "d0.png"),
        ("cat", "c1.jpg"),
        ("dog", "d1.png"),
    ]
    assert len(read_labelled(tmp_path, CLASSES)) == 7
    assert len(read_labelled(tmp_path, CLASSES, limit=100)) == 7


def test_bytes_are_read_only_when_asked(tmp_path: Path) -> None:
    photo = _touch(tmp_path / "cat" / "a.jpg", b"before")
    (item,) = read_labelled(tmp_path, CLASSES)
    photo.write_bytes(b"after")
    assert item.read() == b"after"


def test_archive_members_read_from_many_threads(tmp_path: Path) -> None:
    members = {f"train/{label}.{i}.jpg": f"{label}{i}".encode() for label in CLASSES for i in range(50)}
    items = read_labelled(_zip(tmp_path / "t.zip", members), CLASSES)
    with ThreadPoolExecutor(4) as pool:
        read = list(pool.map(lambda item: item.read(), items))
    assert read == [members[item.name] for item in items]


def test_a_symlink_refuses_the_folder(tmp_path: Path) -> None:
    _touch(tmp_path / "src" / "cat" / "a.jpg")
    _touch(tmp_path / "secret.txt", b"outside")
    os.symlink(tmp_path / "secret.txt", tmp_path / "src" / "cat" / "b.jpg")
    with pytest.raises(UnsafeSourceError, match="symbolic link"):
        read_labelled(tmp_path / "src", CLASSES)


def test_missing_source_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(CatsdogsError, match="neither a folder nor a zip"):
        read_labelled(tmp_path / "nope", CLASSES)


def test_source_without_labelled_images_is_a_clear_error(tmp_path: Path) -> None:
    _touch(tmp_path / "birds" / "b.jpg")
    with pytest.raises(CatsdogsError, match="no labelled image"):
        read_labelled(tmp_path, CLASSES)


def test_a_dog_folder_holding_cat_named_files_is_dogs_for_evaluate_and_evaluate_deployed(
    tmp_path: Path, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    bundle = build_tiny_bundle(tmp_path / "bundle")
    folder = write_images(tmp_path / "photos", {"dog/cat.1.png": BLUE, "dog/cat.2.png": BLUE})
    offline = evaluate_bundle(find_bundle(bundle), folder, progress=False)
    assert [(p["image"], p["label"], p["correct"]) for p in offline.predictions] == [
        ("dog/cat.1.png", "dog", True),
        ("dog/cat.2.png", "dog", True),
    ]
    with service_in_process(bundle, settings, monkeypatch) as url:
        deployed = evaluate_deployed(url, folder, classes=CLASSES)
    assert deployed.n_failed == 0 and deployed.feedback_sent == 2
    assert deployed.metrics["per_class"]["dog"]["support"] == 2
    assert deployed.metrics["accuracy"] == offline.metrics["accuracy"] == 1.0
