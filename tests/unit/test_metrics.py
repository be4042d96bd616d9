"""common/metrics.py: design §8.3 names and types, pre-initialised reasons, and the HTTP endpoint over real sockets."""

from __future__ import annotations

import urllib.error
import urllib.request

import pytest
from prometheus_client import REGISTRY, Counter, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from common.metrics import (
    ACTOR_LOST_REASONS,
    DROP_REASONS,
    METRICS,
    REWARD_ERROR_REASONS,
    STEP_RECORD,
    SYNC_FAILURE_REASONS,
    WIRE_ERROR_REASONS,
    ActorMetrics,
    LearnerMetrics,
    MetricsServer,
    WeightSyncMetrics,
    exported_names,
    metric_types,
    new_registry,
    series,
    undeclared_names,
)

# design §8.3, copied by hand: exposed name -> type.
DESIGN_CORE = {
    "learner": {
        "treerpo_learner_steps_total": "counter",
        "treerpo_learner_version": "gauge",
        "treerpo_learner_trees_consumed_total": "counter",
        "treerpo_learner_trees_dropped_total": "counter",
        "treerpo_learner_buffer_trees": "gauge",
        "treerpo_learner_staleness": "histogram",
        "treerpo_learner_last_step_timestamp_seconds": "gauge",
        "treerpo_weight_sync_duration_seconds": "histogram",
    },
    "actor": {
        "treerpo_actor_trees_total": "counter",
        "treerpo_actor_weight_version": "gauge",
    },
}


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def samples(text: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} from a text exposition."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


@pytest.mark.parametrize("process", ["learner", "actor"])
def test_design_core_names_have_their_types(process):
    types = metric_types(process)
    for name, kind in DESIGN_CORE[process].items():
        assert types.get(name) == kind, f"{name}: {types.get(name)} != {kind}"
    assert all(n.startswith("treerpo_") for n in types)


def test_exported_names_expand_suffixes():
    names = exported_names("learner")
    assert {"treerpo_learner_staleness_bucket", "treerpo_learner_staleness_sum", "treerpo_learner_staleness_count",
            "treerpo_learner_steps_total", "treerpo_learner_version"} <= names
    assert "treerpo_learner_steps" not in names  # a counter is only exposed with _total
    assert not any(n.startswith("treerpo_actor_") for n in names)
    assert exported_names() == names | exported_names("actor")


def test_learner_server_over_http():
    registry = new_registry()
    learner, sync = LearnerMetrics(registry), WeightSyncMetrics(registry)
    server = MetricsServer("127.0.0.1", 0, registry).start()
    try:
        assert server.port > 0
        text = get(server.url + "/metrics")[1]
        before = samples(text)
        # every known reason exists at 0 before any event
        for reason in DROP_REASONS:
            assert before[("treerpo_learner_trees_dropped_total", (("reason", reason),))] == 0
        for reason in WIRE_ERROR_REASONS:
            assert before[("treerpo_learner_wire_errors_total", (("reason", reason),))] == 0
        for reason in SYNC_FAILURE_REASONS:
            assert before[("treerpo_weight_sync_failures_total", (("reason", reason),))] == 0
        assert before[("treerpo_learner_last_step_timestamp_seconds", ())] == 0
        assert "process_cpu_seconds_total" in text  # the process collector is on

        learner.record_step({"version": 7, "trainable_tokens": 100, "step_duration_seconds": 0.5, "loss": 0.25,
                             "grad_norm": 1.5, "clip_fraction_low": 0.125, "clip_fraction_high": 0.0,
                             "trees_consumed": 3, "step": 1, "tree_ids": ["a", "b", "c"]},
                            staleness=[0, 1, 3], now=1000.0)
        learner.record_step({"version": 8, "trainable_tokens": 50, "step_duration_seconds": 2.0, "loss": None},
                            now=1010.0)
        learner.dropped("stale", 3)
        learner.dropped("duplicate")
        learner.wire_error(WIRE_ERROR_REASONS[0])
        sync.succeeded(version=8, seconds=0.3, nbytes=4096, actors=2, now=1011.0)
        sync.failed("timeout")

        after = samples(get(server.url + "/metrics")[1])
        assert after[("treerpo_learner_steps_total", ())] == 2
        assert after[("treerpo_learner_version", ())] == 8
        assert after[("treerpo_learner_trainable_tokens_total", ())] == 150
        assert after[("treerpo_learner_last_step_timestamp_seconds", ())] == 1010.0
        assert after[("treerpo_learner_loss", ())] == 0.25  # second step passed no loss: kept
        assert after[("treerpo_learner_grad_norm", ())] == 1.5
        assert after[("treerpo_learner_clip_fraction", (("side", "low"),))] == 0.125
        assert after[("treerpo_learner_trees_consumed_total", ())] == 3
        # staleness 0, 1, 3: sum 4, count 3; buckets le=0 -> 1, le=1 -> 2, le=2 -> 2, le=3 -> 3
        assert after[("treerpo_learner_staleness_sum", ())] == 4
        assert after[("treerpo_learner_staleness_count", ())] == 3
        buckets = [after[("treerpo_learner_staleness_bucket", (("le", le),))] for le in ("0.0", "1.0", "2.0", "3.0")]
        assert buckets == [1, 2, 2, 3]
        # step durations 0.5 and 2.0
        assert after[("treerpo_learner_step_duration_seconds_sum", ())] == 2.5
        assert after[("treerpo_learner_trees_dropped_total", (("reason", "stale"),))] == 3
        assert after[("treerpo_learner_trees_dropped_total", (("reason", "duplicate"),))] == 1
        assert after[("treerpo_learner_trees_dropped_total", (("reason", "shutdown"),))] == 0
        assert after[("treerpo_learner_wire_errors_total", (("reason", WIRE_ERROR_REASONS[0]),))] == 1
        assert after[("treerpo_weight_sync_bytes_total", ())] == 4096
        assert after[("treerpo_weight_sync_last_success_timestamp_seconds", ())] == 1011.0
        assert after[("treerpo_weight_sync_actors", ())] == 2
        assert after[("treerpo_weight_sync_duration_seconds_count", ())] == 1
        assert after[("treerpo_weight_sync_failures_total", (("reason", "timeout"),))] == 1

        assert get(server.url + "/health") == (200, "ok\n")
        assert get(server.url + "/nope")[0] == 404
    finally:
        server.stop()


def test_ready_follows_ready_fn_and_flag():
    registry = new_registry(process_metrics=False)
    state = {"ready": False}
    with MetricsServer("127.0.0.1", 0, registry, ready_fn=lambda: state["ready"]) as server:
        assert get(server.url + "/ready")[0] == 503
        assert get(server.url + "/health")[0] == 200  # alive while not ready
        state["ready"] = True
        assert get(server.url + "/ready") == (200, "ready\n")
    with MetricsServer("127.0.0.1", 0, registry) as server:  # no ready_fn: the flag
        assert get(server.url + "/ready")[0] == 503
        server.set_ready()
        assert get(server.url + "/ready")[0] == 200
        server.set_ready(False)
        assert get(server.url + "/ready")[0] == 503

    def broken() -> bool:
        raise RuntimeError("engine not loaded")

    with MetricsServer("127.0.0.1", 0, registry, ready_fn=broken) as server:
        code, body = get(server.url + "/ready")
        assert code == 503 and "engine not loaded" in body


def test_stop_frees_the_port_and_bind_errors_explain():
    registry = new_registry(process_metrics=False)
    server = MetricsServer("127.0.0.1", 0, registry).start()
    port = server.port
    with pytest.raises(OSError, match="metrics.learner_port"):
        MetricsServer("127.0.0.1", port, registry).start()
    server.stop()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
    again = MetricsServer("127.0.0.1", port, registry).start()  # the port is free again
    assert get(again.url + "/health")[0] == 200
    again.stop()


def test_actor_metrics_carry_actor_id():
    registry = new_registry(process_metrics=False)
    actor = ActorMetrics(registry, "treerpo-actor-3", engine="vllm")
    actor.trees.inc(2)
    actor.tokens_generated.inc(640)
    actor.leaves_scored([1.0, 0.0, 1.0, 1.0])
    actor.reward_results(["ok", "wrong", "timeout", "timeout", REWARD_ERROR_REASONS[0]])
    actor.trees_lost("send_timeout")
    actor.weights_loaded(version=5, seconds=0.75)
    actor.credits.set(6)
    with MetricsServer("127.0.0.1", 0, registry) as server:
        text = get(server.url + "/metrics")[1]
    got = samples(text)
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            assert s.labels.get("actor_id") == "treerpo-actor-3", s
    a = ("actor_id", "treerpo-actor-3")
    assert got[("treerpo_actor_trees_total", (a,))] == 2
    assert got[("treerpo_actor_tokens_generated_total", (a,))] == 640
    assert got[("treerpo_actor_leaf_reward_mean", (a,))] == 0.75  # (1 + 0 + 1 + 1) / 4
    assert got[("treerpo_actor_leaf_reward_count", (a,))] == 4
    assert got[("treerpo_actor_weight_version", (a,))] == 5
    assert got[("treerpo_actor_weight_load_last_seconds", (a,))] == 0.75
    assert got[("treerpo_actor_info", (a, ("engine", "vllm")))] == 1
    timeouts = 2 + (REWARD_ERROR_REASONS[0] == "timeout")
    assert got[("treerpo_actor_reward_errors_total", (a, ("reason", "timeout")))] == timeouts
    assert ("treerpo_actor_reward_errors_total", (a, ("reason", "ok"))) not in got  # not an error
    for reason in ACTOR_LOST_REASONS:
        assert got[("treerpo_actor_trees_lost_total", (a, ("reason", reason)))] == (reason == "send_timeout")


def test_unknown_labels_and_keys_are_refused():
    registry = new_registry(process_metrics=False)
    learner, sync = LearnerMetrics(registry), WeightSyncMetrics(registry)
    actor = ActorMetrics(new_registry(process_metrics=False), "a0")
    with pytest.raises(ValueError, match="unknown drop reason"):
        learner.dropped("because")
    with pytest.raises(ValueError, match="wire error"):
        learner.wire_error("nope")
    with pytest.raises(ValueError, match="weight sync failure"):
        sync.failed("nope")
    with pytest.raises(ValueError, match="reward"):
        actor.reward_results(["surprise"])
    with pytest.raises(ValueError, match="lost tree"):
        actor.trees_lost("nope")
    with pytest.raises(ValueError, match="unknown step-record key"):
        learner.record_step({"los": 1.0})
    with pytest.raises(ValueError, match="actor_id"):
        ActorMetrics(new_registry(process_metrics=False), "")


def test_registries_are_process_local_and_default_registry_is_opt_in():
    # Two learners in one interpreter do not clash (no global registry).
    r1, r2 = new_registry(process_metrics=False), new_registry(process_metrics=False)
    LearnerMetrics(r1).steps.inc()
    LearnerMetrics(r2)
    foreign = Counter("h5_test_vllm_like_metric", "stands in for vLLM's metrics in the global registry")
    try:
        foreign.inc()
        with MetricsServer("127.0.0.1", 0, r1) as plain, \
                MetricsServer("127.0.0.1", 0, r2, include_default_registry=True) as with_default:
            t1, t2 = get(plain.url + "/metrics")[1], get(with_default.url + "/metrics")[1]
        assert samples(t1)[("treerpo_learner_steps_total", ())] == 1
        assert samples(t2)[("treerpo_learner_steps_total", ())] == 0
        assert "h5_test_vllm_like_metric_total" not in t1
        assert "h5_test_vllm_like_metric_total 1.0" in t2
    finally:
        REGISTRY.unregister(foreign)


def test_one_name_per_quantity_from_the_step_record_to_prometheus():
    """Every step-record key of a Prometheus row lands on the series named after it, and nowhere else."""
    registry = new_registry(process_metrics=False)
    learner = LearnerMetrics(registry)
    keys = [k for k, m in STEP_RECORD.items() if m.kind != "record"]
    record = {k: float(i + 1) for i, k in enumerate(keys)}
    learner.record_step(record, now=5.0)
    got = samples(generate_latest(registry).decode())
    for key, value in record.items():
        spec = STEP_RECORD[key]
        if spec.values:  # a labelled gauge: <name>_<label value>
            label = key[len(spec.name) + 1:]
            assert got[(spec.family, ((spec.labels[0], label),))] == value, key
        elif spec.kind == "histogram":
            assert got[(series("learner", spec.name, "sum"), ())] == value, key
        else:
            assert got[(series("learner", spec.name), ())] == value, key
    assert got[("treerpo_learner_steps_total", ())] == 1
    assert got[("treerpo_learner_last_step_timestamp_seconds", ())] == 5.0


def test_table_names_and_lookups():
    assert len({(m.subsystem, m.name) for m in METRICS}) == len(METRICS)
    assert series("learner", "steps") == "treerpo_learner_steps_total"
    assert series("weight_sync", "duration_seconds", "count") == "treerpo_weight_sync_duration_seconds_count"
    assert series("actor", "weight_version") == "treerpo_actor_weight_version"
    with pytest.raises(KeyError, match="METRICS"):
        series("learner", "tokens_trained")
    with pytest.raises(KeyError):
        series("learner", "step")  # a step-record field, not a Prometheus metric
    with pytest.raises(ValueError, match="histogram"):
        series("learner", "staleness")
    exprs = ['rate(treerpo_learner_nope_total[5m]) + on() up{job="x"}', "sum(vllm:num_requests_running)",
             "treerpo_learner_version"]
    assert undeclared_names(exprs) == {"treerpo_learner_nope_total"}
