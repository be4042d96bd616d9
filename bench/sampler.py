"""Tree sampler throughput against flat (GRPO) sampling of the same number of leaves.

Both run through `TreeSampler` on the same HF engine and tiny model in the same process:
tree = depth D with branching b; flat = depth 1 with branching [prod(b)] and the same total
budget. Figures: generated tokens per second (each node's tokens counted once, wall time of
`sample()` including scoring), generated tokens per leaf, and

    ratio = median over call pairs of tree tok/s / flat tok/s        (target 0.8)

The tree generates fewer tokens per leaf (shared prefixes), but early levels decode fewer rows
at a time, so its tokens/s is lower; the ratio measures that cost.

    python bench/sampler.py [--prompts 8] [--branching 2,2,2] [--segment-tokens 32] [--max-tokens 128] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=8, help="prompts expanded together per sample() call")
    ap.add_argument("--branching", default="2,2,2", help="tree branching per level, comma separated")
    ap.add_argument("--segment-tokens", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5, help="timed (tree, flat) call pairs; medians reported")
    ap.add_argument("--hidden", type=int, default=64, help="tiny model hidden size")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--json", action="store_true", help="print one JSON object on the last line")
    return ap.parse_args(argv)


def one_call(sampler, prompts) -> tuple[float, float]:
    """(generated tokens per second, generated tokens per leaf) of one sample() call."""
    t0 = time.perf_counter()
    trees = sampler.sample(prompts)
    dt = time.perf_counter() - t0
    tokens = sum(t.num_tokens() for t in trees)
    return tokens / dt, tokens / sum(len(t.leaves()) for t in trees)


def run_interleaved(engine, cfgs: dict, prompts, reward, repeats: int) -> dict[str, dict[str, float]]:
    """Alternate the modes call by call, so load from other processes hits both alike."""
    from actor.sampler import TreeSampler

    samplers = {name: TreeSampler(engine, cfg, reward, "bench", seed=0) for name, cfg in cfgs.items()}
    for sampler in samplers.values():
        sampler.sample(prompts[:2])  # warm-up
    rates = {name: [] for name in cfgs}
    per_leaf = {name: [] for name in cfgs}
    ratios = []
    for _ in range(repeats):
        for name, sampler in samplers.items():
            rate, leaf = one_call(sampler, prompts)
            rates[name].append(rate)
            per_leaf[name].append(leaf)
        ratios.append(rates["tree"][-1] / rates["flat"][-1])
    out = {name: {"tok_s": statistics.median(rates[name]), "tokens_per_leaf": statistics.mean(per_leaf[name]),
                  "engine_calls": len(cfgs[name].branching)} for name in cfgs}
    out["ratio"] = {"median": statistics.median(ratios)}
    return out


def main(argv=None) -> dict:
    args = parse_args(argv)
    import numpy as np
    import torch

    from actor.engine import make_engine
    from common.config import ActorConfig, ModelConfig, TreeConfig
    from common.rewards import make_reward
    from common.tinymodel import build_tiny_model

    torch.set_num_threads(args.threads)
    branching = [int(b) for b in args.branching.split(",")]
    leaves = int(np.prod(branching))
    tree_cfg = TreeConfig(depth=len(branching), branching=branching, segment_tokens=args.segment_tokens,
                          max_tokens=args.max_tokens)
    flat_cfg = TreeConfig(depth=1, branching=[leaves], segment_tokens=args.segment_tokens, max_tokens=args.max_tokens)
    with tempfile.TemporaryDirectory() as tmp:
        path = build_tiny_model(Path(tmp) / "tiny", hidden_size=args.hidden)
        engine = make_engine(ModelConfig(path=str(path), device="cpu"), ActorConfig())
        tok = engine.tokenizer
        prompts = [_prompt(i, f"{10 + i}+{20 + 2 * i}=", tok) for i in range(args.prompts)]
        reward = make_reward("arithmetic")
        try:
            res = run_interleaved(engine, {"tree": tree_cfg, "flat": flat_cfg}, prompts, reward, args.repeats)
        finally:
            reward.close()
    tree, flat, ratio = res["tree"], res["flat"], res["ratio"]["median"]  # median of per-pair ratios
    result = {
        "bench": "sampler", "prompts": args.prompts, "branching": branching, "leaves_per_tree": leaves,
        "segment_tokens": args.segment_tokens, "max_tokens": args.max_tokens,
        "tree_tok_s": round(tree["tok_s"], 1), "flat_tok_s": round(flat["tok_s"], 1),
        "tree_tokens_per_leaf": round(tree["tokens_per_leaf"], 2),
        "flat_tokens_per_leaf": round(flat["tokens_per_leaf"], 2),
        "tree_engine_calls": tree["engine_calls"], "flat_engine_calls": flat["engine_calls"],
        "ratio": round(ratio, 3), "target": 0.8,
    }
    print(f"{'mode':<6} {'tok/s':>10} {'tok/leaf':>10} {'calls':>6}")
    print(f"{'tree':<6} {tree['tok_s']:>10.1f} {tree['tokens_per_leaf']:>10.2f} {tree['engine_calls']:>6.0f}")
    print(f"{'flat':<6} {flat['tok_s']:>10.1f} {flat['tokens_per_leaf']:>10.2f} {flat['engine_calls']:>6.0f}")
    print(f"ratio tree/flat tok/s = {ratio:.3f} (target 0.8); branching {branching}, "
          f"segment {args.segment_tokens}, max {args.max_tokens}, {args.prompts} prompts")
    if args.json:
        print(json.dumps(result))
    return result


def _prompt(i: int, text: str, tok):
    import numpy as np

    from common.data import Prompt

    return Prompt(prompt_id=f"b{i}", text=text, answer=str(eval(text[:-1])),
                  token_ids=np.array(tok.encode(text), dtype=np.int32), meta={"task": "arithmetic"})


if __name__ == "__main__":
    main()
