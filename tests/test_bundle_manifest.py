"""The bundle manifest: the SHA-256 of every file, and the one check serving runs before loading."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from catsdogs.bundle import MANIFEST, ONNX, SAMPLES, BundleIntegrityError, verify_manifest, write_manifest
from catsdogs.files import file_sha256
from fakes import build_bundle


def _flip_one_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    root = build_bundle(tmp_path / "bundle", samples={"cat.1.jpg": b"not really a jpeg"})
    write_manifest(root)
    return root


def test_the_manifest_lists_every_file_but_itself_and_its_digest_is_returned(tmp_path: Path) -> None:
    root = build_bundle(tmp_path / "bundle", samples={"cat.1.jpg": b"x"})
    digest = write_manifest(root)
    manifest = json.loads((root / MANIFEST).read_text())
    files = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()} - {MANIFEST}
    assert set(manifest["files"]) == files and f"{SAMPLES}/cat.1.jpg" in files
    assert manifest["files"][ONNX] == file_sha256(root / ONNX)
    assert digest == file_sha256(root / MANIFEST)
    assert verify_manifest(root, expected_sha256=digest) == digest


def test_one_changed_byte_in_the_graph_is_refused(bundle: Path) -> None:
    _flip_one_byte(bundle / ONNX)
    with pytest.raises(BundleIntegrityError, match=r"model\.onnx does not match manifest\.json"):
        verify_manifest(bundle)


@pytest.mark.parametrize("change", ["added", "removed"])
def test_an_added_or_removed_file_is_refused(bundle: Path, change: str) -> None:
    if change == "added":
        (bundle / "model.int8.onnx").write_bytes(b"unverified graph")
    else:
        (bundle / SAMPLES / "cat.1.jpg").unlink()
    with pytest.raises(BundleIntegrityError, match="does not match"):
        verify_manifest(bundle)


def test_a_manifest_other_than_the_registered_one_is_refused(bundle: Path) -> None:
    """Rewriting the manifest after changing a file does not help: the registry holds its digest."""
    registered = file_sha256(bundle / MANIFEST)
    _flip_one_byte(bundle / ONNX)
    write_manifest(bundle)
    with pytest.raises(BundleIntegrityError, match="the registry recorded"):
        verify_manifest(bundle, expected_sha256=registered)


def test_a_bundle_from_before_manifests_passes_only_when_nothing_is_expected(tmp_path: Path) -> None:
    root = build_bundle(tmp_path / "old")
    assert verify_manifest(root) is None
    with pytest.raises(BundleIntegrityError, match=r"has no manifest\.json"):
        verify_manifest(root, expected_sha256="ab" * 32)
