"""The Grafana dashboard: valid for Grafana 10+ (read by grafana-foundation-sdk), datasource by uid
variable, the required panels, and every query valid PromQL (parsed by promtool)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.cog.plugins import register_default_plugins
from grafana_foundation_sdk.cog.runtime import Runtime
from grafana_foundation_sdk.models import dashboard as grafana
from grafana_foundation_sdk.models import prometheus
from monitor_support import (
    DASHBOARD,
    DEPLOY,
    dashboard,
    dashboard_exprs,
    dashboard_panels,
    grafana_to_promql,
    require_tool,
)

REQUIRED_PANELS = (
    "Request rate",
    "Error rate",
    "Latency percentiles",
    "Batch size",
    "Class distribution",
    "Confidence",
    "drift",
    "Live accuracy",
    "Model version",
)
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}


@pytest.fixture(scope="module")
def model() -> grafana.Dashboard:
    register_default_plugins()
    return grafana.Dashboard.from_json(dashboard())


def test_dashboard_is_grafana_10_schema(model: grafana.Dashboard) -> None:
    assert model.schema_version >= 36  # Grafana 10.0 writes 38; 36 introduced datasource refs by uid
    assert model.uid == "catsdogs-overview"
    assert model.title


def test_every_panel_is_a_known_panel_type_with_typed_options(model: grafana.Dashboard) -> None:
    known = Runtime().panelcfg_variants
    panels = [panel for panel in model.panels or [] if isinstance(panel, grafana.Panel)]
    assert len(panels) >= len(REQUIRED_PANELS)
    for panel in panels:
        assert panel.type_val in known, f"{panel.title}: unknown panel type {panel.type_val}"
        # The SDK decodes options into the panel plugin's own class; a dict means it did not understand them.
        assert not isinstance(panel.options, dict), f"{panel.title}: options not recognised"
        assert panel.grid_pos is not None and panel.grid_pos.w > 0 and panel.grid_pos.h > 0


def test_every_query_is_a_prometheus_query_on_the_datasource_variable(model: grafana.Dashboard) -> None:
    for panel in model.panels or []:
        if isinstance(panel, grafana.RowPanel):
            continue
        assert (panel.datasource.type_val, panel.datasource.uid) == ("prometheus", "${datasource}")
        assert panel.targets, f"{panel.title} has no query"
        for target in panel.targets:
            assert isinstance(target, prometheus.Dataquery), f"{panel.title}: not a Prometheus query"
            assert target.expr.strip() and target.ref_id


def test_datasource_is_a_template_variable_of_type_prometheus(model: grafana.Dashboard) -> None:
    variables = {variable.name: variable for variable in model.templating.list_val or []}
    variable = variables["datasource"]
    assert variable.type_val == grafana.VariableType.DATASOURCE
    assert variable.query == "prometheus"


def test_provisioned_datasource_uid_is_the_variable_default() -> None:
    provisioned = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    source = provisioned["datasources"][0]
    assert source["type"] == "prometheus"
    current = next(v for v in dashboard()["templating"]["list"] if v["name"] == "datasource")["current"]
    assert current["value"] == source["uid"]


def test_dashboard_provider_points_at_the_mounted_dashboards() -> None:
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/catsdogs.yml").read_text())
    assert provider["providers"][0]["type"] == "file"
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"


def test_round_trip_through_the_sdk_keeps_every_query(model: grafana.Dashboard) -> None:
    again = json.loads(json.dumps(model, cls=JSONEncoder))
    original = sorted(expr for _, expr in dashboard_exprs())
    round_tripped = sorted(
        target["expr"] for panel in again["panels"] if panel["type"] != "row" for target in panel["targets"]
    )
    assert round_tripped == original


@pytest.mark.parametrize("title", REQUIRED_PANELS)
def test_required_panel_exists(title: str) -> None:
    titles = [panel["title"] for panel in dashboard_panels()]
    assert any(title.lower() in candidate.lower() for candidate in titles), titles


def test_panel_ids_are_unique() -> None:
    ids = [panel["id"] for panel in dashboard_panels()]
    assert len(ids) == len(set(ids))


def test_every_panel_query_parses_as_promql(tmp_path: Path) -> None:
    # promtool 2.42 has no `promql` command: the queries become recording rules it must parse.
    rules = {
        "groups": [
            {
                "name": "dashboard-queries",
                "rules": [
                    {"record": f"dashboard:query:{index}", "expr": grafana_to_promql(expr)}
                    for index, (_, expr) in enumerate(dashboard_exprs())
                ],
            }
        ]
    }
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump(rules))
    result = subprocess.run(
        [require_tool("promtool"), "check", "rules", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(dashboard_exprs())} rules found" in result.stdout


def test_a_broken_query_is_caught_by_the_promtool_check(tmp_path: Path) -> None:
    path = tmp_path / "broken.yml"
    path.write_text(
        yaml.safe_dump({"groups": [{"name": "g", "rules": [{"record": "r", "expr": "sum(rate(x[5m])"}]}]})
    )
    result = subprocess.run(
        [require_tool("promtool"), "check", "rules", str(path)], capture_output=True, text=True, check=False
    )
    assert result.returncode != 0


def test_dashboard_file_is_pretty_json() -> None:
    text = DASHBOARD.read_text()
    assert text == json.dumps(json.loads(text), indent=2) + "\n"
