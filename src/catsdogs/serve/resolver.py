"""Find the bundle to serve: a local folder, or ``models:/name@alias`` / ``models:/name/N`` from the
MLflow registry, downloaded once into ``cache_dir/bundles/<name>/<version>/``.

Only ``mlflow-skinny`` is needed (``MlflowClient``). MLflow's HTTP client retries for minutes by
default; :func:`bound_mlflow_http` caps timeout and retries from ``registry_timeout_s`` so a
registry outage costs seconds, after which the newest cached bundle is served.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from catsdogs import CatsdogsError
from catsdogs.bundle import ONNX, ModelBundle, find_bundle, write_json_atomic
from catsdogs.settings import Settings

logger = logging.getLogger(__name__)

_MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))$")
_ALIAS_POINTER = ".alias-{alias}.json"
_SOURCE_FILE = ".catsdogs-source.json"


@dataclass(frozen=True)
class ResolvedBundle:
    """A bundle on local disk plus where it came from."""

    bundle: ModelBundle
    name: str
    version: str
    alias: str
    source: str
    """``registry`` (just resolved), ``cache`` (registry unreachable) or ``local`` (a path)."""
    uri: str
    note: str = ""
    registry: dict[str, Any] = field(default_factory=dict)
    """Registry facts: run id, tags of the model version (e.g. the promotion gate's metrics)."""


@dataclass(frozen=True)
class RegistryRef:
    name: str
    alias: str | None
    version: str | None


def parse_models_uri(uri: str) -> RegistryRef | None:
    """``models:/name@alias`` or ``models:/name/3`` → parts; ``None`` for a local path."""
    if not uri.startswith("models:/"):
        return None
    match = _MODELS_URI.match(uri)
    if not match:
        raise CatsdogsError(f"model URI {uri!r} is not models:/<name>@<alias> or models:/<name>/<version>")
    return RegistryRef(match["name"], match["alias"], match["version"])


def bound_mlflow_http(timeout_s: float) -> None:
    """Cap MLflow's per-request timeout and retries (process-wide environment, read per request)."""
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(max(1, round(timeout_s)))
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "1"
    os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"] = "0"
    os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_JITTER"] = "0"


def local_version(bundle: ModelBundle) -> str:
    """A local bundle's version: its metadata's, else a fingerprint of the ONNX graph."""
    meta = bundle.metadata
    for key in ("registry_version", "version"):
        if meta.get(key):
            return str(meta[key])
    digest = hashlib.sha256()
    with bundle.path(ONNX).open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return f"local-{digest.hexdigest()[:12]}"


def _client(settings: Settings) -> Any:
    from mlflow import MlflowClient  # mlflow-skinny; imported lazily so a local path needs none of it

    bound_mlflow_http(settings.registry_timeout_s)
    return MlflowClient(tracking_uri=settings.mlflow_tracking_uri, registry_uri=settings.mlflow_registry_uri)


def cache_root(settings: Settings, name: str) -> Path:
    return settings.cache_dir / "bundles" / name


def lookup_version(settings: Settings, ref: RegistryRef) -> tuple[str, dict[str, Any]]:
    """Ask the registry which version the alias points at (one bounded HTTP round trip)."""
    client = _client(settings)
    if ref.alias:
        mv = client.get_model_version_by_alias(ref.name, ref.alias)
    else:
        mv = client.get_model_version(ref.name, ref.version)
    return str(mv.version), {"run_id": mv.run_id, "tags": dict(mv.tags or {}), "source": mv.source}


def _download(settings: Settings, name: str, version: str, registry: dict[str, Any]) -> Path:
    """Download a model version into the cache atomically (temp folder + rename)."""
    import mlflow.artifacts

    target = cache_root(settings, name) / version
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{version}."))
    try:
        # Ask this client for the version's storage location: a bare "models:/" URI would be
        # resolved against MLflow's process-wide default registry, not the configured one.
        source = _client(settings).get_model_version_download_uri(name, version)
        local = Path(
            mlflow.artifacts.download_artifacts(
                artifact_uri=source, dst_path=str(staging), tracking_uri=settings.mlflow_tracking_uri
            )
        )
        find_bundle(local)  # refuse a model version without a bundle before it enters the cache
        write_json_atomic(local / _SOURCE_FILE, {"name": name, "version": version, **registry})
        local.replace(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _newest_cached(settings: Settings, ref: RegistryRef) -> tuple[str, Path, dict[str, Any]] | None:
    """The version the alias last pointed at, else the highest cached version number."""
    root = cache_root(settings, ref.name)
    if not root.is_dir():
        return None
    if ref.version:
        folder = root / ref.version
        return (ref.version, folder, {}) if folder.is_dir() else None
    pointer = root / _ALIAS_POINTER.format(alias=ref.alias)
    if pointer.is_file():
        version = str(json.loads(pointer.read_text()).get("version"))
        if (root / version).is_dir():
            return version, root / version, {}
    versions = sorted(
        (p for p in root.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name)
    )
    return (versions[-1].name, versions[-1], {}) if versions else None


def resolve(settings: Settings, *, uri: str | None = None) -> ResolvedBundle:
    """Resolve the configured model URI to a bundle on disk, falling back to the cache.

    Raises:
        CatsdogsError: when neither the registry nor the cache (nor the path) has a bundle.
    """
    uri = uri or settings.model_uri
    ref = parse_models_uri(uri)
    if ref is None:
        bundle = find_bundle(Path(uri))
        ModelBundle.open(bundle.root)
        return ResolvedBundle(bundle, settings.model_name, local_version(bundle), "", "local", uri)
    alias = ref.alias or ""
    started = time.monotonic()
    try:
        version, registry = lookup_version(settings, ref)
        folder = _download(settings, ref.name, version, registry)
        if ref.alias:
            write_json_atomic(
                cache_root(settings, ref.name) / _ALIAS_POINTER.format(alias=ref.alias),
                {"version": version, "resolved_at": time.time()},
            )
        return ResolvedBundle(
            find_bundle(folder), ref.name, version, alias, "registry", uri, registry=registry
        )
    except Exception as exc:  # MLflow raises many types for "unreachable" / "no such alias"
        cached = _newest_cached(settings, ref)
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
        if cached is None:
            raise CatsdogsError(
                f"cannot resolve {uri} ({reason}) and no bundle is cached under "
                f"{cache_root(settings, ref.name)}; check CATSDOGS_MLFLOW_TRACKING_URI or serve a local path"
            ) from exc
        version, folder, registry = cached
        source_file = folder / _SOURCE_FILE
        if source_file.is_file():
            registry = json.loads(source_file.read_text())
        note = (
            f"registry unreachable after {time.monotonic() - started:.1f}s ({reason}); "
            f"serving cached version {version}"
        )
        logger.warning("%s", note)
        return ResolvedBundle(
            find_bundle(folder), ref.name, version, alias, "cache", uri, note=note, registry=registry
        )


def current_version(settings: Settings, *, uri: str | None = None) -> str:
    """The version the URI points at right now (for polling); raises when the registry is down."""
    uri = uri or settings.model_uri
    ref = parse_models_uri(uri)
    if ref is None:
        return local_version(find_bundle(Path(uri)))
    return lookup_version(settings, ref)[0]
