"""The real system on CPU: a learner and actors as processes, a tiny model, ZeroMQ, gloo, DeepSpeed.

One run (module fixture) serves most assertions: it starts a learner and one actor, adds a
late-joining second actor, trains, lets a real Prometheus scrape everything (when `prometheus` is
installed), then stops the job by SIGTERM. Separate runs freeze an actor (SIGSTOP) while it is a
sync member and then kill it, and restart the learner under live actors.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from safetensors.torch import load_file

from common.metrics import promql_metric_names, series
from learner.checkpoint import find_latest, read_learner_state
from tests.support.monitoring import dashboard_queries, is_vllm, rule_exprs
from tests.support.prom_stack import PromStack
from tests.support.system import (
    SYSTEM_MODEL,
    System,
    free_port,
    metric_value,
    pid_alive,
    read_jsonl,
    received_trees,
    scrape,
    sigkill,
    start_process,
    wait_until,
)
from tests.support.tools import require_tool
from weightsync.publisher import ACK_GRACE_S
from weightsync.seal import tensor_checksum


@dataclass
class RunResult:
    system: System
    join_time: float = 0.0
    learner_text: str = ""
    actor_texts: dict[str, str] = field(default_factory=dict)
    prometheus: bool = False  # was `prometheus` installed (else no panel_results)
    panel_results: dict[str, int] = field(default_factory=dict)
    exit_code: int | None = None


@pytest.fixture(scope="module")
def run(make_tiny_model, tmp_path_factory) -> RunResult:
    system = System(tmp_path_factory.mktemp("run") / "job", make_tiny_model(**SYSTEM_MODEL), ["weights.bucket_mb=0.05"],
                    num_actors=1)
    result = RunResult(system)
    try:
        system.start()
        system.wait(lambda: len(system.steps()) >= 2, 240, "2 steps with one actor")
        result.join_time = time.time()
        system.add_actor()
        system.wait(lambda: any(t["actor_id"] == "actor-1" and t["verdict"] == "accepted" for t in system.trees())
                    and len(system.steps()) >= 6, 240, "trees from the late joiner and 6 steps")
        result.prometheus = shutil.which("prometheus") is not None
        if result.prometheus:
            result.panel_results = query_every_panel(system, tmp_path_factory.mktemp("prom"))
        result.learner_text = scrape(system.learner_metrics_url())
        for actor_id in ("actor-0", "actor-1"):
            result.actor_texts[actor_id] = scrape(system.actor_metrics_url(actor_id))
    finally:
        result.exit_code = system.stop()
    return result


def query_every_panel(system: System, workdir: Path) -> dict[str, int]:
    """A real Prometheus scrapes the job; -> {dashboard query: series it returns}, retried up to 90 s."""
    targets = {"treerpo-learner": [system.sup.endpoints["metrics"].split("//")[1]],
               "treerpo-actor": [system.actor_metrics_url(a).split("//")[1].split("/")[0]
                                 for a in ("actor-0", "actor-1")]}
    results: dict[str, int] = {}
    with PromStack(targets, workdir) as prom:
        system.wait(lambda: len(prom.query("up == 1")) == 3, 60, "prometheus scraping 3 targets")
        queries = [expr.replace("$__rate_interval", "10s").replace("$__interval", "1s")
                   for _, _, expr in dashboard_queries() if not is_vllm(expr)]
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            system.tick()
            for expr in queries:
                if results.get(expr, 0) == 0:
                    results[expr] = len(prom.query(expr))
            if all(results.values()):
                break
            time.sleep(1.0)
    return results


def test_trees_from_two_actors_train_and_shutdown_is_clean(run):
    s = run.system
    accepted = {t["actor_id"] for t in s.trees() if t["verdict"] == "accepted"}
    assert accepted == {"actor-0", "actor-1"}
    steps = s.steps()
    assert [r["step"] for r in steps] == list(range(1, len(steps) + 1))
    assert all(all(v == v and abs(v) != float("inf") for k, v in r.items() if isinstance(v, float)) for r in steps)
    trained = [tid for r in steps for tid in r["tree_ids"]]
    assert len(trained) == len(set(trained)), "a tree was trained twice"
    assert run.exit_code == 0  # SIGTERM: final checkpoint, clean exit
    wait_until(s.all_exited, 30, "every process of the job to exit")
    # each actor left its last exposition in its info file: the version the learner last confirmed
    # for it, and at least every tree the learner received from it
    syncs = s.syncs()
    for actor_id in ("actor-0", "actor-1"):
        final = json.loads((s.run_dir / "actors" / f"{actor_id}.json").read_text())["final_metrics"]
        confirmed = [r["version"] for r in syncs if actor_id in r["confirmed"]]
        assert metric_value(final, "treerpo_actor_weight_version") == confirmed[-1]
        received = sum(1 for t in s.trees() if t["actor_id"] == actor_id)
        assert metric_value(final, series("actor", "trees")) >= received > 0


def test_trees_jsonl_follows_every_tree_to_its_end(run):
    # learner.log_trees: each received tree (with its cost and staleness on arrival) ends exactly
    # one way -- trained once, at the staleness it had then, or dropped with its reason (the clean
    # exit drops what is still buffered as 'shutdown')
    events = read_jsonl(run.system.run_dir / "trees.jsonl")
    received = {e["tree_id"]: e for e in events if e["event"] == "received"}
    trained = [e for e in events if e["event"] == "trained"]
    dropped = [e for e in events if e["event"] == "dropped"]
    assert len(received) == sum(e["event"] == "received" for e in events) and trained
    assert {e["tree_id"] for e in trained} == {tid for r in run.system.steps() for tid in r["tree_ids"]}
    ends = Counter(e["tree_id"] for e in trained + dropped)
    assert set(ends) == set(received) and set(ends.values()) == {1}
    for r in received.values():
        assert r["staleness"] == r["learner_version"] - r["min_version"] >= 0
        assert r["tokens"] > 0 and r["leaves"] > 0 and r["mean_path_tokens"] > 0
    for e in trained:
        assert received[e["tree_id"]]["verdict"] == "accepted"
        assert e["staleness"] == e["learner_version"] - received[e["tree_id"]]["min_version"] >= 0
    for e in dropped:
        verdict = received[e["tree_id"]]["verdict"]
        assert e["reason"] == verdict or (verdict == "accepted" and e["reason"] in ("stale", "capacity", "shutdown"))


def test_every_sync_is_bit_exact_and_versions_agree(run):
    s = run.system
    syncs = [r for r in s.syncs() if r["confirmed"]]
    assert len(syncs) >= 4
    for r in syncs:
        for actor_id in r["confirmed"]:
            assert r["acks"][actor_id] == {"problem": None, "checksum": r["checksum"]}
    # the learner's checksum is of what it trained: the final checkpoint's HF export (same version) agrees

    final = find_latest(s.run_dir)
    state = read_learner_state(final)[0]
    last = [r for r in syncs if r["version"] == state.version]
    assert last, f"no confirmed sync of the final version {state.version}"
    tensors = load_file(str(final / "hf" / "model.safetensors"))
    assert tensor_checksum(tensors.items()) == last[-1]["checksum"]
    # each actor's loaded version, as it reports it, is the learner's last confirmed version for it
    for actor_id, text in run.actor_texts.items():
        mine = [r["version"] for r in syncs if actor_id in r["confirmed"] and r["time"] <= time.time()]
        assert metric_value(text, "treerpo_actor_weight_version") in mine


def test_late_joiner_gets_current_weights_before_its_first_tree(run):
    s = run.system
    syncs = s.syncs()
    first_confirm = min((r for r in syncs if "actor-1" in r["confirmed"]), key=lambda r: r["time"])
    versions_at_join = [r["version"] for r in syncs if r["time"] <= run.join_time]
    assert first_confirm["version"] >= max(versions_at_join)  # the weights current when it joined, or newer
    mine = [t for t in s.trees() if t["actor_id"] == "actor-1"]
    assert mine and min(t["time"] for t in mine) >= first_confirm["time"]
    assert all(t["min_version"] >= first_confirm["version"] for t in mine)


def test_metrics_exported_by_real_processes_cover_dashboard_and_rules(run):
    exported = set()
    for text in [run.learner_text, *run.actor_texts.values()]:
        for line in text.splitlines():
            if line and not line.startswith("#"):
                exported.add(line.split("{")[0].split(" ")[0])
    used = set()
    for expr in [e for _, _, e in dashboard_queries()] + rule_exprs():
        used |= {n for n in promql_metric_names(expr) if not n.startswith("vllm:")}
    used -= {"up"}  # made by Prometheus itself for every target
    missing = sorted(n for n in used if n not in exported and not any(e.startswith(n + "_") for e in exported))
    assert missing == []
    assert metric_value(run.learner_text, "treerpo_learner_steps_total") >= 6
    assert metric_value(run.learner_text, "treerpo_weight_sync_duration_seconds_count") >= 4
    for text in run.actor_texts.values():
        assert metric_value(text, "treerpo_actor_trees_total") >= 1


def test_prometheus_has_data_for_every_dashboard_panel(run):
    if not run.prometheus:
        require_tool("prometheus")
    empty = sorted(expr for expr, n in run.panel_results.items() if n == 0)
    assert run.panel_results and empty == []


def test_actor_stalled_in_a_sync_is_dropped_at_the_deadline_and_the_job_goes_on(make_tiny_model, tmp_path):
    """actor-1 is frozen (SIGSTOP) while it is a sync member: no gloo, no ack, no heartbeat, its
    sockets open. The sync fails for it within weights.timeout_s, the learner drops it and trains on;
    then killed, actor-1 is restarted by the supervisor, gets the current weights before its trees count.

    The learner's silence timeout (transport.peer_timeout_s) is set far above the sync deadline, so
    the frozen actor is still a member when the next sync starts: the sync deadline, not the
    heartbeat, has to end the wait."""
    timeout_s = 15
    overrides = ["weights.bucket_mb=0.01", f"weights.timeout_s={timeout_s}", "transport.peer_timeout_s=120"]
    system = System(tmp_path / "job", make_tiny_model(**SYSTEM_MODEL), overrides, num_actors=2)
    victim, frozen = None, False
    try:
        system.start()
        system.wait(lambda: any(r["version"] >= 1 and "actor-1" in r["confirmed"] for r in system.syncs()), 300,
                    "actor-1 to confirm a sync of version >= 1")
        victim = system.sup.actors[1].proc.pid
        os.kill(victim, signal.SIGSTOP)  # a process this test's supervisor started
        frozen, stop_time = True, time.time()
        system.wait(lambda: any(r["time"] > stop_time and "actor-1" in r["members"]
                                and "actor-1" not in r["confirmed"] for r in system.syncs()),
                    120, "a sync to fail for the frozen actor-1")
        os.kill(victim, signal.SIGKILL)
        frozen, kill_time = False, time.time()
        system.wait(lambda: any(r["time"] > kill_time and "actor-1" in r["confirmed"] for r in system.syncs())
                    and any(t["actor_id"] == "actor-1" and t["time"] > kill_time and t["verdict"] == "accepted"
                            for t in system.trees()), 300, "actor-1 restarted, synced and sending again")
        system.wait(lambda: any(r["time"] > kill_time for r in system.steps()), 120, "steps after the kill")
    finally:
        if frozen:  # failed before the kill: let it take the supervisor's SIGTERM
            os.kill(victim, signal.SIGCONT)
        code = system.stop()
    assert code == 0
    syncs = system.syncs()
    failed = [r for r in syncs
              if r["time"] > stop_time and "actor-1" in r["members"] and "actor-1" not in r["confirmed"]]
    assert failed[0]["seconds"] <= timeout_s + 1  # the broadcast ended by its deadline
    # ... and so did the whole sync, acks included: it began right after its step's record
    step_before = max(r["time"] for r in system.steps() if r["time"] <= failed[0]["time"])
    assert failed[0]["time"] - step_before <= timeout_s + ACK_GRACE_S + 1
    later = [r for r in syncs if r["time"] > failed[0]["time"] and "actor-0" in r["confirmed"]]
    assert later, "no later sync succeeded with the surviving actor"
    assert any(r["time"] > failed[0]["time"] for r in system.steps()), "the learner stopped training"
    rejoin = min((r for r in syncs if r["time"] > kill_time and "actor-1" in r["confirmed"]), key=lambda r: r["time"])
    new_trees = [t for t in system.trees() if t["actor_id"] == "actor-1" and t["time"] > kill_time]
    accepted = [t for t in new_trees if t["verdict"] == "accepted"]
    assert accepted and all(t["time"] >= rejoin["time"] and t["min_version"] >= rejoin["version"] for t in accepted)
    assert system.sup.actors[1].restarts >= 1 and not pid_alive(victim)
    wait_until(system.all_exited, 30, "every process to exit")


def test_learner_restart_under_live_actors(make_tiny_model, tmp_path):
    """Stop the learner (SIGTERM: checkpoint), start it again: actors stay up, re-register, count
    what was lost; the learner resumes step, version and incarnation and trains no tree twice."""
    run_dir = tmp_path / "job"
    ports = [f"transport.data_port={free_port()}", f"transport.control_port={free_port()}",
             f"weights.rendezvous_port={free_port()}"]
    system = System(run_dir, make_tiny_model(**SYSTEM_MODEL), ports, num_actors=2)
    config = str(system.sup.config_path)
    logs = run_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    learner = start_process(["learner", "--config", config, "--run-dir", str(run_dir)], logs / "learner-0.log")
    actors = []
    try:
        wait_until(lambda: (run_dir / "endpoints.json").exists(), 300, "learner endpoints", logs=logs)
        for i in range(2):
            actors.append(start_process(
                ["actor", "--config", config, "--run-dir", str(run_dir), "--actor-id", f"actor-{i}",
                 "--actor-index", str(i), "--num-actors", "2"], logs / f"actor-{i}.log"))
        wait_until(lambda: len(read_jsonl(run_dir / "metrics.jsonl")) >= 3, 300, "3 steps", logs=logs)
        learner.terminate()
        assert learner.proc.wait(timeout=120) == 0
        first = read_jsonl(run_dir / "metrics.jsonl")
        trees_first = received_trees(run_dir)
        (run_dir / "endpoints.json").unlink()
        learner = start_process(["learner", "--config", config, "--run-dir", str(run_dir)], logs / "learner-1.log")
        def back() -> bool:
            trees = received_trees(run_dir)
            return all(any(t.get("incarnation") == 1 and t["verdict"] == "accepted" and t["actor_id"] == a
                           for t in trees) for a in ("actor-0", "actor-1")) \
                and len(read_jsonl(run_dir / "metrics.jsonl")) >= len(first) + 2

        wait_until(back, 300, "both actors back with the new incarnation, 2 more steps", logs=logs)
        assert all(a.alive() for a in actors), "an actor died while the learner was away"
        actor_texts = {f"actor-{i}": scrape(json.loads((run_dir / "actors" / f"actor-{i}.json").read_text())
                                            ["metrics"] + "/metrics") for i in range(2)}
        learner.terminate()
        assert learner.proc.wait(timeout=120) == 0
    finally:
        for child in [learner, *actors]:
            if child.alive():
                child.terminate()
                try:
                    child.proc.wait(timeout=30)
                except Exception:  # noqa: BLE001
                    sigkill(child)
    steps = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["step"] for r in steps] == list(range(1, len(steps) + 1))  # step continues across the restart
    versions = [r["version"] for r in steps]
    assert versions == sorted(versions) and versions[len(first)] >= versions[len(first) - 1]
    trained = [tid for r in steps for tid in r["tree_ids"]]
    assert len(trained) == len(set(trained)), "a tree was trained twice"
    # what the first learner received but never trained died with it; the actors counted at least that
    trained_first = {tid for r in first for tid in r["tree_ids"]}
    for actor_id, text in actor_texts.items():
        buffered = sum(1 for t in trees_first if t["actor_id"] == actor_id and t["verdict"] == "accepted"
                       and t["tree_id"] not in trained_first)
        lost = metric_value(text, "treerpo_actor_trees_lost_total") or 0.0
        assert lost >= buffered
        assert metric_value(text, "treerpo_actor_connected") == 1.0
