"""HTTP(S) sources: streamed download with Range resume and SHA-256 check, from a loopback server."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from datafiles import generated_photos, kaggle_members, read_manifest, write_zip
from range_server import RangeServer, serve, url_of

from catsdogs import CatsdogsError
from catsdogs.data import ingest
from catsdogs.data.download import download
from catsdogs.data.fetch import download_dir
from catsdogs.settings import Settings


@pytest.fixture
def archive_bytes(tmp_path: Path) -> bytes:
    return write_zip(tmp_path / "src.zip", kaggle_members(generated_photos(4), 4)).read_bytes()


@pytest.fixture
def dest(tmp_path: Path) -> Path:
    return tmp_path / "downloads"


@pytest.fixture
def server(archive_bytes: bytes) -> Iterator[RangeServer]:
    yield from serve(archive_bytes)


def test_url_source_is_downloaded_checked_and_ingested(
    server: RangeServer, archive_bytes, settings: Settings
) -> None:
    settings = settings.model_copy(update={"data_sha256": hashlib.sha256(archive_bytes).hexdigest()})
    report = ingest(settings, source=url_of(server), show_progress=False).report
    assert report["counts"]["manifest_rows"] == 8
    assert (download_dir(settings) / "cats.zip").read_bytes() == archive_bytes  # the fetch cache
    assert not (download_dir(settings) / "cats.zip.part").exists()
    assert len(read_manifest(settings)) == 8


def test_partial_download_resumes_with_a_range_request(
    server: RangeServer, archive_bytes, dest: Path
) -> None:
    dest.mkdir()
    (dest / "cats.zip.part").write_bytes(archive_bytes[:1000])
    path = download(
        url_of(server), dest, sha256=hashlib.sha256(archive_bytes).hexdigest(), show_progress=False
    )
    assert server.ranges == ["bytes=1000-"]
    assert path.read_bytes() == archive_bytes


def test_complete_part_file_is_finished_on_416(server: RangeServer, archive_bytes, dest: Path) -> None:
    dest.mkdir()
    (dest / "cats.zip.part").write_bytes(archive_bytes)
    path = download(url_of(server), dest, show_progress=False)
    assert path.read_bytes() == archive_bytes


def test_server_without_range_support_restarts_from_zero(archive_bytes, dest: Path) -> None:
    dest.mkdir()
    (dest / "cats.zip.part").write_bytes(b"garbage that must not stay in front")
    for server in serve(archive_bytes, honour_range=False):
        path = download(url_of(server), dest, show_progress=False)
    assert path.read_bytes() == archive_bytes


def test_wrong_checksum_is_refused_and_the_file_deleted(server: RangeServer, dest: Path) -> None:
    with pytest.raises(CatsdogsError, match="SHA-256"):
        download(url_of(server), dest, sha256="0" * 64, show_progress=False)
    assert list(dest.iterdir()) == []


def test_verified_download_is_reused_without_a_request(
    server: RangeServer, archive_bytes, dest: Path
) -> None:
    digest = hashlib.sha256(archive_bytes).hexdigest()
    download(url_of(server), dest, sha256=digest, show_progress=False)
    download(url_of(server), dest, sha256=digest, show_progress=False)
    assert len(server.ranges) == 1


def test_http_error_is_a_clear_error(server: RangeServer, dest: Path) -> None:
    url = f"http://127.0.0.1:{server.server_address[1]}/missing.txt"
    with pytest.raises(CatsdogsError, match="HTTP 404"):
        download(url, dest, show_progress=False)


def test_unreachable_server_is_a_clear_error(dest: Path) -> None:
    with pytest.raises(CatsdogsError, match="run again to resume"):
        download("http://127.0.0.1:9/cats.zip", dest, show_progress=False, timeout_s=2)
