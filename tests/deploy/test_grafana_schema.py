"""The dashboard against Grafana's own schema: deploy/grafana/*.json decoded into the generated
dashboard, panel and query types of `grafana-foundation-sdk` and encoded back. A key the types do not
know (a typo, an obsolete field) is dropped on the way, and the test names it; so is a panel type or
query datasource the runtime would only carry as an opaque bag, which would check nothing.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.support.monitoring import DEPLOY
from tests.support.tools import require_module

DASHBOARDS = sorted((DEPLOY / "grafana").glob("*.json"))


def roundtrip(data: dict[str, Any]) -> dict[str, Any]:
    require_module("grafana_foundation_sdk", "pip install -e '.[test]'")  # here, not at import: see tools.py
    from grafana_foundation_sdk.cog.encoder import JSONEncoder  # noqa: PLC0415
    from grafana_foundation_sdk.cog.plugins import register_default_plugins  # noqa: PLC0415
    from grafana_foundation_sdk.models.dashboard import Dashboard  # noqa: PLC0415

    register_default_plugins()
    return json.loads(json.dumps(Dashboard.from_json(data), cls=JSONEncoder))


def dropped(before: Any, after: Any, path: str = "") -> list[str]:
    """Paths of `before` that `after` lost or changed (keys `after` adds, its defaults, are fine)."""
    if isinstance(before, dict):
        if not isinstance(after, dict):
            return [path or "."]
        out = []
        for k, v in before.items():
            where = f"{path}.{k}" if path else k
            out += dropped(v, after[k], where) if k in after else [where]
        return out
    if isinstance(before, list):
        if not isinstance(after, list) or len(after) != len(before):
            return [path]
        return [p for i, (b, a) in enumerate(zip(before, after, strict=True)) for p in dropped(b, a, f"{path}[{i}]")]
    return [] if before == after else [f"{path} ({before!r} -> {after!r})"]


def test_the_checker_sees_a_typo_and_an_obsolete_field():
    dash = json.loads(DASHBOARDS[0].read_text())
    panel = next(p for p in dash["panels"] if p["type"] == "timeseries")
    panel["options"]["legend"]["dispalyMode"] = "list"  # typo
    panel["fieldConfig"]["defaults"]["unitt"] = "s"  # typo
    dash["panels"][0]["repeatIteration"] = 1  # a field of old Grafana releases
    lost = dropped(dash, roundtrip(dash))
    assert f"panels[{dash['panels'].index(panel)}].options.legend.dispalyMode" in lost
    assert f"panels[{dash['panels'].index(panel)}].fieldConfig.defaults.unitt" in lost
    assert "panels[0].repeatIteration" in lost


@pytest.mark.parametrize("path", DASHBOARDS, ids=[p.name for p in DASHBOARDS])
def test_every_key_of_the_dashboard_is_in_grafanas_schema(path):
    dash = json.loads(path.read_text())
    assert dropped(dash, roundtrip(dash)) == []
    from grafana_foundation_sdk.cog.runtime import Runtime  # noqa: PLC0415

    runtime = Runtime()
    panels = [p for p in dash["panels"] if p["type"] != "row"]
    assert panels and {p["type"] for p in panels} <= set(runtime.panelcfg_variants)  # typed, not a bag
    queries = [t for p in panels for t in p["targets"]]
    assert queries and {t["datasource"]["type"] for t in queries} <= set(runtime.dataquery_variants)
    titles = {p["title"] for p in panels}
    assert "Tracker errors by backend" in titles
