"""Atomic file writes: readers see the old file or the new one, never half of one.

Every file the project writes (bundle files, the ONNX graph, manifests, feature caches, checkpoints,
reports) goes through :func:`atomic_path`: a temporary file beside the target, flushed to disk, then
renamed over it. The file gets the mode any other tool would give it (``0666`` less the umask):
``tempfile.mkstemp`` creates ``0600`` files, which a container running as another user (the serving
image's uid 10001 reading a bundle mounted read-only) cannot open.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def current_umask() -> int:
    """The process umask, read without changing it (``os.umask`` can only be read by setting it,
    which would race with other threads creating files)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def default_file_mode() -> int:
    """What ``open(path, "w")`` would create: ``0666`` less the umask."""
    return 0o666 & ~current_umask()


@contextmanager
def atomic_path(path: Path, *, suffix: str = ".tmp") -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; when the block ends without an error it is
    flushed to disk, given the default file mode and renamed over ``path`` (else it is removed).

    ``suffix`` keeps the extension for writers that choose their format by it (Matplotlib, ONNX).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        tmp.chmod(default_file_mode())
        with tmp.open("rb") as handle:
            os.fsync(handle.fileno())
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str) -> Path:
    """Write ``text`` (UTF-8, newlines as given) to ``path`` atomically."""
    with atomic_path(path) as tmp, tmp.open("w", encoding="utf-8", newline="") as handle:
        handle.write(text)
    return path


@contextmanager
def exclusive_lock(folder: Path, *, what: str) -> Iterator[None]:
    """Hold an exclusive lock on ``folder`` itself (no lock file to leave behind) for the block, or
    refuse at once with a one-line error: two ingests swapping one data folder would leave it
    mixed. The kernel releases the lock when the process dies, so a crash never leaves it stale."""
    import fcntl

    from catsdogs import CatsdogsError

    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CatsdogsError(f"{what} is already running; wait for it to finish") from None
        yield
    finally:
        os.close(fd)  # closing the last descriptor releases the lock


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, read in 1 MiB chunks (archives and graphs can be larger than memory)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
