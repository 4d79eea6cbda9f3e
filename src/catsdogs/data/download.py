"""Download a dataset archive over HTTP(S): streamed, resumable, checksum-verified.

The bytes go to ``<name>.part`` next to the target; an interrupted download resumes from the
part file's size with an HTTP ``Range`` request (a server that ignores it answers 200 and we
start over). Only a complete file whose SHA-256 matches (when one is configured) is renamed to
its final name, so a file without ``.part`` is always whole.
"""

from __future__ import annotations

import logging
from pathlib import Path
from urllib.parse import unquote, urlparse

import requests
from tqdm import tqdm

from catsdogs import CatsdogsError
from catsdogs.files import file_sha256

_logger = logging.getLogger(__name__)
CHUNK = 1 << 20


def is_url(source: str) -> bool:
    return source.startswith(("http://", "https://"))


def target_name(url: str) -> str:
    """File name for a URL: its last path segment (``kagglecatsanddogs_5340.zip``)."""
    name = Path(unquote(urlparse(url).path)).name
    return name or "dataset.zip"


def download(
    url: str,
    dest_dir: Path,
    *,
    sha256: str | None = None,
    show_progress: bool = True,
    timeout_s: float = 30.0,
) -> Path:
    """Download ``url`` into ``dest_dir`` (or reuse a verified earlier download) and return the path.

    Raises:
        CatsdogsError: on network/HTTP errors (the ``.part`` file is kept for the next try) and on a
            checksum mismatch (the bad file is deleted so the next try starts clean).
    """
    dest_dir.mkdir(parents=True, exist_ok=True)
    final = dest_dir / target_name(url)
    part = final.with_name(final.name + ".part")
    if final.is_file() and (sha256 is None or file_sha256(final) == sha256.lower()):
        _logger.info("reusing %s", final)
        return final
    offset = part.stat().st_size if part.is_file() else 0
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    try:
        with requests.get(url, headers=headers, stream=True, timeout=timeout_s) as response:
            if response.status_code == 416:  # the part file already holds everything
                pass
            elif response.status_code not in (200, 206):
                raise CatsdogsError(f"download of {url} failed: HTTP {response.status_code}")
            else:
                _write_body(response, part, offset=offset, show_progress=show_progress)
    except requests.RequestException as exc:
        raise CatsdogsError(
            f"download of {url} failed ({exc}); run again to resume, or point CATSDOGS_DATA_SOURCE "
            "at a local copy"
        ) from None
    if sha256 is not None:
        actual = file_sha256(part)
        if actual != sha256.lower():
            part.unlink()
            raise CatsdogsError(
                f"SHA-256 of {url} is {actual}, expected {sha256}: the file is corrupt or not the "
                "configured dataset; it was deleted"
            )
    part.replace(final)
    return final


def _write_body(response: requests.Response, part: Path, *, offset: int, show_progress: bool) -> None:
    """Append a 206 body to the part file, or rewrite it from zero for a plain 200."""
    resumed = response.status_code == 206 and offset > 0
    if not resumed:
        offset = 0
    length = response.headers.get("Content-Length")
    total = offset + int(length) if length and length.isdigit() else None
    with (
        part.open("ab" if resumed else "wb") as handle,
        tqdm(
            total=total,
            initial=offset,
            unit="B",
            unit_scale=True,
            desc=f"download {part.stem}",
            disable=not show_progress,
        ) as bar,
    ):
        for chunk in response.iter_content(CHUNK):
            handle.write(chunk)
            bar.update(len(chunk))
    if total is not None and part.stat().st_size != total:
        raise CatsdogsError(f"download of {response.url} stopped early; run again to resume")
