"""Learner step time, flat vs tree packing, on depth-3 [2, 2, 2] trees (design §10 bench format).

One step = pack the trees + TreeRPO forward + backward over every micro-batch (no optimizer step:
AdamW costs the same in both layouts and would only dilute the difference). Both layouts put
one tree per micro-batch: flat = its 8 paths as 8 causal rows (SDPA's is_causal fast path, no
mask), tree = one row attended with `--tree-attention` (auto = the span kernel of
learner/attention.py on CPU; mask = the dense additive tree mask, also timed as `tree_mask`).

    ceiling  = flat tokens / tree tokens         (from the layouts: the work tree packing skips)
    speed-up = flat step time / tree step time   (medians of --reps interleaved steps after a warm-up)
    ratio    = speed-up / ceiling                target 0.7

The ceiling counts tokens; attention work shrinks less (flat computes 8 x 640²/2 causal scores
per tree, the tree its ~0.92 M allowed ones: 1.8x), so with the tiny model, where attention is
most of the cost, even an ideal tree kernel stays below ratio 1. `--profile` splits the tree
step: mask/plan construction, fwd+bwd of the tree row vs the same row under a plain causal mask.
`--json` prints one JSON object on the last line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, installed or not

from wire import level_parents  # noqa: E402 -- bench/ is on sys.path: this script runs from it

from common.config import AdvantageConfig, LossConfig  # noqa: E402
from common.tree import Node, ReasoningTree, new_tree_id  # noqa: E402
from learner.logprobs import attention_inputs, resolve_tree_attention, token_logprobs  # noqa: E402
from learner.loss import LossInputs, treerpo_loss  # noqa: E402
from learner.packing import pack_trees  # noqa: E402
from treerpo.tinymodel import build_tiny_model  # noqa: E402


def make_tree(rng, prompt_tokens: int, segment_tokens: int, branching: list[int], vocab: int):
    parents = level_parents(branching)
    has_child = {p for p in parents if p >= 0}
    nodes = [
        Node(parent=p, token_ids=rng.integers(3, vocab, segment_tokens).astype(np.int32),
             logprobs=(-rng.random(segment_tokens) * 2 - 0.01).astype(np.float32), version=0,
             finish="segment" if i in has_child else "stop",
             reward=None if i in has_child else float(rng.integers(0, 2)))
        for i, p in enumerate(parents)
    ]
    return ReasoningTree(tree_id=new_tree_id(), prompt_id="bench", actor_id="bench",
                         prompt_token_ids=rng.integers(3, vocab, prompt_tokens).astype(np.int32), nodes=nodes)


def step(model, trees, mode: str, row_tokens: int, rows: int, loss_cfg, adv_cfg, tree_attention: str = "auto"):
    """Pack + forward + backward of the whole step; returns (seconds, tokens processed)."""
    t0 = time.perf_counter()
    batches = pack_trees(trees, adv_cfg, mode, row_tokens, learner_version=0, max_batch_rows=rows)
    total = sum(b.num_trainable_tokens for b in batches)
    for b in batches:
        lp = token_logprobs(model, b, 1.0, tree_attention=tree_attention)
        prox = lp.detach() + 0.01
        loss, _ = treerpo_loss(LossInputs(lp, prox, b.behaviour_logprobs, b.advantages, b.loss_mask,
                                          normalizer=total), loss_cfg)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - t0, sum(b.num_tokens for b in batches)


def profile_tree(model, trees, row_tokens: int, adv_cfg, reps: int, tree_attention: str) -> dict[str, float]:
    """Where a tree step's time goes: mask/plan build, fwd+bwd of the tree row vs a causal mask."""
    t0 = time.perf_counter()
    batches = pack_trees(trees, adv_cfg, "tree", row_tokens, learner_version=0)
    pack_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    inputs = [attention_inputs(model, b, tree_attention) for b in batches]
    mask_s = time.perf_counter() - t0

    density = sum(float(b.allowed().float().mean()) for b in batches) / len(batches)
    plans = [i["treerpo_spans"] for i in inputs if "treerpo_spans" in i]
    work = sum(p.work for p in plans) / sum(p.batch * p.length ** 2 for p in plans) if plans else 1.0

    def fwd_bwd(tree: bool) -> float:
        # the causal probe also gets contiguous positions, else HF infers packed sequences from them
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            for b, kw in zip(batches, inputs, strict=True):
                pos = b.position_ids if tree else torch.arange(b.input_ids.shape[1])[None]
                out = model(input_ids=b.input_ids, position_ids=pos, use_cache=False,
                            **(kw if tree else {"attention_mask": None}))
                out.logits.float().logsumexp(-1).sum().backward()
            model.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    return {"tree_attention": resolve_tree_attention(model, tree_attention), "pack_s": pack_s,
            "mask_or_plan_build_s": mask_s, "tree_mask_density": density, "scores_computed_vs_dense": work,
            "fwd_bwd_tree_s": fwd_bwd(True), "fwd_bwd_causal_mask_s": fwd_bwd(False)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trees", type=int, default=2, help="trees per step")
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--segment-tokens", type=int, default=128)
    ap.add_argument("--branching", type=str, default="2,2,2")
    ap.add_argument("--hidden-size", type=int, default=64, help="tiny model width (64 = the tests' tiny model)")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--attn", choices=["sdpa", "eager"], default="sdpa")
    ap.add_argument("--tree-attention", choices=["auto", "span", "mask"], default="auto",
                    help="how the tree row is attended (learner.tree_attention)")
    ap.add_argument("--no-mask-baseline", action="store_true", help="skip timing the tree row with the dense mask")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--profile", action="store_true", help="also profile the tree step")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    branching = [int(x) for x in args.branching.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        build_tiny_model(tmp, hidden_size=args.hidden_size, num_layers=args.layers,
                         max_position_embeddings=8192)
        model = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32, attn_implementation=args.attn)
    model.train()
    rng = np.random.default_rng(0)
    trees = [make_tree(rng, args.prompt_tokens, args.segment_tokens, branching, 90) for _ in range(args.trees)]
    path_len = args.prompt_tokens + args.segment_tokens * len(branching)
    tree_len = args.prompt_tokens + trees[0].num_tokens()
    leaves = len(trees[0].leaves())
    # name: (packing mode, row tokens, rows per micro-batch, tree attention)
    layouts = {"flat": ("flat", path_len, leaves, "auto"), "tree": ("tree", tree_len, 1, args.tree_attention)}
    if not args.no_mask_baseline:
        layouts["tree_mask"] = ("tree", tree_len, 1, "mask")
    adv_cfg, loss_cfg = AdvantageConfig(), LossConfig()

    tree_attention = resolve_tree_attention(model, args.tree_attention)
    times: dict[str, list[float]] = {name: [] for name in layouts}
    tokens: dict[str, int] = {}
    for rep in range(args.reps + 1):  # rep 0 warms up; layouts alternate so a busy machine hits all alike
        for name, (mode, row_tokens, rows, attention) in layouts.items():
            s, tokens[name] = step(model, trees, mode, row_tokens, rows, loss_cfg, adv_cfg, attention)
            if rep:
                times[name].append(s)
    results = {name: {"step_s": statistics.median(t), "tokens": tokens[name]} for name, t in times.items()}
    speedup = results["flat"]["step_s"] / results["tree"]["step_s"]
    ceiling = results["flat"]["tokens"] / results["tree"]["tokens"]
    out = {
        "bench": "packing", "model": f"tiny qwen2 h={args.hidden_size} L={args.layers} {args.attn} fp32 cpu",
        "trees": args.trees, "branching": branching, "prompt_tokens": args.prompt_tokens,
        "segment_tokens": args.segment_tokens, "threads": args.threads, "timed": "pack+fwd+bwd, no optimizer",
        "tree_attention": tree_attention,
        "flat_step_s": results["flat"]["step_s"], "tree_step_s": results["tree"]["step_s"],
        "flat_tokens": results["flat"]["tokens"], "tree_tokens": results["tree"]["tokens"],
        "speedup": speedup, "ceiling": ceiling, "ratio": speedup / ceiling, "target": 0.7,
    }
    if "tree_mask" in results:  # the dense-mask tree row, for comparison (the pre-span-kernel figure)
        out["tree_mask_step_s"] = results["tree_mask"]["step_s"]
        out["tree_mask_ratio"] = results["flat"]["step_s"] / results["tree_mask"]["step_s"] / ceiling
    if args.profile:
        out["profile"] = profile_tree(model, trees, tree_len, adv_cfg, args.reps, args.tree_attention)

    print(f"packing bench: {out['model']}, {args.trees} trees {branching}, prompt {args.prompt_tokens}, "
          f"segments {args.segment_tokens}, {args.threads} thread(s), timed: {out['timed']}")
    print(f"{'layout':<11}{'attention':>10}{'tokens':>10}{'step s':>10}")
    for name, (_, _, _, attention) in layouts.items():
        shown = "causal" if name == "flat" else resolve_tree_attention(model, attention)
        print(f"{name:<11}{shown:>10}{results[name]['tokens']:>10}{results[name]['step_s']:>10.3f}")
    print(f"speed-up {speedup:.2f}x   ceiling {ceiling:.2f}x   ratio {out['ratio']:.2f} (target 0.7)"
          + (f"   [dense-mask tree: ratio {out['tree_mask_ratio']:.2f}]" if "tree_mask_ratio" in out else ""))
    for k, v in out.get("profile", {}).items():
        print(f"  profile {k:<26}{v:>8.3f}" if isinstance(v, float) else f"  profile {k:<26}{v:>8}")
    if args.json:
        print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
