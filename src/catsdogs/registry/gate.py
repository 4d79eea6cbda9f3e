"""The quality gate's rules: what a candidate version must show to become ``champion``.

Rules (thresholds from the settings):

* test accuracy ≥ ``promotion_min_accuracy`` and ≥ the champion's accuracy on the same test split;
* every class's recall ≥ ``promotion_min_class_recall`` and ≥ the champion's recall for that class
  minus ``promotion_max_recall_drop``;
* the share of test cats and dogs answered ``unknown`` ≤ ``promotion_max_unknown_rate`` (a version
  with an unknown detector only; accuracy above judges the predicted class either way);
* with ``--require-shadow N``: at least N live requests scored in shadow, and the candidate right at
  least as often as the champion on those that got a label.

:mod:`~catsdogs.registry.promotion` gathers the numbers from the registry and moves the alias.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from catsdogs import CatsdogsError
from catsdogs.settings import Settings

#: Float noise allowance when comparing metrics that were computed the same way.
_EPS = 1e-9


@dataclass(frozen=True)
class VersionMetrics:
    """What the gate looks at for one version."""

    accuracy: float
    recall: dict[str, float]
    split: str | None
    reevaluated: bool = False
    unknown_rate: float | None = None
    """Test cats and dogs answered ``unknown`` (``None``: a version without an unknown detector)."""

    @classmethod
    def from_metrics(cls, metrics: dict[str, Any], *, split: str | None, reevaluated: bool) -> VersionMetrics:
        """From a ``metrics.json``-shaped dict (``accuracy``, ``per_class.<label>.recall``)."""
        try:
            recall = {label: float(row["recall"]) for label, row in metrics["per_class"].items()}
            unknown = metrics.get("unknown_rate")
            return cls(
                float(metrics["accuracy"]),
                recall,
                split,
                reevaluated,
                None if unknown is None else float(unknown),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise CatsdogsError(f"evaluation metrics lack accuracy or per-class recall ({exc!r})") from None


@dataclass(frozen=True)
class GateCheck:
    """One row of the comparison table."""

    metric: str
    challenger: float
    champion: float | None
    required: float
    rule: str
    passed: bool


@dataclass
class PromotionDecision:
    """The outcome of :func:`promote`, with every number that decided it."""

    accepted: bool
    model_name: str
    challenger_version: int
    champion_version: int | None
    checks: list[GateCheck] = field(default_factory=list)
    message: str = ""
    champion_reevaluated: bool = False

    def table(self) -> str:
        """A plain-text comparison table (the CLI prints it)."""
        champion = f"champion v{self.champion_version}" if self.champion_version else "champion (none)"
        head = ("metric", f"challenger v{self.challenger_version}", champion, "required", "rule", "result")
        rows = [head] + [
            (
                check.metric,
                f"{check.challenger:.4f}",
                "-" if check.champion is None else f"{check.champion:.4f}",
                f"{check.required:.4f}",
                check.rule,
                "pass" if check.passed else "FAIL",
            )
            for check in self.checks
        ]
        widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
        lines = [
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)) for row in rows
        ]
        lines.insert(1, "  ".join("-" * width for width in widths))
        return "\n".join(line.rstrip() for line in lines)


def gate_checks(
    settings: Settings, challenger: VersionMetrics, champion: VersionMetrics | None
) -> list[GateCheck]:
    """Accuracy, each class's recall and the unknown rate against the floors and the champion."""
    floor_acc = settings.promotion_min_accuracy
    rows = []
    required = floor_acc if champion is None else max(floor_acc, champion.accuracy)
    rule = f">= floor {floor_acc:.3f}" + ("" if champion is None else " and >= champion")
    rows.append(
        GateCheck(
            "accuracy",
            challenger.accuracy,
            None if champion is None else champion.accuracy,
            required,
            rule,
            challenger.accuracy >= required - _EPS,
        )
    )
    floor_recall, drop = settings.promotion_min_class_recall, settings.promotion_max_recall_drop
    labels = sorted(set(challenger.recall) | set(champion.recall if champion else {}))
    for label in labels:
        value = challenger.recall.get(label, 0.0)
        previous = champion.recall.get(label) if champion else None
        required = floor_recall if previous is None else max(floor_recall, previous - drop)
        rule = f">= floor {floor_recall:.3f}" + ("" if previous is None else f" and >= champion - {drop:.3f}")
        rows.append(GateCheck(f"recall[{label}]", value, previous, required, rule, value >= required - _EPS))
    if challenger.unknown_rate is not None:
        ceiling = settings.promotion_max_unknown_rate
        previous = champion.unknown_rate if champion else None
        passed = challenger.unknown_rate <= ceiling + _EPS
        rows.append(
            GateCheck("unknown_rate", challenger.unknown_rate, previous, ceiling, "<= ceiling", passed)
        )
    return rows


def shadow_checks(settings: Settings, version: str, required: int) -> list[GateCheck]:
    """The candidate's shadow record against live traffic (``catsdogs promote --require-shadow``)."""
    from catsdogs.feedback.store import FeedbackStore, store_url

    store = FeedbackStore(store_url(settings))
    store.open()
    try:
        summary = store.shadow_summary(version)
    finally:
        store.close()
    labelled = max(summary.labelled, 1)
    challenger_acc = summary.challenger_correct / labelled
    champion_acc = summary.champion_correct / labelled
    agreement = "-" if summary.agreement is None else f"{summary.agreement:.3f}"
    return [
        GateCheck(
            "shadowed requests",
            float(summary.shadowed),
            None,
            float(required),
            f">= {required} (agreement with the champion {agreement})",
            summary.shadowed >= required,
        ),
        GateCheck(
            "shadow live accuracy",
            challenger_acc,
            champion_acc,
            champion_acc,
            f">= champion on the same {summary.labelled} labelled requests",
            summary.challenger_correct >= summary.champion_correct,
        ),
    ]
