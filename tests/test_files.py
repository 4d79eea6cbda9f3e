"""Atomic writes: whole files only, with the mode the umask gives (never mkstemp's 0600)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from catsdogs.bundle import write_json_atomic
from catsdogs.files import atomic_path, default_file_mode, write_text_atomic


@pytest.fixture(params=[0o022, 0o077, 0o002])
def umask(request: pytest.FixtureRequest):
    previous = os.umask(request.param)
    yield request.param
    os.umask(previous)


def test_written_files_follow_the_umask_like_any_other_tool(tmp_path: Path, umask: int) -> None:
    expected = 0o666 & ~umask
    assert default_file_mode() == expected
    write_json_atomic(tmp_path / "metadata.json", {"a": 1})
    write_text_atomic(tmp_path / "manifest.csv", "path,label\n")
    with atomic_path(tmp_path / "model.onnx", suffix=".onnx") as tmp:
        tmp.write_bytes(b"graph")
    (tmp_path / "plain.txt").write_text("x")  # what open() gives, for comparison
    for name in ("metadata.json", "manifest.csv", "model.onnx", "plain.txt"):
        assert (tmp_path / name).stat().st_mode & 0o777 == expected, name


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "metrics.json"
    write_json_atomic(target, {"accuracy": 0.99})
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text('{"accura')
        raise RuntimeError("disk went away")
    assert target.read_text() == '{\n  "accuracy": 0.99\n}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]
