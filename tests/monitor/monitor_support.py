"""Helpers shared by the monitoring tests: where the configs are, and PromQL metric-name extraction.

(A module, not a ``conftest.py``: several test folders without ``__init__.py`` each having a
``conftest`` module would shadow ``tests/conftest.py`` in ``sys.modules``.)
"""

from __future__ import annotations

import importlib.util
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
RULES = DEPLOY / "prometheus" / "rules" / "catsdogs-alerts.yml"
RULE_TESTS = sorted((DEPLOY / "prometheus" / "tests").glob("*.yml"))
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
ALERTMANAGER_CONFIG = DEPLOY / "alertmanager" / "alertmanager.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "catsdogs.json"
ARCHITECTURE = REPO / "docs" / "architecture.md"

_KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right", "bool"}
_KEYWORDS |= {"offset", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression reads (function names, label names and keywords removed)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"'(?:[^'\\]|\\.)*'", "''", text)
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # range selectors, including Grafana's $__rate_interval
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for match in re.finditer(r"(?<![\w:.$])([A-Za-z_:][\w:]*)\s*(\()?", text):
        name, call = match.groups()
        if call is None and name.lower() not in _KEYWORDS:
            names.add(name)
    return names


def alert_rules() -> list[dict[str, Any]]:
    """Every rule of the alert rules file, with the group name added under ``group``."""
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [{**rule, "group": group["name"]} for group in groups for rule in group["rules"]]


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def dashboard_panels() -> list[dict[str, Any]]:
    """Every panel of the dashboard, rows flattened (collapsed rows hold their panels inside)."""
    panels = []
    for panel in dashboard()["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))
    return panels


def dashboard_exprs() -> list[tuple[str, str]]:
    """(panel title, PromQL) for every query of every panel."""
    return [
        (panel["title"], target["expr"])
        for panel in dashboard_panels()
        for target in panel.get("targets", [])
    ]


def grafana_to_promql(expr: str) -> str:
    """Replace Grafana's interval variables with durations so Prometheus tools can parse the query."""
    for variable, value in (("$__rate_interval", "1m"), ("$__interval", "15s"), ("$__range", "1h")):
        expr = expr.replace(variable, value)
    return expr


def architecture_metrics() -> dict[str, str]:
    """The metric table of docs/architecture.md: name -> type."""
    rows = re.findall(r"^\| `(catsdogs_\w+)` \| ([\w ()=]+?) \|", ARCHITECTURE.read_text(), flags=re.M)
    return {name: kind.split()[0] for name, kind in rows}


def _root_conftest_require_tool() -> Callable[[str], str]:
    # Loaded by path: `from conftest import ...` depends on which conftest pytest imported last.
    spec = importlib.util.spec_from_file_location("_catsdogs_root_conftest", REPO / "tests" / "conftest.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.require_tool


require_tool = _root_conftest_require_tool()
