"""How the tests get their photos: the archive is found (or fetched) the way a user gets it, and
photos are picked by the project's labelled-image reader, so the PetImages layout of the public
download works as well as the Kaggle layout of the shared copy."""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import pytest
from datafiles import decode, encode, generated_photos, write_zip
from range_server import serve, url_of
from typer.testing import CliRunner

from catsdogs.cli import app
from support import DATASET_VARIABLES, dataset_archive, dataset_photos, labelled_names


@pytest.fixture(scope="module")
def petimages_zip(dataset_zip: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real photos re-packed the way the public archive holds them: ``PetImages/Cat/<n>.jpg``, of
    varied sizes, numbered so that name order is not number order, with broken files among them."""
    members: dict[str, bytes] = {}
    for label in ("cat", "dog"):
        for i, data in enumerate(dataset_photos(dataset_zip, label, 6)):
            image = decode(data)
            image = image.resize((image.width * (2 + i) // 3, image.height * (3 + i) // 4))
            members[f"PetImages/{label.title()}/{[2, 10, 3, 100, 7, 11][i]}.jpg"] = encode(image, "JPEG")
    members["PetImages/Cat/1.jpg"] = b""  # the public archive holds empty files (Cat/666.jpg)
    members["PetImages/Dog/4.jpg"] = members["PetImages/Dog/2.jpg"][:700]  # and truncated ones
    members["PetImages/Cat/Thumbs.db"] = b"\x00" * 64
    return write_zip(tmp_path_factory.mktemp("petimages") / "kagglecatsanddogs.zip", members)


def test_photo_picker_reads_the_petimages_layout_in_number_order_and_skips_broken_files(
    petimages_zip: Path,
) -> None:
    assert labelled_names(petimages_zip, "cat") == tuple(
        f"PetImages/Cat/{n}.jpg" for n in (1, 2, 3, 7, 10, 11, 100)
    )
    cats = dataset_photos(petimages_zip, "cat", 6)
    with pytest.raises(pytest.fail.Exception, match="fewer than 7 ordinary cat photos"):
        dataset_photos(petimages_zip, "cat", 7)  # 1.jpg is empty
    dogs = dataset_photos(petimages_zip, "dog", 5, offset=1)  # from 3.jpg: 4.jpg is truncated
    assert len(dogs) == 5 and dogs[0] == _member(petimages_zip, "PetImages/Dog/3.jpg")
    assert len({hashlib.sha256(p).hexdigest() for p in cats + dogs}) == 11
    assert len({decode(p).size for p in cats}) == 6  # varied sizes, like the public archive


def test_ingest_reads_the_petimages_archive_the_picker_read(petimages_zip: Path, tmp_path: Path) -> None:
    run = CliRunner().invoke(
        app, ["data", "ingest", "--source", str(petimages_zip), "--data-dir", str(tmp_path / "data")]
    )
    assert run.exit_code == 0, run.output
    report = json.loads((tmp_path / "data" / "data_report.json").read_text())
    assert report["layout"] == "petimages"
    assert report["counts"]["manifest_rows"] == 12
    assert report["rejections_by_reason"] == {"empty": 1, "truncated": 1}


def _member(archive: Path, name: str) -> bytes:
    with zipfile.ZipFile(archive) as handle:
        return handle.read(name)


def _env(**given: str) -> dict[str, str | None]:
    return {name: given.get(name) for name in DATASET_VARIABLES}


def test_shared_copy_wins_then_the_test_dataset_variable(tmp_path: Path) -> None:
    shared, mine = tmp_path / "shared.zip", tmp_path / "mine.zip"
    shared.write_bytes(b"PK")
    mine.write_bytes(b"PK")
    assert dataset_archive(_env(CATSDOGS_TEST_DATASET=str(mine)), shared=shared) == shared
    assert dataset_archive(_env(CATSDOGS_TEST_DATASET=str(mine)), shared=tmp_path / "none") == mine
    with pytest.raises(pytest.fail.Exception, match=r"CATSDOGS_TEST_DATASET=.* does not exist") as failed:
        dataset_archive(_env(CATSDOGS_TEST_DATASET=str(tmp_path / "gone.zip")), shared=tmp_path / "none")
    assert "\n" not in str(failed.value)


def test_without_a_local_copy_the_data_source_is_fetched_once_into_the_test_cache(tmp_path: Path) -> None:
    members = {f"PetImages/Cat/{i}.jpg": p for i, p in enumerate(generated_photos(2)["cat"])}
    payload = write_zip(tmp_path / "src.zip", members).read_bytes()
    digest = hashlib.sha256(payload).hexdigest()
    cache = tmp_path / "test-cache"
    for server in serve(payload):
        env = _env(
            CATSDOGS_DATA_SOURCE=url_of(server), CATSDOGS_DATA_SHA256=digest, CATSDOGS_TEST_CACHE=str(cache)
        )
        path = dataset_archive(env, shared=tmp_path / "none")
        assert dataset_archive(env, shared=tmp_path / "none") == path
        assert len(server.ranges) == 1  # downloaded once
        with pytest.raises(pytest.fail.Exception, match="set CATSDOGS_DATA_SHA256=") as unverified:
            dataset_archive(_env(CATSDOGS_DATA_SOURCE=url_of(server)), shared=tmp_path / "none")
    assert path == cache / "datasets" / "cats.zip" and path.read_bytes() == payload
    assert "\n" not in str(unverified.value) and "CATSDOGS_TEST_DATASET" in str(unverified.value)
