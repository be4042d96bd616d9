"""Weight-sync throughput: treerpo's bucketed sync vs one plain broadcast of a flat buffer (gloo, CPU).

What is timed (learner clock, median of --reps after one warm-up):
* treerpo: `WeightPublisher.broadcast` of a transformer-shaped list of float32 tensors (group
  rendezvous + flatten into buckets + broadcast) until the receiver process reports that it
  received every bucket and copied it in place into its own parameters (`WeightReceiver.receive`
  with an in-place load_fn). Run with checksums off (the `ratio`) and on (reported separately).
* baseline: on a fresh gloo group of the same store, ONE `broadcast` of a single flat float32
  buffer of the same size, until the receiver reports it arrived (no rendezvous, no load).

ratio = baseline seconds / treerpo seconds (= treerpo GB/s / baseline GB/s); target 0.8.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import time


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
    import torch

    from actor.weights import WeightReceiver
    from common.weightsync import broadcast_bucket, Deadline, make_group, wait_work

    torch.set_num_threads(1)
    params = {n: torch.zeros(s) for n, s in shapes}
    flat = torch.empty(sum(p.numel() for p in params.values()))
    checksum_receiver = WeightReceiver(checksum=True)
    plain_receiver = WeightReceiver(checksum=False)

    def load(named) -> None:
        for name, t in named:
            params[name].copy_(t)

    while True:
        cmd = conn.recv()
        if cmd[0] == "stop":
            return
        if cmd[0] == "sync":
            announce, checksum = cmd[1], cmd[2]
            rec = checksum_receiver if checksum else plain_receiver
            digest, seconds = rec.receive(announce, load, read_back=lambda: params.items())
            conn.send(("done", digest, seconds))
        elif cmd[0] == "baseline":
            pg = make_group(host, port, cmd[1], 1, 2, 120.0, "gloo")
            conn.send(("ready",))
            for _ in range(cmd[2]):
                wait_work(broadcast_bucket(pg, flat, Deadline(120.0), "baseline"), Deadline(120.0), "gloo", "baseline")
                conn.send(("done",))
            del pg


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--ffn", type=int, default=3072)
    ap.add_argument("--bucket-mb", type=float, default=256.0)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    import torch

    from common.config import WeightsConfig
    from common.weightsync import Deadline, broadcast_bucket, make_group, wait_work
    from learner.weights import WeightPublisher

    torch.set_num_threads(1)
    shapes = transformer_shapes(args.vocab, args.hidden, args.layers, args.ffn)
    g = torch.Generator().manual_seed(0)
    named = [(n, torch.randn(s, generator=g)) for n, s in shapes]
    numel = sum(t.numel() for _, t in named)
    nbytes = numel * 4

    pubs = {c: WeightPublisher(WeightsConfig(backend="gloo", rendezvous_port=0, bucket_mb=args.bucket_mb,
                                             timeout_s=300.0, checksum=c), "127.0.0.1") for c in (False, True)}
    ctx = mp.get_context("spawn")
    conn, child_conn = ctx.Pipe()
    # One receiver process; it talks to the checksum-off publisher's store for the baseline too.
    proc = ctx.Process(target=_receiver, args=(child_conn, shapes, "127.0.0.1", pubs[False].port), daemon=True)
    proc.start()

    def sync_once(checksum: bool) -> float:
        pub = pubs[checksum]
        sync = pub.prepare(pub.plan(named, version=1), ["r0"])
        t0 = time.perf_counter()
        conn.send(("sync", sync.announcements[0], checksum))
        result = pub.broadcast(sync, iter(named))
        reply = conn.recv()
        dt = time.perf_counter() - t0
        assert result.ok, result.error
        assert reply[1] == result.checksum, "receiver checksum differs from the learner's"
        return dt

    # Baseline: one flat buffer, one broadcast, same group type and store.
    flat = torch.cat([t.reshape(-1) for _, t in named])
    conn.send(("baseline", "baseline-0", args.reps + 1))
    pg = make_group("127.0.0.1", pubs[False].port, "baseline-0", 0, 2, 120.0, "gloo", store=pubs[False].store)
    assert conn.recv() == ("ready",)
    base = []
    for _ in range(args.reps + 1):
        t0 = time.perf_counter()
        wait_work(broadcast_bucket(pg, flat, Deadline(120.0), "baseline"), Deadline(120.0), "gloo", "baseline")
        assert conn.recv() == ("done",)
        base.append(time.perf_counter() - t0)
    del pg, flat

    plain = [sync_once(False) for _ in range(args.reps + 1)]
    summed = [sync_once(True) for _ in range(args.reps + 1)]
    conn.send(("stop",))
    proc.join(30)

    b, p, c = (statistics.median(x[1:]) for x in (base, plain, summed))
    gb = nbytes / 1e9
    rows = [("baseline: one flat dist.broadcast", b), ("treerpo sync + in-place load", p),
            ("treerpo sync + load + sha256 both sides", c)]
    print(f"model: {numel / 1e6:.1f}M float32 params = {gb:.3f} GB; buckets {args.bucket_mb} MiB; "
          f"gloo, 1 receiver; median of {args.reps}")
    print(f"{'what':44s} {'seconds':>9s} {'GB/s':>8s}")
    for name, s in rows:
        print(f"{name:44s} {s:9.3f} {gb / s:8.3f}")
    ratio = b / p
    print(f"ratio (baseline s / treerpo s) = {ratio:.3f}  (target 0.8)")
    if args.json:
        print(json.dumps({"bench": "weights", "params": numel, "bytes": nbytes, "bucket_mb": args.bucket_mb,
                          "baseline_seconds": b, "sync_seconds": p, "sync_checksum_seconds": c,
                          "baseline_gbps": gb / b, "sync_gbps": gb / p, "sync_checksum_gbps": gb / c,
                          "ratio": ratio, "target": 0.8}))


if __name__ == "__main__":
    main()
