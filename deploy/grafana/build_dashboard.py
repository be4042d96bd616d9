"""Generate deploy/grafana/treerpo.json, the treerpo Grafana dashboard (run: python deploy/grafana/build_dashboard.py).

The JSON is committed; tests/test_deploy.py checks it equals this script's output, that every
`treerpo_` name in its queries is declared in common/metrics.py, and that every query returns
data from a real Prometheus. Panels on vLLM's own metrics (`vllm:` prefix) stay empty without a
vLLM engine; their row is titled "vLLM engine" and the tests skip queries naming `vllm:`.
The datasource is the template variable `${datasource}`; `$__rate_interval` is Grafana's.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

OUT = Path(__file__).with_name("treerpo.json")
DS = {"type": "prometheus", "uid": "${datasource}"}
RI = "$__rate_interval"
W, H = 8, 8  # panel width (of 24) and height

# (row title, [(panel title, unit, [(expr, legend)], description)])
ROWS: list[tuple[str, list[tuple[str, str, list[tuple[str, str]], str]]]] = [
    ("Training progress", [
        ("Leaf reward", "none", [
            ("treerpo_learner_leaf_reward_mean", "trained batch"),
            (f"sum(rate(treerpo_actor_leaf_reward_sum[{RI}])) / sum(rate(treerpo_actor_leaf_reward_count[{RI}]))",
             "generated (all actors)"),
        ], "Mean leaf reward of the last trained batch, and of leaves scored by actors."),
        ("Accuracy", "percentunit", [("treerpo_learner_accuracy", "accuracy")],
         "Fraction of the last batch's leaves judged correct."),
        ("Response length", "none", [("treerpo_learner_response_tokens_mean", "tokens per root-to-leaf path")],
         "Mean generated tokens on a root-to-leaf path."),
        ("Loss terms", "none", [
            ("treerpo_learner_loss", "loss"), ("treerpo_learner_pg_loss", "pg loss"),
            ("treerpo_learner_kl", "kl (ref)"), ("treerpo_learner_approx_kl", "approx kl (behaviour)"),
        ], "Loss of the last optimizer step and its terms."),
        ("Clipping and importance weights", "none", [
            ("treerpo_learner_clip_fraction", "clip fraction {{side}}"),
            ("treerpo_learner_is_weight_mean", "IS weight mean"),
            ("treerpo_learner_is_weight_capped_fraction", "IS weight capped fraction"),
        ], "Ratio clipping by side; truncated importance weights behaviour -> proximal."),
        ("Grad norm and learning rate", "none", [
            ("treerpo_learner_grad_norm", "grad norm"), ("treerpo_learner_learning_rate", "lr"),
        ], "Global gradient norm before clipping, and the learning rate."),
        ("Version and steps", "none", [
            ("treerpo_learner_version", "learner version"),
            (f"rate(treerpo_learner_steps_total[{RI}])", "steps/s"),
        ], "Weight version (published updates) and optimizer steps per second."),
        ("Advantages", "none", [
            ("treerpo_learner_advantage_mean", "mean"), ("treerpo_learner_advantage_std", "std"),
            ("treerpo_learner_trainable_token_fraction", "trainable token fraction"),
        ], "Step-level advantages of trainable tokens; pruned groups lower the trainable fraction."),
    ]),
    ("Async health", [
        ("Staleness of trained trees", "none", [
            (f"histogram_quantile(0.5, sum by (le) (rate(treerpo_learner_staleness_bucket[{RI}])))", "p50"),
            (f"histogram_quantile(0.95, sum by (le) (rate(treerpo_learner_staleness_bucket[{RI}])))", "p95"),
            (f"rate(treerpo_learner_staleness_sum[{RI}]) / rate(treerpo_learner_staleness_count[{RI}])", "mean"),
            ("treerpo_learner_max_staleness", "max_staleness"),
        ], "Staleness in versions of the trees trained, against the configured bound."),
        ("Replay buffer", "none", [
            ("treerpo_learner_buffer_trees", "trees in buffer"),
            ("treerpo_learner_trees_in_flight", "credits outstanding"),
        ], "Trees waiting in the buffer and trees granted to actors."),
        ("Oldest tree in buffer", "s", [("treerpo_learner_buffer_oldest_age_seconds", "age")],
         "Age of the oldest buffered tree."),
        ("Learner idle (waiting for data)", "percentunit", [
            (f"rate(treerpo_learner_idle_seconds_total[{RI}])", "idle fraction"),
        ], "Fraction of wall time the learner waited for trees."),
        ("Actors blocked on send", "percentunit", [
            (f"sum by (actor_id) (rate(treerpo_actor_send_blocked_seconds_total[{RI}]))", "{{actor_id}}"),
        ], "Fraction of wall time each actor was blocked by backpressure."),
        ("Trees dropped by reason", "ops", [
            (f"sum by (reason) (rate(treerpo_learner_trees_dropped_total[{RI}]))", "{{reason}}"),
        ], "Trees reaching the learner but not trained."),
        ("Decode errors by reason", "ops", [
            (f"sum by (reason) (rate(treerpo_learner_wire_errors_total[{RI}]))", "{{reason}}"),
        ], "Messages the learner could not decode."),
        ("Trees lost by actors", "ops", [
            (f"sum by (reason) (rate(treerpo_actor_trees_lost_total[{RI}]))", "{{reason}}"),
        ], "Trees generated but never handed to the learner."),
        ("Reward errors by reason", "ops", [
            (f"sum by (reason) (rate(treerpo_actor_reward_errors_total[{RI}]))", "{{reason}}"),
        ], "Leaves whose scoring failed (timeouts, no answer, parse errors)."),
        ("Actor credits", "none", [("treerpo_actor_credits", "{{actor_id}}")], "Trees each actor may still send."),
    ]),
    ("Throughput", [
        ("Trees per second", "ops", [
            (f"sum(rate(treerpo_actor_trees_total[{RI}]))", "sent by actors"),
            (f"rate(treerpo_learner_trees_received_total[{RI}])", "received"),
            (f"rate(treerpo_learner_trees_consumed_total[{RI}])", "trained"),
        ], "Trees sent, received and trained per second."),
        ("Tokens per second", "ops", [
            (f"sum(rate(treerpo_actor_tokens_generated_total[{RI}]))", "generated"),
            (f"rate(treerpo_learner_tokens_trained_total[{RI}])", "trained"),
        ], "Generated tokens (all actors) and trainable tokens consumed by the learner."),
        ("Step duration", "s", [
            (f"histogram_quantile(0.5, sum by (le) (rate(treerpo_learner_step_duration_seconds_bucket[{RI}])))", "p50"),
            (f"histogram_quantile(0.95, sum by (le) (rate(treerpo_learner_step_duration_seconds_bucket[{RI}])))", "p95"),
        ], "Wall time of one optimizer step."),
        ("Generation time per batch", "s", [
            ("histogram_quantile(0.95, sum by (le, actor_id) "
             f"(rate(treerpo_actor_generation_seconds_bucket[{RI}])))", "p95 {{actor_id}}"),
        ], "Wall time of one tree batch's generation, per actor."),
        ("Segments per second", "ops", [
            (f"sum(rate(treerpo_actor_segments_total[{RI}]))", "segments"),
        ], "Tree segments generated per second, all actors."),
    ]),
    ("Weight sync", [
        ("Sync duration", "s", [
            (f"histogram_quantile(0.5, sum by (le) (rate(treerpo_weight_sync_duration_seconds_bucket[{RI}])))", "p50"),
            (f"histogram_quantile(0.95, sum by (le) (rate(treerpo_weight_sync_duration_seconds_bucket[{RI}])))", "p95"),
        ], "Learner-side duration of one weight sync."),
        ("Sync failures by reason", "short", [
            (f"sum by (reason) (increase(treerpo_weight_sync_failures_total[{RI}]))", "{{reason}}"),
        ], "Failed syncs and actors dropped from a sync."),
        ("Time since last successful sync", "s", [
            ("time() - treerpo_weight_sync_last_success_timestamp_seconds", "seconds"),
        ], "Alerted on when the learner steps but no sync succeeds."),
        ("Version skew (learner - actor)", "none", [
            ("scalar(max(treerpo_learner_version)) - treerpo_actor_weight_version", "{{actor_id}}"),
        ], "Versions each actor's weights lag the learner's."),
        ("Sync bandwidth", "Bps", [(f"rate(treerpo_weight_sync_bytes_total[{RI}])", "bytes/s")],
         "Weight bytes broadcast per second."),
        ("Actors in sync group / registered", "none", [
            ("treerpo_weight_sync_actors", "in sync group"),
            ("treerpo_learner_actors_registered", "registered"),
        ], "Actors taking part in weight sync and registered with the learner."),
        ("Actor weight load time", "s", [("treerpo_actor_weight_load_last_seconds", "{{actor_id}}")],
         "Duration of each actor's last weight load."),
    ]),
    ("Actors", [
        ("Actors up", "none", [
            ('sum(up{job="treerpo-actor"})', "up"),
            ("sum(treerpo_actor_connected)", "connected to learner"),
        ], "Actors Prometheus can scrape, and actors registered with a learner."),
        ("Trees per second per actor", "ops", [
            (f"sum by (actor_id) (rate(treerpo_actor_trees_total[{RI}]))", "{{actor_id}}"),
        ], "Trees sent per second by each actor."),
        ("Tokens per second per actor", "ops", [
            (f"sum by (actor_id) (rate(treerpo_actor_tokens_generated_total[{RI}]))", "{{actor_id}}"),
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
    return json.dumps(build(), indent=2) + "\n"


if __name__ == "__main__":
    OUT.write_text(render())
    sys.stdout.write(f"wrote {OUT}\n")
