"""Where a model came from: git commit, data version, manifest hash and the test-split fingerprint."""

from __future__ import annotations

import csv
import hashlib
import logging
import subprocess
from pathlib import Path

import yaml

_logger = logging.getLogger(__name__)


def split_fingerprint(manifest_path: Path) -> str | None:
    """SHA-256 of the sorted content hashes of the manifest's test images.

    Two accuracies are comparable only when this is equal: same images, whatever their paths.
    """
    if not manifest_path.is_file():
        return None
    with manifest_path.open(newline="") as handle:
        hashes = sorted(row["sha256"] for row in csv.DictReader(handle) if row.get("split") == "test")
    if not hashes:
        return None
    return hashlib.sha256("\n".join(hashes).encode()).hexdigest()


def git_commit(cwd: Path | None = None) -> str:
    """The checked-out commit (``+dirty`` when there are uncommitted changes), or ``unknown``."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{commit}+dirty" if dirty else commit


def _dvc_outs(path: Path) -> list[dict]:
    """The ``outs`` entries of a ``.dvc`` file or of every stage in a ``dvc.lock``."""
    try:
        document = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        _logger.warning("cannot read %s: %s", path, exc)
        return []
    outs = list(document.get("outs") or [])
    for stage in (document.get("stages") or {}).values():
        outs.extend((stage or {}).get("outs") or [])
    return [out for out in outs if isinstance(out, dict)]


def dvc_data_version(
    data_dir: Path, manifest_path: Path, *, search_dirs: tuple[Path, ...] = ()
) -> str | None:
    """The DVC md5 that versions the data: the entry for the manifest or the data folder.

    Looks at ``<data_dir>.dvc``, ``<manifest>.dvc`` and ``dvc.lock`` in the current folder, the data
    folder's parent and ``search_dirs``. Paths in DVC files are relative to the file's folder.
    """
    targets = {data_dir.resolve(), manifest_path.resolve()}
    candidates = [
        data_dir.with_name(data_dir.name + ".dvc"),
        manifest_path.with_name(manifest_path.name + ".dvc"),
    ]
    for folder in (Path.cwd(), data_dir.resolve().parent, *search_dirs):
        candidates.append(folder / "dvc.lock")
    seen: set[Path] = set()
    for candidate in candidates:
        candidate = candidate.resolve()
        if candidate in seen or not candidate.is_file():
            continue
        seen.add(candidate)
        for out in _dvc_outs(candidate):
            out_path = (candidate.parent / str(out.get("path", ""))).resolve()
            md5 = out.get("md5")
            if out_path in targets and md5:
                return str(md5)
    return None
