"""Every metric of treerpo, named once in one table (`METRICS`), and the HTTP endpoint that serves them.

One name per thing. Each quantity is one `MetricSpec` row; its `name` is the only name it has:

* Prometheus: `treerpo_<subsystem>_<name>` (a counter exposes it with `_total`, a histogram with
  `_bucket` / `_sum` / `_count`); the metrics objects are built from the rows;
* Python: the attribute of `LearnerMetrics` / `WeightSyncMetrics` / `ActorMetrics` (built from the
  rows too: `LearnerMetrics(r).buffer_trees` is `treerpo_learner_buffer_trees`);
* the learner's step record (`RUN_DIR/metrics.jsonl`, one JSON object per optimizer step): the
  key, for the rows with `step=True` and the record-only rows (`kind="record"`). The loss
  (learner/loss.py) and the trainer return their metrics under these keys already, and
  `LearnerMetrics.record_step` refuses a key that is not in the table. A labelled step gauge is
  written once per label value as `<name>_<value>` (`clip_fraction_low`, `clip_fraction_high`).
  In the record, a counter's key holds this step's increment and a histogram's this step's
  observation; a gauge's key holds its value;
* dashboards and alert rules: deploy/grafana/build_dashboard.py writes every query through
  `series()`, and both builders refuse an expression naming a `treerpo_` series the table lacks
  (`undeclared_names`).

Guarantees:

* All names start with ``treerpo_``, use base units (seconds, bytes, tokens, versions) and carry
  only bounded labels: ``reason`` from a fixed tuple defined or imported here, ``side`` in
  {low, high}, ``engine`` in {hf, vllm}, ``backend`` in TRACKER_BACKENDS and ``actor_id`` (one
  value per actor process). The
  design §8.3 core names are declared exactly as listed there (tests/unit/test_metrics.py copies them).
* Each process builds its metrics in its own ``CollectorRegistry`` (``new_registry()``), never the
  global default one, so tests can build many in one interpreter.
* Labelled series are created at 0 for every known label value when the metrics object is built,
  so ``rate()``/``increase()`` see the first event and absent-series alerts stay quiet.
* ``MetricsServer`` serves ``/metrics`` (text exposition), ``/health`` (200 while the process
  lives) and ``/ready`` (200 iff ``ready_fn()`` is true, else 503) on a daemon thread.

``actor_id`` decision: every actor metric carries an ``actor_id`` label bound once at
construction (prometheus_client has no constant labels). Unlike Prometheus' ``instance``
(ip:port, changes when a pod moves), the actor id is stable across restarts — it is the
StatefulSet pod name in Kubernetes — and it is what the learner logs, so per-actor panels and
the learner's view of an actor agree. The series count stays bounded by the number of actors.

Which process exports what (``exported_names(process)`` lists the exposed sample names):

* ``learner``: subsystems ``learner`` and ``weight_sync`` (the learner side of weight sync);
* ``actor``:   subsystem ``actor`` (includes the actor side of weight sync: version, load time).
"""

from __future__ import annotations

import errno
import re
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Literal

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)

from common.config import TRACKER_BACKENDS
from common.errors import PortInUse
from common.rewards import REWARD_REASONS
from common.wire import WIRE_ERROR_REASONS

# --------------------------------------------------------------------------------------------
# Fixed label values
# --------------------------------------------------------------------------------------------
DROP_REASONS: tuple[str, ...] = ("stale", "invalid", "duplicate", "incarnation", "shutdown", "capacity")
"""Why a tree reaching the learner was not trained (design §4.3; `capacity`: evicted from a full
buffer). The one definition: learner/buffer.py counts its drops under these."""

REWARD_ERROR_REASONS: tuple[str, ...] = tuple(r for r in REWARD_REASONS if r not in ("ok", "wrong"))
"""Reward outcomes that are failures of scoring (an `ok` or `wrong` verdict is not an error)."""

ACTOR_LOST_REASONS: tuple[str, ...] = ("send_timeout", "incarnation", "shutdown", "error", "learner_lost")
"""Why an actor's tree never reached training: not handed to the learner (send_timeout,
incarnation, shutdown, error), or handed over but lost with the learner that died holding it
(learner_lost: trees sent to it that it had not reported trained or dropped)."""

SYNC_FAILURE_REASONS: tuple[str, ...] = ("timeout", "actor_lost", "checksum", "version", "forged", "error")
"""Why one weight sync (or one actor's part of it) failed."""

CHECKPOINT_FAILURE_REASONS: tuple[str, ...] = ("no_space", "io_error", "error")
"""Why a checkpoint was not written (design §7.1): the filesystem is (or would be) full, another
OS error (permissions, EIO, a file-size limit), or anything else. The one definition:
learner/checkpoint.py classifies its failures under these."""

CLIP_SIDES: tuple[str, ...] = ("low", "high")

# Buckets in the metric's base unit.
STALENESS_BUCKETS = (0, 1, 2, 3, 4, 6, 8, 12, 16, 32)  # versions
STEP_SECONDS_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
GENERATION_SECONDS_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
SYNC_SECONDS_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
REWARD_BUCKETS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


# --------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------
Kind = Literal["counter", "gauge", "histogram", "record"]
Subsystem = Literal["learner", "weight_sync", "actor"]


@dataclass(frozen=True)
class MetricSpec:
    """One named quantity (see the module docstring for where its `name` is used)."""

    subsystem: Subsystem  # Prometheus prefix treerpo_<subsystem>_; "learner" for step-record fields
    name: str  # THE name: Prometheus suffix (a counter's without _total), attribute, step-record key
    kind: Kind  # a Prometheus type, or "record": a field of the learner's step record only
    help: str
    unit: str = ""  # base unit of the value ("" = a count or a dimensionless number)
    labels: tuple[str, ...] = ()  # label names; actor metrics start with actor_id
    values: tuple[str, ...] = ()  # the fixed values of the last label: series pre-created at 0
    buckets: tuple[float, ...] = ()  # histogram buckets, in `unit`
    step: bool = False  # also a key of the learner's step record (record rows always are)

    @property
    def family(self) -> str:
        """The Prometheus family name (as prometheus_client takes it: a counter's without _total)."""
        if self.kind == "record":
            raise ValueError(f"{self.name!r} is a step-record field, not a Prometheus metric")
        return f"treerpo_{self.subsystem}_{self.name}"

    def samples(self) -> tuple[str, ...]:
        """Every sample name this metric exposes."""
        return tuple(self.family + s for s in _SUFFIXES[self.kind])

    def step_keys(self) -> tuple[str, ...]:
        """Its keys in the learner's step record (none unless `step` or a record row)."""
        if not (self.step or self.kind == "record"):
            return ()
        if self.values and self.kind != "record":
            return tuple(f"{self.name}_{v}" for v in self.values)
        return (self.name,)


_SUFFIXES = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}

_L, _S, _A = "learner", "weight_sync", "actor"
_ACTOR = ("actor_id",)

METRICS: tuple[MetricSpec, ...] = (
    # -- learner: design §8.3 core names ----------------------------------------------------------
    MetricSpec(_L, "steps", "counter", "Optimizer steps taken."),
    MetricSpec(_L, "version", "gauge", "Current weight version of the learner.", "versions", step=True),
    MetricSpec(_L, "trees_consumed", "counter", "Trees trained.", "trees", step=True),
    MetricSpec(_L, "leaves_consumed", "counter", "Root-to-leaf paths (samples) trained.", "leaves", step=True),
    MetricSpec(_L, "path_tokens", "counter", "Sum of the trained root-to-leaf path lengths: the tokens a flat sampler "
               "would generate for the same samples (/ generated = the tree's prefix sharing).", "tokens", step=True),
    MetricSpec(_L, "trees_dropped", "counter", "Trees not trained, by reason.", "trees", ("reason",), DROP_REASONS),
    MetricSpec(_L, "buffer_trees", "gauge", "Trees waiting in the replay buffer.", "trees", step=True),
    MetricSpec(_L, "staleness", "histogram", "Staleness of trained trees, in versions.", "versions",
               buckets=STALENESS_BUCKETS),
    MetricSpec(_L, "last_step_timestamp_seconds", "gauge", "Unix time of the last optimizer step (0 = none yet).",
               "seconds"),
    # -- learner: ingest and async health ---------------------------------------------------------
    MetricSpec(_L, "trees_received", "counter", "Trees decoded and validated off the data socket.", "trees"),
    MetricSpec(_L, "wire_errors", "counter", "Messages that failed to decode, by reason.", "", ("reason",),
               WIRE_ERROR_REASONS),
    MetricSpec(_L, "buffer_oldest_age_seconds", "gauge", "Age of the oldest tree in the buffer (0 when empty).",
               "seconds"),
    MetricSpec(_L, "idle_seconds", "counter", "Seconds the learner waited for data with nothing to train.", "seconds"),
    MetricSpec(_L, "actors_registered", "gauge", "Actors currently registered (heartbeating)."),
    MetricSpec(_L, "trees_in_flight", "gauge", "Trees the members may have in flight as the learner counts them: "
               "unused credits plus buffered trees.", "trees"),
    MetricSpec(_L, "credits_written_off", "counter", "Trees an actor sent that never arrived (a gap in its "
               "sequence, or its heartbeats' count): their credits were granted again.", "trees"),
    MetricSpec(_L, "credit_stall", "gauge", "1 while the learner waits in vain for trees and no confirmed actor "
               "holds a credit (a stall that credit reconciliation did not cure)."),
    MetricSpec(_L, "credit_stalls", "counter", "Times treerpo_learner_credit_stall went to 1."),
    MetricSpec(_L, "max_staleness", "gauge", "Configured staleness bound eta, in versions.", "versions"),
    MetricSpec(_L, "incarnation", "gauge", "Learner incarnation (restarts)."),
    # -- learner: checkpoints (design §7.1) ---------------------------------------------------------
    MetricSpec(_L, "checkpoints", "counter", "Checkpoints written completely (each then named by `latest`)."),
    MetricSpec(_L, "checkpoint_failures", "counter", "Checkpoint saves that failed, by reason; the previous "
               "checkpoint stays the latest.", "", ("reason",), CHECKPOINT_FAILURE_REASONS),
    MetricSpec(_L, "tracker_errors", "counter", "Calls to an experiment tracker (learner/tracking.py) that "
               "raised, by backend; training goes on and the tracker is tried again.", "", ("backend",),
               TRACKER_BACKENDS),
    # -- learner: evaluation during training (learner.eval_every, design §8.5) ----------------------
    MetricSpec(_L, "eval_pass_at_1", "gauge", "Held-out pass@1 of the latest evaluation (RUN_DIR/evals.jsonl)."),
    MetricSpec(_L, "eval_pass_at_k", "gauge", "Held-out pass@k (k = learner.eval_k) of the latest evaluation."),
    MetricSpec(_L, "eval_mean_response_tokens", "gauge", "Mean response length of the latest held-out evaluation.",
               "tokens"),
    MetricSpec(_L, "eval_step", "gauge", "Step whose weights the latest held-out evaluation scored."),
    MetricSpec(_L, "evals", "counter", "Held-out evaluations read back from the evaluator."),
    MetricSpec(_L, "evals_skipped", "counter", "Evaluations skipped because the evaluator had not yet taken the "
               "previous export (training never waits for one)."),
    MetricSpec(_L, "last_checkpoint_timestamp_seconds", "gauge", "Unix time of this process's last complete "
               "checkpoint (0 = none yet).", "seconds"),
    # -- learner: training (written by the trainer / the loss, recorded per step) ----------------
    MetricSpec(_L, "step_duration_seconds", "histogram", "Wall time of one optimizer step.", "seconds",
               buckets=STEP_SECONDS_BUCKETS, step=True),
    MetricSpec(_L, "trainable_tokens", "counter", "Trainable tokens consumed by optimizer steps (all ranks).",
               "tokens", step=True),
    MetricSpec(_L, "generated_tokens", "counter", "Generated (non-prompt) tokens of the trees trained "
               "(learner.max_generated_tokens counts these).", "tokens", step=True),
    MetricSpec(_L, "loss", "gauge", "Total loss of the last step.", step=True),
    MetricSpec(_L, "pg_loss", "gauge", "Clipped policy-gradient term w*max(-A*r, -A*clip(r)), last step.", step=True),
    MetricSpec(_L, "kl_ref", "gauge", "k3 KL of the policy to the reference model, last step (absent without one).",
               step=True),
    MetricSpec(_L, "approx_kl_behaviour", "gauge", "k3 KL(behaviour || current policy) on the sampled tokens, "
               "last step.", step=True),
    MetricSpec(_L, "clip_fraction", "gauge", "Fraction of trainable tokens whose ratio was clipped, by side.",
               "", ("side",), CLIP_SIDES, step=True),
    MetricSpec(_L, "is_weight_mean", "gauge", "Mean truncated IS weight (behaviour -> proximal), last step.",
               step=True),
    MetricSpec(_L, "is_weight_max", "gauge", "Max truncated IS weight, last step.", step=True),
    MetricSpec(_L, "is_weight_capped_fraction", "gauge", "Fraction of trainable tokens whose IS weight hit the cap.",
               step=True),
    MetricSpec(_L, "truncated_token_fraction", "gauge", "Fraction of trainable tokens outside the learner's "
               "top-k/top-p kept set (masked out of the loss), last step.", step=True),
    MetricSpec(_L, "entropy", "gauge", "Mean token entropy of the policy (nats), last step.", "nats", step=True),
    MetricSpec(_L, "advantage_mean", "gauge", "Mean advantage of trainable tokens.", step=True),
    MetricSpec(_L, "advantage_std", "gauge", "Std of the advantage of trainable tokens.", step=True),
    MetricSpec(_L, "trainable_token_fraction", "gauge", "Trainable (unpruned) fraction of generated tokens.",
               step=True),
    MetricSpec(_L, "grad_norm", "gauge", "Global gradient norm before clipping, last step.", step=True),
    MetricSpec(_L, "learning_rate", "gauge", "Learning rate of the last step.", step=True),
    MetricSpec(_L, "leaf_reward_mean", "gauge", "Mean leaf reward of the last batch.", step=True),
    MetricSpec(_L, "accuracy", "gauge", "Fraction of the last batch's leaves judged correct (reward >= 1).",
               step=True),
    MetricSpec(_L, "response_tokens_mean", "gauge", "Mean generated tokens on a root-to-leaf path, last batch.",
               "tokens", step=True),
    # -- learner: step-record fields only ---------------------------------------------------------
    MetricSpec(_L, "step", "record", "Optimizer steps done, this one included (continues across restarts)."),
    MetricSpec(_L, "time", "record", "Unix time the record was written.", "seconds"),
    MetricSpec(_L, "tree_ids", "record", "tree_id of every tree trained in the step (a list)."),
    MetricSpec(_L, "staleness_mean", "record", "Mean staleness of the step's trees (v - min node version).",
               "versions"),
    MetricSpec(_L, "step_applied", "record", "1 if the optimizer step was applied, 0 if the collapse guard "
               "skipped it (non-finite loss or gradient)."),
    MetricSpec(_L, "micro_batches", "record", "Micro-batches per rank in the step (the most any rank ran)."),
    MetricSpec(_L, "optimizer_steps", "record", "Optimizer steps the record's batch took (learner.minibatches)."),
    MetricSpec(_L, "forward_tokens", "record", "Non-padding tokens the training forwards processed, all ranks.",
               "tokens"),
    MetricSpec(_L, "ratio_mean", "record", "Mean policy ratio exp(logprob - proximal logprob), trainable tokens."),
    MetricSpec(_L, "approx_kl_proximal", "record", "k3 KL(proximal || current policy) on the trainable tokens."),
    MetricSpec(_L, "advantage_min", "record", "Smallest advantage of a trainable token."),
    MetricSpec(_L, "advantage_max", "record", "Largest advantage of a trainable token."),
    MetricSpec(_L, "token_staleness_mean", "record", "Mean staleness of the trainable tokens, in versions.",
               "versions"),
    MetricSpec(_L, "token_staleness_max", "record", "Largest staleness of a trainable token, in versions.",
               "versions"),
    # -- weight sync, learner side (design §6) ----------------------------------------------------
    MetricSpec(_S, "duration_seconds", "histogram", "Learner-side duration of one successful weight sync.",
               "seconds", buckets=SYNC_SECONDS_BUCKETS),
    MetricSpec(_S, "bytes", "counter", "Bytes of weights broadcast.", "bytes"),
    MetricSpec(_S, "failures", "counter", "Failed syncs (or actors dropped from one), by reason.", "",
               ("reason",), SYNC_FAILURE_REASONS),
    MetricSpec(_S, "last_success_timestamp_seconds", "gauge", "Unix time of the last successful sync (0 = none).",
               "seconds"),
    MetricSpec(_S, "actors", "gauge", "Actors in the weight-sync group."),
    MetricSpec(_S, "version", "gauge", "Version of the last successful sync.", "versions"),
    # -- actor (every series carries actor_id) ----------------------------------------------------
    MetricSpec(_A, "info", "gauge", "Always 1; labels describe the actor.", "", ("actor_id", "engine")),
    MetricSpec(_A, "trees", "counter", "Trees sent to the learner.", "trees", _ACTOR),
    MetricSpec(_A, "weight_version", "gauge", "Weight version loaded in this actor.", "versions", _ACTOR),
    MetricSpec(_A, "segments", "counter", "Tree segments generated.", "", _ACTOR),
    MetricSpec(_A, "tokens_generated", "counter", "Tokens generated (all segments).", "tokens", _ACTOR),
    MetricSpec(_A, "generation_seconds", "histogram", "Wall time of one tree's generation, from its first "
               "segment to its last.", "seconds", _ACTOR, buckets=GENERATION_SECONDS_BUCKETS),
    MetricSpec(_A, "leaf_reward", "histogram", "Reward of each scored leaf.", "", _ACTOR, buckets=REWARD_BUCKETS),
    MetricSpec(_A, "leaf_reward_mean", "gauge", "Mean leaf reward of the last tree batch.", "", _ACTOR),
    MetricSpec(_A, "send_blocked_seconds", "counter", "Seconds blocked sending trees (backpressure).", "seconds",
               _ACTOR),
    MetricSpec(_A, "credits", "gauge", "Trees this actor may still send before new credit.", "trees", _ACTOR),
    MetricSpec(_A, "connected", "gauge", "1 while registered with a learner, else 0.", "", _ACTOR),
    MetricSpec(_A, "weight_load_duration_seconds", "histogram", "Time to receive and load one weight update.",
               "seconds", _ACTOR, buckets=SYNC_SECONDS_BUCKETS),
    MetricSpec(_A, "weight_load_last_seconds", "gauge", "Duration of the last weight load.", "seconds", _ACTOR),
    MetricSpec(_A, "weight_pause_seconds", "histogram", "Generation paused by one in-flight weight update (vLLM "
               "actors: pause_generation(keep) to resume_generation).", "seconds", _ACTOR,
               buckets=SYNC_SECONDS_BUCKETS),
    MetricSpec(_A, "reward_errors", "counter", "Leaves whose scoring failed, by reason.", "", ("actor_id", "reason"),
               REWARD_ERROR_REASONS),
    MetricSpec(_A, "trees_lost", "counter", "Trees generated but not handed to the learner, by reason.", "trees",
               ("actor_id", "reason"), ACTOR_LOST_REASONS),
)

SPECS: dict[tuple[str, str], MetricSpec] = {(m.subsystem, m.name): m for m in METRICS}
STEP_RECORD: dict[str, MetricSpec] = {k: m for m in METRICS for k in m.step_keys()}
"""Every key of the learner's step record (RUN_DIR/metrics.jsonl) -> its row."""

PROCESSES = ("learner", "actor")
_PROCESS_SUBSYSTEMS = {"learner": (_L, _S), "actor": (_A,)}


def _check_table() -> None:
    assert len(SPECS) == len(METRICS), "a (subsystem, name) pair appears twice in METRICS"
    assert len(STEP_RECORD) == sum(len(m.step_keys()) for m in METRICS), "two rows share a step-record key"
    for m in METRICS:
        assert re.fullmatch(r"[a-z][a-z0-9_]*", m.name) and not m.name.endswith("_total"), m.name
        assert (m.kind == "histogram") == bool(m.buckets), m.name
        assert m.kind == "record" or m.unit not in ("seconds", "bytes") or m.name.endswith(m.unit), m.name
        assert not (m.values and not m.labels), m.name
        assert m.subsystem != _A or m.labels[:1] == _ACTOR, f"{m.name}: actor metrics carry actor_id"
        assert not (m.step and m.subsystem != _L), m.name
        assert not (m.step and m.values and m.kind != "gauge"), f"{m.name}: only gauges may be labelled step keys"


_check_table()


def series(subsystem: str, name: str, suffix: str = "") -> str:
    """The exposed sample name of row (subsystem, name); KeyError naming the table if there is none.

    A counter's is `…_total` (suffix "" or "total"); a histogram needs suffix "bucket", "sum" or "count".
    """
    spec = SPECS.get((subsystem, name))
    if spec is None or spec.kind == "record":
        raise KeyError(f"no Prometheus metric ({subsystem!r}, {name!r}) in common.metrics.METRICS")
    suffix = "_" + suffix if suffix else ""
    if spec.kind == "counter":
        suffix = suffix or "_total"
    if suffix not in _SUFFIXES[spec.kind]:
        raise ValueError(f"{spec.family} is a {spec.kind}: use a suffix of {_SUFFIXES[spec.kind]}")
    return spec.family + suffix


def specs(process: str | None = None) -> tuple[MetricSpec, ...]:
    """The Prometheus rows a `process` ('learner' or 'actor'; None = both) exports."""
    if process is not None and process not in _PROCESS_SUBSYSTEMS:
        raise ValueError(f"unknown process {process!r}: use one of {PROCESSES}")
    subsystems = [s for p in (PROCESSES if process is None else (process,)) for s in _PROCESS_SUBSYSTEMS[p]]
    return tuple(m for m in METRICS if m.kind != "record" and m.subsystem in subsystems)


def metric_types(process: str) -> dict[str, str]:
    """{family name as exposed (counters with _total): type} of the treerpo_ metrics of `process`."""
    return {m.family + ("_total" if m.kind == "counter" else ""): m.kind for m in specs(process)}


def exported_names(process: str | None = None) -> set[str]:
    """Every sample name `process` (None = all) exposes: counters' _total, histograms' _bucket/_sum/_count."""
    return {s for m in specs(process) for s in m.samples()}


# --------------------------------------------------------------------------------------------
# PromQL checks (dashboards, alert rules)
# --------------------------------------------------------------------------------------------
FOREIGN_SERIES = frozenset({"up"})  # made by Prometheus itself
FOREIGN_PREFIXES = ("vllm:",)  # vLLM's own metrics, served by vLLM actors

_KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
    "offset", "inf", "nan", "atan2",
}
_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENT = re.compile(r"(?<![\w:.$])([a-zA-Z_:][a-zA-Z0-9_:]*)(?![\w:])(?!\s*\()")


def promql_metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression (not functions, keywords, labels or durations).

    Strips strings, label matchers `{...}`, range/subquery selectors `[...]` and grouping label
    lists, then keeps identifiers not followed by `(`. A `{__name__="x"}` selector is not seen.
    """
    text = _STRINGS.sub('""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = _GROUPING.sub(" ", text)
    return {m for m in _IDENT.findall(text) if m not in _KEYWORDS}


def undeclared_names(exprs: Iterable[str]) -> set[str]:
    """Series the expressions name that neither the table nor Prometheus/vLLM (FOREIGN_*) define."""
    declared = exported_names()
    used = {n for e in exprs for n in promql_metric_names(e)}
    return {n for n in used if n not in declared and n not in FOREIGN_SERIES and not n.startswith(FOREIGN_PREFIXES)}


# --------------------------------------------------------------------------------------------
# Metrics objects, built from the table
# --------------------------------------------------------------------------------------------
def new_registry(process_metrics: bool = True) -> CollectorRegistry:
    """A process-local registry; with `process_metrics`, also process_cpu_seconds_total & co."""
    registry = CollectorRegistry(auto_describe=True)
    if process_metrics:
        ProcessCollector(registry=registry)
    return registry


def _check_reason(reason: str, allowed: tuple[str, ...], what: str) -> str:
    if reason not in allowed:
        raise ValueError(f"unknown {what} reason {reason!r}: use one of {allowed} (labels must stay bounded)")
    return reason


def _build(spec: MetricSpec, registry: CollectorRegistry, bound: tuple[str, ...] = ()):
    """The prometheus_client object of `spec`, its fixed label values pre-created at 0."""
    cls = {"counter": Counter, "gauge": Gauge, "histogram": Histogram}[spec.kind]
    extra = {"buckets": spec.buckets} if spec.kind == "histogram" else {}
    metric = cls(spec.family, spec.help, spec.labels, registry=registry, **extra)
    for value in spec.values:
        metric.labels(*bound, value)
    return metric


class _FromTable:
    """Sets one attribute per row of `subsystem`, named by the row (a method of that name wins)."""

    def _attach(self, registry: CollectorRegistry, subsystem: str, bound: tuple[str, ...] = ()) -> None:
        for spec in specs():
            if spec.subsystem != subsystem:
                continue
            metric = _build(spec, registry, bound)
            if bound and len(spec.labels) == len(bound):  # only the bound labels: a ready child
                metric = metric.labels(*bound)
            if not callable(getattr(type(self), spec.name, None)):
                setattr(self, spec.name, metric)
            self.family[spec.name] = metric


# --------------------------------------------------------------------------------------------
# Learner
# --------------------------------------------------------------------------------------------
class LearnerMetrics(_FromTable):
    """Metrics of the learner (rank 0): one attribute per `learner` row of METRICS. Thread-safe."""

    def __init__(self, registry: CollectorRegistry):
        self.family: dict[str, object] = {}
        self._attach(registry, _L)

    def dropped(self, reason: str, n: int = 1) -> None:
        self.trees_dropped.labels(_check_reason(reason, DROP_REASONS, "drop")).inc(n)

    def wire_error(self, reason: str) -> None:
        self.wire_errors.labels(_check_reason(reason, WIRE_ERROR_REASONS, "wire error")).inc()

    def checkpoint_failed(self, reason: str) -> None:
        self.checkpoint_failures.labels(_check_reason(reason, CHECKPOINT_FAILURE_REASONS, "checkpoint failure")).inc()

    def tracker_failed(self, backend: str) -> None:
        self.tracker_errors.labels(_check_reason(backend, TRACKER_BACKENDS, "tracker")).inc()

    def checkpoint_written(self, now: float | None = None) -> None:
        self.checkpoints.inc()
        self.last_checkpoint_timestamp_seconds.set(time.time() if now is None else now)

    def record_step(self, record: Mapping[str, object], *, staleness: Iterable[int] = (),
                    now: float | None = None) -> None:
        """Record one batch's step record (keys: STEP_RECORD; `optimizer_steps` of them) and its trees' staleness.

        Gauges are set, counters advance by the record's value, histograms observe it; a key the
        record lacks (or holds as None) leaves its metric as is. A key not in the table raises.
        """
        unknown = sorted(set(record) - set(STEP_RECORD))
        if unknown:
            raise ValueError(f"unknown step-record key(s) {unknown}: add a row to common.metrics.METRICS")
        self.steps.inc(float(record.get("optimizer_steps") or 1))
        for key, value in record.items():
            spec = STEP_RECORD[key]
            if spec.kind == "record" or value is None:
                continue
            metric = self.family[spec.name]
            if spec.values:
                metric.labels(key[len(spec.name) + 1:]).set(value)
            elif spec.kind == "gauge":
                metric.set(value)
            elif spec.kind == "counter":
                metric.inc(value)
            else:
                metric.observe(value)
        for s in staleness:
            self.staleness.observe(s)
        self.last_step_timestamp_seconds.set(time.time() if now is None else now)


# --------------------------------------------------------------------------------------------
# Weight sync, learner side
# --------------------------------------------------------------------------------------------
class WeightSyncMetrics(_FromTable):
    """Learner-side weight-sync metrics (design §6), the `weight_sync` rows; the actor side is ActorMetrics."""

    def __init__(self, registry: CollectorRegistry):
        self.family: dict[str, object] = {}
        self._attach(registry, _S)

    def succeeded(self, *, version: int, seconds: float, nbytes: int, actors: int, now: float | None = None) -> None:
        self.duration_seconds.observe(seconds)
        self.bytes.inc(nbytes)
        self.actors.set(actors)
        self.version.set(version)
        self.last_success_timestamp_seconds.set(time.time() if now is None else now)

    def failed(self, reason: str, n: int = 1) -> None:
        self.failures.labels(_check_reason(reason, SYNC_FAILURE_REASONS, "weight sync failure")).inc(n)


# --------------------------------------------------------------------------------------------
# Actor
# --------------------------------------------------------------------------------------------
class ActorMetrics(_FromTable):
    """Metrics of one actor process, the `actor` rows, every series bound to `actor_id`.

    Rows whose only label is actor_id are attributes ready to use (`metrics.trees.inc()`); the
    reason-labelled ones are counted through `reward_results` / `trees_lost`.
    """

    def __init__(self, registry: CollectorRegistry, actor_id: str, engine: str = "hf"):
        if not actor_id:
            raise ValueError("ActorMetrics needs a non-empty actor_id (the pod name in Kubernetes)")
        self.actor_id = actor_id
        self.family: dict[str, object] = {}
        self._attach(registry, _A, bound=(actor_id,))
        self.info.labels(actor_id, engine).set(1)

    def reward_results(self, reasons: Iterable[str]) -> None:
        """Count the failure reasons among RewardResult.reason values (`ok`/`wrong` are not failures)."""
        for reason in reasons:
            if reason in ("ok", "wrong"):
                continue
            reason = _check_reason(reason, REWARD_ERROR_REASONS, "reward")
            self.reward_errors.labels(self.actor_id, reason).inc()

    def trees_lost(self, reason: str, n: int = 1) -> None:
        reason = _check_reason(reason, ACTOR_LOST_REASONS, "lost tree")
        self.family["trees_lost"].labels(self.actor_id, reason).inc(n)

    def weights_loaded(self, version: int, seconds: float) -> None:
        self.weight_version.set(version)
        self.weight_load_duration_seconds.observe(seconds)
        self.weight_load_last_seconds.set(seconds)

    def leaves_scored(self, rewards: Iterable[float]) -> None:
        rewards = list(rewards)
        for x in rewards:
            self.leaf_reward.observe(x)
        if rewards:
            self.leaf_reward_mean.set(sum(rewards) / len(rewards))


def build_process_metrics(process: str, registry: CollectorRegistry, actor_id: str = "actor-0") -> list[object]:
    """The metrics objects a `process` ('learner' or 'actor') creates, built in `registry`."""
    if process == "learner":
        return [LearnerMetrics(registry), WeightSyncMetrics(registry)]
    if process == "actor":
        return [ActorMetrics(registry, actor_id)]
    raise ValueError(f"unknown process {process!r}: use one of {PROCESSES}")


# --------------------------------------------------------------------------------------------
# HTTP endpoint
# --------------------------------------------------------------------------------------------
class MetricsServer:
    """/metrics, /health, /ready on a background ThreadingHTTPServer.

    `ready_fn` decides /ready (200 when it returns true, 503 otherwise or when it raises; the body
    says which). Without one, readiness follows `set_ready()`. `include_default_registry` also
    exposes prometheus_client's global registry, where vLLM registers its own `vllm:` metrics.
    """

    def __init__(self, host: str, port: int, registry: CollectorRegistry,
                 ready_fn: Callable[[], bool] | None = None, include_default_registry: bool = False,
                 port_key: str = "metrics.learner_port/actor_port"):
        self.host, self.requested_port, self.registry = host, port, registry
        self.port_key = port_key  # the config key of `port`, for the error of a busy port
        self._ready_flag = threading.Event()
        self.ready_fn = ready_fn or self._ready_flag.is_set
        self.registries = [registry] + ([REGISTRY] if include_default_registry else [])
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        if self._httpd is None:
            raise RuntimeError("MetricsServer.port is known only after start()")
        return self._httpd.server_address[1]

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def set_ready(self, ready: bool = True) -> None:
        if ready:
            self._ready_flag.set()
        else:
            self._ready_flag.clear()

    def exposition(self) -> bytes:
        """What /metrics answers now (the text exposition format of every registry served)."""
        return b"".join(generate_latest(r) for r in self.registries)

    def start(self) -> MetricsServer:
        if self._httpd is not None:
            raise RuntimeError("MetricsServer already started")
        server = self
        server_cls = ThreadingHTTPServer
        if ":" in self.host:
            server_cls = type("ThreadingHTTPServer6", (ThreadingHTTPServer,), {"address_family": socket.AF_INET6})

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's API
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._reply(200, server.exposition(), CONTENT_TYPE_LATEST)
                elif path == "/health":
                    self._reply(200, b"ok\n")
                elif path == "/ready":
                    try:
                        ready, why = bool(server.ready_fn()), ""
                    except Exception as e:  # noqa: BLE001 - readiness must answer, reporting the error
                        ready, why = False, f": ready_fn raised {type(e).__name__}: {e}"
                    self._reply(200 if ready else 503, (b"ready\n" if ready else f"not ready{why}\n".encode()))
                else:
                    self._reply(404, b"not found: try /metrics, /health or /ready\n")

            def _reply(self, code: int, body: bytes, ctype: str = "text/plain; charset=utf-8") -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:  # scrapes every second: stay quiet
                pass

        try:
            self._httpd = server_cls((self.host, self.requested_port), Handler)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise PortInUse.at(self.host, self.requested_port, self.port_key) from None
            raise OSError(
                e.errno, f"metrics server cannot bind {self.host}:{self.requested_port} ({e.strerror}); "
                f"check metrics.host, set {self.port_key} to a free port or 0"
            ) from None
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.1}, name="metrics-http", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is None:
            return
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
        self._httpd = self._thread = None

    def __enter__(self) -> MetricsServer:
        return self.start() if self._httpd is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()
