"""MLflow tracking, the model registry, its aliases and the promotion quality gate.

* :mod:`~catsdogs.registry.tracking` — :class:`MlflowTracker`: one run per training, ending in a
  registered version with the ``challenger`` alias.
* :mod:`~catsdogs.registry.promotion` — :func:`promote` (the quality gate), :func:`rollback`,
  :func:`list_versions`.
* :func:`download_bundle`, :class:`ModelRef`, :func:`resolve_version`: re-exported from
  :mod:`catsdogs.model_source`, the one model-URI resolver (shared with serving, mlflow-skinny only).
* :mod:`~catsdogs.registry.pyfunc_model` — the logged pyfunc ("models from code", no pickle).

Nothing here sets MLflow URIs at import time; every call builds its client from the settings.
"""

from catsdogs.model_source import ModelRef, bounded_http, download_bundle, resolve_version
from catsdogs.registry.client import CHALLENGER, CHAMPION, alias_log, champion_history
from catsdogs.registry.promotion import (
    GateCheck,
    PromotionDecision,
    VersionSummary,
    list_versions,
    promote,
    rollback,
)
from catsdogs.registry.tracking import MlflowTracker, flatten_metrics

__all__ = [
    "CHALLENGER",
    "CHAMPION",
    "GateCheck",
    "MlflowTracker",
    "ModelRef",
    "PromotionDecision",
    "VersionSummary",
    "alias_log",
    "bounded_http",
    "champion_history",
    "download_bundle",
    "flatten_metrics",
    "list_versions",
    "promote",
    "resolve_version",
    "rollback",
]
