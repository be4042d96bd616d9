"""Transport: trees/s from actor sockets into the learner's replay buffer on loopback, vs. the codec alone.

What runs
* The learner side, in this process, made of the production pieces only: common.transport.
  LearnerEndpoints (CURVE on, ZAP allow-list of the actors' public keys, 127.0.0.1, ephemeral
  ports), learner.control.ControlPlane (Register/Welcome, Heartbeat/Credit, the credit sweep),
  learner.buffer.ReplayBuffer, common.metrics.LearnerMetrics, and the learner's own ingest loop,
  learner.ingest.Ingest, run unchanged: recv_tree(copy=False) -> decode_tree(
  vocab_size=...) with full validation -> membership -> longest-path check -> ReplayBuffer.add
  (which spends the actor's credit). There is no model: `IngestHost` holds what that loop reads.
  A taker thread stands in for the trainer (ReplayBuffer.take of --batch-trees trees), so trees
  leave the buffer and free their credits, which the control plane grants back. The bench
  confirms each registered member (ControlPlane.confirm), as a weight sync would.
* N actors, one process each (as in production: their own GIL): bench/load.py's SyntheticActor
  (common.transport.ActorEndpoints, CURVE PUSH + DEALER; Register, Heartbeat, Credit, Shutdown)
  without its weight sync: it is ready on Welcome. It sends only with a credit in hand and
  encodes every tree per send (encode_tree) from its pool of pre-sampled paper-size trees
  (load.paper_tree: 512-token prompt, [2,2,2], 384-token segments, 14 nodes, 5,888 tokens;
  Zipf token ids over the 151,936-id Qwen2 vocabulary) with a fresh tree_id.
* Credits are spent and granted on every tree but do not bind: --credits per actor (default 4096)
  exceeds what reaches the buffer between two credit sweeps (0.5 s). At the production default
  of 8 an actor passes ~16-20 trees/s (8 per sweep, plus heartbeat grants; 19 measured with
  --credits 8): the pace of generation, not of the transport.

Figures
  transport_trees_per_s  --trees trees accepted into the buffer / seconds, after the first
                         --warmup-trees (ReplayBuffer.stats().accepted, polled every 5 ms)
  codec_trees_per_s      encode + validated decode of the same pool in one process
                         (load.codec_trees_per_s), median of runs right before and right after
  ratio                  transport / codec (same run); target 0.7: the transport adds at most ~30%
  *_cpu_us_per_tree      CPU per tree over the same interval, by thread: learner ingest, control,
                         taker, ZeroMQ I/O (CURVE decrypt, TCP), the rest; actors' Python
                         (encode, send) and ZeroMQ I/O (CURVE encrypt)
  cpu_ratio              codec CPU per tree / transport CPU per tree (learner + actors, all threads):
                         what the transport adds in CPU, whatever cores the run got
  learner_gil_us_per_tree  the learner's Python threads' CPU per tree (all but ZeroMQ's I/O, which
                         runs without the GIL); gil_bound_trees_per_s = 1e6 / it: the most this
                         learner can ingest with a core for its Python; gil_bound_ratio = codec CPU
                         per tree / learner_gil_us_per_tree (CPU over CPU: what ratio would be with
                         cores to spare, the learner's GIL the only bound)
  alone_gil_us_per_tree  the same ingest loop fed by a plain PUSH socket in this process with no
                         other thread busy (chunks of 32 frames, encoded before they are sent; the
                         main thread takes the batches in between): the learner's Python CPU per
                         tree with a core to itself and no neighbour, loop plus take(), timed
                         without per-call timers; alone_ingest_us_by_call: a second pass with them
                         (its total includes their cost); alone_ratio = codec CPU per tree / it,
                         the ratio to expect with cores to spare
  raw_frames_per_s, raw_curve_frames_per_s  reference: the same byte frames from N plain PUSH
                         processes into one PULL (pyzmq, same HWMs, no codec, no control plane),
                         without and with CURVE
  exact                  every tree the actors queued was accepted (no drop, no wire error)
  load_avg               1-minute load average at start and end (the machine may be shared)

Reading it: per tree the path keeps 4 kinds of thread busy (the learner's Python, its ZeroMQ I/O
thread decrypting CURVE, each actor's Python, its I/O thread encrypting). With fewer free cores
than that, the rate is bound by CPU, and cpu_ratio says how much the path costs against the
codec; with cores to spare, by the learner's GIL (gil_bound_ratio).

    python bench/transport.py [--actors 2] [--trees 20000] [--json] [--profile] [--tiny]
"""

from __future__ import annotations

import argparse
import cProfile
import json
import multiprocessing as mp
import os
import pstats
import statistics
import sys
import tempfile
import threading
import time
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import zmq
import zmq.auth

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from load import POOL, SyntheticActor, codec_trees_per_s, paper_tree, stat_cpu_s  # noqa: E402 -- bench/ is on sys.path

import learner.ingest as learner_ingest  # noqa: E402
from common.config import LearnerConfig, ReplayConfig, TransportConfig  # noqa: E402
from common.metrics import LearnerMetrics, new_registry  # noqa: E402
from common.transport import LearnerEndpoints, generate_keys  # noqa: E402
from common.tree import ReasoningTree  # noqa: E402
from common.wire import Welcome, encode_tree  # noqa: E402
from learner.buffer import ReplayBuffer  # noqa: E402
from learner.control import ControlPlane, ControlState  # noqa: E402
from learner.ingest import Ingest  # noqa: E402

TARGET = 0.7
VOCAB = 151_936  # Qwen2, as bench/wire.py
POLL_S = 0.005


# -- actors ---------------------------------------------------------------------------------------
class ReadyOnWelcome(SyntheticActor):
    """load.py's synthetic actor; the bench's learner has no weights to sync, so Welcome makes it ready."""

    def _handle(self, msg):
        out = super()._handle(msg)
        if isinstance(msg, Welcome):
            self.version, self.ready = msg.version, True
            self.shared["ready"].value = 1
        return out


def actor_main(spec: dict, shared: dict, results) -> None:
    try:
        actor = ReadyOnWelcome(spec, shared)
        if spec.get("profile"):  # --profile: this actor's main thread (encode, send, control) under cProfile
            prof = cProfile.Profile()
            results.put(prof.runcall(actor.run))
            prof.dump_stats(spec["profile"])
        else:
            results.put(actor.run())
    except Exception as e:  # noqa: BLE001 - reported to the bench, which fails with it
        results.put({"actor_id": spec["actor_id"], "error": repr(e)})


# -- the learner side -----------------------------------------------------------------------------
class IngestHost(Ingest):
    """The learner's ingest (learner.ingest.Ingest, run unchanged) at version 0, with its stop event."""

    def __init__(self, endpoints: LearnerEndpoints, buffer: ReplayBuffer, control: ControlPlane,
                 metrics: LearnerMetrics, vocab: int) -> None:
        super().__init__(endpoints, buffer, control, metrics, vocab_size=vocab,
                         longest_allowed=LearnerConfig().micro_batch_tokens, version=lambda: 0)
        self.stop_requested = threading.Event()

    def _ingest_loop(self) -> None:
        self.run(self.stop_requested)


class _Proxy:
    """`target` with some attributes replaced."""

    def __init__(self, target, **overrides) -> None:
        self._target = target
        self.__dict__.update(overrides)

    def __getattr__(self, name: str):
        return getattr(self._target, name)

    def __len__(self) -> int:
        return len(self._target)


class StageClock:
    """--stages: CPU seconds (time.thread_time) the ingest thread spends in each call the loop makes.

    Wraps the host's endpoints.recv_tree, buffer.add and control.is_member, and, for the run,
    the module globals learner.ingest.decode_tree and ReasoningTree.path_lengths (this process only)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}

    def wrap(self, name: str, fn):
        def timed(*args, **kwargs):
            t0 = time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] = self.seconds.get(name, 0.0) + time.thread_time() - t0
                self.calls[name] = self.calls.get(name, 0) + 1

        return timed

    def instrument(self, host: IngestHost) -> None:
        host.endpoints = _Proxy(host.endpoints, recv_tree=self.wrap("recv_tree", host.endpoints.recv_tree))
        host.buffer = _Proxy(host.buffer, add=self.wrap("buffer.add", host.buffer.add))
        host.control = _Proxy(host.control, is_member=self.wrap("is_member", host.control.is_member))
        self._saved = (learner_ingest.decode_tree, ReasoningTree.path_lengths)
        learner_ingest.decode_tree = self.wrap("decode_tree", learner_ingest.decode_tree)
        ReasoningTree.path_lengths = self.wrap("path_lengths", ReasoningTree.path_lengths)

    def restore(self) -> None:
        learner_ingest.decode_tree, ReasoningTree.path_lengths = self._saved

    def run(self, loop) -> None:
        t0 = time.thread_time()
        loop()
        self.seconds["total"] = time.thread_time() - t0

    def per_tree_us(self) -> dict[str, float]:
        n = max(1, self.calls.get("decode_tree", 0))
        out = {k: v / n * 1e6 for k, v in self.seconds.items()}
        out["rest"] = out.get("total", 0.0) - sum(v for k, v in out.items() if k != "total")
        return out


def thread_cpu(pid: int) -> dict[int, tuple[str, float]]:
    """tid -> (thread name as the kernel knows it, user + system CPU seconds)."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            comm = (task / "comm").read_text().strip()
        except OSError:
            continue
        seconds = stat_cpu_s(task / "stat")
        if seconds is not None:
            out[int(task.name)] = (comm, seconds)
    return out


def cpu_by_role(pids: list[int], roles: dict[int, str]) -> dict[str, float]:
    """CPU seconds summed by role: a Python thread named in `roles` (by native id), ZeroMQ's I/O
    threads ('zmq_io'), and everything else ('python': a process's other threads)."""
    out: dict[str, float] = {}
    for pid in pids:
        for tid, (comm, s) in thread_cpu(pid).items():
            role = roles.get(tid) or ("zmq_io" if comm.startswith("ZMQbg") else "python")
            out[role] = out.get(role, 0.0) + s
    return out


def _wait(cond, timeout_s: float, what: str, alive=lambda: True) -> float:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if not alive():
            raise RuntimeError(f"an actor process ended while waiting for {what}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(POLL_S)
    return time.monotonic()


def run_transport(args, work: Path, names: list[str], prof: cProfile.Profile | None,
                  clock: StageClock | None) -> dict:
    """N actor processes -> the learner's ingest path in this process; trees/s into the buffer."""
    curve_dir = work / "curve"
    cfg = TransportConfig(curve=True, curve_dir=str(curve_dir), data_port=0, control_port=0)
    metrics = LearnerMetrics(new_registry())
    buffer = ReplayBuffer(ReplayConfig(capacity=1024, credits_per_actor=args.credits, batch_trees=args.batch_trees),
                          0, on_drop=lambda ev: metrics.dropped(ev.reason, ev.count))
    endpoints = LearnerEndpoints(cfg)
    control = ControlPlane(endpoints, buffer, ControlState(0, 0, "127.0.0.1", 0),
                           peer_timeout_s=cfg.peer_timeout_s, metrics=metrics)
    host = IngestHost(endpoints, buffer, control, metrics, VOCAB)
    done = threading.Event()

    def take() -> None:  # the trainer's side of the buffer, without training
        while not done.is_set():
            buffer.take(0, min_trees=args.batch_trees, timeout_s=0.1)

    loop = host._ingest_loop
    if clock is not None:
        clock.instrument(host)
        loop = partial(clock.run, host._ingest_loop)
    if prof is not None:
        loop = partial(prof.runcall, loop)
    ingest = threading.Thread(target=loop, name="ingest", daemon=True)
    taker = threading.Thread(target=take, name="taker", daemon=True)
    ctx = mp.get_context("spawn")
    events = {"go": ctx.Event(), "stop_sending": ctx.Event(), "stop": ctx.Event()}
    shared = [{**events, "ready": ctx.Value("b", 0, lock=False), "sent": ctx.Value("q", 0, lock=False)}
              for _ in names]
    results = ctx.Queue()
    procs = []
    try:
        control.start()
        ingest.start()
        taker.start()
        for i, name in enumerate(names):
            spec = {"actor_id": name, "transport": {"curve": True, "curve_dir": str(curve_dir)},
                    "data": endpoints.data_endpoint, "control": endpoints.control_endpoint, "vocab": VOCAB,
                    "seed": i, "send": True, "max_seconds": args.timeout + 60,
                    "heartbeat_s": cfg.heartbeat_interval_s,
                    "profile": str(work / "actor.prof") if prof is not None and i == 0 else None}
            procs.append(ctx.Process(target=actor_main, args=(spec, shared[i], results), name=name, daemon=True))
            procs[-1].start()
        def alive() -> bool:
            if all(p.is_alive() for p in procs):
                return True
            while not results.empty():  # an actor that failed said why
                got = results.get_nowait()
                if "error" in got:
                    raise RuntimeError(f"actor {got['actor_id']} failed: {got['error']}")
            return False

        def confirmed() -> bool:  # stands in for the weight sync that makes a member count
            for actor_id in control.pending():
                control.confirm(actor_id, 0)
                control.grant_soon()  # as Learner.sync does for the members it confirms
            return len(control.member_ids()) == len(names) and all(s["ready"].value for s in shared)

        _wait(confirmed, args.timeout, "every actor to register", alive)
        # the main thread only polls the buffer's count (bench, not learner work): reported apart
        roles = {t.native_id: t.name for t in (ingest, taker, control._thread, threading.main_thread())}
        accepted = lambda: buffer.stats().accepted  # noqa: E731
        load_start = os.getloadavg()[0]
        events["go"].set()
        t0 = _wait(lambda: accepted() >= args.warmup_trees, args.timeout, "the warm-up trees", alive)
        n0, cpu_l0, cpu_a0 = accepted(), cpu_by_role([os.getpid()], roles), cpu_by_role([p.pid for p in procs], {})
        t1 = _wait(lambda: accepted() >= n0 + args.trees, args.timeout, f"{args.trees} trees", alive)
        n1, cpu_l1, cpu_a1 = accepted(), cpu_by_role([os.getpid()], roles), cpu_by_role([p.pid for p in procs], {})
        load_end = os.getloadavg()[0]
        events["stop_sending"].set()

        def arrived() -> bool:  # every queued frame still arrives: accepted, dropped or invalid
            st = buffer.stats()
            return st.accepted + sum(st.drops.values()) >= sum(s["sent"].value for s in shared)

        _wait(arrived, 60, "the queued trees")
        events["stop"].set()
        stats = [results.get(timeout=60) for _ in names]
    finally:
        for e in events.values():
            e.set()
        for p in procs:
            p.join(timeout=30)
        done.set()
        host.stop_requested.set()
        ingest.join(5)
        taker.join(5)
        control.stop()
        endpoints.close()
        if clock is not None:
            clock.restore()
    errors = [s["error"] for s in stats if "error" in s]
    if errors:
        raise RuntimeError(f"synthetic actors failed: {errors}")
    st = buffer.stats()
    n = n1 - n0
    per_tree = lambda a, b: {k: (b[k] - a.get(k, 0.0)) / n * 1e6 for k in b}  # noqa: E731
    learner_us, actor_us = per_tree(cpu_l0, cpu_l1), per_tree(cpu_a0, cpu_a1)
    bench_us = learner_us.pop("MainThread", 0.0)
    total_sent = sum(s["sent"] for s in stats)
    return {
        "transport_trees_per_s": n / (t1 - t0),
        "measured_trees": n,
        "seconds": t1 - t0,
        "learner_cpu_us_per_tree": sum(learner_us.values()),
        "learner_cpu_us_by_thread": learner_us,
        "learner_gil_us_per_tree": sum(v for k, v in learner_us.items() if k != "zmq_io"),
        "bench_poll_us_per_tree": bench_us,
        "actor_cpu_us_per_tree": sum(actor_us.values()),
        "actor_cpu_us_by_thread": actor_us,
        "sent": total_sent,
        "accepted": st.accepted,
        "dropped": {k: v for k, v in st.drops.items() if v},
        "exact": total_sent == st.accepted and not any(st.drops.values()) and st.accepted == st.taken + st.size,
        "send_timeouts": sum(s["send_timeouts"] for s in stats),
        "actor_blocked_fraction": sum(s["blocked_s"] for s in stats) / (len(names) * (t1 - t0)),
        "load_avg": [load_start, load_end],
    }


def ingest_alone(pool: list[ReasoningTree], args, n: int, chunk: int = 32, instrument: bool = True) -> dict:
    """The learner's ingest loop (learner.ingest.Ingest.run, instrumented as by --stages) with no other
    thread busy: one plain PUSH socket in this process sends `chunk` frames of the pool with fresh
    tree ids (encoded first), then waits (asleep) until the loop has admitted them; the main thread
    takes the full batches in between. CURVE off: it runs on ZeroMQ's I/O thread, outside the GIL. Membership
    comes from a stand-in (ControlPlane admits only registered actors); its lookup is timed as
    is_member. -> the learner's Python CPU per tree with a core to itself and no neighbour; with
    instrument=False only the loop's total is timed (the per-call timers cost CPU of their own)."""
    metrics = LearnerMetrics(new_registry())
    buffer = ReplayBuffer(ReplayConfig(capacity=1024, credits_per_actor=args.credits, batch_trees=args.batch_trees))
    buffer.register_actor(pool[0].actor_id)
    endpoints = LearnerEndpoints(TransportConfig(data_port=0, control_port=0))
    host = IngestHost(endpoints, buffer, _Proxy(SimpleNamespace(), is_member=lambda actor_id: True), metrics, VOCAB)
    clock = StageClock()
    if instrument:
        clock.instrument(host)
    ingest = threading.Thread(target=partial(clock.run, host._ingest_loop), name="ingest-alone", daemon=True)
    zctx = zmq.Context()
    push = zctx.socket(zmq.PUSH)
    push.setsockopt(zmq.SNDHWM, 0)
    push.setsockopt(zmq.LINGER, 0)
    push.connect(endpoints.data_endpoint)
    take_s = 0.0
    try:
        ingest.start()
        for start in range(0, n, chunk):
            end = min(n, start + chunk)
            batch = []
            for k in range(start, end):  # encoded before the first send: the loop is idle meanwhile
                tree = pool[k % len(pool)]
                tree.tree_id = f"alone-{k:09d}"
                batch.append(encode_tree(tree))
            for frame in batch:
                push.send(frame, copy=False)
            _wait(lambda end=end: buffer.stats().accepted >= end, args.timeout, "the ingest loop alone")
            t0 = time.thread_time()
            while len(buffer) >= args.batch_trees:
                buffer.take(0)
            take_s += time.thread_time() - t0
    finally:
        host.stop_requested.set()
        ingest.join(5)
        if instrument:
            clock.restore()
        push.close()
        zctx.term()
        endpoints.close()
    st = buffer.stats()
    if st.accepted != n or any(st.drops.values()):
        raise RuntimeError(f"ingest alone: {st.accepted} of {n} trees accepted, drops {st.drops}")
    if not instrument:
        return {"alone_gil_us_per_tree": (clock.seconds["total"] + take_s) / n * 1e6, "alone_trees": n}
    by_call = clock.per_tree_us()
    return {"alone_ingest_us_by_call": by_call, "alone_take_us_per_tree": take_s / n * 1e6, "alone_trees": n}


# -- baselines ------------------------------------------------------------------------------------
def codec_rates(pool: list, args) -> tuple[list[float], list[float]]:
    """load.codec_trees_per_s over the pool: (trees/s of each run, [this thread's CPU us per tree]).
    Trees counted as wall seconds x mean rate (each run overshoots its seconds by < 1 pool pass)."""
    cpu0, wall0 = time.thread_time(), time.perf_counter()
    rates = codec_trees_per_s(pool, VOCAB, args.codec_seconds, args.codec_repeats)
    cpu, wall = time.thread_time() - cpu0, time.perf_counter() - wall0
    return rates, [cpu / (wall * statistics.mean(rates)) * 1e6]


# -- raw ZeroMQ -----------------------------------------------------------------------------------
def raw_sender(endpoint: str, options: dict, frames: list[bytes], hwm: int, stop) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    for opt, value in {zmq.SNDHWM: hwm, zmq.SNDTIMEO: 100, zmq.LINGER: 0, **options}.items():
        sock.setsockopt(opt, value)
    sock.connect(endpoint)
    i = 0
    while i % 64 or not stop.is_set():
        try:
            sock.send(frames[i % len(frames)])
            i += 1
        except zmq.Again:
            if stop.is_set():
                break
    sock.close()
    ctx.term()


def raw_frames_per_s(n: int, frames: list[bytes], count: int, warm: int, curve_dir: Path | None,
                     client: str, timeout_s: float) -> float:
    """Frames/s from n plain PUSH processes into one PULL here: the same bytes, no codec."""
    server, client_opts = {}, {}
    if curve_dir is not None:
        public, secret = zmq.auth.load_certificate(str(curve_dir / "learner.key_secret"))
        c_public, c_secret = zmq.auth.load_certificate(str(curve_dir / "private" / f"{client}.key_secret"))
        server = {zmq.CURVE_SERVER: 1, zmq.CURVE_PUBLICKEY: public, zmq.CURVE_SECRETKEY: secret}
        client_opts = {zmq.CURVE_SERVERKEY: public, zmq.CURVE_PUBLICKEY: c_public, zmq.CURVE_SECRETKEY: c_secret}
    cfg = TransportConfig()
    zctx = zmq.Context()
    pull = zctx.socket(zmq.PULL)
    for opt, value in {zmq.RCVHWM: cfg.recv_hwm, zmq.RCVTIMEO: int(timeout_s * 1000), zmq.LINGER: 0,
                       **server}.items():
        pull.setsockopt(opt, value)
    pull.bind("tcp://127.0.0.1:*")
    endpoint = pull.getsockopt_string(zmq.LAST_ENDPOINT)
    ctx = mp.get_context("spawn")
    stop = ctx.Event()
    procs = [ctx.Process(target=raw_sender, args=(endpoint, client_opts, frames, cfg.send_hwm, stop), daemon=True)
             for _ in range(n)]
    try:
        for p in procs:
            p.start()
        for _ in range(warm):
            pull.recv(copy=False)
        t0 = time.perf_counter()
        for _ in range(count):
            pull.recv(copy=False)
        return count / (time.perf_counter() - t0)
    finally:
        stop.set()
        for p in procs:
            p.join(timeout=30)
        pull.close()
        zctx.term()


# -- main -----------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true", help="print one JSON object on the last line")
    ap.add_argument("--actors", type=int, default=2, help="actor processes")
    ap.add_argument("--trees", type=int, default=20_000, help="trees measured (after the warm-up)")
    ap.add_argument("--warmup-trees", type=int, default=2_000, help="trees let through before measuring")
    ap.add_argument("--credits", type=int, default=4096, help="replay.credits_per_actor")
    ap.add_argument("--batch-trees", type=int, default=8, help="trees the taker takes at a time (replay.batch_trees)")
    ap.add_argument("--codec-seconds", type=float, default=1.0, help="each codec baseline run")
    ap.add_argument("--codec-repeats", type=int, default=3, help="codec runs before and after the transport")
    ap.add_argument("--no-raw", action="store_true", help="skip the raw ZeroMQ reference")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds any one phase may take")
    ap.add_argument("--profile", action="store_true", help="cProfile the ingest thread and actor-0 (slows both)")
    ap.add_argument("--stages", action="store_true",
                    help="CPU time of the ingest thread per call (recv, decode, path lengths, buffer.add)")
    ap.add_argument("--tiny", action="store_true", help="smoke size: 1 actor, 300 trees, short baseline")
    args = ap.parse_args(argv)
    if args.tiny:
        args.actors, args.trees, args.warmup_trees, args.codec_seconds, args.codec_repeats = 1, 300, 30, 0.2, 1
    names = [f"actor-{i}" for i in range(args.actors)]
    pool = [paper_tree(k, VOCAB, names[0]) for k in range(POOL)]  # actor 0's pool (SyntheticActor's seeds)
    frames = [encode_tree(t) for t in pool]
    prof = cProfile.Profile() if args.profile else None
    clock = StageClock() if args.stages else None
    with tempfile.TemporaryDirectory(prefix="treerpo-transport-") as tmp:
        work = Path(tmp)
        curve_dir = work / "curve"
        generate_keys(curve_dir, names)
        codecs, codec_cpu = codec_rates(pool, args)
        r = run_transport(args, work, names, prof, clock)
        if clock is not None:
            r["ingest_cpu_us_by_stage"] = clock.per_tree_us()
        actor_stats = pstats.Stats(str(work / "actor.prof")) if prof is not None else None
        alone_n = 300 if args.tiny else 4000
        r.update(ingest_alone(pool, args, alone_n))  # by call, then the total without the per-call timers
        r.update(ingest_alone(pool, args, alone_n, instrument=False))
        more, cpu = codec_rates(pool, args)
        codecs, codec_cpu = codecs + more, codec_cpu + cpu
        if not args.no_raw:
            r["raw_frames_per_s"] = raw_frames_per_s(args.actors, frames, args.trees, args.warmup_trees, None,
                                                     names[0], args.timeout)
            r["raw_curve_frames_per_s"] = raw_frames_per_s(args.actors, frames, args.trees, args.warmup_trees,
                                                           curve_dir, names[0], args.timeout)
    codec = statistics.median(codecs)
    t = pool[0]
    out = {
        "tree": {"prompt_tokens": len(t.prompt_token_ids), "branching": [2, 2, 2], "segment_tokens": 384,
                 "nodes": len(t.nodes), "tokens": len(t.prompt_token_ids) + t.num_tokens(), "bytes": len(frames[0])},
        "actors": args.actors, "credits_per_actor": args.credits, "cpus": os.cpu_count(), "curve": True,
        **r,
        "transport_mb_per_s": r["transport_trees_per_s"] * len(frames[0]) / 1e6,
        "codec_trees_per_s": codec,
        "codec_range": [min(codecs), max(codecs)],
        "codec_us_per_tree": 1e6 / codec,
        "codec_cpu_us_per_tree": statistics.median(codec_cpu),
        "cpu_ratio": statistics.median(codec_cpu) / (r["learner_cpu_us_per_tree"] + r["actor_cpu_us_per_tree"]),
        "gil_bound_trees_per_s": 1e6 / r["learner_gil_us_per_tree"],
        "gil_bound_ratio": statistics.median(codec_cpu) / r["learner_gil_us_per_tree"],
        "alone_ratio": statistics.median(codec_cpu) / r["alone_gil_us_per_tree"],
        "profiled": args.profile or args.stages,
        "ratio": r["transport_trees_per_s"] / codec,
        "target": TARGET,
    }
    print(f"tree: {out['tree']['nodes']} nodes, {out['tree']['tokens']} tokens, {out['tree']['bytes']} bytes; "
          f"{args.actors} actor process(es) -> learner ingest over CURVE on loopback; {os.cpu_count()} CPUs; "
          f"load avg {r['load_avg'][0]:.2f} -> {r['load_avg'][1]:.2f}")
    print(f"{'figure':<28}{'value':>12}")
    for key, fmt in [("transport_trees_per_s", "{:.0f}"), ("transport_mb_per_s", "{:.0f}"),
                     ("codec_trees_per_s", "{:.0f}"), ("ratio", "{:.3f}"), ("target", "{:.2f}"),
                     ("raw_frames_per_s", "{:.0f}"), ("raw_curve_frames_per_s", "{:.0f}"),
                     ("codec_us_per_tree", "{:.0f}"), ("codec_cpu_us_per_tree", "{:.0f}"),
                     ("learner_cpu_us_per_tree", "{:.0f}"), ("learner_gil_us_per_tree", "{:.0f}"),
                     ("actor_cpu_us_per_tree", "{:.0f}"), ("cpu_ratio", "{:.3f}"),
                     ("gil_bound_trees_per_s", "{:.0f}"), ("gil_bound_ratio", "{:.3f}"),
                     ("alone_gil_us_per_tree", "{:.0f}"), ("alone_ratio", "{:.3f}"),
                     ("actor_blocked_fraction", "{:.2f}"),
                     ("measured_trees", "{:d}"), ("exact", "{}")]:
        if key in out:
            print(f"{key:<28}{fmt.format(out[key]):>12}")
    for side in ("learner", "actor"):
        parts = ", ".join(f"{k} {v:.0f}" for k, v in sorted(out[f"{side}_cpu_us_by_thread"].items()))
        print(f"{side} CPU us/tree by thread: {parts}")
    if clock is not None:
        print("ingest thread CPU us/tree by call (--stages): "
              + ", ".join(f"{k} {v:.1f}" for k, v in r["ingest_cpu_us_by_stage"].items()))
    print("ingest loop alone, CPU us/tree by call: "
          + ", ".join(f"{k} {v:.1f}" for k, v in r["alone_ingest_us_by_call"].items())
          + f"; take {r['alone_take_us_per_tree']:.1f}")
    if prof is not None:
        print("(--profile: the ingest thread and actor-0 ran under cProfile, so the rates above are low)")
        print("== learner ingest thread ==")
        pstats.Stats(prof).sort_stats("tottime").print_stats(20)
        print("== actor-0 main thread ==")
        actor_stats.sort_stats("tottime").print_stats(20)
    if args.json:
        print(json.dumps(out))


if __name__ == "__main__":
    main()
