"""Where a model bundle comes from: a local folder, or ``models:/name@alias`` / ``models:/name/N``
in the MLflow registry, downloaded once into ``cache_dir/bundles/<name>/<run id>/``.

The cache (:mod:`~catsdogs.registry.bundle_cache`) is keyed by the run that produced the version.
Every bundle is checked against its ``manifest.json`` (and that against the version's
``bundle_manifest_sha256`` tag) when it is downloaded and each time it is loaded: a changed byte is
refused.

The one resolver for serving, ``evaluate-deployed`` and the promotion gate. It needs only
``mlflow-skinny`` (``MlflowClient`` and artifact downloads, imported lazily so a local folder needs
no MLflow at all) and no torch, so the serving install can use it. MLflow's HTTP client retries for
minutes by default; :func:`bounded_http` caps that by ``registry_timeout_s``, and when the registry
cannot be reached the bundle this URI resolved to last time is used from the cache.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from catsdogs import CatsdogsError
from catsdogs.bundle import ONNX, ModelBundle, find_bundle, write_json_atomic
from catsdogs.files import file_sha256
from catsdogs.registry.bundle_cache import (
    SOURCE_FILE,
    cache_key,
    cache_root,
    cached,
    fallback,
    read_json,
    remember,
    verified,
)
from catsdogs.settings import Settings

if TYPE_CHECKING:
    from mlflow import MlflowClient

logger = logging.getLogger(__name__)

_MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))/?$")
#: Registry answers that mean "this does not exist" (an error to report), not "cannot reach it".
_NOT_FOUND = {"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND", "BAD_REQUEST"}
_OTHER_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:/")


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


@dataclass(frozen=True)
class ResolvedBundle:
    """A bundle on local disk plus where it came from."""

    bundle: ModelBundle
    name: str
    version: str
    alias: str
    source: str
    """``registry`` (just resolved), ``cache`` (registry unreachable) or ``local`` (a folder)."""
    uri: str
    note: str = ""
    registry: dict[str, Any] = field(default_factory=dict)
    """Registry facts: run id, tags of the model version (e.g. the promotion gate's metrics)."""


def parse_models_uri(uri: str) -> ModelRef | None:
    """``models:/…`` → its parts; ``None`` for a local folder (other schemes are refused)."""
    if uri.startswith("models:/"):
        return ModelRef.parse(uri)
    if _OTHER_SCHEME.match(uri) and not uri.startswith("file://"):
        raise CatsdogsError(
            f"unsupported model URI {uri!r}: use models:/<name>@<alias>, "
            "models:/<name>/<version> or a local bundle folder"
        )
    return None


def registry_uri(settings: Settings) -> str:
    """The registry lives with the tracking store unless a separate one is configured."""
    return settings.mlflow_registry_uri or settings.mlflow_tracking_uri


def make_client(settings: Settings) -> MlflowClient:
    """An MLflow client for the configured tracking store and registry (no global state set)."""
    from mlflow import MlflowClient  # lazily: a local bundle folder needs no MLflow

    with _first_open(settings.mlflow_tracking_uri) as first:
        client = MlflowClient(tracking_uri=settings.mlflow_tracking_uri, registry_uri=registry_uri(settings))
        if first:
            client.search_registered_models(max_results=1)  # the registry's tables, same database
    return client


#: SQLite stores this process has opened (created and migrated) already.
_OPENED_SQLITE: set[str] = set()


@contextlib.contextmanager
def _first_open(uri: str) -> Iterator[bool]:
    """The first opening in this process of a ``sqlite:///`` store, under a lock file next to the
    database (``<db>.lock``); yields whether this is that first opening.

    MLflow creates and migrates a SQLite store's tables when a process first opens it; two processes
    doing that at once fail (``duplicate column name``, 1 run in 2 with MLflow 3.17), so one at a
    time does it. Later writes need no lock of ours: SQLite lets one writer in at a time and MLflow
    sets a 20-second busy timeout, within which a second writer waits instead of failing.
    """
    import fcntl

    if not uri.startswith("sqlite:///") or uri in _OPENED_SQLITE:
        yield False
        return
    database = Path(uri.removeprefix("sqlite:///"))
    database.parent.mkdir(parents=True, exist_ok=True)
    with database.with_name(f"{database.name}.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # blocks while another process opens the store
        yield True
    _OPENED_SQLITE.add(uri)


@contextlib.contextmanager
def env_defaults(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables that are not already set, for the duration of the block.

    An explicit setting by the operator always wins; previous state is restored afterwards.
    """
    unset = [key for key in values if key not in os.environ]
    for key in unset:
        os.environ[key] = values[key]
    try:
        yield
    finally:
        for key in unset:
            os.environ.pop(key, None)


def bounded_http(settings: Settings) -> contextlib.AbstractContextManager[None]:
    """Make MLflow's HTTP client give up within about ``registry_timeout_s`` instead of minutes.

    MLflow reads these variables on every request (its defaults: 7 retries with exponential backoff
    and a 120 s timeout), so setting them for the duration of a call is enough. One retry is kept for
    a dropped connection; the worst case is two timeouts.
    """
    timeout = max(1, math.ceil(settings.registry_timeout_s))
    return env_defaults(
        {
            "MLFLOW_HTTP_REQUEST_TIMEOUT": str(timeout),
            "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
            "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0",
            "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0",
            # tqdm bars on stderr are noise in a server log.
            "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
        }
    )


def local_version(bundle: ModelBundle) -> str:
    """A local bundle's version: its metadata's, else a fingerprint of the ONNX graph."""
    meta = bundle.metadata
    for key in ("registry_version", "version"):
        if meta.get(key):
            return str(meta[key])
    return f"local-{file_sha256(bundle.path(ONNX))[:12]}"


def identity(resolved: ResolvedBundle) -> str:
    """What is served: the version and, from a registry, the run behind it (numbers are reused)."""
    return _identity(resolved.version, resolved.registry.get("run_id"))


def _identity(version: int | str, run_id: str | None) -> str:
    return f"{version}@{run_id}" if run_id else str(version)


def _lookup(settings: Settings, ref: ModelRef, uri: str) -> tuple[int, dict[str, Any]]:
    """Ask the registry which version the URI points at now (one bounded round trip, no download).

    Raises:
        CatsdogsError: the model, version or alias does not exist.
        MlflowException | OSError: the registry cannot be reached (within ``registry_timeout_s``).
    """
    from mlflow.exceptions import MlflowException

    with bounded_http(settings):
        client = make_client(settings)
        try:
            if ref.alias is not None:
                mv = client.get_model_version_by_alias(ref.name, ref.alias)
            else:
                mv = client.get_model_version(ref.name, str(ref.version))
        except MlflowException as exc:
            if exc.error_code in _NOT_FOUND:
                raise CatsdogsError(
                    f"{uri} does not exist in the registry {registry_uri(settings)}: {exc.message}"
                ) from None
            raise
    return int(mv.version), {"run_id": mv.run_id, "tags": dict(mv.tags or {}), "source": mv.source}


def resolve_version(model_uri: str, settings: Settings) -> int:
    """The version number a ``models:/`` URI points at now (cheap: no download).

    Raises:
        CatsdogsError: the URI is malformed, or the model, version or alias does not exist.
        MlflowException | OSError: the registry cannot be reached (within ``registry_timeout_s``).
    """
    return _lookup(settings, ModelRef.parse(model_uri), model_uri)[0]


def download_files(settings: Settings, name: str, version: int, staging: Path) -> Path:
    """Download a model version's files into ``staging``; returns the local model folder."""
    from mlflow.artifacts import download_artifacts

    with bounded_http(settings):
        # Not download_artifacts("models:/..."): MLflow resolves that through the *global*
        # registry URI, ignoring the one passed in. Ask our client for the files' location.
        location = make_client(settings).get_model_version_download_uri(name, str(version))
        return Path(
            download_artifacts(
                artifact_uri=location, dst_path=str(staging), tracking_uri=settings.mlflow_tracking_uri
            )
        )


def _download(
    ref: ModelRef, version: int, root: Path, key: str, settings: Settings, facts: dict[str, Any]
) -> ModelBundle:
    """Download a model version into the cache atomically (staging folder + rename), verified."""
    staging = root / f".tmp-{uuid.uuid4().hex}"
    try:
        local = download_files(settings, ref.name, version, staging)
        # Refuse a model that holds no bundle, or a changed one, before it enters the cache.
        verified(find_bundle(local), facts, what=f"{ref.name} version {version}")
        write_json_atomic(local / SOURCE_FILE, {"name": ref.name, "version": str(version), **facts})
        try:
            local.rename(root / key)
        except OSError:  # another process cached it first
            if cached(root, key) is None:
                raise
        return find_bundle(root / key)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _first_line(exc: Exception) -> str:
    text = getattr(exc, "message", None) or str(exc)
    first = (text.strip().splitlines() or [""])[0][:300]
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def _fetch(settings: Settings, ref: ModelRef, uri: str, version: int, facts: dict[str, Any]) -> ModelBundle:
    """The verified bundle of a version the registry just named: from the cache, else downloaded.

    Raises:
        BundleIntegrityError: the cached or downloaded files are not the registered ones.
        CatsdogsError: the download failed (disk full, registry gone mid-way, ...).
    """
    from mlflow.exceptions import MlflowException

    root = cache_root(settings, ref.name)
    key = cache_key(version, facts)
    what = f"{uri} (version {version}, run {facts.get('run_id')})"
    try:
        root.mkdir(parents=True, exist_ok=True)
        bundle = cached(root, key)
        if bundle is not None:
            verified(bundle, facts, what=what)
        else:
            bundle = _download(ref, version, root, key, settings, facts)
            logger.info("downloaded %s into %s", what, bundle.root)
        remember(root, uri, version, key)
    except (MlflowException, OSError) as exc:  # ENOSPC, a dropped connection, a vanished artifact
        raise CatsdogsError(f"cannot download {what} into {root}: {_first_line(exc)}") from None
    return bundle


def resolve(settings: Settings, *, uri: str | None = None) -> ResolvedBundle:
    """Resolve a model URI (default: ``settings.model_uri``) to a verified bundle on disk.

    ``models:/…`` URIs are looked up in the registry and downloaded once into the cache. When the
    registry cannot be reached within ``registry_timeout_s``, the bundle this URI resolved to last
    time is used from the cache, with a warning and a ``note`` saying so.

    Raises:
        BundleIntegrityError: the bundle's files are not the ones its manifest (or the registry) records.
        CatsdogsError: the URI is malformed, refers to something that does not exist, the download
            failed, or the registry is unreachable and nothing is cached for this URI.
    """
    uri = uri or settings.model_uri
    ref = parse_models_uri(uri)
    if ref is None:
        bundle = verified(find_bundle(Path(uri.removeprefix("file://"))), {}, what=uri)
        return ResolvedBundle(bundle, settings.model_name, local_version(bundle), "", "local", uri)
    from mlflow.exceptions import MlflowException

    alias = ref.alias or ""
    started = time.monotonic()
    try:
        version, facts = _lookup(settings, ref, uri)
    except (MlflowException, OSError) as exc:  # requests' connection errors are OSErrors
        return _offline(settings, ref, uri, reason=_first_line(exc), waited=time.monotonic() - started)
    bundle = _fetch(settings, ref, uri, version, facts)
    return ResolvedBundle(bundle, ref.name, str(version), alias, "registry", uri, registry=facts)


def _offline(settings: Settings, ref: ModelRef, uri: str, *, reason: str, waited: float) -> ResolvedBundle:
    """The registry is unreachable: the bundle this URI resolved to last time, verified again."""
    root = cache_root(settings, ref.name)
    cached = fallback(uri, root)
    if cached is None:
        raise CatsdogsError(
            f"cannot reach the model registry at {registry_uri(settings)} ({reason}) and no bundle "
            f"is cached for {uri} in {root}: check CATSDOGS_MLFLOW_TRACKING_URI or point "
            "CATSDOGS_MODEL_URI at a local bundle folder"
        )
    version, key, bundle = cached
    facts = read_json(root / key / SOURCE_FILE)
    verified(bundle, facts, what=f"{uri} (cached version {version})")
    note = (
        f"registry unreachable after {waited:.1f}s ({reason}); "
        f"serving cached version {version} from {bundle.root}"
    )
    logger.warning("%s: %s", uri, note)
    alias = ref.alias or ""
    return ResolvedBundle(bundle, ref.name, str(version), alias, "cache", uri, note=note, registry=facts)


def download_bundle(model_uri: str, settings: Settings) -> Path:
    """The local bundle folder for a registry URI or a local folder (see :func:`resolve`)."""
    return resolve(settings, uri=model_uri).bundle.root


def current_identity(settings: Settings, *, uri: str | None = None) -> str:
    """What the URI points at right now, as :func:`identity` spells it (for polling; no download).

    Raises:
        MlflowException | OSError: the registry cannot be reached.
    """
    uri = uri or settings.model_uri
    ref = parse_models_uri(uri)
    if ref is None:
        return local_version(find_bundle(Path(uri.removeprefix("file://"))))
    version, facts = _lookup(settings, ref, uri)
    return _identity(version, facts.get("run_id"))
