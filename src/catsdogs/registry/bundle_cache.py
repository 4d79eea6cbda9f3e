"""The on-disk cache of registry downloads: ``cache_dir/bundles/<name>/<run id>/``, checked on every load.

Keyed by the run that produced a model version, not by its number: a registry that was reset numbers
its versions from 1 again, and its "v1" is another model. Each folder holds the downloaded MLflow
model (the bundle in ``artifacts/bundle``) and :data:`SOURCE_FILE` (the registry facts at download
time); :data:`REFS_FILE` remembers which version each URI resolved to last, for when the registry
cannot be reached. Standard library only (no MLflow), like :mod:`~catsdogs.registry.model_source`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from pathlib import Path
from typing import Any

from catsdogs import CatsdogsError
from catsdogs.bundle import MANIFEST, ModelBundle, find_bundle, verify_manifest, write_json_atomic
from catsdogs.settings import Settings

logger = logging.getLogger(__name__)

#: In ``cache_dir/bundles/<name>/``: which version (and cache key) each URI resolved to last (the
#: offline fallback).
REFS_FILE = "refs.json"
_SAFE_KEY = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
#: In ``cache_dir/bundles/<name>/<key>/``: the registry facts of that version (run id, tags).
SOURCE_FILE = ".catsdogs-source.json"
#: Model-version tag: SHA-256 of the bundle's ``manifest.json``, recorded at registration.
MANIFEST_TAG = "bundle_manifest_sha256"


def cache_root(settings: Settings, name: str) -> Path:
    return settings.cache_dir / "bundles" / name


def read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return value if isinstance(value, dict) else {}


def cache_key(version: int, facts: dict[str, Any]) -> str:
    """The cache folder of a model version: its run id (a fingerprint of its source when it has none)."""
    run_id = str(facts.get("run_id") or "")
    if _SAFE_KEY.match(run_id):
        return run_id
    source = str(facts.get("source") or version)
    return f"source-{hashlib.sha256(source.encode()).hexdigest()[:16]}"


def verified(bundle: ModelBundle, facts: dict[str, Any], *, what: str) -> ModelBundle:
    """``bundle`` once its files match its manifest and the manifest the version's tag.

    A bundle written before manifests existed loads with a warning, unless the registry recorded a
    digest for it (then it is refused like any other mismatch).

    Raises:
        BundleIntegrityError: a file differs from the manifest, or the manifest from the tag.
    """
    expected = (facts.get("tags") or {}).get(MANIFEST_TAG)
    if verify_manifest(bundle.root, expected_sha256=expected) is None:
        logger.warning("%s: %s has no %s, so its files cannot be verified", what, bundle.root, MANIFEST)
    return bundle


def remember(root: Path, uri: str, version: int, key: str) -> None:
    refs = read_json(root / REFS_FILE)
    refs[uri] = {"version": version, "key": key, "resolved_at": time.time()}
    write_json_atomic(root / REFS_FILE, refs)


def cached(root: Path, key: str) -> ModelBundle | None:
    try:
        return find_bundle(root / key)
    except CatsdogsError:
        return None


def fallback(uri: str, root: Path) -> tuple[int, str, ModelBundle] | None:
    """The bundle this URI resolved to last time, if it is still cached."""
    ref = read_json(root / REFS_FILE).get(uri, {})
    if not isinstance(ref, dict) or "key" not in ref or "version" not in ref:
        return None  # never resolved, or by a release that cached by version number
    key = str(ref["key"])
    bundle = cached(root, key) if _SAFE_KEY.match(key) else None
    return (int(ref["version"]), key, bundle) if bundle is not None else None
