"""The PromQL metric-name extractor the coverage tests rely on."""

from __future__ import annotations

import pytest
from monitor_support import metric_names


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ('up{job="catsdogs-api"} == 0', {"up"}),
        (
            'histogram_quantile(0.95, sum by (le) (rate(a_bucket{route=~".*predict.*"}[5m]))) > 0.5',
            {"a_bucket"},
        ),
        (
            "sum by (label) (increase(b_total[1h])) / ignoring(label) group_left sum(increase(b_total[1h]))",
            {"b_total"},
        ),
        ("(sum(increase(c_total[30m])) or vector(0)) == 0 and on() sum(up) > 0", {"c_total", "up"}),
        ("rate(d_sum[$__rate_interval]) / rate(d_count[$__rate_interval]) offset 5m", {"d_sum", "d_count"}),
        ('max by (feature) (e{feature="a,b"}) >= 1e-3', {"e"}),
        ("x:recorded:rate5m > bool 2", {"x:recorded:rate5m"}),
    ],
)
def test_metric_names_of_promql(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names
