"""Prometheus rules and config, Alertmanager config: checked and unit-tested by the real tools."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml
from monitor_support import (
    ALERTMANAGER_CONFIG,
    PROMETHEUS_CONFIG,
    REPO,
    RULE_TESTS,
    RULES,
    alert_rules,
    require_tool,
)

REQUIRED_ALERTS = {
    "CatsdogsHighErrorRate",
    "CatsdogsHighLatencyP95",
    "CatsdogsCriticalLatency",
    "CatsdogsNoPredictions",
    "CatsdogsServiceDown",
    "CatsdogsModelNotReady",
    "CatsdogsPredictionClassImbalance",
    "CatsdogsLowMeanConfidence",
    "CatsdogsHighUnknownRate",
    "CatsdogsInputDrift",
    "CatsdogsLiveAccuracyDrop",
    "CatsdogsAutomaticRollback",
    "CatsdogsModelReloadFailures",
    "CatsdogsPodNotReady",
    "CatsdogsPodCrashLooping",
    "CatsdogsReplicasMismatch",
    "CatsdogsHPAAtMax",
    "CatsdogsHighCPU",
    "CatsdogsHighMemory",
}


def _run(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)


def test_promtool_check_rules() -> None:
    result = _run(require_tool("promtool"), "check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(REQUIRED_ALERTS)} rules found" in result.stdout


def test_promtool_unit_tests_pass() -> None:
    result = _run(require_tool("promtool"), "test", "rules", *map(str, RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("SUCCESS") == len(RULE_TESTS)


def test_promtool_check_config() -> None:
    result = _run(require_tool("promtool"), "check", "config", str(PROMETHEUS_CONFIG))
    assert result.returncode == 0, result.stdout + result.stderr


def test_prometheus_config_scrapes_the_api_and_sends_to_alertmanager() -> None:
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert jobs["catsdogs-api"]["static_configs"][0]["targets"] == ["api:8000"]
    assert config["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"] == ["alertmanager:9093"]
    assert config["rule_files"] == ["rules/*.yml"]


def test_every_required_alert_exists() -> None:
    assert {rule["alert"] for rule in alert_rules()} == REQUIRED_ALERTS


@pytest.mark.parametrize("rule", alert_rules(), ids=lambda rule: rule["alert"])
def test_alert_has_severity_summary_description_and_runbook(rule: dict) -> None:
    assert rule["labels"]["severity"] in {"critical", "warning"}
    for key in ("summary", "description", "runbook", "runbook_url"):
        assert rule["annotations"].get(key, "").strip(), f"{rule['alert']} lacks the {key} annotation"
    anchor = rule["annotations"]["runbook_url"].split("#", 1)[1]
    assert anchor == rule["alert"].lower()


def test_every_runbook_link_points_at_a_section_of_the_monitoring_doc() -> None:
    headings = re.findall(r"^#+ (\w+)\s*$", (REPO / "docs" / "monitoring.md").read_text(), flags=re.M)
    anchors = {heading.lower() for heading in headings}
    assert {rule["alert"].lower() for rule in alert_rules()} <= anchors


def _test_cases() -> list[dict]:
    return [
        check
        for path in RULE_TESTS
        for case in yaml.safe_load(path.read_text())["tests"]
        for check in case.get("alert_rule_test", [])
    ]


def test_every_alert_has_a_firing_and_a_quiet_unit_test() -> None:
    firing = {check["alertname"] for check in _test_cases() if check.get("exp_alerts")}
    quiet = {check["alertname"] for check in _test_cases() if not check.get("exp_alerts")}
    assert REQUIRED_ALERTS - firing == set(), "alerts never tested firing"
    assert REQUIRED_ALERTS - quiet == set(), "alerts never tested quiet"


def test_unit_tests_load_the_real_rules_file() -> None:
    for path in RULE_TESTS:
        files = yaml.safe_load(path.read_text())["rule_files"]
        assert [(path.parent / name).resolve() for name in files] == [RULES.resolve()]


def test_amtool_check_config() -> None:
    result = _run(require_tool("amtool"), "check-config", str(ALERTMANAGER_CONFIG))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


@pytest.mark.parametrize(
    ("labels", "receiver"),
    [
        (["severity=critical", "alertname=CatsdogsServiceDown"], "pager-webhook-and-email"),
        (["severity=warning", "alertname=CatsdogsInputDrift"], "email-team"),
        (["alertname=SomethingUnlabelled"], "email-team"),
        (["severity=critical", "alertname=CatsdogsHighErrorRate"], "catsdogs-guard,pager-webhook-and-email"),
        (["severity=critical", "alertname=CatsdogsAutomaticRollback"], "pager-webhook-and-email"),
    ],
)
def test_alertmanager_routes_by_severity(labels: list[str], receiver: str) -> None:
    result = _run(
        require_tool("amtool"), "config", "routes", "test", f"--config.file={ALERTMANAGER_CONFIG}", *labels
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == receiver


def test_alertmanager_config_holds_no_secret() -> None:
    config = yaml.safe_load(ALERTMANAGER_CONFIG.read_text())
    assert "smtp_auth_password" not in config["global"]
    assert config["global"]["smtp_auth_password_file"].startswith("/etc/alertmanager/secrets/")
    webhooks = [hook for receiver in config["receivers"] for hook in receiver.get("webhook_configs", [])]
    assert webhooks, "critical alerts need a webhook receiver"
    for hook in webhooks:
        credentials = hook["http_config"]["authorization"]
        assert "credentials" not in credentials
        assert Path(credentials["credentials_file"]).parent == Path("/etc/alertmanager/secrets")
    emails = [mail for receiver in config["receivers"] for mail in receiver.get("email_configs", [])]
    assert emails, "alerts need an email receiver"
