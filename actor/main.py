"""`treerpo actor`: register, receive weights, sample trees, stream them to the learner.

Three threads. The *control* thread owns the DEALER socket: it registers (and re-registers when
the learner restarts or goes silent), heartbeats and takes credits. The *weights* thread receives
the syncs it announces, each handed whole to the engine (`Engine.receive_weights`, actor/engine.py):
the HF engine stages them and installs between forwards, the vLLM engine in flight (generation
paused for the install only, not drained; actor/vllm_engine.py). The *main* thread loops
prompts -> trees -> PUSH, never holding more trees in flight than its credits allow.

Guarantees:
* no tree is generated before the learner's current weights are loaded (after every
  registration the actor waits for a sync);
* every generated tree is either handed to ZeroMQ for a live learner or counted in
  `treerpo_actor_trees_lost_total{reason}` (send_timeout, incarnation, shutdown);
* the actor stays up while the learner is away: it keeps re-registering with backoff, and says
  where it is looking once every `transport.peer_timeout_s` while no learner answers (a learner
  that cannot be reached is not an error: actors may start first, and wait); with ephemeral
  ports (0) it first waits for the learner's endpoints.json the same way;
* SIGTERM/SIGINT: finish the current engine call, say Shutdown, exit 0; a Shutdown from the
  learner (training finished) also exits 0.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import socket
import threading
import time
from pathlib import Path

from actor.credits import Credits, TreeSender
from actor.engines import make_engine
from actor.sampler import TreeSampler
from common.config import ConfigError, JobConfig, load_config
from common.data import PromptSource
from common.device import gpu_uuid
from common.metrics import ActorMetrics, MetricsServer, new_registry
from common.rewards import make_reward
from common.rundir import ENDPOINTS, actor_info_path, read_json, require_model_path, setup_logging, write_json_atomic
from common.transport import ActorEndpoints, check_ports_free
from common.wire import (
    Credit,
    Heartbeat,
    Register,
    Rejoin,
    Shutdown,
    WeightAck,
    WeightAnnounce,
    Welcome,
    WireError,
)
from weightsync.errors import WeightSyncError
from weightsync.group import bound_nccl_setup

log = logging.getLogger("treerpo.actor")


class Actor:
    def __init__(self, cfg: JobConfig, run_dir: Path, actor_id: str, index: int, num_actors: int,
                 endpoints: dict[str, str]) -> None:
        self.cfg, self.run_dir, self.actor_id = cfg, run_dir, actor_id
        self.stop = threading.Event()
        # the reward first: a custom function or dataset that cannot load fails before the model loads
        self.reward = make_reward(cfg.data.reward, cfg.data.reward_timeout_s, cfg.data)
        self.engine = make_engine(cfg, seed=cfg.actor.seed + 1_000_003 * index)
        self.prompts = PromptSource(cfg.data, self.engine.tokenizer, index, num_actors)
        self.sampler = TreeSampler(self.engine, cfg.tree, self.reward, actor_id,
                                   seed=cfg.actor.seed + 7919 * index)
        self.registry = new_registry()
        self.metrics = ActorMetrics(self.registry, actor_id, cfg.actor.engine)
        self.server = None
        if cfg.metrics.enabled:
            # vLLM registers its own `vllm:` metrics in prometheus_client's global registry
            self.server = MetricsServer(cfg.metrics.host, cfg.metrics.actor_port, self.registry,
                                        include_default_registry=cfg.actor.engine == "vllm",
                                        port_key="metrics.actor_port").start()
            self.info_path = actor_info_path(run_dir, actor_id)
            write_json_atomic(self.info_path, {"metrics": self.server.url, "pid": os.getpid()})
        self.net = ActorEndpoints(cfg.transport, actor_id, data_endpoint=endpoints.get("data"),
                                  control_endpoint=endpoints.get("control"))
        self.credits = Credits()  # registration: learner incarnation, credits, trees sent under it
        self.sender = TreeSender(self.net, self.credits, self.metrics, self.stop)
        self.weights_ready = threading.Event()  # current learner's weights loaded
        self.last_contact = 0.0
        self.learner_finished = False
        self._outbox: queue.Queue = queue.Queue()  # messages other threads send via the control thread
        self._announces: queue.Queue = queue.Queue()
        self._control = threading.Thread(target=self._control_loop, name="control", daemon=True)
        self._weights = threading.Thread(target=self._weights_loop, name="weights", daemon=True)

    # -- control thread --------------------------------------------------------------------
    def _control_loop(self) -> None:
        tc = self.cfg.transport
        next_register = 0.0
        next_heartbeat = 0.0
        backoff = 0.5
        waiting_since = time.monotonic()  # no registration since (the learner did not answer)
        next_wait_log = waiting_since + tc.peer_timeout_s
        log.info("registering with the learner at %s", self.net.control_endpoint)
        while not self.stop.is_set():
            now = time.monotonic()
            registered = self.incarnation >= 0 and now - self.last_contact < tc.peer_timeout_s
            if registered:
                waiting_since, next_wait_log = now, now + tc.peer_timeout_s
            elif now >= next_wait_log:
                log.warning("no answer from the learner at %s for %.0f s: is it running, and are "
                            "transport.learner_host and the ports (or its endpoints.json) right? Still trying",
                            self.net.control_endpoint, now - waiting_since)
                next_wait_log = now + tc.peer_timeout_s
            if not registered and now >= next_register:
                if self.incarnation >= 0:
                    # no socket reconnect: ZeroMQ redials by itself, and the main thread may be
                    # inside send_tree on the data socket (sockets are single-threaded)
                    log.warning("learner silent for %.0f s: registering again", now - self.last_contact)
                    self._learner_lost()
                self.net.send_control(Register(
                    actor_id=self.actor_id, incarnation_seen=self.incarnation, version=self.engine.version,
                    pid=os.getpid(), hostname=socket.gethostname(), engine=self.cfg.actor.engine,
                    vocab_size=self.engine.vocab_size, has_cuda=self.engine.device.type == "cuda",
                    gpu_uuid=gpu_uuid(self.engine.device),  # "" without CUDA: learner and actors on one GPU use gloo
                ), timeout_s=0.5)
                next_register = now + backoff
                backoff = min(backoff * 2, 10.0)
            elif registered and now >= next_heartbeat:
                self.net.send_control(Heartbeat(actor_id=self.actor_id, incarnation_seen=self.incarnation,
                                                version=self.engine.version, **self.credits.heartbeat_fields()),
                                      timeout_s=0.5)
                next_heartbeat = now + tc.heartbeat_interval_s
            while not self._outbox.empty():
                self.net.send_control(self._outbox.get_nowait(), timeout_s=1.0)
            try:
                msg = self.net.recv_control(0.05)
            except WireError as e:
                log.warning("bad control message from the learner: %s", e)
                continue
            if msg is not None:
                self.last_contact = time.monotonic()
                if self._handle(msg):
                    backoff = 0.5
                    next_heartbeat = 0.0

    def _handle(self, msg) -> bool:
        """Returns True when the message (re)established a registration."""
        if isinstance(msg, Welcome):
            if msg.incarnation != self.incarnation and self.incarnation >= 0:
                self._learner_lost()
            self.credits.welcome(msg)
            self.weights_ready.clear()
            self.engine.reset_weight_transfer()  # a (re)registration may mean a new learner with a new store
            self.metrics.connected.set(1)
            self.metrics.credits.set(0)
            log.info("registered with learner incarnation %d (version %d, registration %d); credits follow "
                     "the weights", msg.incarnation, msg.version, msg.registration)
            return True
        if isinstance(msg, Credit):
            if not self.credits.credit(msg):
                log.warning("learner incarnation %d != %d: re-registering", msg.incarnation, self.incarnation)
                self.last_contact = 0.0  # forces a Register on the next pass
                return False
            self.metrics.credits.set(self.credits.available)
        elif isinstance(msg, Rejoin):
            log.warning("learner says rejoin (%s): registering again", msg.reason)
            self._learner_lost(count_lost=msg.incarnation != self.incarnation)
            self.last_contact = 0.0  # forces a Register on the next pass
        elif isinstance(msg, WeightAnnounce):
            self._announces.put(msg)
        elif isinstance(msg, Shutdown):
            log.info("learner says shutdown: %s", msg.reason)
            self.learner_finished = True
            self.stop.set()
        return False

    def _weights_loop(self) -> None:
        while not self.stop.is_set():
            try:
                announce = self._announces.get(timeout=0.2)
            except queue.Empty:
                continue
            self._outbox.put(self._receive_weights(announce))

    def _receive_weights(self, announce):
        """The engine takes part in the sync (no lock held here: generation goes on while it
        receives); the ack says what it installed, or why not."""
        try:
            installed = self.engine.receive_weights(announce)
            if installed.pause_s is not None:
                self.metrics.weight_pause_seconds.observe(installed.pause_s)
                log.info("weights v%d landed in flight: generation paused %.1f ms, %d requests kept running",
                         announce.version, 1e3 * installed.pause_s, installed.kept)
        except WeightSyncError as e:
            log.warning("weight sync %d failed: %s", announce.sync_id, e)
            return WeightAck(actor_id=self.actor_id, sync_id=announce.sync_id, version=announce.version, ok=False,
                             checksum="", load_seconds=0.0, error=str(e)[:4000])
        self.metrics.weights_loaded(announce.version, installed.seconds)
        self.weights_ready.set()
        log.info("loaded weights v%d in %.2f s", announce.version, installed.seconds)
        return WeightAck(actor_id=self.actor_id, sync_id=announce.sync_id, version=announce.version, ok=True,
                         checksum=installed.checksum, load_seconds=installed.seconds, error="")

    @property
    def incarnation(self) -> int:
        """Learner incarnation of the current registration (-1: none)."""
        return self.credits.incarnation

    def _learner_lost(self, count_lost: bool = True) -> None:
        """Forget the registration. With count_lost, the learner itself is gone: trees sent to it
        that it had not reported settled died with it (in its buffer or in transit)."""
        unsettled = self.credits.lose()
        if count_lost and unsettled:
            self.metrics.trees_lost("learner_lost", unsettled)
            log.warning("learner lost: %d trees sent to it were not reported trained or dropped", unsettled)
        self.weights_ready.clear()
        self.metrics.connected.set(0)
        self.metrics.credits.set(0)

    # -- main thread -----------------------------------------------------------------------
    def run(self) -> int:
        self._control.start()
        self._weights.start()
        if self.server is not None:
            self.server.set_ready(True)
        taken: dict[int, int] = {}  # id(prompt) -> learner incarnation when its tree was started

        def source(k: int):
            """Prompts for up to k new trees; credits are spent on send, so count the trees in flight."""
            if self.stop.is_set():
                return None  # the stream finishes the trees in flight, then ends
            incarnation, available = self.credits.budget()
            n = min(k, available - len(taken))
            if n <= 0 or not self.weights_ready.is_set():
                return []
            prompts = self.prompts.next_batch(n)
            for p in prompts:
                taken[id(p)] = incarnation
            return prompts

        while not self.stop.is_set():
            if not self.weights_ready.wait(0.2):
                continue
            got_any = False
            for prompt, tree in self.sampler.stream(source, max_trees_in_flight=self.cfg.actor.prompts_per_batch):
                got_any = True
                incarnation = taken.pop(id(prompt))
                self.metrics.generation_seconds.observe(tree.meta["sample_seconds"])
                self._count(tree)
                tree.meta["incarnation"] = incarnation
                self.sender.send(tree, incarnation)
            if not got_any:
                time.sleep(0.05)
        self.reward.close()
        return 0

    def _count(self, tree) -> None:
        self.metrics.segments.inc(len(tree.nodes))
        self.metrics.tokens_generated.inc(tree.num_tokens())
        self.metrics.leaves_scored(tree.leaf_rewards().tolist())
        reasons = tree.meta.get("reward_reasons", {})
        self.metrics.reward_results(r for r, n in reasons.items() for _ in range(int(n)))

    def close(self) -> None:
        self.stop.set()
        self._control.join(2.0)
        self._weights.join(2.0)
        if not self.learner_finished:
            try:
                self.net.send_control(Shutdown(reason="actor stopping"), timeout_s=0.5)
            except Exception:  # noqa: BLE001 - best effort on the way out
                pass
        self.net.close()
        self.engine.close()  # vLLM: its engine-core and worker processes
        if self.server is not None:
            # the last word: what /metrics would answer now, for whoever reads the run after this
            # process is gone (a short run can end between two scrapes of `treerpo demo`)
            try:
                write_json_atomic(self.info_path, {"metrics": self.server.url, "pid": os.getpid(),
                                                   "final_metrics": self.server.exposition().decode()})
            except Exception as e:  # noqa: BLE001 - the run's results are elsewhere; say it and go on
                log.warning("could not leave the final metrics in %s: %s", self.info_path, e)
            self.server.stop()


def resolve_endpoints(args, cfg: JobConfig, run_dir: Path, stop: threading.Event) -> dict[str, str] | None:
    """The learner's endpoints from --endpoints or RUN_DIR/endpoints.json; {} = the config's
    learner_host + ports. A file named by --endpoints, or needed because the config's ports are
    ephemeral (0), is waited for (the learner writes it once it listens), with one log line every
    transport.peer_timeout_s; None if `stop` is set meanwhile."""
    tc = cfg.transport
    path = Path(args.endpoints) if args.endpoints else run_dir / ENDPOINTS
    if not path.exists() and not args.endpoints and tc.data_port and tc.control_port:
        return {}
    started = time.monotonic()
    next_log = started
    while not path.exists():
        if time.monotonic() >= next_log:
            how = ("--endpoints names it" if args.endpoints else "transport.data_port/control_port are 0 "
                   "(ephemeral), so only the learner's endpoints.json knows them")
            log.warning("waiting for the learner: %s does not exist yet (%s; the learner writes it once it listens: "
                        "start `treerpo learner --run-dir %s`, or set fixed ports); waited %.0f s", path, how,
                        path.parent, time.monotonic() - started)
            next_log = time.monotonic() + tc.peer_timeout_s
        if stop.wait(0.2):
            return None
    try:
        info = read_json(path)
        return {"data": info["data"], "control": info["control"]}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{path} is not a learner's endpoints.json ({e!r}): give the file the learner wrote "
                          "(RUN_DIR/endpoints.json)") from None


def actor_index(actor_id: str, given: int | None) -> int:
    if given is not None:
        return given
    tail = actor_id.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else 0


def run(args) -> int:
    cfg = load_config(args.config, args.overrides)
    if args.run_dir:
        cfg.run_dir = args.run_dir
    run_dir = Path(cfg.run_dir)
    actor_id = args.actor_id or f"{socket.gethostname()}-{os.getpid()}"
    setup_logging(actor_id)
    require_model_path(cfg)
    if cfg.metrics.enabled:
        check_ports_free([(cfg.metrics.host, cfg.metrics.actor_port, "metrics.actor_port")])  # before the model loads
    num_actors = args.num_actors or cfg.actor.num_actors
    stop = threading.Event()  # a signal while waiting for the learner's endpoints
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    endpoints = resolve_endpoints(args, cfg, run_dir, stop)
    if endpoints is None:
        return 0
    bound_nccl_setup(cfg.weights.timeout_s)  # before the engine starts: a vLLM worker inherits it
    actor = Actor(cfg, run_dir, actor_id, actor_index(actor_id, args.actor_index) % num_actors, num_actors,
                  endpoints)
    signal.signal(signal.SIGTERM, lambda *_: actor.stop.set())
    signal.signal(signal.SIGINT, lambda *_: actor.stop.set())
    try:
        return actor.run()
    finally:
        actor.close()
