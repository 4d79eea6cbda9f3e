"""The rollback guard: move ``champion`` back when its live accuracy falls, or an error alert fires.

Live accuracy is read from the shared feedback store (every replica writes it, it survives restarts),
never from one pod's gauge. The yardstick is the champion's own live accuracy over its first
``guard_min_labels`` labelled predictions, or ``guard_accuracy_floor`` when configured: feedback is
mostly corrections, so the offline test accuracy would make every champion look bad.

With its own baseline a champion is judged only once it has ``2 × guard_min_labels`` labels, so the
first N (baseline) and the latest N (live) are different predictions; with a floor, N labels suffice.

The guard takes at most one automatic step before a human acts: each rollback is recorded on the
registered model (tag ``guard_last_rollback``), and the guard holds while ``champion`` is still the
version it rolled back to. A human re-arms it by moving ``champion`` (``catsdogs promote`` or
``catsdogs rollback``); even then it waits ``guard_cooldown_s`` after its last step. Every move goes
through :func:`catsdogs.registry.promotion.rollback`, the promotion gate's one way back.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from mlflow import MlflowClient

from catsdogs import CatsdogsError
from catsdogs.feedback.store import FeedbackStore
from catsdogs.registry.client import CHAMPION, REASON_MAX_CHARS, require_model, version_by_alias
from catsdogs.registry.model_source import bounded_http, make_client
from catsdogs.registry.promotion import rollback
from catsdogs.settings import Settings

_logger = logging.getLogger(__name__)

#: Registered-model tag: JSON ``{from, to, at, reason, trigger}`` of the guard's last rollback.
LAST_ROLLBACK_TAG = "guard_last_rollback"
Trigger = Literal["live_accuracy", "alert"]
#: What a check found (the ``result`` label of ``catsdogs_guard_checks_total``).
Result = Literal["rolled_back", "healthy", "too_few_labels", "held", "no_champion", "no_previous"]
#: Serializes the guard's steps in one process: the periodic check and the webhook never both act.
_STEP = threading.Lock()
#: Each step also kept in memory, by (tracking URI, model): should the tag fail to be written after
#: the alias moved, this process still holds instead of stepping again.
_REMEMBERED: dict[tuple[str, str], dict[str, Any]] = {}


@dataclass(frozen=True)
class GuardDecision:
    """One look at the champion, with the numbers that decided it."""

    action: Literal["rollback", "none"]
    result: Result
    reason: str
    champion_version: int | None
    baseline: float | None = None
    live_accuracy: float | None = None
    labels: int = 0
    baseline_labels: int = 0
    rolled_back_to: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _last_rollback(client: MlflowClient, name: str) -> dict[str, Any] | None:
    try:
        value = json.loads(client.get_registered_model(name).tags.get(LAST_ROLLBACK_TAG, "null"))
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def _hold_reason(settings: Settings, client: MlflowClient, champion: int, now: datetime) -> str | None:
    """Why the guard must not act now (its one step is taken, or it is cooling down), else ``None``."""
    remembered = _REMEMBERED.get((settings.mlflow_tracking_uri, settings.model_name))
    for last in (_last_rollback(client, settings.model_name), remembered):
        if last is None:
            continue
        if str(last.get("to")) == str(champion):
            return (
                f"the guard rolled back to v{champion} at {last.get('at')} and a human has not acted since: "
                "promote or roll back to re-arm it"
            )
        try:
            elapsed = (now - datetime.fromisoformat(str(last["at"]))).total_seconds()
        except (KeyError, ValueError, TypeError):
            continue
        if elapsed < settings.guard_cooldown_s:
            cooldown = settings.guard_cooldown_s
            return f"cooling down: the last automatic rollback was {elapsed:.0f}s ago (< {cooldown:.0f}s)"
    return None


def _accuracy(outcomes: list[bool]) -> float:
    return sum(outcomes) / len(outcomes)


def _measure(settings: Settings, store: FeedbackStore, version: int) -> GuardDecision | dict[str, Any]:
    """``baseline``, ``live_accuracy`` and the label counts, or the decision when there are too few."""
    n = settings.guard_min_labels
    latest = store.outcomes(str(version), limit=n, newest=True)
    if settings.guard_accuracy_floor is not None:
        if len(latest) < n:
            return _too_few(version, len(latest), n)
        baseline, baseline_labels = settings.guard_accuracy_floor, 0
    else:
        first = store.outcomes(str(version), limit=2 * n, newest=False)
        if len(first) < 2 * n:  # the first N are the baseline, the latest N must be other predictions
            return _too_few(version, len(first), 2 * n)
        baseline, baseline_labels = _accuracy(first[:n]), n
    return {
        "baseline": baseline,
        "live_accuracy": _accuracy(latest),
        "labels": len(latest),
        "baseline_labels": baseline_labels,
    }


def _too_few(version: int, have: int, need: int) -> GuardDecision:
    return GuardDecision(
        "none",
        "too_few_labels",
        f"v{version} has {have} labelled predictions; the guard needs {need}",
        version,
    )


def _with_champion(settings: Settings, decide: Callable[[MlflowClient, int], GuardDecision]) -> GuardDecision:
    """Run ``decide(client, champion version)`` as the process's one guard step at a time."""
    with _STEP, bounded_http(settings):
        client = make_client(settings)
        require_model(client, settings.model_name)
        current = version_by_alias(client, settings.model_name, CHAMPION)
        if current is None:
            return GuardDecision("none", "no_champion", f"{settings.model_name} has no {CHAMPION}", None)
        return decide(client, int(current.version))


def check(settings: Settings, *, store: FeedbackStore, now: datetime | None = None) -> GuardDecision:
    """Compare the champion's live accuracy with its baseline; roll it back when it fell too far.

    Args:
        store: the open feedback store every replica writes.
        now: the time the cooldown is measured at (tests pass one).
    """
    now = now or datetime.now(UTC)

    def judge(client: MlflowClient, version: int) -> GuardDecision:
        numbers = _measure(settings, store, version)
        if isinstance(numbers, GuardDecision):
            return numbers
        baseline, live, labels = numbers["baseline"], numbers["live_accuracy"], numbers["labels"]
        source = "its first labels" if numbers["baseline_labels"] else "the floor"
        drop, allowed = baseline - live, settings.guard_max_drop
        if drop <= allowed:
            reason = (
                f"v{version}: live accuracy {live:.3f} vs {baseline:.3f} ({source}), within {allowed:.3f}"
            )
            return GuardDecision("none", "healthy", reason, version, **numbers)
        reason = (
            f"live accuracy of v{version} over its latest {labels} labels is {live:.3f}, "
            f"{drop:.3f} below {baseline:.3f} ({source}; allowed drop {allowed:.3f})"
        )
        return _step(
            settings, client, version, trigger="live_accuracy", reason=reason, now=now, numbers=numbers
        )

    return _with_champion(settings, judge)


def on_alert(
    settings: Settings, *, alert: str, detail: str = "", now: datetime | None = None
) -> GuardDecision:
    """A firing error-rate alert (one of ``guard_error_alerts``): roll the champion back."""
    moment = now or datetime.now(UTC)
    reason = f"alert {alert} is firing" + (f": {detail}" if detail else "")
    return _with_champion(
        settings,
        lambda client, version: _step(
            settings, client, version, trigger="alert", reason=reason, now=moment, numbers={}
        ),
    )


def _step(
    settings: Settings,
    client: MlflowClient,
    version: int,
    *,
    trigger: Trigger,
    reason: str,
    now: datetime,
    numbers: dict[str, Any],
) -> GuardDecision:
    """The one automatic step: roll back (unless held) and record it, so the guard then holds."""
    held = _hold_reason(settings, client, version, now)
    if held is not None:
        _logger.info("guard holds (%s); would roll back because %s", held, reason)
        return GuardDecision("none", "held", f"{held}; would roll back: {reason}", version, **numbers)
    why = f"automatic rollback by catsdogs guard ({trigger}): {reason}"[:REASON_MAX_CHARS]
    try:
        target = rollback(settings, reason=why)
    except CatsdogsError as exc:
        _logger.error("guard cannot roll back: %s (%s)", exc, reason)
        return GuardDecision("none", "no_previous", f"{exc}; would roll back: {reason}", version, **numbers)
    record = {"from": version, "to": target, "at": now.isoformat(timespec="seconds"), "reason": why}
    record["trigger"] = trigger
    _REMEMBERED[(settings.mlflow_tracking_uri, settings.model_name)] = record
    try:
        client.set_registered_model_tag(settings.model_name, LAST_ROLLBACK_TAG, json.dumps(record))
    except Exception:  # the alias moved: report the step; this process holds from memory meanwhile
        _logger.exception("the guard rolled back but could not record it in the registry")
    _logger.warning("guard rolled %s back from v%d to v%d: %s", settings.model_name, version, target, why)
    return GuardDecision("rollback", "rolled_back", why, version, rolled_back_to=target, **numbers)


def last_rollback(settings: Settings) -> dict[str, Any] | None:
    """The guard's last recorded step (``{from, to, at, reason, trigger}``), or ``None``."""
    with bounded_http(settings):
        return _last_rollback(make_client(settings), settings.model_name)
