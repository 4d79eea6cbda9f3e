"""MLflow tracking, the model registry, its aliases and the promotion quality gate.

* :mod:`~catsdogs.registry.model_source` — the one model-URI resolver (a folder or ``models:/…``
  → a cached local bundle; mlflow-skinny only, imported lazily): what serving uses; its cache, keyed
  by run id and verified on every load, is :mod:`~catsdogs.registry.bundle_cache`.
* :mod:`~catsdogs.registry.tracking` — :class:`MlflowTracker`: one run per training, ending in a
  registered version with the ``challenger`` alias.
* :mod:`~catsdogs.registry.gate` — the quality gate's rules and the :class:`PromotionDecision`.
* :mod:`~catsdogs.registry.promotion` — :func:`promote` (through the gate), :func:`rollback`,
  :func:`list_versions`, and :func:`move_champion`, the one function that moves ``champion``.
* :mod:`~catsdogs.registry.pyfunc_model` — the logged pyfunc ("models from code", no pickle).

The names below are loaded on first use (PEP 562), so ``import catsdogs.registry.model_source``
from the serving side never imports full MLflow. Nothing here sets MLflow URIs at import time.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ModelRef": "model_source",
    "bounded_http": "model_source",
    "download_bundle": "model_source",
    "resolve_version": "model_source",
    "CHALLENGER": "client",
    "CHAMPION": "client",
    "alias_log": "client",
    "champion_history": "client",
    "GateCheck": "gate",
    "PromotionDecision": "gate",
    "VersionSummary": "promotion",
    "list_versions": "promotion",
    "move_champion": "promotion",
    "promote": "promotion",
    "rollback": "promotion",
    "MlflowTracker": "tracking",
    "flatten_metrics": "tracking",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
