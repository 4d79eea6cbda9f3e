"""``catsdogs data fetch``: the configured data source as a local, verified archive.

The one fetch path for users, ``catsdogs data ingest``, the DVC ``fetch`` stage and the tests: a
local source is used where it is; an http(s) source is downloaded once (streamed and resumable:
:mod:`catsdogs.data.download`) into ``cache_dir/datasets`` and checked against its SHA-256, so a
second fetch reads no network. A download nobody can check is refused unless asked for explicitly
(``allow_unverified``): a truncated or swapped archive would otherwise become the training data
without a trace.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from pathlib import Path

from catsdogs import CatsdogsError
from catsdogs.data.download import download, is_url
from catsdogs.files import file_sha256
from catsdogs.settings import DEFAULT_DATA_SHA256, DEFAULT_DATA_SOURCE, Settings

_logger = logging.getLogger(__name__)


def expected_sha256(settings: Settings) -> str | None:
    """The checksum the source must have: ``data_sha256``, else the published one of the default URL."""
    if settings.data_sha256:
        return settings.data_sha256.strip().lower()
    return DEFAULT_DATA_SHA256 if settings.data_source == DEFAULT_DATA_SOURCE else None


def download_dir(settings: Settings) -> Path:
    """Where downloaded archives are kept (one file per URL file name)."""
    return settings.cache_dir / "datasets"


def fetch_archive(settings: Settings, *, allow_unverified: bool = False) -> Path:
    """Local path of ``settings.data_source``: a local path as is, a URL downloaded once and verified.

    Raises:
        CatsdogsError: a local path is missing or does not match ``data_sha256``; a URL has no known
            checksum (and ``allow_unverified`` is off), cannot be downloaded, or does not match.
    """
    source, sha256 = settings.data_source, expected_sha256(settings)
    if not is_url(source):
        return _local(Path(source).expanduser(), sha256)
    if sha256 is None and not allow_unverified:
        raise CatsdogsError(
            f"no SHA-256 is known for {source}: set CATSDOGS_DATA_SHA256 (data_sha256 in params.yaml) to the "
            "archive's checksum, or pass --allow-unverified to download it unchecked"
        )
    path = download(source, download_dir(settings), sha256=sha256, show_progress=sys.stderr.isatty())
    if sha256 is None:
        _logger.warning(
            "%s was not verified; its SHA-256 is %s: set CATSDOGS_DATA_SHA256 to it to pin this archive",
            path,
            file_sha256(path),
        )
    return path


def _local(path: Path, sha256: str | None) -> Path:
    if not path.exists():
        raise CatsdogsError(
            f"data source {path} does not exist; set CATSDOGS_DATA_SOURCE (data_source in params.yaml) to a "
            "zip archive, a folder or an http(s) URL"
        )
    if sha256 is None:
        return path
    if path.is_dir():
        raise CatsdogsError(f"data_sha256 is set but {path} is a folder: a checksum names one archive file")
    actual = file_sha256(path)
    if actual != sha256:
        raise CatsdogsError(
            f"SHA-256 of {path} is {actual}, expected {sha256}: the file is not the configured dataset "
            "(fix CATSDOGS_DATA_SHA256 or the file)"
        )
    return path


def place(archive: Path, out: Path, *, link: bool) -> Path:
    """Put a fetched archive (or source folder) at ``out``, replacing what was there: the DVC
    ``fetch`` stage's output, so ``ingest`` depends on a file, not on a URL.

    ``link``: a hard link where the file system allows it (no second copy of an 800 MB download),
    for files of our own cache only; a user's own file is copied, so that nothing done to the
    output (DVC may make it read-only) reaches the original.
    """
    if out.resolve() == archive.resolve():
        return out
    if out.is_dir() and not out.is_symlink():
        shutil.rmtree(out)
    elif out.exists() or out.is_symlink():
        out.unlink()
    out.parent.mkdir(parents=True, exist_ok=True)
    copy = _link_or_copy if link else shutil.copy2
    if archive.is_dir():
        shutil.copytree(archive, out, copy_function=copy)
    else:
        copy(archive, out)
    _logger.info("placed %s at %s", archive, out)
    return out


def _link_or_copy(src: str | Path, dst: str | Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system, or links not allowed
        shutil.copy2(src, dst)
