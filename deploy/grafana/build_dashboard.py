"""Generate deploy/grafana/treerpo.json, the treerpo Grafana dashboard (run: python deploy/grafana/build_dashboard.py).

Every treerpo series in a query is written through `L` / `S` / `A` (learner, weight_sync, actor),
which look the name up in common/metrics.py's table (`series`): a name the table lacks fails the
build, and `render()` also refuses any hand-written `treerpo_` name the table lacks. The JSON is
committed; the deploy tests check it equals this script's output and that every query returns
data from a real Prometheus. Panels on vLLM's own metrics (`vllm:` prefix) stay empty without a
vLLM engine; their row is titled "vLLM engine" and the tests skip queries naming `vllm:`.
The datasource is the template variable `${datasource}`; `$__rate_interval` is Grafana's.
Run it where treerpo is importable (`pip install -e .`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from common.metrics import series, undeclared_names

OUT = Path(__file__).with_name("treerpo.json")
DS = {"type": "prometheus", "uid": "${datasource}"}
RI = "$__rate_interval"
W, H = 8, 8  # panel width (of 24) and height


def L(name: str, suffix: str = "") -> str:  # noqa: N802 - read as a prefix, like the metric names
    return series("learner", name, suffix)


def S(name: str, suffix: str = "") -> str:  # noqa: N802
    return series("weight_sync", name, suffix)


def A(name: str, suffix: str = "") -> str:  # noqa: N802
    return series("actor", name, suffix)


def p50_p95(bucket: str) -> list[tuple[str, str]]:
    return [(f"histogram_quantile({q}, sum by (le) (rate({bucket}[{RI}])))", f"p{round(q * 100)}") for q in (0.5, 0.95)]


# (row title, [(panel title, unit, [(expr, legend)], description)])
ROWS: list[tuple[str, list[tuple[str, str, list[tuple[str, str]], str]]]] = [
    ("Training progress", [
        ("Leaf reward", "none", [
            (L("leaf_reward_mean"), "trained batch"),
            (f"sum(rate({A('leaf_reward', 'sum')}[{RI}])) / sum(rate({A('leaf_reward', 'count')}[{RI}]))",
             "generated (all actors)"),
        ], "Mean leaf reward of the last trained batch, and of leaves scored by actors."),
        ("Accuracy", "percentunit", [(L("accuracy"), "accuracy")],
         "Fraction of the last batch's leaves judged correct."),
        ("Held-out pass@1 and pass@k (evaluation during training)", "percentunit", [
            (L("eval_pass_at_1"), "pass@1"), (L("eval_pass_at_k"), "pass@k"),
        ], "The latest evaluation of the learner's weights on the held-out set (learner.eval_every; "
           "RUN_DIR/evals.jsonl has every one, with the step it scored)."),
        ("Response length", "none", [(L("response_tokens_mean"), "tokens per root-to-leaf path")],
         "Mean generated tokens on a root-to-leaf path."),
        ("Loss terms", "none", [
            (L("loss"), "loss"), (L("pg_loss"), "pg loss"),
            (L("kl_ref"), "kl (ref)"), (L("approx_kl_behaviour"), "approx kl (behaviour)"),
        ], "Loss of the last optimizer step and its terms."),
        ("Clipping and importance weights", "none", [
            (L("clip_fraction"), "clip fraction {{side}}"),
            (L("is_weight_mean"), "IS weight mean"),
            (L("is_weight_capped_fraction"), "IS weight capped fraction"),
        ], "Ratio clipping by side; truncated importance weights behaviour -> proximal."),
        ("Grad norm and learning rate", "none", [
            (L("grad_norm"), "grad norm"), (L("learning_rate"), "lr"),
        ], "Global gradient norm before clipping, and the learning rate."),
        ("Version and steps", "none", [
            (L("version"), "learner version"),
            (f"rate({L('steps')}[{RI}])", "steps/s"),
        ], "Weight version (published updates) and optimizer steps per second."),
        ("Advantages", "none", [
            (L("advantage_mean"), "mean"), (L("advantage_std"), "std"),
            (L("trainable_token_fraction"), "trainable token fraction"),
        ], "Step-level advantages of trainable tokens; pruned groups lower the trainable fraction."),
    ]),
    ("Async health", [
        ("Staleness of trained trees", "none", [
            *p50_p95(L("staleness", "bucket")),
            (f"rate({L('staleness', 'sum')}[{RI}]) / rate({L('staleness', 'count')}[{RI}])", "mean"),
            (L("max_staleness"), "max_staleness"),
        ], "Staleness in versions of the trees trained, against the configured bound."),
        ("Replay buffer", "none", [
            (L("buffer_trees"), "trees in buffer"),
            (L("trees_in_flight"), "in flight (unused credits + buffered)"),
            (L("credit_stall"), "credit stall (1 = stalled)"),
            (f"increase({L('credits_written_off')}[{RI}])", "credits written off"),
        ], "Trees waiting in the buffer, trees the actors may have in flight, and the credit protocol's "
           "repairs: trees that never arrived (written off) and a stall no repair cured."),
        ("Oldest tree in buffer", "s", [(L("buffer_oldest_age_seconds"), "age")],
         "Age of the oldest buffered tree."),
        ("Learner idle (waiting for data)", "percentunit", [
            (f"rate({L('idle_seconds')}[{RI}])", "idle fraction"),
        ], "Fraction of wall time the learner waited for trees."),
        ("Actors blocked on send", "percentunit", [
            (f"sum by (actor_id) (rate({A('send_blocked_seconds')}[{RI}]))", "{{actor_id}}"),
        ], "Fraction of wall time each actor was blocked by backpressure."),
        ("Trees dropped by reason", "ops", [
            (f"sum by (reason) (rate({L('trees_dropped')}[{RI}]))", "{{reason}}"),
        ], "Trees reaching the learner but not trained."),
        ("Decode errors by reason", "ops", [
            (f"sum by (reason) (rate({L('wire_errors')}[{RI}]))", "{{reason}}"),
        ], "Messages the learner could not decode."),
        ("Checkpoint failures by reason", "none", [
            (f"sum by (reason) (increase({L('checkpoint_failures')}[1h]))", "{{reason}}"),
        ], "Checkpoint saves that failed in the last hour; the previous checkpoint stays the latest."),
        ("Tracker errors by backend", "none", [
            (f"sum by (backend) (increase({L('tracker_errors')}[1h]))", "{{backend}}"),
        ], "Calls to TensorBoard, W&B or MLflow (tracking.backends) that failed in the last hour; training "
           "goes on and the tracker is tried again."),
        ("Trees lost by actors", "ops", [
            (f"sum by (reason) (rate({A('trees_lost')}[{RI}]))", "{{reason}}"),
        ], "Trees generated but never handed to the learner."),
        ("Reward errors by reason", "ops", [
            (f"sum by (reason) (rate({A('reward_errors')}[{RI}]))", "{{reason}}"),
        ], "Leaves whose scoring failed (timeouts, no answer, parse errors)."),
        ("Actor credits", "none", [(A("credits"), "{{actor_id}}")], "Trees each actor may still send."),
    ]),
    ("Throughput", [
        ("Trees per second", "ops", [
            (f"sum(rate({A('trees')}[{RI}]))", "sent by actors"),
            (f"rate({L('trees_received')}[{RI}])", "received"),
            (f"rate({L('trees_consumed')}[{RI}])", "trained"),
        ], "Trees sent, received and trained per second."),
        ("Tokens per second", "ops", [
            (f"sum(rate({A('tokens_generated')}[{RI}]))", "generated"),
            (f"rate({L('trainable_tokens')}[{RI}])", "trained"),
        ], "Generated tokens (all actors) and trainable tokens consumed by the learner."),
        ("Step duration", "s", p50_p95(L("step_duration_seconds", "bucket")), "Wall time of one optimizer step."),
        ("Generation time per batch", "s", [
            ("histogram_quantile(0.95, sum by (le, actor_id) "
             f"(rate({A('generation_seconds', 'bucket')}[{RI}])))", "p95 {{actor_id}}"),
        ], "Wall time of one tree batch's generation, per actor."),
        ("Segments per second", "ops", [
            (f"sum(rate({A('segments')}[{RI}]))", "segments"),
        ], "Tree segments generated per second, all actors."),
    ]),
    ("Weight sync", [
        ("Sync duration", "s", p50_p95(S("duration_seconds", "bucket")), "Learner-side duration of one weight sync."),
        ("Sync failures by reason", "short", [
            (f"sum by (reason) (increase({S('failures')}[{RI}]))", "{{reason}}"),
        ], "Failed syncs and actors dropped from a sync."),
        ("Time since last successful sync", "s", [
            (f"time() - {S('last_success_timestamp_seconds')}", "seconds"),
        ], "Alerted on when the learner steps but no sync succeeds."),
        ("Version skew (learner - actor)", "none", [
            (f"scalar(max({L('version')})) - {A('weight_version')}", "{{actor_id}}"),
        ], "Versions each actor's weights lag the learner's."),
        ("Sync bandwidth", "Bps", [(f"rate({S('bytes')}[{RI}])", "bytes/s")],
         "Weight bytes broadcast per second."),
        ("Actors in sync group / registered", "none", [
            (S("actors"), "in sync group"),
            (L("actors_registered"), "registered"),
        ], "Actors taking part in weight sync and registered with the learner."),
        ("Actor weight load time", "s", [(A("weight_load_last_seconds"), "{{actor_id}}")],
         "Duration of each actor's last weight load."),
    ]),
    ("Actors", [
        ("Actors up", "none", [
            ('sum(up{job="treerpo-actor"})', "up"),
            (f"sum({A('connected')})", "connected to learner"),
        ], "Actors Prometheus can scrape, and actors registered with a learner."),
        ("Trees per second per actor", "ops", [
            (f"sum by (actor_id) (rate({A('trees')}[{RI}]))", "{{actor_id}}"),
        ], "Trees sent per second by each actor."),
        ("Tokens per second per actor", "ops", [
            (f"sum by (actor_id) (rate({A('tokens_generated')}[{RI}]))", "{{actor_id}}"),
        ], "Tokens generated per second by each actor."),
        ("Scrape targets up", "none", [('up{job=~"treerpo-.*"}', "{{job}} {{instance}}")],
         "Every treerpo process Prometheus scrapes."),
    ]),
    ("vLLM engine", [
        ("vLLM requests", "none", [
            ("sum by (instance) (vllm:num_requests_running)", "running {{instance}}"),
            ("sum by (instance) (vllm:num_requests_waiting)", "waiting {{instance}}"),
        ], "vLLM's own metrics; empty unless actors run the vLLM engine."),
        ("vLLM KV cache usage", "percentunit", [
            ("sum by (instance) (vllm:kv_cache_usage_perc)", "{{instance}}"),
            ("sum by (instance) (vllm:gpu_cache_usage_perc)", "{{instance}} (older vLLM)"),
        ], "vLLM's own metrics; empty unless actors run the vLLM engine."),
        ("vLLM tokens per second", "ops", [
            (f"sum(rate(vllm:generation_tokens_total[{RI}]))", "generation"),
            (f"sum(rate(vllm:prompt_tokens_total[{RI}]))", "prompt"),
        ], "vLLM's own metrics; empty unless actors run the vLLM engine."),
    ]),
]


def panel(pid: int, title: str, unit: str, targets: list[tuple[str, str]], description: str, x: int, y: int) -> dict:
    return {
        "id": pid,
        "type": "timeseries",
        "title": title,
        "description": description,
        "datasource": DS,
        "gridPos": {"h": H, "w": W, "x": x, "y": y},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom"}, "tooltip": {"mode": "multi"}},
        "targets": [
            {"refId": chr(ord("A") + i), "datasource": DS, "expr": expr, "legendFormat": legend}
            for i, (expr, legend) in enumerate(targets)
        ],
    }


def build() -> dict:
    panels, pid, y = [], 1, 0
    for title, row_panels in ROWS:
        panels.append({"id": pid, "type": "row", "title": title, "collapsed": False,
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []})
        pid, y = pid + 1, y + 1
        for i, spec in enumerate(row_panels):
            panels.append(panel(pid, *spec, x=(i % 3) * W, y=y + (i // 3) * H))
            pid += 1
        y += ((len(row_panels) + 2) // 3) * H
    return {
        "uid": "treerpo",
        "title": "treerpo",
        "description": "Asynchronous actor-learner TreeRPO: training, async health, throughput, weight sync, actors.",
        "tags": ["treerpo"],
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "refresh": "30s",
        "time": {"from": "now-1h", "to": "now"},
        "templating": {"list": [{
            "name": "datasource", "label": "Prometheus", "type": "datasource", "query": "prometheus",
            "current": {}, "hide": 0, "refresh": 1, "regex": "", "options": [],
        }]},
        "annotations": {"list": []},
        "panels": panels,
    }


def render() -> str:
    dashboard = build()
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    unknown = undeclared_names(exprs)
    if unknown:
        raise ValueError(f"dashboard queries name series common.metrics.METRICS lacks: {sorted(unknown)}")
    return json.dumps(dashboard, indent=2) + "\n"


if __name__ == "__main__":
    OUT.write_text(render())
    sys.stdout.write(f"wrote {OUT}\n")
