"""Helpers shared by the monitoring tests: where the configs are, and PromQL metric-name extraction.

(A module, not a ``conftest.py``: several test folders without ``__init__.py`` each having a
``conftest`` module would shadow ``tests/conftest.py`` in ``sys.modules``.)
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

import catsdogs
from support import free_port, require_tool
from tiny_bundle import IMAGE_SIZE, TINY_WEIGHTS, build_tiny_bundle  # noqa: F401  (re-exported)

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


# --- real servers on loopback ---------------------------------------------------------------------


def wait_for(check: Callable[[], bool], *, timeout_s: float, what: str, log: Path | None = None) -> None:
    """Poll ``check`` until it is true; fail with the server log's tail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except (requests.RequestException, OSError):
            pass
        time.sleep(0.2)
    tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
    raise AssertionError(f"{what} not reached within {timeout_s}s\n{tail}")


def stop(process: subprocess.Popen[bytes]) -> None:
    """Stop a server we started, by its PID: SIGTERM, then SIGKILL if it does not exit."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


def src_dir() -> Path:
    """The ``src`` folder of the catsdogs package under test (for subprocesses' PYTHONPATH)."""
    return Path(catsdogs.__file__).resolve().parents[1]


def start_service(bundle: Path, workdir: Path) -> tuple[str, subprocess.Popen[bytes]]:
    """Start the real service (uvicorn on the ``catsdogs.serve.app`` factory) on a free loopback port.

    Fails (never skips) when the serving app cannot be imported: the suite needs the real service.
    """
    try:
        importlib.import_module("catsdogs.serve.app")
    except ImportError as exc:
        pytest.fail(
            f"the serving app catsdogs.serve.app is not importable ({exc}): the real service is needed"
        )
    port = free_port()
    src = src_dir()
    env = {key: value for key, value in os.environ.items() if not key.startswith("CATSDOGS_")}
    env.update(
        PYTHONPATH=str(src),
        CATSDOGS_PARAMS_FILE=str(workdir / "no-params.yaml"),
        CATSDOGS_MODEL_URI=str(bundle),
        CATSDOGS_CACHE_DIR=str(workdir / "cache"),
        CATSDOGS_FEEDBACK_SECRET="monitoring-test-secret-0123456789abcdef",
        CATSDOGS_LOG_LEVEL="WARNING",
    )
    log = workdir / "service.log"
    command = [sys.executable, "-m", "uvicorn", "catsdogs.serve.app:create_app", "--factory"]
    command += ["--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    with log.open("wb") as out:
        process = subprocess.Popen(command, env=env, cwd=workdir, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(
            lambda: requests.get(f"{url}/ready", timeout=2).status_code == 200,
            timeout_s=90,
            what="the service's /ready",
            log=log,
        )
    except AssertionError:
        stop(process)
        raise
    return url, process


def start_prometheus(
    target: str, workdir: Path, *, rule_files: list[Path], extra_targets: tuple[str, ...] = ()
) -> tuple[str, subprocess.Popen[bytes]]:
    """A real Prometheus on a free loopback port, scraping ``target`` (job ``catsdogs-api``, as in
    deploy/prometheus) every second, with its own data dir."""
    binary = require_tool("prometheus")
    port = free_port()
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "1s"},
        "rule_files": [str(path) for path in rule_files],
        "scrape_configs": [
            {"job_name": "catsdogs-api", "static_configs": [{"targets": [target, *extra_targets]}]}
        ],
    }
    config_path = workdir / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(config))
    log = workdir / "prometheus.log"
    command = [
        binary,
        f"--config.file={config_path}",
        f"--storage.tsdb.path={workdir / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--log.level=warn",
    ]
    with log.open("wb") as out:
        process = subprocess.Popen(command, cwd=workdir, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(
            lambda: requests.get(f"{url}/-/ready", timeout=2).status_code == 200,
            timeout_s=30,
            what="Prometheus /-/ready",
            log=log,
        )
    except AssertionError:
        stop(process)
        raise
    return url, process


def prom_query(url: str, promql: str) -> list[dict[str, Any]]:
    """Instant query through Prometheus's HTTP API; the ``result`` list."""
    response = requests.get(f"{url}/api/v1/query", params={"query": promql}, timeout=5)
    response.raise_for_status()
    body = response.json()
    assert body["status"] == "success", body
    return body["data"]["result"]
