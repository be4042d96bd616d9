"""Every Prometheus metric of treerpo, declared once, and the HTTP endpoint that serves them.

Guarantees:

* All names start with ``treerpo_``, use base units (seconds, bytes, tokens, versions) and carry
  only bounded labels: ``reason`` from a fixed tuple defined or imported here, ``side`` in
  {low, high}, and ``actor_id`` (one value per actor process). The DESIGN §8 core names are
  declared exactly as listed there; dashboards, alert rules and tests read names from here.
* Each process builds its metrics in its own ``CollectorRegistry`` (``new_registry()``), never the
  global default one, so tests can build many in one interpreter.
* Labelled series are created at 0 for every known reason when the metrics object is built, so
  ``rate()``/``increase()`` see the first event and absent-series alerts stay quiet.
* ``MetricsServer`` serves ``/metrics`` (text exposition), ``/health`` (200 while the process
  lives) and ``/ready`` (200 iff ``ready_fn()`` is true, else 503) on a daemon thread.

``actor_id`` decision: every actor metric carries an ``actor_id`` label bound once at
construction (prometheus_client has no constant labels). Unlike Prometheus' ``instance``
(ip:port, changes when a pod moves), the actor id is stable across restarts — it is the
StatefulSet pod name in Kubernetes — and it is what the learner logs, so per-actor panels and
the learner's view of an actor agree. The series count stays bounded by the number of actors.

Which process exports what (``exported_names(process)`` lists the exposed sample names):

* ``learner``: ``LearnerMetrics`` + ``WeightSyncMetrics`` (learner side of weight sync);
* ``actor``:   ``ActorMetrics`` (includes the actor side of weight sync: version, load time).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

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

# --------------------------------------------------------------------------------------------
# Fixed label values
# --------------------------------------------------------------------------------------------
DROP_REASONS: tuple[str, ...] = ("stale", "invalid", "duplicate", "incarnation", "shutdown", "capacity")
"""Why a tree reaching the learner was not trained (DESIGN §5, plus `capacity`: evicted from a full buffer)."""

try:  # H1's codec owns the list; fall back to the same names if it is not importable yet.
    from common.wire import WIRE_ERROR_REASONS as _WIRE_REASONS
except ImportError:  # pragma: no cover - only while common/wire.py is absent
    _WIRE_REASONS = ("malformed", "bad_magic", "bad_version", "bad_kind", "schema", "too_large",
                     "out_of_range", "non_finite", "invalid_tree")
WIRE_ERROR_REASONS: tuple[str, ...] = tuple(_WIRE_REASONS)

try:
    from common.rewards import REWARD_REASONS as _REWARD_REASONS
except ImportError:  # pragma: no cover
    _REWARD_REASONS = ("ok", "wrong", "no_answer", "parse_error", "timeout", "error")
REWARD_ERROR_REASONS: tuple[str, ...] = tuple(r for r in _REWARD_REASONS if r not in ("ok", "wrong"))
"""Reward outcomes that are failures of scoring (an `ok` or `wrong` verdict is not an error)."""

ACTOR_LOST_REASONS: tuple[str, ...] = ("send_timeout", "incarnation", "shutdown", "error", "learner_lost")
"""Why an actor's tree never reached training: not handed to the learner (send_timeout,
incarnation, shutdown, error), or handed over but lost with the learner that died holding it
(learner_lost: trees sent whose credit never came back)."""

SYNC_FAILURE_REASONS: tuple[str, ...] = ("timeout", "actor_lost", "checksum", "version", "error")
"""Why one weight sync (or one actor's part of it) failed."""

CLIP_SIDES: tuple[str, ...] = ("low", "high")

# Buckets in the metric's base unit.
STALENESS_BUCKETS = (0, 1, 2, 3, 4, 6, 8, 12, 16, 32)  # versions
STEP_SECONDS_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
GENERATION_SECONDS_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
SYNC_SECONDS_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
REWARD_BUCKETS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


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


# --------------------------------------------------------------------------------------------
# Learner
# --------------------------------------------------------------------------------------------
class LearnerMetrics:
    """Metrics of the learner (rank 0). Update them from one thread or several: the client is thread-safe."""

    def __init__(self, registry: CollectorRegistry):
        r = registry
        # DESIGN §8 core names
        self.steps = Counter("treerpo_learner_steps", "Optimizer steps taken.", registry=r)
        self.version = Gauge("treerpo_learner_version", "Current weight version of the learner.", registry=r)
        self.trees_consumed = Counter("treerpo_learner_trees_consumed", "Trees trained.", registry=r)
        self.trees_dropped = Counter(
            "treerpo_learner_trees_dropped", "Trees not trained, by reason.", ["reason"], registry=r
        )
        self.buffer_trees = Gauge("treerpo_learner_buffer_trees", "Trees waiting in the replay buffer.", registry=r)
        self.staleness = Histogram(
            "treerpo_learner_staleness", "Staleness of trained trees, in versions.", buckets=STALENESS_BUCKETS,
            registry=r,
        )
        self.last_step_timestamp = Gauge(
            "treerpo_learner_last_step_timestamp_seconds", "Unix time of the last optimizer step (0 = none yet).",
            registry=r,
        )
        # ingest and async health
        self.trees_received = Counter(
            "treerpo_learner_trees_received", "Trees decoded and validated off the data socket.", registry=r
        )
        self.wire_errors = Counter(
            "treerpo_learner_wire_errors", "Messages that failed to decode, by reason.", ["reason"], registry=r
        )
        self.buffer_oldest_age = Gauge(
            "treerpo_learner_buffer_oldest_age_seconds", "Age of the oldest tree in the buffer (0 when empty).",
            registry=r,
        )
        self.idle_seconds = Counter(
            "treerpo_learner_idle_seconds", "Seconds the learner waited for data with nothing to train.", registry=r
        )
        self.actors_registered = Gauge(
            "treerpo_learner_actors_registered", "Actors currently registered (heartbeating).", registry=r
        )
        self.trees_in_flight = Gauge(
            "treerpo_learner_trees_in_flight", "Credits granted to actors and not yet used.", registry=r
        )
        self.max_staleness = Gauge(
            "treerpo_learner_max_staleness", "Configured staleness bound eta, in versions.", registry=r
        )
        self.incarnation = Gauge("treerpo_learner_incarnation", "Learner incarnation (restarts).", registry=r)
        # training
        self.step_duration = Histogram(
            "treerpo_learner_step_duration_seconds", "Wall time of one optimizer step.", buckets=STEP_SECONDS_BUCKETS,
            registry=r,
        )
        self.tokens_trained = Counter(
            "treerpo_learner_tokens_trained", "Trainable tokens consumed by optimizer steps.", registry=r
        )
        self.loss = Gauge("treerpo_learner_loss", "Total loss of the last step.", registry=r)
        self.pg_loss = Gauge("treerpo_learner_pg_loss", "Clipped policy-gradient term of the last step.", registry=r)
        self.kl = Gauge("treerpo_learner_kl", "k3 KL to the reference model, last step (0 without one).", registry=r)
        self.approx_kl = Gauge(
            "treerpo_learner_approx_kl", "Approximate KL of the current policy to the behaviour one, last step.",
            registry=r,
        )
        self.clip_fraction = Gauge(
            "treerpo_learner_clip_fraction", "Fraction of trainable tokens whose ratio was clipped, by side.",
            ["side"], registry=r,
        )
        self.is_weight_mean = Gauge("treerpo_learner_is_weight_mean", "Mean truncated IS weight, last step.", registry=r)
        self.is_weight_max = Gauge("treerpo_learner_is_weight_max", "Max IS weight before the cap, last step.", registry=r)
        self.is_weight_capped_fraction = Gauge(
            "treerpo_learner_is_weight_capped_fraction", "Fraction of tokens whose IS weight hit the cap.", registry=r
        )
        self.entropy = Gauge("treerpo_learner_entropy", "Mean token entropy (nats), last step.", registry=r)
        self.advantage_mean = Gauge("treerpo_learner_advantage_mean", "Mean advantage of trainable tokens.", registry=r)
        self.advantage_std = Gauge("treerpo_learner_advantage_std", "Std of the advantage of trainable tokens.", registry=r)
        self.trainable_token_fraction = Gauge(
            "treerpo_learner_trainable_token_fraction", "Trainable (unpruned) fraction of generated tokens.", registry=r
        )
        self.grad_norm = Gauge("treerpo_learner_grad_norm", "Global gradient norm before clipping, last step.", registry=r)
        self.learning_rate = Gauge("treerpo_learner_learning_rate", "Learning rate of the last step.", registry=r)
        self.leaf_reward_mean = Gauge("treerpo_learner_leaf_reward_mean", "Mean leaf reward of the last batch.", registry=r)
        self.accuracy = Gauge(
            "treerpo_learner_accuracy", "Fraction of the last batch's leaves judged correct (reward >= 1).", registry=r
        )
        self.response_tokens_mean = Gauge(
            "treerpo_learner_response_tokens_mean", "Mean generated tokens on a root-to-leaf path, last batch.",
            registry=r,
        )
        for reason in DROP_REASONS:
            self.trees_dropped.labels(reason)
        for reason in WIRE_ERROR_REASONS:
            self.wire_errors.labels(reason)
        for side in CLIP_SIDES:
            self.clip_fraction.labels(side)

    # -- events ----------------------------------------------------------------------------
    def dropped(self, reason: str, n: int = 1) -> None:
        self.trees_dropped.labels(_check_reason(reason, DROP_REASONS, "drop")).inc(n)

    def wire_error(self, reason: str) -> None:
        self.wire_errors.labels(_check_reason(reason, WIRE_ERROR_REASONS, "wire error")).inc()

    def consumed(self, staleness: Iterable[int]) -> None:
        """Trees trained in one step, given their staleness v - min(node.version)."""
        for s in staleness:
            self.trees_consumed.inc()
            self.staleness.observe(s)

    _STEP_GAUGES = {
        "loss": "loss", "pg_loss": "pg_loss", "kl": "kl", "approx_kl": "approx_kl",
        "is_weight_mean": "is_weight_mean", "is_weight_max": "is_weight_max",
        "is_weight_capped_fraction": "is_weight_capped_fraction", "entropy": "entropy",
        "advantage_mean": "advantage_mean", "advantage_std": "advantage_std",
        "trainable_token_fraction": "trainable_token_fraction", "grad_norm": "grad_norm",
        "learning_rate": "learning_rate", "leaf_reward_mean": "leaf_reward_mean", "accuracy": "accuracy",
        "response_tokens_mean": "response_tokens_mean",
    }

    def step(self, *, version: int, tokens: int, duration_s: float, now: float | None = None,
             clip_fraction_low: float | None = None, clip_fraction_high: float | None = None,
             **gauges: float | None) -> None:
        """Record one optimizer step. `gauges` keys are those of `_STEP_GAUGES`; None leaves a gauge as is."""
        unknown = sorted(set(gauges) - set(self._STEP_GAUGES))
        if unknown:
            raise TypeError(f"LearnerMetrics.step got unknown gauge(s) {unknown}; known: {sorted(self._STEP_GAUGES)}")
        self.steps.inc()
        self.version.set(version)
        self.tokens_trained.inc(tokens)
        self.step_duration.observe(duration_s)
        for key, value in gauges.items():
            if value is not None:
                getattr(self, self._STEP_GAUGES[key]).set(value)
        if clip_fraction_low is not None:
            self.clip_fraction.labels("low").set(clip_fraction_low)
        if clip_fraction_high is not None:
            self.clip_fraction.labels("high").set(clip_fraction_high)
        self.last_step_timestamp.set(time.time() if now is None else now)


# --------------------------------------------------------------------------------------------
# Weight sync, learner side
# --------------------------------------------------------------------------------------------
class WeightSyncMetrics:
    """Learner-side weight-sync metrics (DESIGN §6); the actor side lives in ActorMetrics."""

    def __init__(self, registry: CollectorRegistry):
        r = registry
        self.duration = Histogram(
            "treerpo_weight_sync_duration_seconds", "Learner-side duration of one successful weight sync.",
            buckets=SYNC_SECONDS_BUCKETS, registry=r,
        )
        self.bytes_sent = Counter("treerpo_weight_sync_bytes", "Bytes of weights broadcast.", registry=r)
        self.failures = Counter(
            "treerpo_weight_sync_failures", "Failed syncs (or actors dropped from one), by reason.", ["reason"],
            registry=r,
        )
        self.last_success_timestamp = Gauge(
            "treerpo_weight_sync_last_success_timestamp_seconds", "Unix time of the last successful sync (0 = none).",
            registry=r,
        )
        self.actors = Gauge("treerpo_weight_sync_actors", "Actors in the weight-sync group.", registry=r)
        self.version = Gauge("treerpo_weight_sync_version", "Version of the last successful sync.", registry=r)
        for reason in SYNC_FAILURE_REASONS:
            self.failures.labels(reason)

    def succeeded(self, *, version: int, seconds: float, nbytes: int, actors: int, now: float | None = None) -> None:
        self.duration.observe(seconds)
        self.bytes_sent.inc(nbytes)
        self.actors.set(actors)
        self.version.set(version)
        self.last_success_timestamp.set(time.time() if now is None else now)

    def failed(self, reason: str, n: int = 1) -> None:
        self.failures.labels(_check_reason(reason, SYNC_FAILURE_REASONS, "weight sync failure")).inc(n)


# --------------------------------------------------------------------------------------------
# Actor
# --------------------------------------------------------------------------------------------
class ActorMetrics:
    """Metrics of one actor process; every series carries `actor_id` (see the module docstring)."""

    def __init__(self, registry: CollectorRegistry, actor_id: str, engine: str = "hf"):
        if not actor_id:
            raise ValueError("ActorMetrics needs a non-empty actor_id (the pod name in Kubernetes)")
        r, a = registry, ["actor_id"]
        self.actor_id = actor_id
        info = Gauge("treerpo_actor_info", "Always 1; labels describe the actor.", ["actor_id", "engine"], registry=r)
        info.labels(actor_id, engine).set(1)
        self.trees = Counter("treerpo_actor_trees", "Trees sent to the learner.", a, registry=r).labels(actor_id)
        self.weight_version = Gauge(
            "treerpo_actor_weight_version", "Weight version loaded in this actor.", a, registry=r
        ).labels(actor_id)
        self.segments = Counter("treerpo_actor_segments", "Tree segments generated.", a, registry=r).labels(actor_id)
        self.tokens_generated = Counter(
            "treerpo_actor_tokens_generated", "Tokens generated (all segments).", a, registry=r
        ).labels(actor_id)
        self.generation_seconds = Histogram(
            "treerpo_actor_generation_seconds", "Wall time of one tree's generation, from its first segment to its last.", a,
            buckets=GENERATION_SECONDS_BUCKETS, registry=r,
        ).labels(actor_id)
        self.leaf_reward = Histogram(
            "treerpo_actor_leaf_reward", "Reward of each scored leaf.", a, buckets=REWARD_BUCKETS, registry=r
        ).labels(actor_id)
        self.leaf_reward_mean = Gauge(
            "treerpo_actor_leaf_reward_mean", "Mean leaf reward of the last tree batch.", a, registry=r
        ).labels(actor_id)
        self.send_blocked_seconds = Counter(
            "treerpo_actor_send_blocked_seconds", "Seconds blocked sending trees (backpressure).", a, registry=r
        ).labels(actor_id)
        self.credits = Gauge(
            "treerpo_actor_credits", "Trees this actor may still send before new credit.", a, registry=r
        ).labels(actor_id)
        self.connected = Gauge(
            "treerpo_actor_connected", "1 while registered with a learner, else 0.", a, registry=r
        ).labels(actor_id)
        self.weight_load_duration = Histogram(
            "treerpo_actor_weight_load_duration_seconds", "Time to receive and load one weight update.", a,
            buckets=SYNC_SECONDS_BUCKETS, registry=r,
        ).labels(actor_id)
        self.weight_load_last_seconds = Gauge(
            "treerpo_actor_weight_load_last_seconds", "Duration of the last weight load.", a, registry=r
        ).labels(actor_id)
        self._reward_errors = Counter(
            "treerpo_actor_reward_errors", "Leaves whose scoring failed, by reason.", ["actor_id", "reason"], registry=r
        )
        self._trees_lost = Counter(
            "treerpo_actor_trees_lost", "Trees generated but not handed to the learner, by reason.",
            ["actor_id", "reason"], registry=r,
        )
        for reason in REWARD_ERROR_REASONS:
            self._reward_errors.labels(actor_id, reason)
        for reason in ACTOR_LOST_REASONS:
            self._trees_lost.labels(actor_id, reason)

    def reward_results(self, reasons: Iterable[str]) -> None:
        """Count the failure reasons among RewardResult.reason values (`ok`/`wrong` are not failures)."""
        for reason in reasons:
            if reason in ("ok", "wrong"):
                continue
            self._reward_errors.labels(self.actor_id, _check_reason(reason, REWARD_ERROR_REASONS, "reward")).inc()

    def trees_lost(self, reason: str, n: int = 1) -> None:
        self._trees_lost.labels(self.actor_id, _check_reason(reason, ACTOR_LOST_REASONS, "lost tree")).inc(n)

    def weights_loaded(self, version: int, seconds: float) -> None:
        self.weight_version.set(version)
        self.weight_load_duration.observe(seconds)
        self.weight_load_last_seconds.set(seconds)

    def leaves_scored(self, rewards: Iterable[float]) -> None:
        rewards = list(rewards)
        for x in rewards:
            self.leaf_reward.observe(x)
        if rewards:
            self.leaf_reward_mean.set(sum(rewards) / len(rewards))


# --------------------------------------------------------------------------------------------
# Names (for deploy checks)
# --------------------------------------------------------------------------------------------
PROCESSES = ("learner", "actor")


def build_process_metrics(process: str, registry: CollectorRegistry, actor_id: str = "actor-0") -> list[object]:
    """The metrics objects a `process` ('learner' or 'actor') creates, built in `registry`."""
    if process == "learner":
        return [LearnerMetrics(registry), WeightSyncMetrics(registry)]
    if process == "actor":
        return [ActorMetrics(registry, actor_id)]
    raise ValueError(f"unknown process {process!r}: use one of {PROCESSES}")


_SUFFIXES = {
    "counter": ("_total",),
    "histogram": ("_bucket", "_sum", "_count"),
    "gauge": ("",),
    "summary": ("_sum", "_count", ""),
}


def metric_types(process: str) -> dict[str, str]:
    """{family name as exposed (counters with _total): type} of the treerpo_ metrics of `process`."""
    registry = new_registry(process_metrics=False)
    build_process_metrics(process, registry)
    out = {}
    for family in registry.collect():
        name = family.name + ("_total" if family.type == "counter" else "")
        out[name] = family.type
    return out


def exported_names(process: str | None = None) -> set[str]:
    """Every sample name `process` (None = all) exposes: counters' _total, histograms' _bucket/_sum/_count."""
    names: set[str] = set()
    for proc in PROCESSES if process is None else (process,):
        registry = new_registry(process_metrics=False)
        build_process_metrics(proc, registry)
        for family in registry.collect():
            names.update(family.name + suffix for suffix in _SUFFIXES[family.type])
    return names


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
                 ready_fn: Callable[[], bool] | None = None, include_default_registry: bool = False):
        self.host, self.requested_port, self.registry = host, port, registry
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

    def start(self) -> "MetricsServer":
        if self._httpd is not None:
            raise RuntimeError("MetricsServer already started")
        server = self
        server_cls = ThreadingHTTPServer
        if ":" in self.host:
            import socket

            server_cls = type("ThreadingHTTPServer6", (ThreadingHTTPServer,), {"address_family": socket.AF_INET6})

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's API
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    body = b"".join(generate_latest(r) for r in server.registries)
                    self._reply(200, body, CONTENT_TYPE_LATEST)
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
            raise OSError(
                e.errno, f"metrics server cannot bind {self.host}:{self.requested_port} ({e.strerror}); "
                "set metrics.learner_port/actor_port to a free port or 0"
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

    def __enter__(self) -> "MetricsServer":
        return self.start() if self._httpd is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()
