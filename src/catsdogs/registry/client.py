"""Shared MLflow plumbing: a client built from the settings, bounded HTTP, and who/when/why tags.

Nothing here touches MLflow's global state: every function builds an explicit
``MlflowClient(tracking_uri=..., registry_uri=...)`` from :class:`~catsdogs.settings.Settings`
(:func:`~catsdogs.registry.model_source.make_client`, shared with serving).
"""

from __future__ import annotations

import getpass
import json
import socket
from datetime import UTC, datetime
from typing import Any

from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from catsdogs import CatsdogsError
from catsdogs.settings import Settings

CHAMPION = "champion"
CHALLENGER = "challenger"
#: Registered-model tag: JSON list of the versions that were champion, oldest first (last = current).
CHAMPION_HISTORY_TAG = "champion_history"
#: Registered-model tag: JSON list of every alias change (bounded to the last entries).
ALIAS_LOG_TAG = "alias_log"
ALIAS_LOG_MAX = 200
#: Registered-model tag values are capped at 100,000 characters by MLflow; stay well below.
ALIAS_LOG_MAX_CHARS = 60_000
REASON_MAX_CHARS = 500
#: The pyfunc artifact that holds the model bundle folder, and the pyfunc's input column.
BUNDLE_ARTIFACT = "bundle"
INPUT_COLUMN = "image"
#: Run and model-version tag naming the test split a version was measured on.
TEST_SPLIT_TAG = "test_split_sha256"


def actor(settings: Settings) -> str:
    """Who makes a change: ``settings.actor`` (``CATSDOGS_ACTOR``, e.g. a CI bot), else user@host."""
    if settings.actor:
        return settings.actor
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _json_tag(tags: dict[str, str], key: str) -> list[Any]:
    try:
        value = json.loads(tags.get(key, "[]"))
    except json.JSONDecodeError:
        return []
    return value if isinstance(value, list) else []


def champion_history(client: MlflowClient, name: str) -> list[int]:
    """Versions that were champion, oldest first; the last one is the current champion."""
    tags = client.get_registered_model(name).tags
    return [int(version) for version in _json_tag(tags, CHAMPION_HISTORY_TAG)]


def set_champion_history(client: MlflowClient, name: str, history: list[int]) -> None:
    client.set_registered_model_tag(name, CHAMPION_HISTORY_TAG, json.dumps(history))


def append_bounded(log: list[Any], event: dict[str, str]) -> list[Any]:
    """The log with ``event`` appended, oldest entries dropped to respect MLflow's tag size limit."""
    log = [*log, event][-ALIAS_LOG_MAX:]
    while len(json.dumps(log)) > ALIAS_LOG_MAX_CHARS and len(log) > 1:
        log.pop(0)
    return log


def move_alias(
    client: MlflowClient,
    settings: Settings,
    alias: str,
    version: int,
    *,
    reason: str,
    champion_gate: bool = False,
) -> dict[str, str]:
    """Point ``alias`` at ``version`` and record who/when/why on the version and in the model's log.

    ``champion`` is refused here unless the caller is the promotion gate
    (:func:`catsdogs.registry.promotion.move_champion`, which passes ``champion_gate``): what is
    served moves through one function (a test checks no other module moves it).

    Returns:
        The recorded event (``alias``, ``version``, ``previous``, ``by``, ``at``, ``why``).
    """
    if alias == CHAMPION and not champion_gate:
        raise CatsdogsError(
            f"the {CHAMPION} alias moves only through catsdogs.registry.promotion.move_champion "
            "(`catsdogs promote` / `catsdogs rollback`)"
        )
    name = settings.model_name
    holder = version_by_alias(client, name, alias)
    previous = None if holder is None else holder.version
    event = {
        "alias": alias,
        "version": str(version),
        "previous": str(previous) if previous is not None else "",
        "by": actor(settings),
        "at": utc_now(),
        "why": (reason or "(no reason given)")[:REASON_MAX_CHARS],
    }
    client.set_registered_model_alias(name, alias, str(version))
    for field in ("by", "at", "why"):
        client.set_model_version_tag(name, str(version), f"alias.{alias}.{field}", event[field])
    log = _json_tag(client.get_registered_model(name).tags, ALIAS_LOG_TAG)
    client.set_registered_model_tag(name, ALIAS_LOG_TAG, json.dumps(append_bounded(log, event)))
    return event


def alias_log(client: MlflowClient, name: str) -> list[dict[str, str]]:
    """Every recorded alias change of the registered model, oldest first."""
    return _json_tag(client.get_registered_model(name).tags, ALIAS_LOG_TAG)


def version_by_alias(client: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    """The version holding ``alias``, or None when the alias (or the model) does not exist."""
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        if exc.error_code in {"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"}:
            return None
        raise


def require_model(client: MlflowClient, name: str) -> None:
    """Refuse clearly when the registered model does not exist yet."""
    try:
        client.get_registered_model(name)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise CatsdogsError(
                f"no registered model {name!r} in the registry: run `catsdogs train` first"
            ) from None
        raise
