"""Fetch a model bundle from the registry (or a local folder), with a local cache that keeps
serving up when the registry is not reachable.

Only ``mlflow-skinny`` is needed here (no ``mlflow.pyfunc``), so the serving install can use it.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

from mlflow.exceptions import MlflowException

from catsdogs import CatsdogsError
from catsdogs.bundle import find_bundle, write_json_atomic
from catsdogs.registry.client import bounded_http, make_client, registry_uri
from catsdogs.settings import Settings

_logger = logging.getLogger(__name__)

_MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))/?$")
#: Registry answers that mean "this does not exist" (an error to report), not "cannot reach it".
_NOT_FOUND = {"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND", "BAD_REQUEST"}
_OTHER_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:/")
REFS_FILE = "refs.json"


@dataclass(frozen=True)
class ModelRef:
    """A parsed ``models:/name@alias`` or ``models:/name/version`` URI."""

    name: str
    alias: str | None
    version: int | None

    @classmethod
    def parse(cls, uri: str) -> ModelRef:
        match = _MODELS_URI.match(uri)
        if match is None:
            raise CatsdogsError(
                f"cannot read model URI {uri!r}: use models:/<name>@<alias>, models:/<name>/<version> "
                "or a local bundle folder"
            )
        version = match["version"]
        return cls(match["name"], match["alias"], int(version) if version else None)


def _cache_root(settings: Settings, name: str) -> Path:
    return settings.cache_dir / "bundles" / name


def _read_refs(root: Path) -> dict[str, dict]:
    try:
        return json.loads((root / REFS_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _remember(root: Path, uri: str, version: int) -> None:
    refs = _read_refs(root)
    refs[uri] = {"version": version}
    write_json_atomic(root / REFS_FILE, refs)


def _cached(root: Path, version: int) -> Path | None:
    folder = root / str(version)
    try:
        return find_bundle(folder).root
    except CatsdogsError:
        return None


def _fallback(uri: str, ref: ModelRef, root: Path) -> Path | None:
    """The bundle this URI resolved to last time (for an alias), or the pinned version, if cached."""
    version = ref.version if ref.version is not None else _read_refs(root).get(uri, {}).get("version")
    return _cached(root, int(version)) if version is not None else None


def resolve_version(model_uri: str, settings: Settings) -> int:
    """The version number a ``models:/`` URI points at now (cheap: no download).

    Raises:
        CatsdogsError: the model, version or alias does not exist.
        MlflowException: the registry cannot be reached (within ``registry_timeout_s``).
    """
    ref = ModelRef.parse(model_uri)
    with bounded_http(settings):
        client = make_client(settings)
        try:
            if ref.alias is not None:
                return int(client.get_model_version_by_alias(ref.name, ref.alias).version)
            return int(client.get_model_version(ref.name, str(ref.version)).version)
        except MlflowException as exc:
            if exc.error_code in _NOT_FOUND:
                raise CatsdogsError(
                    f"{model_uri} does not exist in the registry {registry_uri(settings)}: {exc.message}"
                ) from None
            raise


def _first_line(exc: Exception) -> str:
    text = exc.message if isinstance(exc, MlflowException) else str(exc)
    return (text.strip().splitlines() or [type(exc).__name__])[0][:300]


def _download(ref: ModelRef, version: int, root: Path, settings: Settings) -> Path:
    from mlflow.artifacts import download_artifacts

    staging = root / f".tmp-{uuid.uuid4().hex}"
    try:
        # Not download_artifacts("models:/..."): MLflow resolves that through the *global* registry
        # URI, ignoring the one passed in. Ask our client for the files' location instead.
        location = make_client(settings).get_model_version_download_uri(ref.name, str(version))
        local = Path(
            download_artifacts(
                artifact_uri=location, dst_path=str(staging), tracking_uri=settings.mlflow_tracking_uri
            )
        )
        find_bundle(local)  # refuse a model that holds no bundle before it enters the cache
        target = root / str(version)
        try:
            local.rename(target)
        except OSError:  # another process cached it first
            if _cached(root, version) is None:
                raise
        return find_bundle(target).root
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def download_bundle(model_uri: str, settings: Settings) -> Path:
    """The local bundle folder for a registry URI or a local path.

    ``models:/name@alias`` and ``models:/name/3`` are resolved in the registry and downloaded once
    into ``settings.cache_dir/bundles/<name>/<version>``. When the registry cannot be reached within
    ``registry_timeout_s``, the bundle this URI resolved to last time is used (with a warning).

    Raises:
        CatsdogsError: the URI is malformed or does not exist, or the registry is unreachable and
            nothing is cached for this URI.
    """
    if not model_uri.startswith("models:/"):
        if _OTHER_SCHEME.match(model_uri) and not model_uri.startswith("file://"):
            raise CatsdogsError(
                f"unsupported model URI {model_uri!r}: use models:/<name>@<alias>, "
                "models:/<name>/<version> or a local bundle folder"
            )
        return find_bundle(Path(model_uri.removeprefix("file://"))).root
    ref = ModelRef.parse(model_uri)
    root = _cache_root(settings, ref.name)
    try:
        version = resolve_version(model_uri, settings)
        root.mkdir(parents=True, exist_ok=True)
        bundle = _cached(root, version)
        if bundle is None:
            with bounded_http(settings):
                bundle = _download(ref, version, root, settings)
            _logger.info("downloaded %s (version %d) into %s", model_uri, version, bundle)
        _remember(root, model_uri, version)
        return bundle
    except (MlflowException, OSError) as exc:  # requests' connection errors are OSErrors
        reason = _first_line(exc)
        cached = _fallback(model_uri, ref, root)
        if cached is None:
            raise CatsdogsError(
                f"cannot reach the model registry at {registry_uri(settings)} ({reason}) "
                f"and no copy of {model_uri} is cached in {root}: check CATSDOGS_MLFLOW_TRACKING_URI "
                "or point CATSDOGS_MODEL_URI at a local bundle folder"
            ) from None
        _logger.warning(
            "model registry unreachable (%s); using the cached bundle %s for %s",
            reason,
            cached,
            model_uri,
        )
        return cached
