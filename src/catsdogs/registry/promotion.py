"""Promotion: move ``champion`` only to a version that passes the quality gate
(:mod:`~catsdogs.registry.gate`), and back again.

Accuracies are comparable only on the same test split (the fingerprint of its image hashes): when the
data have grown, the champion is re-evaluated on the challenger's split through ``evaluate``.
"""

from __future__ import annotations

import functools
import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from catsdogs import CatsdogsError
from catsdogs.registry.client import (
    CHALLENGER,
    CHAMPION,
    TEST_SPLIT_TAG,
    champion_history,
    move_alias,
    require_model,
    set_champion_history,
    version_by_alias,
)
from catsdogs.registry.gate import PromotionDecision, VersionMetrics, gate_checks, shadow_checks
from catsdogs.registry.lineage import split_fingerprint
from catsdogs.registry.model_source import bounded_http, download_bundle, make_client
from catsdogs.settings import Settings

_logger = logging.getLogger(__name__)

_RECALL_METRIC = re.compile(r"^test_per_class_(?P<label>.+)_recall$")
_T = TypeVar("_T")


def _run_metrics(client: MlflowClient, model_version: ModelVersion) -> VersionMetrics:
    """The test metrics the version's training run logged."""
    if not model_version.run_id:
        raise CatsdogsError(f"version {model_version.version} has no MLflow run with its test metrics")
    metrics = client.get_run(model_version.run_id).data.metrics
    recall = {
        match["label"]: value
        for key, value in metrics.items()
        if (match := _RECALL_METRIC.match(key)) is not None
    }
    if "test_accuracy" not in metrics or not recall:
        raise CatsdogsError(
            f"the run of version {model_version.version} logged no test_accuracy or per-class recall"
        )
    return VersionMetrics(
        metrics["test_accuracy"],
        recall,
        model_version.tags.get(TEST_SPLIT_TAG),
        unknown_rate=metrics.get("test_unknown_rate"),
    )


def _reevaluate_champion(
    settings: Settings,
    champion: ModelVersion,
    challenger: VersionMetrics,
    evaluate: Callable[[Path], dict] | None,
    client: MlflowClient,
) -> VersionMetrics:
    """Measure the champion on the challenger's test split, or refuse to compare."""
    split = champion.tags.get(TEST_SPLIT_TAG)
    if evaluate is None:
        raise CatsdogsError(
            f"the champion (v{champion.version}) was tested on split {str(split)[:12]} and the challenger "
            f"on split {str(challenger.split)[:12]}: their accuracies are not comparable. Promote with "
            "an evaluate function (the `catsdogs promote` command passes one) to re-test the champion."
        )
    current = split_fingerprint(settings.manifest_path)
    if current is None or current != challenger.split:
        raise CatsdogsError(
            f"cannot re-test the champion on the challenger's split {str(challenger.split)[:12]}: the "
            f"manifest at {settings.manifest_path} has split {str(current)[:12]}. Retrain on the current "
            "data or point CATSDOGS_DATA_DIR at the data the challenger was tested on."
        )
    bundle = download_bundle(f"models:/{settings.model_name}/{champion.version}", settings)
    metrics = evaluate(bundle)
    result = VersionMetrics.from_metrics(metrics, split=current, reevaluated=True)
    client.set_model_version_tag(
        settings.model_name,
        champion.version,
        f"retest.{current[:16]}",
        json.dumps({"accuracy": result.accuracy, "recall": result.recall}),
    )
    return result


def _bounded(function: Callable[..., _T]) -> Callable[..., _T]:
    """Run a registry command with MLflow's HTTP retries bounded by ``settings.registry_timeout_s``,
    so an unreachable tracking server fails in seconds instead of retrying for minutes."""

    @functools.wraps(function)
    def wrapper(settings: Settings, *args: Any, **kwargs: Any) -> _T:
        with bounded_http(settings):
            return function(settings, *args, **kwargs)

    return wrapper


def _get_version(client: MlflowClient, name: str, version: int | None) -> ModelVersion:
    if version is None:
        found = version_by_alias(client, name, CHALLENGER)
        if found is None:
            raise CatsdogsError(f"{name} has no '{CHALLENGER}' version: train a model or pass --version")
        return found
    try:
        return client.get_model_version(name, str(version))
    except MlflowException:
        raise CatsdogsError(f"{name} has no version {version}: see `catsdogs models list`") from None


@_bounded
def promote(
    settings: Settings,
    *,
    version: int | None = None,
    reason: str = "",
    evaluate: Callable[[Path], dict] | None = None,
    require_shadow: int = 0,
) -> PromotionDecision:
    """Move ``champion`` to the challenger (or ``version``) if it passes the quality gate.

    Args:
        settings: registry location, model name and the gate's thresholds.
        version: the version to promote; the ``challenger`` alias when omitted.
        reason: why, recorded with the alias change.
        evaluate: ``bundle folder -> metrics.json-shaped dict`` on the current test split; used to
            re-test the champion when it was tested on another split.
        require_shadow: also require this many live requests scored by the candidate in shadow
            (the feedback store's record), and its accuracy on those that got a label at least
            the champion's on the same requests.

    Returns:
        The decision; ``accepted`` is False when the gate refused (nothing was changed then).
    """
    client = make_client(settings)
    name = settings.model_name
    require_model(client, name)
    candidate = _get_version(client, name, version)
    candidate_no = int(candidate.version)
    current = version_by_alias(client, name, CHAMPION)
    if current is not None and int(current.version) == candidate_no:
        raise CatsdogsError(f"version {candidate_no} of {name} is already the champion")
    challenger = _run_metrics(client, candidate)
    champion = _champion_metrics(settings, current, challenger, evaluate, client)
    decision = PromotionDecision(
        accepted=False,
        model_name=name,
        challenger_version=candidate_no,
        champion_version=None if current is None else int(current.version),
        checks=gate_checks(settings, challenger, champion),
        champion_reevaluated=bool(champion and champion.reevaluated),
    )
    if require_shadow > 0:
        decision.checks.extend(shadow_checks(settings, str(candidate_no), require_shadow))
    failed = [check for check in decision.checks if not check.passed]
    if failed:
        decision.message = f"refused to promote {name} v{candidate_no}: " + "; ".join(
            f"{check.metric} {check.challenger:.4f} {'>' if check.rule.startswith('<=') else '<'} "
            f"required {check.required:.4f} ({check.rule})"
            for check in failed
        )
        _logger.warning(decision.message)
        return decision
    history = champion_history(client, name)
    if current is not None and (not history or history[-1] != int(current.version)):
        history.append(int(current.version))  # an alias moved by hand: keep it reachable by rollback
    move_champion(
        client,
        settings,
        candidate_no,
        history=[*history, candidate_no],
        reason=reason or "passed the quality gate",
    )
    decision.accepted = True
    decision.message = f"promoted {name} v{candidate_no} to {CHAMPION}" + (
        f" (was v{decision.champion_version})" if decision.champion_version else " (first champion)"
    )
    _logger.info(decision.message)
    return decision


def _champion_metrics(
    settings: Settings,
    current: ModelVersion | None,
    challenger: VersionMetrics,
    evaluate: Callable[[Path], dict] | None,
    client: MlflowClient,
) -> VersionMetrics | None:
    """The champion's metrics on the challenger's test split (re-tested when it was tested on
    another one), or ``None`` when there is no champion yet."""
    if current is None:
        return None
    champion = _run_metrics(client, current)
    if champion.split is None or champion.split != challenger.split:
        champion = _reevaluate_champion(settings, current, challenger, evaluate, client)
    return champion


def move_champion(
    client: MlflowClient, settings: Settings, version: int, *, history: list[int], reason: str
) -> None:
    """The one function that moves ``champion``: :func:`promote` (after the quality gate),
    :func:`rollback`, and any later automation call it; nothing else may (a test reads the source).

    Args:
        history: the champion history rollback walks back, ending with ``version``.
        reason: why, recorded with the alias change.
    """
    if not history or history[-1] != version:
        raise CatsdogsError(f"the champion history must end with the new champion v{version}: {history}")
    move_alias(client, settings, CHAMPION, version, reason=reason, champion_gate=True)
    set_champion_history(client, settings.model_name, history)


@_bounded
def rollback(settings: Settings, *, reason: str = "") -> int:
    """Move ``champion`` back to the previous champion and record why.

    Returns:
        The version that is champion now.

    Raises:
        CatsdogsError: there is no earlier champion to go back to.
    """
    client = make_client(settings)
    name = settings.model_name
    require_model(client, name)
    current = version_by_alias(client, name, CHAMPION)
    history = champion_history(client, name)
    current_no = int(current.version) if current is not None else None
    while history and history[-1] == current_no:
        history.pop()
    while history:
        target = history[-1]
        try:
            client.get_model_version(name, str(target))
            break
        except MlflowException:
            _logger.warning("previous champion v%d no longer exists; skipping it", target)
            history.pop()
    else:
        raise CatsdogsError(
            f"{name} has no previous champion to roll back to (current: "
            f"{'none' if current_no is None else f'v{current_no}'})"
        )
    move_champion(client, settings, target, history=history, reason=reason or f"rollback from v{current_no}")
    _logger.info("rolled %s back from v%s to v%d", name, current_no, target)
    return target


@dataclass(frozen=True)
class VersionSummary:
    """One line of ``catsdogs models list``."""

    version: int
    aliases: tuple[str, ...]
    created_at_ms: int
    run_id: str | None
    accuracy: float | None
    recall: dict[str, float]
    test_split: str | None


@_bounded
def list_versions(settings: Settings) -> list[VersionSummary]:
    """Every version of the registered model, newest first, with aliases and key test metrics."""
    client = make_client(settings)
    name = settings.model_name
    require_model(client, name)
    aliases: dict[str, list[str]] = {}
    for alias, version in client.get_registered_model(name).aliases.items():
        aliases.setdefault(str(version), []).append(alias)
    rows = []
    for model_version in client.search_model_versions(f"name = '{name}'"):
        try:
            metrics = _run_metrics(client, model_version)
            accuracy, recall = metrics.accuracy, metrics.recall
        except (CatsdogsError, MlflowException):
            accuracy, recall = None, {}
        rows.append(
            VersionSummary(
                version=int(model_version.version),
                aliases=tuple(sorted(aliases.get(str(model_version.version), []))),
                created_at_ms=int(model_version.creation_timestamp or 0),
                run_id=model_version.run_id,
                accuracy=accuracy,
                recall=recall,
                test_split=model_version.tags.get(TEST_SPLIT_TAG),
            )
        )
    return sorted(rows, key=lambda row: row.version, reverse=True)
