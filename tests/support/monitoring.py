"""The monitoring files deploy/ ships, read for tests: every dashboard query and every rule expression."""

from __future__ import annotations

import json

import yaml

from tests.support.paths import REPO

DEPLOY = REPO / "deploy"
DASHBOARD = DEPLOY / "grafana" / "treerpo.json"
RULES = DEPLOY / "prometheus" / "treerpo-rules.yml"
RULE_TESTS = DEPLOY / "prometheus" / "tests"


def dashboard_queries() -> list[tuple[str, str, str]]:
    """(row title, panel title, expr) of every query in the dashboard."""
    out, row = [], ""
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        if panel["type"] == "row":
            row = panel["title"]
            continue
        out += [(row, panel["title"], t["expr"]) for t in panel["targets"]]
    return out


def is_vllm(expr: str) -> bool:
    return "vllm:" in expr


def rule_exprs() -> list[str]:
    return [r["expr"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]
