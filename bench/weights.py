"""Weight-sync throughput: treerpo's bucketed sync vs one plain broadcast of a flat buffer (gloo, CPU).

What is timed (learner clock, median of --reps after --warmup syncs, i.e. steady state):
* treerpo, the system's configuration (default weights.bucket_mb, SOLO_BYTES, actor installs by
  swap as `HFEngine.swap_in` does): `WeightPublisher.broadcast` of a transformer-shaped list of
  float32 tensors (group rendezvous + buckets: large tensors sent from their own memory, small
  ones flattened) until the receiver process reports that every bucket arrived and its
  parameters were rebound to them (`WeightReceiver.receive(..., swap_fn=...)`).
  * "sync": weights.checksum off -> `ratio`;
  * "sync + checksum": weights.checksum on (the config default) -> `ratio_checksum`, XXH3-128 of
    every tensor on both sides, overlapped with the wire;
  * "copy load": for reference, the receiver copies into its parameters (load_weights path, the
    one vLLM actors take) with checksum off -> `ratio_copy`.
* baseline: on a fresh gloo group of the same store, ONE `broadcast` of a single flat float32
  buffer of the same size (allocated once, reused), until the receiver reports it arrived (no
  rendezvous, no install).

ratio = baseline seconds / treerpo seconds (= treerpo GB/s / baseline GB/s); target 0.8.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.config import WeightsConfig  # noqa: E402
from weightsync.buckets import broadcast_bucket, wait_work  # noqa: E402
from weightsync.errors import Deadline  # noqa: E402
from weightsync.group import make_group  # noqa: E402
from weightsync.publisher import SOLO_BYTES, WeightPublisher  # noqa: E402
from weightsync.receiver import WeightReceiver  # noqa: E402


def transformer_shapes(vocab: int, hidden: int, layers: int, ffn: int) -> list[tuple[str, list[int]]]:
    """Parameter shapes of a Llama/Qwen-like decoder (tied embeddings)."""
    shapes = [("embed_tokens.weight", [vocab, hidden])]
    for i in range(layers):
        p = f"layers.{i}."
        shapes += [(p + "input_layernorm.weight", [hidden]), (p + "q_proj.weight", [hidden, hidden]),
                   (p + "k_proj.weight", [hidden, hidden]), (p + "v_proj.weight", [hidden, hidden]),
                   (p + "o_proj.weight", [hidden, hidden]), (p + "post_attention_layernorm.weight", [hidden]),
                   (p + "gate_proj.weight", [ffn, hidden]), (p + "up_proj.weight", [ffn, hidden]),
                   (p + "down_proj.weight", [hidden, ffn])]
    return shapes + [("norm.weight", [hidden])]


def _receiver(conn, shapes, host: str, port: int) -> None:
    torch.set_num_threads(1)
    params = {n: torch.nn.Parameter(torch.zeros(s), requires_grad=False) for n, s in shapes}
    flat = torch.empty(sum(p.numel() for p in params.values()))
    lock = threading.Lock()  # the engine lock swap_in / load_weights take
    receivers = {mode: WeightReceiver(checksum=mode == "checksum") for mode in ("plain", "checksum", "copy")}

    def load(named) -> None:  # HFEngine.load_weights: copy in place
        with lock, torch.no_grad():
            for name, t in named:
                params[name].data.copy_(t)

    def swap(named) -> bool:  # HFEngine.swap_in: validate, then rebind every parameter under the lock
        pairs = [(params[name], t) for name, t in named]
        if any(p.shape != t.shape or p.dtype != t.dtype for p, t in pairs):
            return False
        with lock:
            for p, t in pairs:
                p.data = t
        return True

    while True:
        cmd = conn.recv()
        if cmd[0] == "stop":
            return
        if cmd[0] == "sync":
            announce, mode = cmd[1], cmd[2]
            digest, seconds = receivers[mode].receive(announce, load, read_back=lambda: params.items(),
                                                      swap_fn=None if mode == "copy" else swap)
            conn.send(("done", digest, seconds))
        elif cmd[0] == "baseline_group":
            pg = make_group(host, port, cmd[1], 1, 2, 120.0, "gloo", secret=None)  # bare torch
            conn.send(("ready",))
        elif cmd[0] == "baseline":
            wait_work(broadcast_bucket(pg, flat, Deadline(120.0), "baseline"), Deadline(120.0), "gloo", "baseline")
            conn.send(("done",))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--ffn", type=int, default=3072)
    ap.add_argument("--bucket-mb", type=float, default=None, help="default: weights.bucket_mb's default")
    ap.add_argument("--solo-mb", type=float, default=None, help="default: weightsync.publisher.SOLO_BYTES")
    ap.add_argument("--modes", default="plain,checksum,copy", help="which treerpo syncs to time")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2, help="syncs before timing (the receiver's two buffer sets)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    torch.set_num_threads(1)
    shapes = transformer_shapes(args.vocab, args.hidden, args.layers, args.ffn)
    g = torch.Generator().manual_seed(0)
    named = [(n, torch.randn(s, generator=g)) for n, s in shapes]
    numel = sum(t.numel() for _, t in named)
    nbytes = numel * 4
    bucket_mb = WeightsConfig().bucket_mb if args.bucket_mb is None else args.bucket_mb
    solo = SOLO_BYTES if args.solo_mb is None else int(args.solo_mb * (1 << 20))

    pubs = {c: WeightPublisher(WeightsConfig(backend="gloo", rendezvous_port=0, bucket_mb=bucket_mb, timeout_s=300.0,
                                             checksum=c), "127.0.0.1", solo_bytes=solo) for c in (False, True)}
    ctx = mp.get_context("spawn")
    conn, child_conn = ctx.Pipe()
    # One receiver process; it talks to the checksum-off publisher's store for the baseline too.
    proc = ctx.Process(target=_receiver, args=(child_conn, shapes, "127.0.0.1", pubs[False].port), daemon=True)
    proc.start()

    def sync_once(mode: str) -> float:
        pub = pubs[mode == "checksum"]
        sync = pub.prepare(pub.plan(named, version=1), ["r0"])
        t0 = time.perf_counter()
        conn.send(("sync", sync.announcements[0], mode))
        result = pub.broadcast(sync, iter(named))
        reply = conn.recv()
        dt = time.perf_counter() - t0
        assert result.ok, result.error
        assert reply[1] == result.checksum, "receiver checksum differs from the learner's"
        return dt

    # Baseline: one flat buffer, one broadcast, on a group of the same type and store that stays
    # open. The four measurements take turns, so a change of machine load hits them alike.
    flat = torch.cat([t.reshape(-1) for _, t in named])
    conn.send(("baseline_group", "baseline-0"))
    pg = make_group("127.0.0.1", pubs[False].port, "baseline-0", 0, 2, 120.0, "gloo", secret=None,
                    store=pubs[False].store)
    assert conn.recv() == ("ready",)

    def baseline_once() -> float:
        t0 = time.perf_counter()
        conn.send(("baseline",))
        wait_work(broadcast_bucket(pg, flat, Deadline(120.0), "baseline"), Deadline(120.0), "gloo", "baseline")
        assert conn.recv() == ("done",)
        return time.perf_counter() - t0

    base: list[float] = []
    modes = [m for m in args.modes.split(",") if m]
    if "plain" not in modes or not set(modes) <= {"plain", "checksum", "copy"}:
        raise SystemExit(f"--modes must include plain and name only plain, checksum, copy; got {args.modes!r}")
    times: dict[str, list[float]] = {mode: [] for mode in modes}
    for _ in range(args.warmup + args.reps):
        base.append(baseline_once())
        for mode, got in times.items():
            got.append(sync_once(mode))
    conn.send(("stop",))
    proc.join(30)
    pg = flat = None  # drop the group and its buffer before the stores close (baseline_once holds the names)
    for pub in pubs.values():  # their TCPStores: stopped now, not torn down at interpreter exit
        pub.close()

    med = lambda x: statistics.median(x[args.warmup:])  # noqa: E731
    b = med(base)
    secs = {mode: med(x) for mode, x in times.items()}
    gb = nbytes / 1e9
    plan = pubs[False].plan(named, version=1)
    labels = {"plain": "treerpo sync, swap install", "checksum": "treerpo sync, swap + XXH3 both sides",
              "copy": "treerpo sync, copy install (reference)"}
    print(f"model: {numel / 1e6:.1f}M float32 params = {gb:.3f} GB; {len(plan.buckets)} buckets "
          f"(bucket_mb {bucket_mb}, solo >= {pubs[False].solo_bytes} B); gloo, 1 receiver; "
          f"median of {args.reps} after {args.warmup} warm-up")
    print(f"{'what':44s} {'seconds':>9s} {'GB/s':>8s} {'ratio':>7s}")
    for name, sec in [("baseline: one flat dist.broadcast", b)] + [(labels[m], secs[m]) for m in modes]:
        print(f"{name:44s} {sec:9.3f} {gb / sec:8.3f} {b / sec:7.3f}")
    default_checksum = WeightsConfig().checksum
    print(f"ratio (baseline s / treerpo s; checksum off, swap install) = {b / secs['plain']:.3f}  (target 0.8); "
          f"first (cold) sync {times['plain'][0]:.3f} s")
    print(f"note: weights.checksum defaults to {default_checksum} (presets do not override it): the system as "
          f"configured by default runs the '{'swap + XXH3' if default_checksum else 'swap install'}' row")
    if args.json:
        out = {"bench": "weights", "params": numel, "bytes": nbytes, "bucket_mb": bucket_mb,
               "solo_bytes": pubs[False].solo_bytes, "buckets": len(plan.buckets), "baseline_seconds": b,
               "baseline_gbps": gb / b, "cold_sync_seconds": times["plain"][0],
               "headline": "ratio: checksum off, swap install", "config_default_checksum": default_checksum}
        for mode in modes:
            key = {"plain": "sync", "checksum": "sync_checksum", "copy": "sync_copy"}[mode]
            out.update({f"{key}_seconds": secs[mode], f"{key}_gbps": gb / secs[mode],
                        f"ratio{key.removeprefix('sync')}": b / secs[mode]})
        # Each round times the baseline and then every mode back to back; the median over rounds of
        # that round's ratio is less sensitive to the machine's load changing between rounds.
        paired = statistics.median(x / y for x, y in zip(base[args.warmup:], times["plain"][args.warmup:], strict=True))
        out.update({"ratio_paired": paired, "ratio": b / secs["plain"], "target": 0.8})
        print(json.dumps(out))

if __name__ == "__main__":
    main()
