"""The images of a folder tree or a zip archive, listed once and read by name.

Listing goes through :func:`catsdogs.data.labelled.list_members`, so a batch job refuses the same
unsafe members (symlinks, FIFOs, ``..`` names) as ingest. The collection pickles as its path, so a
Ray actor opens its own zip handle instead of sharing one.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from catsdogs import CatsdogsError
from catsdogs.data.labelled import Archive, is_image_name, list_members

#: What reading one member can raise (a vanished file, a zip member with a bad CRC): that file fails.
READ_ERRORS: tuple[type[BaseException], ...] = (OSError, zipfile.BadZipFile, KeyError, EOFError)


@dataclass
class ImageCollection:
    """A folder or zip archive of images; ``names`` are paths inside it, in name order."""

    source: Path
    names: list[str] = field(default_factory=list)
    _archive: Archive | None = field(default=None, repr=False)

    @classmethod
    def open(cls, source: Path) -> ImageCollection:
        """List the images (by file-name suffix; content is checked when decoded).

        Raises:
            CatsdogsError: the source is missing, unsafe or holds no image.
        """
        names = [m.name for m in list_members(source, ()) if is_image_name(m.name)]
        if not names:
            raise CatsdogsError(f"no images in {source}: give a folder or zip archive of .jpg/.png/... files")
        return cls(source, names, None if source.is_dir() else Archive(source))

    def read(self, name: str) -> bytes:
        if self._archive is None:
            return (self.source / name).read_bytes()
        return self._archive.read(name)
