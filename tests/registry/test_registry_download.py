"""download_bundle: URIs or folders to a bundle, cached, and bounded when the registry is down."""

from __future__ import annotations

import logging
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from registry_fakes import run_id_of

from catsdogs import CatsdogsError
from catsdogs.registry import ModelRef, download_bundle, promote
from catsdogs.settings import Settings

GOOD = {"cat": 0.98, "dog": 0.98}
CHAMPION_URI = "models:/catsdogs-classifier@champion"


@pytest.fixture
def hung_registry() -> Iterator[str]:
    """A TCP port that accepts connections but never answers (a hung server, not a refused port)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}"
    finally:
        server.close()


def test_a_local_bundle_folder_is_used_as_is(make_bundle: Callable, settings: Settings) -> None:
    bundle = make_bundle("local")
    assert download_bundle(str(bundle), settings) == bundle


def test_a_downloaded_mlflow_model_folder_resolves_to_its_bundle(
    make_bundle: Callable, settings: Settings, tmp_path: Path
) -> None:
    model_dir = tmp_path / "model"
    shutil.copytree(make_bundle("inner"), model_dir / "artifacts" / "bundle")
    assert download_bundle(str(model_dir), settings) == model_dir / "artifacts" / "bundle"


def test_a_missing_local_folder_is_a_clear_error(settings: Settings, tmp_path: Path) -> None:
    with pytest.raises(CatsdogsError, match="no model bundle found"):
        download_bundle(str(tmp_path / "nope"), settings)


@pytest.mark.parametrize("uri", ["models:/", "models:/name/latest-ish", "models:/a/b/c"])
def test_a_malformed_models_uri_is_a_clear_error(uri: str, settings: Settings) -> None:
    with pytest.raises(CatsdogsError, match="cannot read model URI"):
        download_bundle(uri, settings)


def test_model_ref_parses_aliases_and_versions() -> None:
    assert ModelRef.parse("models:/m@champion") == ModelRef("m", "champion", None)
    assert ModelRef.parse("models:/m/7") == ModelRef("m", None, 7)


def test_the_champion_is_downloaded_once_into_the_cache(
    settings: Settings, register_version: Callable, tmp_path: Path
) -> None:
    version = register_version(accuracy=0.98, recall=GOOD)
    promote(settings)
    bundle = download_bundle(CHAMPION_URI, settings)
    run_id = run_id_of(settings, version)
    assert bundle == settings.cache_dir / "bundles" / "catsdogs-classifier" / run_id / "artifacts" / "bundle"
    assert (bundle / "model.onnx").is_file() and (bundle / "metrics.json").is_file()
    assert not list(bundle.parents[2].glob(".tmp-*"))  # staging folders are cleaned up
    # The registry's artifact store is gone, yet the same version is served from the cache.
    shutil.rmtree(str(settings.mlflow_artifact_location))
    assert download_bundle(CHAMPION_URI, settings) == bundle
    assert download_bundle(f"models:/catsdogs-classifier/{version}", settings) == bundle


def test_a_moved_alias_downloads_the_new_version(settings: Settings, register_version: Callable) -> None:
    register_version(accuracy=0.975, recall=GOOD)
    promote(settings)
    first = download_bundle(CHAMPION_URI, settings)
    newer = register_version(accuracy=0.99, recall=GOOD)
    promote(settings)
    second = download_bundle(CHAMPION_URI, settings)
    assert second != first
    assert second.parts[-3] == run_id_of(settings, newer)


def test_an_unknown_alias_is_an_error_not_a_fallback(settings: Settings, register_version: Callable) -> None:
    register_version(accuracy=0.98, recall=GOOD)
    with pytest.raises(CatsdogsError, match="does not exist"):
        download_bundle("models:/catsdogs-classifier@nobody", settings)


def test_a_hung_registry_falls_back_to_the_cached_champion_within_seconds(
    settings: Settings, register_version: Callable, hung_registry: str, caplog: pytest.LogCaptureFixture
) -> None:
    register_version(accuracy=0.98, recall=GOOD)
    promote(settings)
    cached = download_bundle(CHAMPION_URI, settings)
    offline = settings.model_copy(update={"mlflow_tracking_uri": hung_registry, "registry_timeout_s": 1.0})
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="catsdogs.registry.model_source"):
        assert download_bundle(CHAMPION_URI, offline) == cached
    assert time.monotonic() - started < 10  # MLflow's defaults would retry for minutes
    assert "unreachable" in caplog.text and str(cached) in caplog.text


def test_a_hung_registry_with_nothing_cached_is_a_clear_error_within_seconds(
    settings: Settings, hung_registry: str
) -> None:
    offline = settings.model_copy(update={"mlflow_tracking_uri": hung_registry, "registry_timeout_s": 1.0})
    started = time.monotonic()
    with pytest.raises(CatsdogsError, match="cannot reach the model registry") as error:
        download_bundle(CHAMPION_URI, offline)
    assert time.monotonic() - started < 10
    assert CHAMPION_URI in str(error.value)


@pytest.mark.parametrize("uri", ["runs:/abc/model", "s3://bucket/model"])
def test_other_uri_schemes_are_refused_clearly(uri: str, settings: Settings) -> None:
    with pytest.raises(CatsdogsError, match="unsupported model URI"):
        download_bundle(uri, settings)


def test_download_needs_nothing_the_serving_install_lacks(
    settings: Settings, register_version: Callable
) -> None:
    """Serving has mlflow-skinny and no pandas, torch or pyfunc: download_bundle runs without them."""
    import os
    import subprocess
    import sys

    import catsdogs

    version = register_version(accuracy=0.98, recall=GOOD)
    promote(settings)
    script = f"""
import sys
for name in ("pandas", "torch", "sklearn", "scipy", "matplotlib", "onnx", "mlflow.pyfunc"):
    sys.modules[name] = None
from catsdogs.registry import download_bundle
from catsdogs.settings import Settings
uri, cache = {settings.mlflow_tracking_uri!r}, {str(settings.cache_dir)!r}
print(download_bundle({CHAMPION_URI!r}, Settings(mlflow_tracking_uri=uri, cache_dir=cache)))
"""
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "PYTHONPATH": str(Path(catsdogs.__file__).parents[1])},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith(f"/{run_id_of(settings, version)}/artifacts/bundle")
