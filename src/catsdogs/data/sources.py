"""Where ingest's images come from: a zip archive or a folder (Kaggle, PetImages or class folders).

A source is always a local path by the time it gets here (URLs are downloaded first, see
:mod:`catsdogs.data.download`). :func:`open_source` checks **every** member before anything is
read or written, so an unsafe archive (zip-slip ``../``, absolute names, symlinks) is refused as a
whole: a half-ingested malicious archive would be worse than none.

The listing, its safety checks and the label rule are those of :mod:`catsdogs.data.labelled`, which
``evaluate`` and ``evaluate-deployed`` read through too; this module adds what only ingest needs:
the layout's name for the report, and keeping unlabelled files so the report can count them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from catsdogs import CatsdogsError
from catsdogs.data.labelled import Member, list_members

_logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Source:
    """A checked, local source: a zip archive or a folder, with its members listed in name order."""

    path: Path
    kind: str  # "zip" or "folder"
    layout: str  # "kaggle", "petimages" or "class-folders"
    members: tuple[Member, ...]


def detect_layout(names: list[str], classes: tuple[str, ...]) -> str:
    """Name the layout for the report: PetImages, Kaggle (labels in file names) or class folders."""
    lowered = {c.lower() for c in classes}
    if any(part.lower() == "petimages" for n in names[:1000] for part in PurePosixPath(n).parts[:-1]):
        return "petimages"
    in_folder = sum(any(p.lower() in lowered for p in PurePosixPath(n).parts[:-1]) for n in names[:1000])
    return "class-folders" if in_folder * 2 >= min(len(names), 1000) else "kaggle"


def open_source(path: Path, *, classes: tuple[str, ...]) -> Source:
    """Check and list a local zip archive or folder.

    Raises:
        UnsafeSourceError: a member is a symlink, has an absolute name or a ``..`` component
            (see :func:`catsdogs.data.labelled.list_members`).
        CatsdogsError: the path does not exist, is not a zip, or holds no labelled file.
    """
    if not path.exists():
        raise CatsdogsError(f"data source {path} does not exist; pass --source or set CATSDOGS_DATA_SOURCE")
    kind = "folder" if path.is_dir() else "zip"
    members = list_members(path, classes)
    if not any(m.label for m in members):
        raise CatsdogsError(
            f"{path} holds no file labelled {'/'.join(classes)}: expected train/cat.1.jpg, "
            "PetImages/Cat/1.jpg or one folder per class"
        )
    layout = detect_layout([m.name for m in members if m.label], classes)
    _logger.info("source %s: %s, %s layout, %d files", path, kind, layout, len(members))
    return Source(path=path, kind=kind, layout=layout, members=tuple(members))
