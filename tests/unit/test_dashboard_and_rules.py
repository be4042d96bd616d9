"""The monitoring files deploy/ ships, checked without any tool: the dashboard's layout, every
metric a query or rule uses is in common.metrics' table, every alert has a promtool test, and the
generated files match their generators. (promtool and a real Prometheus: tests/deploy/.)
"""

from __future__ import annotations

import importlib.util
import json

import yaml

from common.metrics import promql_metric_names, undeclared_names
from tests.support.monitoring import DASHBOARD, DEPLOY, RULE_TESTS, RULES, dashboard_queries, is_vllm, rule_exprs
from tests.support.paths import REPO


def test_generated_files_are_up_to_date():
    for path, target in ((DEPLOY / "grafana" / "build_dashboard.py", DASHBOARD),
                         (DEPLOY / "prometheus" / "build_prometheusrule.py",
                          DEPLOY / "k8s" / "components" / "monitoring" / "prometheusrule.yaml")):
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        assert module.render() == target.read_text(), f"{target} is stale: run python {path.relative_to(REPO)}"


def test_dashboard_structure():
    dash = json.loads(DASHBOARD.read_text())
    (var,) = dash["templating"]["list"]
    assert var["type"] == "datasource" and var["query"] == "prometheus"
    rows = [p["title"] for p in dash["panels"] if p["type"] == "row"]
    assert rows == ["Training progress", "Async health", "Throughput", "Weight sync", "Actors", "vLLM engine"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for p in dash["panels"]:
        if p["type"] != "row":
            assert p["datasource"]["uid"] == "${datasource}"
            assert all(t["datasource"]["uid"] == "${datasource}" for t in p["targets"])
    # vLLM queries live in the vLLM row only
    assert all((row == "vLLM engine") == is_vllm(expr) for row, _, expr in dashboard_queries())


def test_every_metric_in_dashboard_and_rules_is_in_the_metric_table():
    exprs = [expr for _, _, expr in dashboard_queries()] + rule_exprs()
    used = {n for e in exprs for n in promql_metric_names(e)}
    assert {n for n in used if n.startswith("treerpo_")}, "no names extracted"
    undeclared = undeclared_names(exprs)
    assert not undeclared, f"used but not in common.metrics.METRICS: {sorted(undeclared)}"
    # the extractor finds what a reader sees (a check on the helper itself)
    expr = 'histogram_quantile(0.95, sum by (le) (rate(a_bucket{x="y"}[5m]))) / b'
    assert promql_metric_names(expr) == {"a_bucket", "b"}


def test_every_alert_has_a_promtool_test():
    alerts = {r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"] if "alert" in r}
    tested = set()
    for path in RULE_TESTS.glob("*.yaml"):
        for case in yaml.safe_load(path.read_text())["tests"]:
            tested |= {t["alertname"] for t in case.get("alert_rule_test", []) if t.get("exp_alerts")}
    assert alerts - tested == set()
