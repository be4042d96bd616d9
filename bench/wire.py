"""Wire codec throughput: encode + validated decode of a realistic tree vs. a plain memory copy.

The tree: 512-token prompt, depth 3, branching [2, 2, 2], 384-token segments (14 nodes, 5376
generated tokens, ~45 KB on the wire). Figures:
  wire    = frame bytes / (encode + decode_tree(vocab_size=...) seconds)   [GB/s, trees/s]
  memcpy  = the same bytes / seconds of np.copyto into a preallocated buffer [GB/s]
  ratio   = wire GB/s / memcpy GB/s  (same run, same bytes); target 0.2
  validate_us = ReasoningTree.validate alone (what the actor runs before sending; decode runs
                the same rules, common.tree.validate_flat, on the decoded arrays)
  batch_*     = the same over --batch distinct trees (different buffers, as a stream of trees
                arrives): wire seconds per tree, and memcpy of all buffers into distinct
                destinations, which no longer stays in the L1/L2 cache; batch_ratio is the
                wire/memcpy ratio of that mode. An extra figure: "ratio" stays the one above.
Each figure is the median over --repeats timed batches of --iters operations.

    python bench/wire.py [--json] [--iters 2000] [--repeats 7] [--batch 256] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.tree import Node, ReasoningTree, new_tree_id  # noqa: E402
from common.wire import decode_tree, encode_tree  # noqa: E402

TARGET = 0.2
VOCAB = 151_936  # Qwen2 vocabulary


def level_parents(branching) -> list[int]:
    """Parent index of every node of a full tree with per-level `branching`, breadth-first (-1: the root)."""
    parents, level = [], [-1]
    for b in branching:
        nxt = []
        for p in level:
            for _ in range(b):
                parents.append(p)
                nxt.append(len(parents) - 1)
        level = nxt
    return parents


def realistic_tree(seed: int = 0, prompt_len: int = 512, branching=(2, 2, 2), seg_len: int = 384) -> ReasoningTree:
    rng = np.random.default_rng(seed)
    parents = level_parents(branching)
    inner = {p for p in parents if p >= 0}
    nodes = [
        Node(
            parent=p,
            token_ids=rng.integers(0, VOCAB, seg_len).astype(np.int32),
            logprobs=(-rng.random(seg_len) * 5).astype(np.float32),
            version=7,
            finish="segment" if i in inner else "stop",
            reward=None if i in inner else float(rng.integers(0, 2)),
        )
        for i, p in enumerate(parents)
    ]
    return ReasoningTree(
        tree_id=new_tree_id(),
        prompt_id="math-00042",
        actor_id="actor-0",
        prompt_token_ids=rng.integers(0, VOCAB, prompt_len).astype(np.int32),
        nodes=nodes,
        meta={"incarnation": 3, "task": "math", "answer_id": "a42", "timings": {"generate_s": 1.25, "reward_s": 0.01}},
    ).validate(VOCAB)


def _seconds_per_call(fn, iters: int, repeats: int, pick=statistics.median) -> float:
    """Seconds per call: `pick` (default the median) over `repeats` timed batches of `iters` calls."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        times.append((time.perf_counter() - t0) / iters)
    return pick(times)


def run_batch(batch: int, repeats: int) -> dict:
    """Encode + decode of `batch` distinct trees vs. memcpy of their buffers to distinct places."""
    trees = [realistic_tree(seed) for seed in range(batch)]
    bufs = [encode_tree(t) for t in trees]
    srcs = [np.frombuffer(b, dtype=np.uint8) for b in bufs]
    dsts = [np.empty_like(s) for s in srcs]

    def wire() -> None:
        for t in trees:
            encode_tree(t)
        for b in bufs:
            decode_tree(b, vocab_size=VOCAB)

    def copy() -> None:
        for s, d in zip(srcs, dsts, strict=True):
            np.copyto(d, s)

    wire_s = _seconds_per_call(wire, 1, repeats) / batch
    copy_s = _seconds_per_call(copy, 1, repeats) / batch
    nbytes = sum(len(b) for b in bufs) / batch
    return {
        "batch_trees": batch,
        "batch_wire_us_per_tree": wire_s * 1e6,
        "batch_wire_gb_per_s": nbytes / wire_s / 1e9,
        "batch_memcpy_gb_per_s": nbytes / copy_s / 1e9,
        "batch_ratio": copy_s / wire_s,
    }


def run(iters: int, repeats: int) -> dict:
    tree = realistic_tree()
    buf = encode_tree(tree)
    nbytes = len(buf)
    src = np.frombuffer(buf, dtype=np.uint8)
    dst = np.empty_like(src)

    enc_s = _seconds_per_call(lambda: encode_tree(tree), iters, repeats)
    dec_s = _seconds_per_call(lambda: decode_tree(buf, vocab_size=VOCAB), iters, repeats)
    copy_s = _seconds_per_call(lambda: np.copyto(dst, src), iters * 10, repeats)
    validate_s = _seconds_per_call(lambda: tree.validate(VOCAB), iters, repeats)  # share of decode
    wire_s = enc_s + dec_s
    wire_gbs = nbytes / wire_s / 1e9
    copy_gbs = nbytes / copy_s / 1e9
    return {
        "bytes_per_tree": nbytes,
        "nodes": len(tree.nodes),
        "tokens": tree.num_tokens() + len(tree.prompt_token_ids),
        "encode_us": enc_s * 1e6,
        "decode_us": dec_s * 1e6,
        "validate_us": validate_s * 1e6,
        "trees_per_s": 1.0 / wire_s,
        "wire_gb_per_s": wire_gbs,
        "memcpy_gb_per_s": copy_gbs,
        "ratio": wire_gbs / copy_gbs,
        "target": TARGET,
    }


def profile(iters: int) -> None:
    tree = realistic_tree()
    buf = encode_tree(tree)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(iters):
        decode_tree(encode_tree(tree), vocab_size=VOCAB)
    prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(20)
    del buf


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true", help="print one JSON object on the last line")
    ap.add_argument("--iters", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--batch", type=int, default=256, help="distinct trees in the batch mode (0: skip it)")
    ap.add_argument("--profile", action="store_true", help="cProfile encode+decode instead of timing")
    args = ap.parse_args(argv)
    if args.profile:
        profile(args.iters)
        return
    r = run(args.iters, args.repeats)
    if args.batch > 0:
        r.update(run_batch(args.batch, args.repeats))
    print(f"tree: {r['nodes']} nodes, {r['tokens']} tokens, {r['bytes_per_tree']} bytes on the wire")
    print(f"{'figure':<22}{'value':>14}")
    for key, fmt in [
        ("encode_us", "{:.1f}"),
        ("decode_us", "{:.1f}"),
        ("validate_us", "{:.1f}"),
        ("trees_per_s", "{:.0f}"),
        ("wire_gb_per_s", "{:.3f}"),
        ("memcpy_gb_per_s", "{:.3f}"),
        ("ratio", "{:.4f}"),
        ("target", "{:.2f}"),
        ("batch_trees", "{:d}"),
        ("batch_wire_us_per_tree", "{:.1f}"),
        ("batch_memcpy_gb_per_s", "{:.3f}"),
        ("batch_ratio", "{:.4f}"),
    ]:
        if key not in r:
            continue
        print(f"{key:<22}{fmt.format(r[key]):>14}")
    if args.json:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
