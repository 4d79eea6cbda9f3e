"""Where images come from: a zip archive or a folder, in the Kaggle, PetImages or class-folder layout.

A source is always a local path by the time it gets here (URLs are downloaded first, see
:mod:`catsdogs.data.download`). :func:`open_source` checks **every** member before anything is
read or written, so an unsafe archive (zip-slip ``../``, absolute names, symlinks) is refused as a
whole: a half-ingested malicious archive would be worse than none.

Labels come from the path, never from the pixels, with one rule that covers all three layouts:
the nearest folder whose name is a class (case-insensitive: ``PetImages/Cat/1.jpg``, ``DOG/x.png``)
wins; otherwise a file name of the form ``<class>.<anything>`` (Kaggle: ``train/cat.123.jpg``).
"""

from __future__ import annotations

import logging
import os
import stat
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from catsdogs import CatsdogsError

_logger = logging.getLogger(__name__)

#: Names that operating systems drop into image folders; they are skipped, not reported.
IGNORED_NAMES = frozenset({"thumbs.db", ".ds_store", "desktop.ini"})


class UnsafeSourceError(CatsdogsError):
    """The source holds a member that could escape the output folder; nothing was written."""


@dataclass(frozen=True, slots=True)
class Member:
    """One file of a source: its name inside the source and the label its path gives (or None)."""

    name: str
    label: str | None
    size: int


@dataclass(frozen=True)
class Source:
    """A checked, local source: a zip archive or a folder, with its members listed in name order."""

    path: Path
    kind: str  # "zip" or "folder"
    layout: str  # "kaggle", "petimages" or "class-folders"
    members: tuple[Member, ...]


def label_for(name: str, classes: tuple[str, ...]) -> str | None:
    """Label given by a member's path (see the module docstring), or None when the path names no class."""
    lowered = {c.lower(): c for c in classes}
    parts = PurePosixPath(name).parts
    for folder in reversed(parts[:-1]):
        if folder.lower() in lowered:
            return lowered[folder.lower()]
    stem = parts[-1].split(".", 1)
    if len(stem) == 2 and stem[0].lower() in lowered:
        return lowered[stem[0].lower()]
    return None


def detect_layout(names: list[str], classes: tuple[str, ...]) -> str:
    """Name the layout for the report: PetImages, Kaggle (labels in file names) or class folders."""
    lowered = {c.lower() for c in classes}
    if any(part.lower() == "petimages" for n in names[:1000] for part in PurePosixPath(n).parts[:-1]):
        return "petimages"
    in_folder = sum(any(p.lower() in lowered for p in PurePosixPath(n).parts[:-1]) for n in names[:1000])
    return "class-folders" if in_folder * 2 >= min(len(names), 1000) else "kaggle"


def _unsafe_reason(name: str) -> str | None:
    """Why an archive member name could escape the output folder, or None when it is safe."""
    normalized = name.replace("\\", "/")
    if normalized.startswith("/") or (len(normalized) > 1 and normalized[1] == ":"):
        return "absolute path"
    if ".." in PurePosixPath(normalized).parts:
        return "parent-directory ('..') component"
    return None


def _is_symlink(info: zipfile.ZipInfo) -> bool:
    # Unix mode bits live in the high 16 bits of external_attr (what `zip --symlinks` writes).
    return info.create_system == 3 and stat.S_ISLNK(info.external_attr >> 16)


def _zip_members(path: Path, classes: tuple[str, ...]) -> list[Member]:
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile as exc:
        raise CatsdogsError(f"{path} is not a readable zip archive ({exc}); check the download") from None
    with archive:
        members = []
        for info in archive.infolist():
            reason = _unsafe_reason(info.filename) or ("symbolic link" if _is_symlink(info) else None)
            if reason:
                raise UnsafeSourceError(
                    f"refusing {path.name}: member {info.filename!r} is a {reason} that could escape the "
                    "output folder; nothing was written. Use a trusted archive."
                )
            if info.is_dir() or _ignored(info.filename):
                continue
            members.append(Member(info.filename, label_for(info.filename, classes), info.file_size))
    return members


def _ignored(name: str) -> bool:
    base = PurePosixPath(name).name
    return base.lower() in IGNORED_NAMES or base.startswith("._") or "__MACOSX" in name


def _folder_members(root: Path, classes: tuple[str, ...]) -> list[Member]:
    members = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for entry in [*dirnames, *filenames]:
            full = Path(dirpath) / entry
            if full.is_symlink():
                raise UnsafeSourceError(
                    f"refusing {root}: {full.relative_to(root)} is a symbolic link that could point outside "
                    "the source; nothing was written. Replace links by real files."
                )
        for filename in filenames:
            full = Path(dirpath) / filename
            if not full.is_file():  # a FIFO or device would block or stream forever when read
                raise UnsafeSourceError(f"refusing {root}: {full.relative_to(root)} is not a regular file")
            name = full.relative_to(root).as_posix()
            if not _ignored(name):
                members.append(Member(name, label_for(name, classes), full.stat().st_size))
    return members


def open_source(path: Path, *, classes: tuple[str, ...]) -> Source:
    """Check and list a local zip archive or folder.

    Raises:
        UnsafeSourceError: a member is a symlink, has an absolute name or a ``..`` component.
        CatsdogsError: the path does not exist, is not a zip, or holds no labelled file.
    """
    if path.is_dir():
        kind, members = "folder", _folder_members(path, classes)
    elif path.is_file():
        kind, members = "zip", _zip_members(path, classes)
    else:
        raise CatsdogsError(f"data source {path} does not exist; pass --source or set CATSDOGS_DATA_SOURCE")
    members.sort(key=lambda m: m.name)
    if not any(m.label for m in members):
        raise CatsdogsError(
            f"{path} holds no file labelled {'/'.join(classes)}: expected train/cat.1.jpg, "
            "PetImages/Cat/1.jpg or one folder per class"
        )
    layout = detect_layout([m.name for m in members if m.label], classes)
    _logger.info("source %s: %s, %s layout, %d files", path, kind, layout, len(members))
    return Source(path=path, kind=kind, layout=layout, members=tuple(members))
