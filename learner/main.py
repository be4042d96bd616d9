"""`treerpo learner`: ingest trees, train, publish weights, checkpoint (design §4–§8).

Rank 0 binds the data (PULL) and control (ROUTER) endpoints, hosts the weight-sync rendezvous,
serves metrics and writes RUN_DIR/endpoints.json once all of them listen. Ranks > 0 (under
torchrun/deepspeed) only follow rank 0's training commands.

Guarantees:
* every tree that arrives is trained at most once, or counted as dropped with its reason;
* an actor's trees count only after it confirmed the current weights (a sync runs for new
  actors between steps); a failed sync drops the actors that failed it, never blocks past the
  `weights.timeout_s` deadline, and training goes on;
* `learner.mode: sync` trains one round of `replay.batch_trees` trees per version, every one made
  by the weights just synced (the buffer's rounds bound the credits); `async` (default) lets
  actors run ahead by their credits, bounded by `replay.max_staleness`;
* SIGTERM/SIGINT finish the current step, write a checkpoint and exit 0; reaching
  `learner.max_steps` or the token budget `learner.max_generated_tokens` does the same and tells
  the actors to shut down;
* a periodic checkpoint that fails (a full disk) is counted in
  `treerpo_learner_checkpoint_failures_total{reason}` and logged, and training goes on (the
  previous checkpoint stays the restart point); the final one failing (on stop or at `learner.max_steps`) ends
  the learner with CheckpointError (exit 9), since the run's end state is not on disk (design §7.1);
* a fixed port that is taken is reported before the model loads (PortInUse, exit 8);
* each optimizer step appends one record to RUN_DIR/metrics.jsonl and updates /metrics from the
  same record; its keys are rows of common.metrics.METRICS (one name per quantity in both).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import threading
import time
from pathlib import Path

from common.config import JobConfig, dump_config, load_config
from common.device import gpu_uuid
from common.errors import CheckpointError, PortInUse
from common.metrics import LearnerMetrics, MetricsServer, WeightSyncMetrics, new_registry
from common.rundir import ENDPOINTS, read_json, require_model_path, setup_logging, write_json_atomic
from common.transport import LearnerEndpoints, check_ports_free
from learner.buffer import ReplayBuffer
from learner.checkpoint import (
    LearnerState,
    checkpoint_due,
    find_latest,
    load_checkpoint,
    recover_checkpoints,
    save_checkpoint,
)
from learner.control import ControlPlane, ControlState
from learner.evals import EvalRequests, eval_point, mark_finished
from learner.ingest import Ingest
from learner.tracking import Trackers, numeric, sync_point
from learner.trainer import Trainer
from weightsync.errors import WeightSyncError
from weightsync.group import bound_nccl_setup
from weightsync.publisher import WeightPublisher

log = logging.getLogger("treerpo.learner")
STALLED_AFTER_HEARTBEATS = 5  # no tree and no credit anywhere for this many heartbeats: a stall


def advertised_host(bind_host: str) -> str:
    """The address actors should dial for a service bound on bind_host."""
    if bind_host in ("0.0.0.0", "*", "::"):
        return os.environ.get("TREERPO_ADVERTISE_HOST") or socket.getfqdn()
    return bind_host


def learner_ports(cfg: JobConfig) -> list[tuple[str, int, str]]:
    """(host, port, config key) of every fixed port rank 0 binds (port 0 = ephemeral, never taken)."""
    tc = cfg.transport
    ports = [(tc.bind_host, tc.data_port, "transport.data_port"),
             (tc.bind_host, tc.control_port, "transport.control_port"),
             (tc.bind_host, cfg.weights.rendezvous_port, "weights.rendezvous_port")]
    if cfg.metrics.enabled:
        ports.append((cfg.metrics.host, cfg.metrics.learner_port, "metrics.learner_port"))
    return [p for p in ports if p[1]]


def previous_incarnation(run_dir: Path) -> int | None:
    """The incarnation a previous learner of this run dir announced in its endpoints.json, if any."""
    try:
        value = read_json(run_dir / ENDPOINTS).get("incarnation")
    except (OSError, ValueError):
        return None
    return value if isinstance(value, int) and value >= 0 else None


class Learner:
    def __init__(self, cfg: JobConfig, run_dir: Path, resume: str) -> None:
        self.cfg, self.run_dir = cfg, run_dir
        self._trees_log_lock = threading.Lock()  # learner.log_trees: trees.jsonl is written from two threads
        self.stop_requested = threading.Event()
        model_path = require_model_path(cfg)
        if int(os.environ.get("RANK", "0")) == 0:
            check_ports_free(learner_ports(cfg))  # before the (slow) model load
        self.trainer = Trainer(cfg, model_path)
        self.rank = self.trainer.rank
        if self.rank != 0:
            return
        for done in recover_checkpoints(run_dir):  # what a killed save left behind
            log.info("checkpoints: %s", done)
        state = LearnerState()
        latest = find_latest(run_dir) if resume == "auto" else None
        if latest is not None:
            state = load_checkpoint(self.trainer, latest)
            state.incarnation += 1
            log.info("resumed %s: step %d, version %d, incarnation %d", latest.name, state.step, state.version,
                     state.incarnation)
        previous = previous_incarnation(run_dir)
        if previous is not None and state.incarnation <= previous:
            # a learner of this run dir died before (or without) a checkpoint: the actors still hold
            # its incarnation, so this one must differ or they would keep sending against lost weights
            state.incarnation = previous + 1
            log.info("a previous learner (incarnation %d) ran here: this is incarnation %d", previous,
                     state.incarnation)
        self.state = state
        self.registry = new_registry()
        self.metrics = LearnerMetrics(self.registry)
        self.sync_metrics = WeightSyncMetrics(self.registry)
        self.metrics.incarnation.set(state.incarnation)
        self.metrics.version.set(state.version)
        self.metrics.max_staleness.set(cfg.replay.max_staleness)
        self.trackers = Trackers(cfg, run_dir, on_error=self.metrics.tracker_failed)  # tracking.backends
        self.evals = EvalRequests(run_dir, cfg.learner.eval_every, self.trainer.export_hf)  # learner.eval_every
        self.buffer = ReplayBuffer(
            cfg.replay, state.incarnation, resume_version=state.version if latest is not None else None,
            seed=cfg.learner.seed, on_drop=self._on_drop,
            rounds=cfg.learner.mode == "sync",
        )
        if state.buffer:
            self.buffer.load_state_dict(state.buffer)
        self.endpoints = LearnerEndpoints(cfg.transport)
        host = advertised_host(cfg.transport.bind_host)
        try:
            self.publisher = WeightPublisher(cfg.weights, cfg.transport.bind_host, advertise=host,
                                             gpu=gpu_uuid(self.trainer.device))
        except WeightSyncError as e:
            if "EADDRINUSE" in str(e) or "address already in use" in str(e).lower():
                raise PortInUse.at(cfg.transport.bind_host, cfg.weights.rendezvous_port,
                                   "weights.rendezvous_port") from e
            raise
        self.control = ControlPlane(
            self.endpoints, self.buffer,
            ControlState(state.incarnation, state.version, host, self.publisher.port),
            peer_timeout_s=cfg.transport.peer_timeout_s, metrics=self.metrics,
            stalled_after_s=STALLED_AFTER_HEARTBEATS * cfg.transport.heartbeat_interval_s,
        )
        self.server = None
        if cfg.metrics.enabled:
            self.server = MetricsServer(cfg.metrics.host, cfg.metrics.learner_port, self.registry,
                                        port_key="metrics.learner_port").start()
        self.ingest = Ingest(self.endpoints, self.buffer, self.control, self.metrics,
                             vocab_size=self.trainer.vocab_size, longest_allowed=cfg.learner.micro_batch_tokens,
                             version=lambda: self.state.version,
                             on_tree=self._log_tree if cfg.learner.log_trees else None)
        self._ingest = threading.Thread(target=self.ingest.run, args=(self.stop_requested,), name="ingest",
                                        daemon=True)

    # -- threads ---------------------------------------------------------------------------
    def _log_tree(self, tree, verdict: str) -> None:
        """learner.log_trees: a received tree, with what it costs and how stale it came (event 'received')."""
        version = self.state.version
        paths = tree.path_lengths()
        self._log_tree_events({
            "event": "received", "tree_id": tree.tree_id, "actor_id": tree.actor_id, "verdict": verdict,
            "min_version": tree.min_version(), "max_version": max(n.version for n in tree.nodes),
            "incarnation": tree.meta.get("incarnation"), "learner_version": version,
            "staleness": version - tree.min_version(), "tokens": tree.num_tokens(), "leaves": int(len(paths)),
            "mean_path_tokens": float(paths.mean()), "sample_seconds": tree.meta.get("sample_seconds")})

    def _on_drop(self, event) -> None:
        self.metrics.dropped(event.reason, event.count)
        if self.cfg.learner.log_trees and event.tree_id is not None:  # each tree's later fate, too
            self._log_tree_events({"event": "dropped", "tree_id": event.tree_id, "reason": event.reason,
                                   "learner_version": self.state.version})

    def _log_tree_events(self, *records: dict) -> None:
        now = time.time()
        with self._trees_log_lock, open(self.run_dir / "trees.jsonl", "a") as f:  # ingest and train threads
            f.write("".join(json.dumps({**record, "time": now}) + "\n" for record in records))

    # -- weight sync -----------------------------------------------------------------------
    def sync(self, members: list[str]) -> None:
        """Publish the current weights to `members`; confirm those that ack, drop those that fail."""
        if not members:
            return
        version = self.state.version
        plan = self.publisher.plan(self.trainer.parameter_specs(), version)
        prepared = self.publisher.prepare(plan, members, self.control.all_have_cuda(members),
                                          self.control.gpu_uuids(members), epoch=self.control.membership(members))
        for actor_id, announce in zip(prepared.members, prepared.announcements, strict=True):
            self.control.send(actor_id, announce)
        outcome = self.publisher.publish(prepared, self.trainer.named_parameters_for_sync(), self.control.acks)
        result, ok = outcome.result, outcome.confirmed
        for actor_id in ok:
            self.control.confirm(actor_id, version)
        if ok:
            self.control.grant_soon()  # a newly confirmed member's first credits (design §5.6)
        for _ in outcome.kept:  # alive: it stays pending and gets the next sync
            self.sync_metrics.failed("error")
        for actor_id, reason in outcome.dropped.items():
            self.sync_metrics.failed(reason)
            self.control.drop(actor_id, f"weight sync {prepared.sync_id} failed ({reason})")
        record = {"sync_id": prepared.sync_id, "version": version, "time": time.time(), "members": members,
                  "confirmed": ok, "checksum": result.checksum, "seconds": result.seconds, "bytes": result.bytes,
                  "reason": result.reason, "acks": outcome.acks}
        with open(self.run_dir / "syncs.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        self.trackers.log(sync_point(record), self.state.step)
        if ok:
            self.sync_metrics.succeeded(version=version, seconds=result.seconds, nbytes=result.bytes, actors=len(ok))
        log.info("sync %d of version %d: %d/%d actors confirmed in %.2f s", prepared.sync_id, version, len(ok),
                 len(members), result.seconds)

    # -- main loop -------------------------------------------------------------------------
    def run(self) -> int:
        if self.rank != 0:
            self.trainer.follow()
            return 0

        cfg, lc = self.cfg, self.cfg.learner
        self.control.start()
        self._ingest.start()
        self.write_endpoints()
        if self.server is not None:
            self.server.set_ready(True)
        finished, done = False, ""
        self.evaluate_if_due()  # step 0: the curve's start
        while not self.stop_requested.is_set():
            self.read_evals()
            done = self.finished()
            if done:
                finished = True
                break
            self.sync(self.control.pending())
            t_wait = time.monotonic()
            if len(self.control.member_ids()) - len(self.control.pending()) < lc.min_actors:
                time.sleep(0.2)  # e.g. the demo: every actor takes part from the first step
                self.metrics.idle_seconds.inc(time.monotonic() - t_wait)
                continue
            if lc.mode == "sync":
                # the classic on-policy loop: one batch of trees per version, all made by the
                # weights every confirmed actor now holds; actors idle while the learner trains
                if self.buffer.top_up_round(self.control.confirmed(), cfg.replay.batch_trees):
                    self.control.grant_soon()
                min_trees = cfg.replay.batch_trees
            else:
                # the live actors can hold at most members x credits trees: never wait for more
                reachable = len(self.control.member_ids()) * cfg.replay.credits_per_actor
                min_trees = max(1, min(cfg.replay.batch_trees, reachable))
            trees = self.buffer.take(self.state.version, min_trees=min_trees, timeout_s=0.5)
            self.metrics.buffer_trees.set(len(self.buffer))
            self.metrics.buffer_oldest_age_seconds.set(self.buffer.oldest_age_s())
            self.metrics.trees_in_flight.set(sum(self.buffer.in_flight(a) for a in self.control.member_ids()))
            if not trees:
                self.metrics.idle_seconds.inc(time.monotonic() - t_wait)
                continue
            if cfg.learner.log_trees:  # one append for the batch
                self._log_tree_events(*({"event": "trained", "tree_id": tree.tree_id,
                                         "learner_version": self.state.version,
                                         "staleness": self.state.version - tree.min_version()} for tree in trees))
            optimizer_steps = self.train_one(trees)
            # the version counts optimizer steps, published or not, so staleness is in steps even
            # when weights go out only every sync_every steps (design §4.3)
            self.state.version += optimizer_steps
            self.control.set_version(self.state.version)
            self.metrics.version.set(self.state.version)
            if self.state.step % cfg.weights.sync_every == 0:
                self.sync(self.control.member_ids())
            if checkpoint_due(self.state.step, lc.checkpoint_every):
                self.checkpoint()
            self.evaluate_if_due()
        self.checkpoint(final=True)
        if finished:
            self.final_eval()
            self.control.broadcast_shutdown(f"learner reached {done}")
            self.control.flush()
        return 0

    # -- evaluation during training (learner/evals.py) -------------------------------------------
    def evaluate_if_due(self) -> bool:
        """Export the weights for the evaluator at step 0 and every learner.eval_every steps; skipped, and
        counted, while the previous export still waits for it."""
        step = self.state.step
        if not self.evals.due(step):
            return False
        if step in self.evals.evaluated_steps():  # a resumed learner at an evaluated step
            self.evals.requested.add(step)
            return False
        if not self.evals.request(step, self.state.version, self.state.generated_tokens):
            self.metrics.evals_skipped.inc()
            return False
        return True

    def read_evals(self) -> None:
        self.on_evals(self.evals.poll())

    def on_evals(self, records: list[dict]) -> None:
        for record in records:
            self.metrics.evals.inc()
            self.trackers.log(eval_point(record), int(record["step"]))
        if records:
            latest = records[-1]
            self.metrics.eval_pass_at_1.set(latest["pass_at_1"])
            self.metrics.eval_pass_at_k.set(latest["pass_at_k"])
            self.metrics.eval_mean_response_tokens.set(latest["mean_response_tokens"])
            self.metrics.eval_step.set(latest["step"])

    def final_eval(self) -> None:
        """The end of the run: the final weights' evaluation, waited for (learner.eval_final_wait_s)."""
        wait = self.cfg.learner.eval_final_wait_s
        if not self.evals.enabled:
            return
        step = self.state.step
        if wait > 0 and not self.evals.finish(step, self.state.version, self.state.generated_tokens, wait,
                                              self.on_evals):
            log.warning("the evaluation of the final weights (step %d) did not arrive within %.0f s, or no evaluator "
                        "runs: the trackers do not have it", step, wait)
        mark_finished(self.run_dir, step)

    def finished(self) -> str:
        """The limit the run has reached ('' while it goes on)."""
        lc = self.cfg.learner
        if lc.max_steps and self.state.step >= lc.max_steps:
            return "learner.max_steps"
        if lc.max_generated_tokens and self.state.generated_tokens >= lc.max_generated_tokens:
            return "learner.max_generated_tokens"
        return ""

    def train_one(self, trees) -> int:
        """One batch (learner.minibatches optimizer steps); its record (keys: common.metrics.STEP_RECORD)
        goes to metrics.jsonl and Prometheus. Returns the optimizer steps taken."""
        version = self.state.version
        m = self.trainer.train_step(trees, version)
        self.state.step += 1
        generated = sum(t.num_tokens() for t in trees)
        self.state.generated_tokens += generated
        staleness = [version - t.min_version() for t in trees]
        leaves = [r for t in trees for r in t.leaf_rewards()]
        record = {"step": self.state.step, "version": version, "time": time.time(),
                  "accuracy": sum(1 for r in leaves if r >= 1.0) / max(1, len(leaves)),  # leaves judged correct
                  "staleness_mean": sum(staleness) / len(trees), "buffer_trees": len(self.buffer),
                  "generated_tokens": float(generated),
                  "tree_ids": [t.tree_id for t in trees], **{k: float(v) for k, v in m.items()}}
        self.metrics.record_step(record, staleness=staleness)  # refuses a key the table lacks
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        self.trackers.log(numeric(record), self.state.step)
        log.info("step %d v%d trees %d reward %.3f loss %.4f grad %.3f", self.state.step, version, len(trees),
                 m.get("leaf_reward_mean", 0.0), m.get("loss", 0.0), m.get("grad_norm", 0.0))
        return int(m.get("optimizer_steps", 1))

    def checkpoint(self, *, final: bool = False) -> None:
        """Save one; a failure is counted and logged and training goes on, unless it is the final
        checkpoint or one after which the ranks may be out of step (CheckpointError, exit 9)."""
        self.state.buffer = self.buffer.state_dict()
        try:
            path = save_checkpoint(self.trainer, self.run_dir, self.state)
        except CheckpointError as e:
            self.metrics.checkpoint_failed(e.reason)
            if final:
                raise CheckpointError(f"final checkpoint at step {self.state.step} failed, the run's end state is "
                                      f"not on disk: {e}", e.reason, recoverable=False) from e
            if not e.recoverable:
                raise
            log.error("%s; training goes on", e)
            return
        self.metrics.checkpoint_written()
        log.info("checkpoint %s", path)

    def write_endpoints(self) -> None:
        host = advertised_host(self.cfg.transport.bind_host)
        info = {
            "data": self.endpoints.data_endpoint.replace("0.0.0.0", host),
            "control": self.endpoints.control_endpoint.replace("0.0.0.0", host),
            "rendezvous": f"{host}:{self.publisher.port}",
            "metrics": self.server.url if self.server is not None else None,
            "incarnation": self.state.incarnation,
            "pid": os.getpid(),
        }
        write_json_atomic(self.run_dir / ENDPOINTS, info)

    def close(self) -> None:
        if self.rank != 0:
            return
        self.stop_requested.set()
        self.trainer.stop_followers()
        self.buffer.drain_for_shutdown()
        self.control.stop()
        if self._ingest.is_alive():  # not started when run() was never reached
            self._ingest.join(2.0)
        self.endpoints.close()
        self.trackers.close()
        if self.server is not None:
            self.server.stop()


def run(args) -> int:
    setup_logging("learner")
    cfg = load_config(args.config, args.overrides)
    if args.run_dir:
        cfg.run_dir = args.run_dir
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, run_dir / "config.learner.yaml")
    bound_nccl_setup(cfg.weights.timeout_s)  # before any NCCL use (DeepSpeed's included)
    learner = Learner(cfg, run_dir, args.resume or cfg.learner.resume)
    signal.signal(signal.SIGTERM, lambda *_: learner.stop_requested.set())
    signal.signal(signal.SIGINT, lambda *_: learner.stop_requested.set())
    try:
        return learner.run()
    finally:
        learner.close()
