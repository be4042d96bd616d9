"""Prometheus for real: promtool checks and unit-tests the shipped rules, and a real Prometheus
scrapes real MetricsServers and answers every dashboard query.

Tools: promtool and prometheus (Debian `prometheus`); a test needing a missing one skips (fails
under CI=true).
"""

from __future__ import annotations

import threading
import time

from common.metrics import (
    STEP_RECORD,
    ActorMetrics,
    LearnerMetrics,
    MetricsServer,
    WeightSyncMetrics,
    new_registry,
)
from tests.support.monitoring import DEPLOY, RULE_TESTS, RULES, dashboard_queries, is_vllm, rule_exprs
from tests.support.prom_stack import PromStack
from tests.support.tools import require_tool, run


def test_promtool_check_and_test_rules():
    promtool = require_tool("promtool")
    out = run([promtool, "check", "rules", str(RULES)])
    assert out.returncode == 0, out.stdout + out.stderr
    tests = sorted(RULE_TESTS.glob("*.yaml"))
    assert tests
    out = run([promtool, "test", "rules", *map(str, tests)])
    assert out.returncode == 0, out.stdout + out.stderr
    out = run([promtool, "check", "config", str(DEPLOY / "prometheus" / "prometheus.yml")])
    assert out.returncode == 0, out.stdout + out.stderr


# --------------------------------------------------------------------------------------------
# A real Prometheus scraping real metrics endpoints
# --------------------------------------------------------------------------------------------
class FakeRun:
    """Drives real LearnerMetrics/ActorMetrics (no training) so every series moves while scraped."""

    def __init__(self, actor_ids: list[str]):
        self.learner_reg = new_registry()
        self.learner = LearnerMetrics(self.learner_reg)
        self.sync = WeightSyncMetrics(self.learner_reg)
        self.actor_regs = [new_registry() for _ in actor_ids]
        self.actors = [ActorMetrics(r, a) for r, a in zip(self.actor_regs, actor_ids, strict=True)]
        self.servers = [MetricsServer("127.0.0.1", 0, r).start() for r in [self.learner_reg, *self.actor_regs]]
        self.stop_event = threading.Event()
        self.version = 0
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def tick(self) -> None:
        self.version += 1
        v = self.version
        self.learner.max_staleness.set(4)
        self.learner.buffer_trees.set(v % 5)
        self.learner.buffer_oldest_age_seconds.set(1.5)
        self.learner.actors_registered.set(len(self.actors))
        self.learner.trees_in_flight.set(3)
        self.learner.trees_received.inc(4)
        self.learner.dropped("stale")
        self.learner.idle_seconds.inc(0.05)
        # a value for every step-record key of a Prometheus row (the table says which those are)
        record = {k: 0.5 for k, m in STEP_RECORD.items() if m.kind != "record"}
        self.learner.record_step({**record, "version": v, "trees_consumed": 3}, staleness=[0, 1, 2])
        self.sync.succeeded(version=v, seconds=0.05, nbytes=1 << 20, actors=len(self.actors))
        if v % 3 == 0:
            self.sync.failed("timeout")
        for i, actor in enumerate(self.actors):
            actor.trees.inc()
            actor.segments.inc(7)
            actor.tokens_generated.inc(300)
            actor.generation_seconds.observe(0.3)
            actor.leaves_scored([1.0, 0.0])
            actor.send_blocked_seconds.inc(0.01)
            actor.credits.set(5)
            actor.connected.set(1)
            actor.reward_results(["ok", "timeout"])
            actor.trees_lost("send_timeout")
            actor.weights_loaded(version=v - i, seconds=0.02)  # actor i lags by i versions

    def _loop(self) -> None:
        while not self.stop_event.wait(0.25):
            self.tick()

    def pause(self) -> None:
        """Stop updating (values stay served), after the tick in progress."""
        self.stop_event.set()
        self.thread.join(timeout=5)

    def __enter__(self) -> FakeRun:
        self.tick()
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_event.set()
        self.thread.join(timeout=5)
        for s in self.servers:
            s.stop()


def test_prometheus_scrapes_metrics_servers_and_every_panel_has_data(tmp_path):
    require_tool("prometheus")
    with FakeRun(["treerpo-actor-0", "treerpo-actor-1"]) as fake:
        learner_url, *actor_urls = [f"127.0.0.1:{s.port}" for s in fake.servers]
        targets = {"treerpo-learner": [learner_url], "treerpo-actor": actor_urls}
        with PromStack(targets, tmp_path / "prom") as prom:
            prom.wait_for('up{job=~"treerpo-.*"} == 1', timeout_s=60, min_results=3)
            # enough samples for rate() over the panels' window
            prom.wait_for("count_over_time(treerpo_learner_steps_total[1m]) >= 5", timeout_s=60)
            empty = []
            for row, title, expr in dashboard_queries():
                if is_vllm(expr):
                    continue
                query = expr.replace("$__rate_interval", "10s").replace("$__interval", "1s")
                try:
                    prom.wait_for(query, timeout_s=20)
                except TimeoutError:
                    empty.append(f"{row} / {title}: {expr}")
            assert not empty, "panels without data:\n" + "\n".join(empty)
            # values arrive intact: with updates paused, actor i lags the learner by exactly i versions
            fake.pause()
            skew: dict[str, float] = {}
            for _ in range(60):  # until every target has been scraped after the pause
                skew = {r["metric"]["actor_id"]: float(r["value"][1]) for r in prom.query(
                    "max(treerpo_learner_version) - on() group_right treerpo_actor_weight_version")}
                if skew == {"treerpo-actor-0": 0.0, "treerpo-actor-1": 1.0}:
                    break
                time.sleep(0.5)
            assert skew == {"treerpo-actor-0": 0.0, "treerpo-actor-1": 1.0}
            # the shipped alert rules load and evaluate without errors
            rules: list[dict] = []
            for _ in range(60):
                rules = [r for g in prom.api("rules")["groups"] for r in g["rules"]]
                if rules and all(r["health"] == "ok" for r in rules):
                    break
                time.sleep(0.5)
            assert len(rules) == len(rule_exprs())
            assert all(r["health"] == "ok" for r in rules), [(r["name"], r.get("lastError")) for r in rules]
