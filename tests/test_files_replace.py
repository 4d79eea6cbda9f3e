"""Folder replacement: a reader of the stable path sees the old folder or the new one, never a
missing or a mixed one, while a writer swaps it again and again."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from catsdogs import files
from catsdogs.files import replace_folder

FILES_PER_VERSION = 6

#: Lists the stable folder in a loop (it must always exist) and reads one version at a time through
#: a descriptor of the folder: every file of a complete read carries the same generation.
READER = """
import json, os, sys, time
target, stop = sys.argv[1], sys.argv[2]
counts = {"missing_folder": 0, "mixed": 0, "incomplete": 0, "retired": 0, "complete": 0}
generations = set()
while not os.path.exists(stop):
    try:
        os.listdir(target)
        fd = os.open(target, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:
        counts["missing_folder"] += 1
        continue
    names, seen = [], []
    try:
        names = os.listdir(fd)
        for name in names:
            handle = os.open(name, os.O_RDONLY, dir_fd=fd)
            seen.append(os.read(handle, 64).decode())
            os.close(handle)
    except FileNotFoundError:
        seen = None
    # A version replaced and being removed while it was read may lack files: not this folder's fault.
    try:
        retired = os.fstat(fd).st_ino != os.stat(target).st_ino
    except FileNotFoundError:
        counts["missing_folder"] += 1
        continue
    finally:
        os.close(fd)
    if retired and (seen is None or len(names) != int(sys.argv[3])):
        counts["retired"] += 1
    elif seen is None:
        counts["incomplete"] += 1
    elif len(set(seen)) > 1:
        counts["mixed"] += 1
    elif len(names) != int(sys.argv[3]):
        counts["incomplete"] += 1
    else:
        counts["complete"] += 1
        generations.add(seen[0])
print(json.dumps({**counts, "generations": len(generations)}))
"""


def _write_version(staging: Path, generation: int) -> Path:
    staging.mkdir()
    for index in range(FILES_PER_VERSION):
        (staging / f"file{index}.txt").write_text(str(generation))
    return staging


def _generations(folder: Path) -> set[str]:
    return {path.read_text() for path in folder.iterdir()}


def test_a_concurrent_reader_never_sees_a_missing_or_mixed_folder(tmp_path: Path) -> None:
    target = tmp_path / "images"
    replace_folder(_write_version(tmp_path / ".staging", 0), target)
    stop = tmp_path / "stop"
    reader = subprocess.Popen(
        [sys.executable, "-c", READER, str(target), str(stop), str(FILES_PER_VERSION)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(0.3)  # the reader is running before the first swap
        swaps = 400
        for generation in range(1, swaps + 1):
            replace_folder(_write_version(tmp_path / ".staging", generation), target)
    finally:
        stop.touch()
        out, _ = reader.communicate(timeout=30)
    counts = json.loads(out)
    assert counts["missing_folder"] == 0
    assert counts["mixed"] == 0
    assert counts["incomplete"] == 0
    assert counts["complete"] > swaps  # the reader really ran across the swaps
    assert counts["generations"] > 10
    assert _generations(target) == {str(swaps)}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images", "stop"]  # old versions removed


def test_the_first_replacement_moves_staging_into_place(tmp_path: Path) -> None:
    target = tmp_path / "nested" / "bundle"
    target.parent.mkdir()
    replace_folder(_write_version(tmp_path / "nested" / ".bundle.staging", 1), target)
    assert _generations(target) == {"1"}
    assert not (tmp_path / "nested" / ".bundle.staging").exists()


def test_without_an_atomic_exchange_the_folder_is_still_replaced_and_it_is_logged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(files, "exchange_paths", lambda first, second: False)
    monkeypatch.setattr(files, "_libc", lambda: None)  # and an fsync per file instead of syncfs
    target = tmp_path / "images"
    replace_folder(_write_version(tmp_path / "a", 1), target)
    with caplog.at_level(logging.WARNING, logger="catsdogs.files"):
        replace_folder(_write_version(tmp_path / "b", 2), target)
    assert _generations(target) == {"2"}
    assert "two steps" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images"]


def test_exchange_swaps_two_folders_in_place(tmp_path: Path) -> None:
    if not sys.platform.startswith("linux"):
        pytest.skip("renameat2 is Linux only; elsewhere replace_folder takes the logged two-step path")
    first = _write_version(tmp_path / "first", 1)
    second = _write_version(tmp_path / "second", 2)
    assert files.exchange_paths(first, second)
    assert _generations(first) == {"2"}
    assert _generations(second) == {"1"}


def test_exchange_reports_a_missing_path(tmp_path: Path) -> None:
    if not sys.platform.startswith("linux"):
        pytest.skip("renameat2 is Linux only")
    with pytest.raises(FileNotFoundError):
        files.exchange_paths(tmp_path / "absent", _write_version(tmp_path / "here", 1))
    assert os.path.isdir(tmp_path / "here")
