"""Load: N synthetic actors stream paper-size trees at full speed over CURVE into a live learner.

What runs
* the real learner: `python -m treerpo learner` (demo preset) on the tiny char-level Qwen2 of
  treerpo/tinymodel.py, CPU, OMP_NUM_THREADS=1, CURVE on with the actors' public keys as its
  allow-list, ephemeral ports on 127.0.0.1; a fresh learner (and run dir) per N;
* N synthetic actors (threads of this process; --procs: one process each) and one probe. They
  speak the real protocol through the project's own classes: `common.transport.ActorEndpoints`
  (CURVE PUSH + DEALER), `common.wire` messages (Register, Heartbeat every
  transport.heartbeat_interval_s, WeightAck, Shutdown) and `weightsync.receiver.WeightReceiver` (every
  weight sync, on its own thread as in actor/main.py, installed by swap as the HF engine does).
  An actor sends only while it holds credits and the learner's current weights, and stamps each
  tree with that version and the learner's incarnation. Instead of sampling it replays a pool of
  pre-sampled trees of the paper's size (512-token prompt, [2,2,2], 384-token segments: 14
  nodes, 5,888 tokens, ~45 KB on the wire; ids Zipf-distributed over the model's vocabulary,
  log-probs of sampled tokens, 0/1 leaf rewards), a fresh tree_id per send, encoded per send as
  a real actor does (the pool is validated once; a real actor also validates each tree).
* The probe is a member that never sends: once it holds its credits, every Credit it receives
  answers its own Heartbeat (one every 0.1 s, one outstanding), so its round trips are
  unambiguous. (A loaded actor's "first Credit after a Heartbeat" may be a sweep grant.)

Regime (default): replay.credits_per_actor (--credits 2048) far above replay.capacity
(--capacity 256), so credits never bind: actors push until ZeroMQ's high-water marks push back
(send_tree blocks; `blocked_fraction`), the buffer overflows, and what the tiny learner cannot
train leaves as `capacity` drops -- counted, so the accounting stays exact. This measures the
ingest ceiling. Note ZeroMQ's receive HWM is per connection: the learner may hold up to
N x transport.recv_hwm frames, so its memory bound grows with N here. With credits below
capacity / N (e.g. --credits 16 --capacity 1024) ingest is credit-bound at the training rate.
--no-train keeps the learner from training (it still syncs weights): its ingest path alone.

Figures per N, over the window [go + --warmup, go + --seconds]
  ingest_trees_per_s  trees decoded, validated and admitted by the learner (Δ of its
                      trees_received_total; = accepted into the buffer, as no admission drop
                      happened when the level sustains)
  trained_trees_per_s Δ trees_consumed_total / s
  fall                ingest rate of the window's second half / its first half; fall_per_cpu the
                      same per learner CPU-second, which a neighbour taking the cores leaves
                      alone (this machine is shared: its load average is reported per level)
  learner_cpu_us_per_tree  learner CPU (all its threads, training included) per ingested tree
  exact               after the actors stop and every tree they queued has arrived (the actors
                      then say Shutdown, the learner, member-less, finishes its step and idles):
                      trees the actors queued (their own ActorEndpoints.trees_sent) == trained +
                      dropped{reason} + held in the buffer, read from the learner's /metrics
  rss_*_mb            learner VmRSS (/proc/<pid>/status), MiB: at go, peak over the window, at its end
  hb_probe_*_ms       the probe's Heartbeat -> Credit round trip: p50 / p99 / max
  *_cores             CPU the learner / the actors used (/proc/<pid>/stat), in cores
A level *sustains* when: `exact`; nothing was dropped but `capacity`; no member was lost (no
Rejoin, one Welcome each, no weight sync failed on either side during the window, every member
registered throughout it); the probe's slowest round trip stayed under transport.peer_timeout_s;
fall_per_cpu >= 0.8; and the learner's peak RSS stayed within the bound the design implies:
rss_bound_mb = RSS at go + (replay.capacity + N x transport.recv_hwm) x frame bytes (buffered
trees, and the frames ZeroMQ may queue per actor connection, which fill up here because credits
do not bind) + TRAIN_SLACK_MB for the trainer's working set (~100 MB with 1 actor).

Baseline (same run; measured right before and right after each level, the median of both, as
the machine's load drifts): the codec alone, encode + validated decode of the same pool in one
process (as bench/wire.py) -> codec_trees_per_s. ratio = ingest / codec rate of the same level;
the top-level ratio is the ceiling's (the sustained level with the highest ingest); target 0.5.
The codec is the per-tree CPU work no transport can skip; ratio says how much of its rate
survives the rest of the path (ZeroMQ and CURVE on both sides, admission, the learner's GIL
shared with training, actors on the same cores).

    python bench/load.py [--actors 1,4,16,64] [--seconds 20] [--procs] [--no-train] [--json] [--tiny]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import queue
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from wire import level_parents  # noqa: E402 -- bench/ is on sys.path: this script runs from it

from actor.credits import Credits  # noqa: E402
from common.config import TransportConfig  # noqa: E402
from common.transport import ActorEndpoints, generate_keys  # noqa: E402
from common.tree import Node, ReasoningTree, new_tree_id  # noqa: E402
from common.wire import (  # noqa: E402
    Credit,
    Heartbeat,
    Register,
    Rejoin,
    Shutdown,
    WeightAck,
    WeightAnnounce,
    Welcome,
    decode_tree,
    encode_tree,
)
from treerpo.tinymodel import build_tiny_model  # noqa: E402
from weightsync.errors import WeightSyncError  # noqa: E402
from weightsync.receiver import WeightReceiver  # noqa: E402

TARGET = 0.5
PROBE_HEARTBEAT_S = 0.1
POOL = 8  # distinct pre-sampled trees per actor
TRAIN_SLACK_MB = 256.0  # the tiny trainer's working set (activations, optimizer, allocator) on top


# -- trees ------------------------------------------------------------------------------------
def paper_tree(seed: int, vocab: int, actor_id: str, prompt_len: int = 512, branching=(2, 2, 2),
               seg_len: int = 384) -> ReasoningTree:
    """One pre-sampled tree: ids Zipf-ranked over the vocabulary (text-like), log-probs of sampled
    tokens (mostly near 0, a tail of unlikely picks), 0/1 leaf rewards."""
    rng = np.random.default_rng(seed)
    by_rank = rng.permutation(np.arange(3, vocab, dtype=np.int32))  # ids 0-2 are pad/bos/eos

    def ids(n: int) -> np.ndarray:
        return by_rank[np.minimum(rng.zipf(1.3, n), len(by_rank)) - 1]

    parents = level_parents(branching)  # BFS order: every node of a level, then the next level
    inner = {p for p in parents if p >= 0}
    nodes = [Node(parent=p, token_ids=ids(seg_len), logprobs=-rng.gamma(0.5, 1.0, seg_len).astype(np.float32),
                  version=0, finish="segment" if i in inner else "stop",
                  reward=None if i in inner else float(rng.integers(0, 2)))
             for i, p in enumerate(parents)]
    return ReasoningTree(tree_id=new_tree_id(), prompt_id=f"load-{seed}", actor_id=actor_id,
                         prompt_token_ids=ids(prompt_len), nodes=nodes,
                         meta={"incarnation": 0, "task": "load"}).validate(vocab)


def codec_trees_per_s(trees: list[ReasoningTree], vocab: int, seconds: float, repeats: int = 3) -> list[float]:
    """The baseline: encode + validated decode of the pool, trees/s of each of `repeats` runs."""
    rates = []
    for _ in range(repeats):
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            for t in trees:
                decode_tree(encode_tree(t), vocab_size=vocab)
            n += len(trees)
        rates.append(n / (time.perf_counter() - t0))
    return rates


# -- a synthetic actor ----------------------------------------------------------------------------
class SyntheticActor:
    """One actor: control and data on one thread (it owns the sockets), weight syncs on a second."""

    def __init__(self, spec: dict, shared: dict) -> None:
        self.spec, self.shared = spec, shared
        self.cfg = TransportConfig(**spec["transport"])
        self.pool = [paper_tree(spec["seed"] * POOL + k, spec["vocab"], spec["actor_id"]) for k in range(POOL)]
        self.stamp = (-1, -1)  # (incarnation, version) the pool carries
        self.sends = 0
        self.receiver = WeightReceiver(checksum=True)
        self.held: list = []  # the installed weights (swap install: the received buffers themselves)
        self.credits = Credits()  # the actor's own registration and credit state (actor/credits.py)
        self.version, self.ready = -1, False
        self.stats = {"actor_id": spec["actor_id"], "registrations": 0, "welcomes": 0, "rejoins": 0, "syncs_ok": 0,
                      "syncs_failed": 0, "rtts": []}
        self._hb_at: float | None = None
        # as in actor/main.py, weights arrive on their own thread (its acks go out through this
        # loop, which owns the sockets): heartbeats and sends go on during a sync
        self._announces: queue.Queue[WeightAnnounce] = queue.Queue()
        self._acks: queue.Queue[WeightAck] = queue.Queue()
        self._done = threading.Event()

    def run(self) -> dict:
        net = ActorEndpoints(self.cfg, self.spec["actor_id"], data_endpoint=self.spec["data"],
                             control_endpoint=self.spec["control"])
        weights = threading.Thread(target=self._weights_loop, name=f"{self.spec['actor_id']}-weights", daemon=True)
        weights.start()
        try:
            self._loop(net)
            net.send_control(Shutdown(reason="load test done"), timeout_s=0.5)
        finally:
            self._done.set()
            weights.join(timeout=60)  # a receive in progress ends by its announced deadline
            self.stats.update(sent=net.trees_sent, send_timeouts=net.send_timeouts, blocked_s=net.blocked_seconds)
            net.close()
        return self.stats

    @property
    def incarnation(self) -> int:
        return self.credits.incarnation

    def _weights_loop(self) -> None:
        while not self._done.is_set():
            try:
                announce = self._announces.get(timeout=0.1)
            except queue.Empty:
                continue
            self._acks.put(self._receive(announce))
        self.receiver.reset()  # drops what it keeps between syncs (store client; a kept group)

    def _loop(self, net: ActorEndpoints) -> None:
        sh, spec = self.shared, self.spec
        hard_stop = time.monotonic() + spec["max_seconds"]
        next_register = next_heartbeat = 0.0
        while not sh["stop"].is_set() and time.monotonic() < hard_stop:
            now = time.monotonic()
            if self.incarnation < 0 and now >= next_register:
                net.send_control(Register(actor_id=spec["actor_id"], incarnation_seen=self.incarnation,
                                          version=self.version, pid=os.getpid(), hostname=socket.gethostname(),
                                          engine="hf", vocab_size=spec["vocab"], has_cuda=False), timeout_s=0.5)
                self.stats["registrations"] += 1
                next_register = now + 1.0
            elif self.incarnation >= 0 and now >= next_heartbeat:
                if net.send_control(Heartbeat(actor_id=spec["actor_id"], incarnation_seen=self.incarnation,
                                              version=self.version, **self.credits.heartbeat_fields()),
                                    timeout_s=0.5):
                    self._hb_at = self._hb_at or now  # one outstanding: the oldest unanswered counts
                next_heartbeat = now + spec["heartbeat_s"]
            sending = (spec["send"] and self.ready and self.credits.available > 0 and sh["go"].is_set()
                       and not sh["stop_sending"].is_set())
            while not self._acks.empty():
                net.send_control(self._acks.get_nowait(), timeout_s=1.0)
            msg = net.recv_control(0.0 if sending else 0.01)
            while msg is not None:
                if self._handle(msg) == "shutdown":
                    return
                if isinstance(msg, Welcome):
                    next_heartbeat = 0.0
                msg = net.recv_control(0.0)
            if sending and self.ready and self.credits.available > 0:
                _, registration, seq = self.credits.stamp()
                if net.send_tree(self._next_frame(registration, seq), timeout_s=0.1):
                    self.credits.charge(registration, seq)
                    sh["sent"].value = net.trees_sent

    def _handle(self, msg) -> str | None:
        if isinstance(msg, Welcome):
            self.credits.welcome(msg)
            self.ready = False
            self.stats["welcomes"] += 1
            self.receiver.reset()
        elif isinstance(msg, Credit):
            if self._hb_at is not None:
                self.stats["rtts"].append((self._hb_at, time.monotonic() - self._hb_at))  # (sent at, round trip)
                self._hb_at = None
            if not self.credits.credit(msg):
                self.credits.lose()
                self.ready = False
        elif isinstance(msg, WeightAnnounce):
            self._announces.put(msg)
        elif isinstance(msg, Rejoin):
            self.stats["rejoins"] += 1
            self.credits.lose()
            self.ready = False
        elif isinstance(msg, Shutdown):
            return "shutdown"
        return None

    def _receive(self, announce: WeightAnnounce) -> WeightAck:
        def swap(named) -> bool:
            self.held = named
            return True

        try:
            checksum, seconds = self.receiver.receive(announce, lambda named: swap(named),
                                                      read_back=lambda: self.held, swap_fn=swap)
        except WeightSyncError as e:
            self.stats["syncs_failed"] += 1
            return WeightAck(actor_id=self.spec["actor_id"], sync_id=announce.sync_id, version=announce.version,
                             ok=False, checksum="", load_seconds=0.0, error=str(e)[:4000])
        self.stats["syncs_ok"] += 1
        self.version, self.ready = announce.version, True
        self.shared["ready"].value = 1
        return WeightAck(actor_id=self.spec["actor_id"], sync_id=announce.sync_id, version=announce.version,
                         ok=True, checksum=checksum, load_seconds=seconds, error="")

    def _next_frame(self, registration: int, seq: int) -> bytes:
        if self.stamp != (self.incarnation, self.version):
            for tree in self.pool:
                tree.meta["incarnation"] = self.incarnation
                for node in tree.nodes:
                    node.version = self.version
            self.stamp = (self.incarnation, self.version)
        tree = self.pool[self.sends % POOL]
        self.sends += 1
        tree.tree_id = new_tree_id()
        tree.meta["registration"], tree.meta["seq"] = registration, seq
        return encode_tree(tree)


def actor_main(spec: dict, shared: dict, results) -> None:
    """Thread or process entry: run one synthetic actor, put its stats (or its error) in results."""
    try:
        results.put(SyntheticActor(spec, shared).run())
    except Exception as e:  # noqa: BLE001 - reported to the bench, which fails the level with it
        results.put({"actor_id": spec["actor_id"], "error": repr(e)})


# -- the learner ----------------------------------------------------------------------------------
def start_learner(run_dir: Path, model: Path, curve_dir: Path, args) -> subprocess.Popen:
    overrides = [
        f"model.path={model}", "model.device=cpu", "model.dtype=float32",
        "tree.depth=3", "tree.branching=[2,2,2]", "tree.split=tokens", "tree.segment_tokens=384",
        "tree.max_tokens=1152", "transport.curve=true", f"transport.curve_dir={curve_dir}",
        "transport.data_port=0", "transport.control_port=0", "metrics.learner_port=0", "weights.rendezvous_port=0",
        f"replay.capacity={args.capacity}", f"replay.credits_per_actor={args.credits}",
        f"replay.batch_trees={args.batch_trees}", "learner.max_steps=0", "learner.checkpoint_every=0",
        "learner.checkpoint_hf=false", "learner.micro_batch_tokens=2048", "learner.resume=never",
        "learner.log_trees=false", *(["learner.min_actors=4096"] if args.no_train else []),
    ]
    cmd = [sys.executable, "-m", "treerpo", "learner", "--config", "demo", "--run-dir", str(run_dir)]
    for o in overrides:
        cmd += ["--set", o]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    run_dir.mkdir(parents=True)
    with open(run_dir / "learner.log", "wb") as log:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=run_dir)


def log_tail(run_dir: Path, n: int = 30) -> str:
    path = run_dir / "learner.log"
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:]) if path.exists() else ""


def wait_endpoints(run_dir: Path, proc: subprocess.Popen, timeout_s: float) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"learner exited with {proc.returncode}:\n{log_tail(run_dir)}")
        path = run_dir / "endpoints.json"
        if path.exists():
            return json.loads(path.read_text())
        time.sleep(0.2)
    raise RuntimeError(f"learner wrote no endpoints.json within {timeout_s:.0f} s:\n{log_tail(run_dir)}")


def stop_learner(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)  # finish the step, checkpoint, exit 0
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def stat_cpu_s(stat: Path) -> float | None:
    """User + system CPU seconds of a /proc/<pid>/stat or /proc/<pid>/task/<tid>/stat file
    (utime, stime); None once the process or thread is gone."""
    try:
        fields = stat.read_text().rsplit(") ", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_s(pids: list[int]) -> float:
    """User + system CPU seconds the processes used so far."""
    return sum(s for s in (stat_cpu_s(Path(f"/proc/{pid}/stat")) for pid in pids) if s is not None)


def scrape(url: str) -> dict:
    """The learner counters the bench reads, from one /metrics scrape."""
    with urllib.request.urlopen(url, timeout=5) as r:
        text = r.read().decode()
    out: dict = {"dropped": {}, "received": 0.0, "consumed": 0.0, "buffer": 0.0, "wire_errors": 0.0,
                 "registered": 0.0, "steps": 0.0, "sync_failures": 0.0, "idle_s": 0.0}
    names = {"treerpo_learner_trees_received_total": "received", "treerpo_learner_trees_consumed_total": "consumed",
             "treerpo_learner_buffer_trees": "buffer", "treerpo_learner_actors_registered": "registered",
             "treerpo_learner_steps_total": "steps", "treerpo_learner_wire_errors_total": "wire_errors",
             "treerpo_weight_sync_failures_total": "sync_failures", "treerpo_learner_idle_seconds_total": "idle_s"}
    for line in text.splitlines():
        if line.startswith("#") or not line:
            continue
        head, _, value = line.rpartition(" ")
        name, _, labels = head.partition("{")
        if name == "treerpo_learner_trees_dropped_total":
            out["dropped"][labels.split('"')[1]] = float(value)
        elif name in names:
            out[names[name]] += float(value)
    return out


@dataclass(frozen=True)
class Sample:
    t: float  # monotonic seconds
    rss_mb: float | None  # learner VmRSS
    m: dict | None  # learner counters (scrape), None if the scrape failed
    cpu_learner_s: float
    cpu_actors_s: float  # this process (threads: actors, probe, this watch) or the actor processes


class Watch(threading.Thread):
    """Samples the learner's RSS, counters and CPU, and the actors' CPU, every interval_s."""

    def __init__(self, pid: int, url: str, actor_pids: list[int], interval_s: float) -> None:
        super().__init__(name="watch", daemon=True)
        self.pid, self.url, self.actor_pids, self.interval_s = pid, url, actor_pids, interval_s
        self.samples: list[Sample] = []
        self.halt = threading.Event()

    def sample(self, tries: int = 1) -> Sample:
        m = None
        for _ in range(tries):
            try:
                m = scrape(self.url)
                break
            except OSError:
                time.sleep(0.1)
        s = Sample(time.monotonic(), rss_mb(self.pid), m, cpu_s([self.pid]), cpu_s(self.actor_pids))
        self.samples.append(s)
        return s

    def run(self) -> None:
        while not self.halt.wait(self.interval_s):
            self.sample()


# -- one level: a fresh learner, N actors + the probe ---------------------------------------------
def _pct(xs: list[float], q: float) -> float | None:
    return float(np.percentile(xs, q)) * 1e3 if xs else None  # ms


def _at(samples: list[Sample], t: float) -> Sample:
    """The first sample taken at or after t (else the last)."""
    return next((s for s in samples if s.t >= t), samples[-1])


def _wait(cond, timeout_s: float, proc: subprocess.Popen, run_dir: Path, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if proc.poll() is not None:
            raise RuntimeError(f"learner exited with {proc.returncode} while waiting for {what}:\n{log_tail(run_dir)}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout_s:.0f} s waiting for {what}:\n{log_tail(run_dir)}")
        time.sleep(0.1)


def drain(url: str, sent, proc: subprocess.Popen, run_dir: Path, stall_s: float = 30.0) -> None:
    """Wait until every tree the actors queued reached the learner, before they say Shutdown (a
    tree arriving after it would be refused as a non-member's: an artefact of stopping). The
    queues hold up to N x (send_hwm + recv_hwm) frames, so wait as long as the learner progresses."""
    got, progress_at = -1.0, time.monotonic()
    while True:
        m = scrape(url)
        arrived = m["received"] + m["wire_errors"]
        if arrived >= sent():
            return
        if arrived > got:
            got, progress_at = arrived, time.monotonic()
        elif time.monotonic() - progress_at > stall_s:
            raise RuntimeError(f"the learner received no tree for {stall_s:.0f} s with {sent() - arrived:.0f} "
                               f"still queued:\n{log_tail(run_dir)}")
        if proc.poll() is not None:
            raise RuntimeError(f"learner exited with {proc.returncode} while draining:\n{log_tail(run_dir)}")
        time.sleep(0.2)


def settle(url: str, run_dir: Path, timeout_s: float = 120.0) -> dict:
    """The learner's counters once it is idle: with no member left it finishes its step and waits
    (learner.min_actors=1). Settled: two reads 1 s apart with the same tree counters while its
    idle time grew in between."""
    prev = None
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        m = scrape(url)
        if (prev is not None and m["registered"] == 0 and m["idle_s"] > prev["idle_s"]
                and all(m[k] == prev[k] for k in m if k != "idle_s")):
            return m
        prev = m
        time.sleep(1.0)
    raise RuntimeError(f"the learner's counters did not settle within {timeout_s:.0f} s:\n{log_tail(run_dir)}")


def run_level(n: int, args, work: Path, model: Path, vocab: int, nbytes: int) -> dict:
    run_dir, curve_dir = work / f"run-n{n}", work / "curve"
    names = [f"load-{i}" for i in range(n)] + ["probe"]
    ctx = mp.get_context("spawn")
    events = {"go": ctx.Event(), "stop_sending": ctx.Event(), "stop": ctx.Event()}
    results = ctx.Queue() if args.procs else queue.Queue()
    workers: list = []
    proc = start_learner(run_dir, model, curve_dir, args)
    watch = None
    try:
        ep = wait_endpoints(run_dir, proc, 300)
        url = ep["metrics"] + "/metrics"
        defaults = TransportConfig()
        transport = {"curve": True, "curve_dir": str(curve_dir)}
        shared = [{**events, "ready": ctx.Value("b", 0, lock=False), "sent": ctx.Value("q", 0, lock=False)}
                  for _ in names]
        for i, name in enumerate(names):
            probe = name == "probe"
            spec = {"actor_id": name, "transport": transport, "data": ep["data"], "control": ep["control"],
                    "vocab": vocab, "seed": i, "send": not probe, "max_seconds": args.seconds + 600,
                    "heartbeat_s": PROBE_HEARTBEAT_S if probe else defaults.heartbeat_interval_s}
            if args.procs:
                w = ctx.Process(target=actor_main, args=(spec, shared[i], results), name=name, daemon=True)
            else:
                w = threading.Thread(target=actor_main, args=(spec, shared[i], results), name=name, daemon=True)
            w.start()
            workers.append(w)
        _wait(lambda: all(s["ready"].value for s in shared) or not all(w.is_alive() for w in workers), 180, proc,
              run_dir, "every actor to hold the weights")
        if not all(w.is_alive() for w in workers):
            raise RuntimeError(f"a synthetic actor ended early: {results.get(timeout=5)}")
        watch = Watch(proc.pid, url, [w.pid for w in workers] if args.procs else [os.getpid()], args.interval)
        first = watch.sample(tries=5)
        watch.start()
        events["go"].set()
        t_go = time.monotonic()
        _wait(lambda: time.monotonic() >= t_go + args.seconds, args.seconds + 5, proc, run_dir, "the window")
        events["stop_sending"].set()
        watch.halt.set()
        last = watch.sample(tries=5)
        drain(url, lambda: sum(s["sent"].value for s in shared), proc, run_dir)
        events["stop"].set()
        stats = [results.get(timeout=60) for _ in names]
        final = settle(url, run_dir)
    finally:
        events["stop"].set()
        if watch is not None:
            watch.halt.set()
        for w in workers:
            w.join(timeout=30)
        stop_learner(proc)
    return summarize(n, args, watch.samples, first, last, final, stats, t_go, nbytes)


def summarize(n: int, args, samples: list[Sample], first: Sample, last: Sample, final: dict, stats: list,
              t_go: float, nbytes: int) -> dict:
    errors = [s["error"] for s in stats if "error" in s]
    if errors:
        raise RuntimeError(f"synthetic actors failed: {errors}")
    window = [s for s in samples if s.m is not None and t_go + args.warmup <= s.t < last.t] + [last]
    w0 = window[0]
    span = max(last.t - w0.t, 1e-9)
    ingest = (last.m["received"] - w0.m["received"]) / span
    mid = _at(window, w0.t + span / 2)
    first_half = (mid.m["received"] - w0.m["received"]) / max(mid.t - w0.t, 1e-9)
    second_half = (last.m["received"] - mid.m["received"]) / max(last.t - mid.t, 1e-9)
    # per learner CPU-second: a neighbour taking the cores slows both halves' CPU and ingest alike
    first_cpu, second_cpu = mid.cpu_learner_s - w0.cpu_learner_s, last.cpu_learner_s - mid.cpu_learner_s
    first_per_cpu = (mid.m["received"] - w0.m["received"]) / max(first_cpu, 1e-9)
    second_per_cpu = (last.m["received"] - mid.m["received"]) / max(second_cpu, 1e-9)
    loaded = [s for s in stats if s["actor_id"] != "probe"]
    probe = next(s for s in stats if s["actor_id"] == "probe")
    sent = sum(s["sent"] for s in stats)  # the probe's is 0
    dropped = final["dropped"]
    accounted = final["consumed"] + sum(dropped.values()) + final["buffer"]
    during = [s for s in samples if t_go <= s.t <= last.t] + [last]
    rtts = [rtt for t, rtt in probe["rtts"] if t_go <= t <= last.t]  # under load: the window only
    hb_max = max(rtts, default=float("inf"))
    r = {
        "actors": n,
        "ingest_trees_per_s": ingest,
        "trained_trees_per_s": (last.m["consumed"] - w0.m["consumed"]) / span,
        "fall": second_half / first_half if first_half > 0 else 0.0,
        "fall_per_cpu": second_per_cpu / first_per_cpu if first_per_cpu > 0 else 0.0,
        "learner_cpu_us_per_tree": (last.cpu_learner_s - w0.cpu_learner_s) / max(ingest * span, 1) * 1e6,
        "learner_cores": (last.cpu_learner_s - w0.cpu_learner_s) / span,
        "actor_cores": (last.cpu_actors_s - w0.cpu_actors_s) / span,
        "load_avg_1m": os.getloadavg()[0],
        "steps": last.m["steps"] - first.m["steps"],
        "sent": sent,
        "trained": int(final["consumed"]),
        "dropped": {k: int(v) for k, v in dropped.items() if v},
        "held": int(final["buffer"]),
        "exact": sent == accounted and final["received"] + final["wire_errors"] == sent,
        "unaccounted": sent - accounted,
        "rss_start_mb": first.rss_mb, "rss_peak_mb": max(s.rss_mb or 0.0 for s in during), "rss_end_mb": last.rss_mb,
        "rss_bound_mb": first.rss_mb + (args.capacity + n * TransportConfig().recv_hwm) * nbytes / 2**20
        + TRAIN_SLACK_MB,
        "hb_probe_p50_ms": _pct(rtts, 50), "hb_probe_p99_ms": _pct(rtts, 99),
        "hb_probe_max_ms": hb_max * 1e3, "hb_probe_samples": len(rtts),
        "blocked_fraction": sum(s["blocked_s"] for s in loaded) / (n * args.seconds),
        "send_timeouts": sum(s["send_timeouts"] for s in loaded),
        "rejoins": sum(s["rejoins"] for s in stats),
        "registrations": sum(s["registrations"] for s in stats),
        "welcomes": sum(s["welcomes"] for s in stats),
        "actor_syncs_ok": sum(s["syncs_ok"] for s in stats),
        "actor_syncs_failed": sum(s["syncs_failed"] for s in stats),
        # during the window: a sync in flight when the actors stop fails on the learner's side
        "learner_sync_failures": last.m["sync_failures"] - first.m["sync_failures"],
        "registered_min": min((s.m["registered"] for s in during if s.m is not None), default=0),
    }
    checks = {
        "exact": r["exact"],
        "only_capacity_drops": not (set(r["dropped"]) - {"capacity"}),
        "no_member_lost": (r["rejoins"] == 0 and r["welcomes"] == n + 1 and r["actor_syncs_failed"] == 0
                           and r["learner_sync_failures"] == 0 and r["registered_min"] == n + 1),
        "heartbeat_under_peer_timeout": hb_max < TransportConfig().peer_timeout_s,
        "ingest_holds": r["fall_per_cpu"] >= 0.8,
        "rss_within_bound": r["rss_peak_mb"] <= r["rss_bound_mb"],
    }
    r["failed_checks"] = [k for k, ok in checks.items() if not ok]
    r["sustains"] = not r["failed_checks"]
    return r


# -- main -----------------------------------------------------------------------------------------
COLUMNS = [  # (key, header, format)
    ("actors", "N", "{:d}"), ("ingest_trees_per_s", "ingest/s", "{:.0f}"),
    ("trained_trees_per_s", "trained/s", "{:.1f}"), ("fall", "fall", "{:.2f}"), ("fall_per_cpu", "/cpu", "{:.2f}"),
    ("ingest_mb_per_s", "MB/s", "{:.0f}"), ("learner_cpu_us_per_tree", "us/tree", "{:.0f}"),
    ("codec_trees_per_s", "codec/s", "{:.0f}"), ("ratio", "ratio", "{:.2f}"),
    ("hb_probe_p50_ms", "hb p50 ms", "{:.1f}"), ("hb_probe_p99_ms", "hb p99 ms", "{:.1f}"),
    ("hb_probe_max_ms", "hb max ms", "{:.0f}"), ("learner_cores", "learner cores", "{:.2f}"),
    ("actor_cores", "actor cores", "{:.2f}"), ("rss_start_mb", "RSS start", "{:.0f}"),
    ("rss_peak_mb", "peak", "{:.0f}"), ("rss_end_mb", "end", "{:.0f}"), ("rss_bound_mb", "bound", "{:.0f}"),
    ("sent", "sent", "{:d}"),
    ("trained", "trained", "{:d}"), ("dropped", "dropped", "{}"), ("held", "held", "{:d}"),
    ("exact", "exact", "{}"), ("load_avg_1m", "loadavg", "{:.1f}"), ("sustains", "sustains", "{}"),
]


def _cell(r: dict, key: str, fmt: str) -> str:
    v = r.get(key)
    if v is None:
        return "-"
    if key == "dropped":
        return ",".join(f"{k}={c}" for k, c in v.items()) or "0"
    return fmt.format(v)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true", help="print one JSON object on the last line")
    ap.add_argument("--actors", default="1,4,16,64", help="synthetic actors per level, comma-separated (a sweep)")
    ap.add_argument("--seconds", type=float, default=20.0, help="load window per level")
    ap.add_argument("--warmup", type=float, default=3.0, help="seconds of the window left out of the rates")
    ap.add_argument("--procs", action="store_true", help="one process per actor (default: threads of this one)")
    ap.add_argument("--capacity", type=int, default=256, help="learner replay.capacity")
    ap.add_argument("--credits", type=int, default=2048, help="learner replay.credits_per_actor")
    ap.add_argument("--batch-trees", type=int, default=2, help="learner replay.batch_trees")
    ap.add_argument("--no-train", action="store_true",
                    help="learner.min_actors=4096: the learner syncs weights but never trains (ingest alone)")
    ap.add_argument("--interval", type=float, default=0.5, help="seconds between RSS + /metrics samples")
    ap.add_argument("--tiny", action="store_true", help="smoke size: 1 actor, a 4 s window, short baseline")
    ap.add_argument("--keep", action="store_true", help="keep the work folder (learner logs, run dirs) and say where")
    args = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind: each level stops its learner
    if args.tiny:
        args.actors, args.seconds, args.warmup, args.interval, args.batch_trees = "1", 4.0, 1.0, 0.25, 1
    levels_n = [int(x) for x in args.actors.split(",")]
    with tempfile.TemporaryDirectory(prefix="treerpo-load-") as tmp:
        work = Path(tempfile.mkdtemp(prefix="treerpo-load-")) if args.keep else Path(tmp)
        if args.keep:
            print(f"work folder: {work}", file=sys.stderr)
        model = build_tiny_model(work / "model")
        vocab = int(json.loads((model / "config.json").read_text())["vocab_size"])
        generate_keys(work / "curve", [f"load-{i}" for i in range(max(levels_n))] + ["probe"])
        pool = [paper_tree(k, vocab, "load-0") for k in range(POOL)]
        nbytes = len(encode_tree(pool[0]))
        levels = []
        for n in levels_n:
            # the baseline around each level (before and after, median): the machine's load drifts
            seconds, repeats = (0.2, 1) if args.tiny else (1.0, 3)
            codecs = codec_trees_per_s(pool, vocab, seconds, repeats)
            try:
                r = run_level(n, args, work, model, vocab, nbytes)
            except (RuntimeError, OSError, queue.Empty) as e:  # that level failed: say so, go on
                r = {"actors": n, "ingest_trees_per_s": 0.0, "exact": False, "sustains": False,
                     "failed_checks": ["error"], "error": str(e)[-3000:]}
            codecs += codec_trees_per_s(pool, vocab, seconds, repeats)
            codec = statistics.median(codecs)
            r.update(ingest_mb_per_s=r["ingest_trees_per_s"] * nbytes / 1e6, codec_trees_per_s=codec,
                     codec_range=[min(codecs), max(codecs)], ratio=r["ingest_trees_per_s"] / codec)
            levels.append(r)
            print(f"N={n}: {r['ingest_trees_per_s']:.0f} trees/s ingested (codec alone {codec:.0f}), "
                  f"sustains={r['sustains']} {r['failed_checks'] or ''}", file=sys.stderr, flush=True)
    sustained = [r for r in levels if r["sustains"]]
    best = max(sustained, key=lambda r: r["ingest_trees_per_s"], default=None)
    ceiling = best["ingest_trees_per_s"] if best else 0.0
    out = {
        "mode": "processes" if args.procs else "threads",
        "tree": {"prompt_tokens": 512, "branching": [2, 2, 2], "segment_tokens": 384, "nodes": len(pool[0].nodes),
                 "tokens": 512 + pool[0].num_tokens(), "bytes": nbytes},
        "vocab": vocab, "seconds": args.seconds, "capacity": args.capacity, "credits_per_actor": args.credits,
        "batch_trees": args.batch_trees, "cpus": os.cpu_count(),
        "codec_trees_per_s": best["codec_trees_per_s"] if best else statistics.median(r["codec_trees_per_s"]
                                                                                       for r in levels),
        "ingest_ceiling_trees_per_s": ceiling,
        "ceiling_actors": best["actors"] if best else 0,
        "largest_sustained_actors": max((r["actors"] for r in sustained), default=0),
        "all_exact": all(r["exact"] for r in levels),
        "levels": levels,
        "ratio": best["ratio"] if best else 0.0,
        "target": TARGET,
    }
    t = out["tree"]
    print(f"tree: {t['nodes']} nodes, {t['tokens']} tokens, {t['bytes']} bytes; learner: tiny Qwen2 (vocab {vocab}), "
          f"capacity {args.capacity}, credits/actor {args.credits}, batch {args.batch_trees} trees; "
          f"actors as {out['mode']}; {os.cpu_count()} CPUs")
    print("  ".join(f"{h:>{max(len(h), 6)}}" for _, h, _ in COLUMNS))
    for r in levels:
        print("  ".join(f"{_cell(r, k, f):>{max(len(h), 6)}}" for k, h, f in COLUMNS))
    for r in levels:
        if r["failed_checks"]:
            why = r["error"].strip().splitlines()[0] if "error" in r else ", ".join(r["failed_checks"])
            print(f"N={r['actors']} does not sustain: {why}")
    print(f"ingest ceiling {ceiling:.0f} trees/s (N={out['ceiling_actors']}) vs the codec alone (encode + validated "
          f"decode, one process, around that level) {out['codec_trees_per_s']:.0f} trees/s: ratio "
          f"{out['ratio']:.3f} (target {TARGET}); largest N that sustains: {out['largest_sustained_actors']}")
    if args.json:
        print(json.dumps(out))


if __name__ == "__main__":
    main()
