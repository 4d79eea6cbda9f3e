"""Models you can trust: the registered digest of every bundle file, checked on download and on each
load from the cache; a cache keyed by run; a failed download reported as such."""

from __future__ import annotations

import errno
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from registry_fakes import run_id_of

from catsdogs import CatsdogsError
from catsdogs.bundle import MANIFEST, ONNX, BundleIntegrityError
from catsdogs.files import file_sha256
from catsdogs.registry import MlflowTracker, download_bundle, model_source, promote
from catsdogs.registry.bundle_cache import MANIFEST_TAG
from catsdogs.registry.model_source import make_client, resolve
from catsdogs.settings import Settings

GOOD = {"cat": 0.98, "dog": 0.98}
CHAMPION_URI = "models:/catsdogs-classifier@champion"


def _flip_one_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _register(settings: Settings, bundle: Path, tmp_path: Path) -> int:
    with MlflowTracker(settings) as tracker:
        return tracker.finish(
            bundle_dir=bundle,
            test_metrics=json.loads((bundle / "metrics.json").read_text()),
            artifacts_dir=tmp_path / "none",
            manifest_path=None,
            report_path=None,
        )


def test_registration_tags_the_version_with_the_digest_of_the_bundle_manifest(
    settings: Settings, register_version: Callable
) -> None:
    version = register_version(accuracy=0.98, recall=GOOD)
    promote(settings)
    bundle = download_bundle(CHAMPION_URI, settings)
    tag = make_client(settings).get_model_version(settings.model_name, str(version)).tags[MANIFEST_TAG]
    assert tag == file_sha256(bundle / MANIFEST)
    assert json.loads((bundle / MANIFEST).read_text())["files"][ONNX] == file_sha256(bundle / ONNX)


def test_a_changed_byte_in_the_cache_is_refused_on_the_next_load(
    settings: Settings, register_version: Callable
) -> None:
    register_version(accuracy=0.98, recall=GOOD)
    promote(settings)
    bundle = download_bundle(CHAMPION_URI, settings)
    _flip_one_byte(bundle / ONNX)
    with pytest.raises(BundleIntegrityError, match=r"model\.onnx does not match"):
        download_bundle(CHAMPION_URI, settings)


def test_a_changed_byte_in_the_registry_artifact_is_refused_and_never_cached(
    settings: Settings, register_version: Callable
) -> None:
    register_version(accuracy=0.98, recall=GOOD)
    promote(settings)
    stored = list(Path(str(settings.mlflow_artifact_location)).rglob(f"bundle/{ONNX}"))
    assert len(stored) == 1
    _flip_one_byte(stored[0])
    with pytest.raises(BundleIntegrityError, match=r"model\.onnx does not match"):
        download_bundle(CHAMPION_URI, settings)
    root = settings.cache_dir / "bundles" / settings.model_name
    assert [p.name for p in root.iterdir()] == []  # neither a cached copy nor a staging folder


def test_a_reset_registry_does_not_serve_the_cached_v1_of_another_run(
    settings: Settings, make_bundle: Callable, tmp_path: Path, _migrated_db: Path
) -> None:
    first = make_bundle("run-a", bias=(2.0, 0.0))
    assert _register(settings, first, tmp_path) == 1
    promote(settings)
    cached_a = download_bundle(CHAMPION_URI, settings)

    # The registry is wiped and rebuilt (same URI scheme, same cache): its v1 is another model.
    shutil.copy(_migrated_db, tmp_path / "reset.db")
    reset = settings.model_copy(
        update={
            "mlflow_tracking_uri": f"sqlite:///{tmp_path / 'reset.db'}",
            "mlflow_artifact_location": str(tmp_path / "reset-artifacts"),
        }
    )
    second = make_bundle("run-b", bias=(0.0, 2.0))
    assert _register(reset, second, tmp_path) == 1
    promote(reset)
    resolved = resolve(reset, uri=CHAMPION_URI)
    assert resolved.version == "1" and resolved.bundle.root != cached_a
    assert resolved.bundle.root.parts[-3] == run_id_of(reset, 1) != run_id_of(settings, 1)
    assert file_sha256(resolved.bundle.root / ONNX) == file_sha256(second / ONNX)
    assert file_sha256(second / ONNX) != file_sha256(first / ONNX)


def test_a_full_disk_during_the_download_is_a_clear_error_and_leaves_no_cache(
    settings: Settings, register_version: Callable, monkeypatch: pytest.MonkeyPatch
) -> None:
    register_version(accuracy=0.98, recall=GOOD)
    promote(settings)

    def disk_full(*_: object) -> Path:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(model_source, "download_files", disk_full)
    with pytest.raises(CatsdogsError, match=r"cannot download .*No space left on device") as error:
        download_bundle(CHAMPION_URI, settings)
    assert "\n" not in str(error.value)
    root = settings.cache_dir / "bundles" / settings.model_name
    assert not [p for p in root.iterdir() if p.is_dir()]
