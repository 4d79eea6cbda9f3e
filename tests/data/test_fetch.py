"""`catsdogs data fetch`: a URL downloaded once into the cache and verified, a local source as is,
and no unverifiable download unless asked for, against a loopback server holding a generated zip."""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from datafiles import generated_photos, write_zip
from range_server import RangeServer, serve, url_of
from typer.testing import CliRunner

from catsdogs import CatsdogsError
from catsdogs.cli import app
from catsdogs.data.fetch import download_dir, expected_sha256, fetch_archive
from catsdogs.settings import DEFAULT_DATA_SHA256, DEFAULT_DATA_SOURCE, Settings

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def archive_bytes(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """A PetImages-layout zip of six generated noise images (no real photo needed to test a fetch)."""
    members = {
        f"PetImages/{label.title()}/{i}.jpg": data
        for label, photos in generated_photos(3).items()
        for i, data in enumerate(photos)
    }
    return write_zip(tmp_path_factory.mktemp("zip") / "cats.zip", members).read_bytes()


@pytest.fixture
def server(archive_bytes: bytes) -> Iterator[RangeServer]:
    yield from serve(archive_bytes)


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _for(settings: Settings, source: str, sha256: str | None = None) -> Settings:
    return settings.model_copy(update={"data_source": source, "data_sha256": sha256})


def test_url_is_downloaded_into_the_cache_and_verified(server, archive_bytes, settings) -> None:
    path = fetch_archive(_for(settings, url_of(server), _digest(archive_bytes)))
    assert path == download_dir(settings) / "cats.zip" == settings.cache_dir / "datasets" / "cats.zip"
    assert path.read_bytes() == archive_bytes
    assert sorted(p.name for p in path.parent.iterdir()) == ["cats.zip"]  # no .part left


def test_cached_verified_archive_needs_no_network(archive_bytes, settings) -> None:
    for server in serve(archive_bytes):
        url = url_of(server)
        first = fetch_archive(_for(settings, url, _digest(archive_bytes)))
    # The server is gone: a second fetch must come from the cache alone.
    assert fetch_archive(_for(settings, url, _digest(archive_bytes))) == first


def test_wrong_checksum_is_refused_and_no_whole_looking_file_is_left(server, settings) -> None:
    with pytest.raises(CatsdogsError, match=r"SHA-256 of .* expected 0{64}"):
        fetch_archive(_for(settings, url_of(server), "0" * 64))
    assert [p.name for p in download_dir(settings).iterdir() if not p.name.endswith(".part")] == []


def test_url_without_a_known_checksum_is_refused_before_any_request(server, settings) -> None:
    with pytest.raises(CatsdogsError) as refused:
        fetch_archive(_for(settings, url_of(server)))
    message = str(refused.value)
    assert "\n" not in message
    assert "CATSDOGS_DATA_SHA256" in message and "--allow-unverified" in message
    assert server.ranges == []
    assert not download_dir(settings).exists()


def test_allow_unverified_downloads_and_logs_the_checksum_to_pin(
    server, archive_bytes, settings, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="catsdogs.data.fetch"):
        path = fetch_archive(_for(settings, url_of(server)), allow_unverified=True)
    assert path.read_bytes() == archive_bytes
    assert _digest(archive_bytes) in caplog.text


def test_interrupted_download_resumes_from_the_part_file(server, archive_bytes, settings) -> None:
    download_dir(settings).mkdir(parents=True)
    (download_dir(settings) / "cats.zip.part").write_bytes(archive_bytes[:1000])
    path = fetch_archive(_for(settings, url_of(server), _digest(archive_bytes)))
    assert server.ranges == ["bytes=1000-"]
    assert path.read_bytes() == archive_bytes


def test_local_source_is_returned_as_is_and_checked_when_a_checksum_is_set(
    tmp_path: Path, archive_bytes, settings
) -> None:
    local = tmp_path / "mine.zip"
    local.write_bytes(archive_bytes)
    assert fetch_archive(_for(settings, str(local))) == local
    assert fetch_archive(_for(settings, str(local), _digest(archive_bytes).upper())) == local
    with pytest.raises(CatsdogsError, match="not the configured dataset"):
        fetch_archive(_for(settings, str(local), "0" * 64))
    assert local.read_bytes() == archive_bytes  # the user's own file is never deleted
    with pytest.raises(CatsdogsError, match="does not exist; set CATSDOGS_DATA_SOURCE"):
        fetch_archive(_for(settings, str(tmp_path / "missing.zip")))


def test_only_the_default_url_has_a_default_checksum() -> None:
    assert expected_sha256(Settings()) == DEFAULT_DATA_SHA256
    assert expected_sha256(Settings(data_source="https://example.org/kagglecatsanddogs_5340.zip")) is None
    assert expected_sha256(Settings(data_sha256="AB" * 32)) == "ab" * 32


def test_params_yaml_names_the_default_source() -> None:
    """params.yaml repeats the settings default (DVC tracks the value from there): they must agree."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    assert params["data_source"] == DEFAULT_DATA_SOURCE
    assert params["data_sha256"] is None  # None: DEFAULT_DATA_SHA256 applies to the default URL


def test_cli_fetch_places_the_archive_for_dvc(server, archive_bytes, settings, tmp_path: Path) -> None:
    out = tmp_path / "data" / "raw" / "dataset"
    out.parent.mkdir(parents=True)
    out.write_bytes(b"stale")
    os.environ["CATSDOGS_CACHE_DIR"] = str(settings.cache_dir)
    args = ["data", "fetch", "--source", url_of(server), "--allow-unverified", "--out", str(out)]
    run = CliRunner().invoke(app, args)
    assert run.exit_code == 0, run.output
    assert run.stdout.strip() == str(out)
    cached = download_dir(settings) / "cats.zip"
    assert out.read_bytes() == cached.read_bytes() == archive_bytes
    assert out.stat().st_ino == cached.stat().st_ino  # a hard link, not a second copy


def test_cli_refusal_is_one_line_saying_what_to_set(server, settings) -> None:
    # COLUMNS: rich wraps the console at 80 columns when stderr is not a terminal.
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "CATSDOGS_CACHE_DIR": str(settings.cache_dir)}
    env["COLUMNS"] = "500"
    run = subprocess.run(
        [sys.executable, "-m", "catsdogs", "data", "fetch", "--source", url_of(server)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 1
    assert run.stdout == ""
    assert run.stderr.count("\n") == 1 and "set CATSDOGS_DATA_SHA256" in run.stderr


def test_cli_fetch_copies_a_local_source_instead_of_linking_it(archive_bytes, tmp_path: Path) -> None:
    mine, out = tmp_path / "mine.zip", tmp_path / "raw" / "dataset"
    mine.write_bytes(archive_bytes)
    run = CliRunner().invoke(app, ["data", "fetch", "--source", str(mine), "--out", str(out)])
    assert run.exit_code == 0, run.output
    assert out.read_bytes() == archive_bytes
    assert out.stat().st_ino != mine.stat().st_ino  # what DVC does to its output never reaches mine
