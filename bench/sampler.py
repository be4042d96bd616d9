"""Tree sampler throughput against flat (GRPO) sampling of the same number of leaves.

Both run through `TreeSampler` on the same engine (`--engine hf`, default, or `vllm`: vLLM's
AsyncLLM, CUDA or its CPU backend) and tiny model in the same process:
tree = depth D with branching b; flat = depth 1 with branching [prod(b)] and the same total
budget. Two measurements, each alternating tree and flat windows so load from other processes
hits both alike:

* stream (the actor's path, headline): `TreeSampler.stream` over an endless prompt source, the
  engine batch capped at `--rows` rows (default prompts * leaves, the flat call's batch) for
  both modes; after a warm-up, a window is the time for `--window-trees` trees to complete and
  its tokens are the engine's generated tokens in that time:

      ratio = median over window pairs of tree tok/s / flat tok/s        (target 0.8)

* call: one `sample(prompts)` call per mode (a whole batch of --prompts; the tree's first levels
  run fewer rows because its critical path is D segments long): `call_ratio`, same definition.

Tokens: each node's tokens counted once; tokens per leaf are reported (the tree shares prefixes).

    python bench/sampler.py [--prompts 8] [--branching 2,2,2] [--segment-tokens 32] [--max-tokens 128] [--json]
    python bench/sampler.py --engine vllm     # in the vLLM environment (README: vLLM actors)
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from actor.engines import make_engine  # noqa: E402
from actor.sampler import TreeSampler  # noqa: E402
from common.config import ActorConfig, ModelConfig, TreeConfig  # noqa: E402
from common.data import Prompt  # noqa: E402
from common.rewards import make_reward  # noqa: E402
from treerpo.tinymodel import VLLM_CPU_TINY, build_tiny_model  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=8, help="prompts per sample() call (call mode)")
    ap.add_argument("--branching", default="2,2,2", help="tree branching per level, comma separated")
    ap.add_argument("--segment-tokens", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--rows", type=int, default=0, help="stream mode: engine batch rows (0 = prompts * leaves)")
    ap.add_argument("--window-trees", type=int, default=16, help="stream mode: trees completed per timed window")
    ap.add_argument("--repeats", type=int, default=5, help="timed (tree, flat) window pairs / call pairs")
    ap.add_argument("--hidden", type=int, default=64, help="tiny model hidden size")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--engine", choices=("hf", "vllm"), default="hf",
                    help="hf, or vllm (AsyncLLM; the tiny model gets head_dim 64 for vLLM's CPU kernels)")
    ap.add_argument("--json", action="store_true", help="print one JSON object on the last line")
    return ap.parse_args(argv)


def run_calls(engine, cfgs: dict, prompts, reward, repeats: int) -> dict:
    """Alternate one sample() call per mode; median tok/s, mean tokens per leaf, median ratio."""
    samplers = {name: TreeSampler(engine, cfg, reward, "bench", seed=0) for name, cfg in cfgs.items()}
    for sampler in samplers.values():
        sampler.sample(prompts[:2])  # warm-up
    rates, per_leaf, ratios = {n: [] for n in cfgs}, {n: [] for n in cfgs}, []
    for _ in range(repeats):
        for name, sampler in samplers.items():
            t0 = time.perf_counter()
            trees = sampler.sample(prompts)
            tokens = sum(t.num_tokens() for t in trees)
            rates[name].append(tokens / (time.perf_counter() - t0))
            per_leaf[name].append(tokens / sum(len(t.leaves()) for t in trees))
        ratios.append(rates["tree"][-1] / rates["flat"][-1])
    return {"tok_s": {n: statistics.median(r) for n, r in rates.items()},
            "tokens_per_leaf": {n: statistics.mean(v) for n, v in per_leaf.items()},
            "ratio": statistics.median(ratios)}


def run_streams(engine, cfgs: dict, prompts, reward, rows: int, window: int, repeats: int,
                fresh: bool = False) -> dict:
    """Alternate timed windows of `window` completed trees per mode.

    HF: one stream per mode stays open (a stream advances only when stepped). `fresh` (vLLM, whose
    engine runs the requests of every open stream at once): each window opens its stream, warms it
    up with `window` untimed trees, times `window` trees, and closes it (aborting what is in flight)."""
    engine.max_batch_rows = rows
    streams, per_leaf = {}, {n: [] for n in cfgs}

    def open_mode(name: str):
        endless = itertools.cycle(prompts)
        source = lambda k, it=endless: [next(it) for _ in range(k)]  # noqa: E731
        streams[name] = TreeSampler(engine, cfgs[name], reward, "bench", seed=0).stream(
            source, max_trees_in_flight=4 * rows)

    if not fresh:
        for name in cfgs:
            open_mode(name)

    def take(name: str, count: int) -> tuple[float, int]:
        """(seconds, tokens) for `count` trees: the engine's generated tokens in that time (HF), or
        (fresh, vLLM: its engine counts a sample when it finishes, in bursts) the trees' own tokens."""
        tokens0, t0, own = engine.stats["generated_tokens"], time.perf_counter(), 0
        for _ in range(count):
            _, tree = next(streams[name])
            own += tree.num_tokens()
            per_leaf[name].append(tree.num_tokens() / len(tree.leaves()))
        return time.perf_counter() - t0, own if fresh else engine.stats["generated_tokens"] - tokens0

    if not fresh:
        for name in cfgs:
            take(name, 2 * window)  # warm-up: fill the batch, desynchronise the trees
    rates, ratios = {n: [] for n in cfgs}, []
    for _ in range(repeats):
        for name in cfgs:
            if fresh:
                open_mode(name)
                take(name, window)  # warm-up: fill the batch, desynchronise the trees
            seconds, tokens = take(name, window)
            rates[name].append(tokens / seconds)
            if fresh:
                streams.pop(name).close()
        ratios.append(rates["tree"][-1] / rates["flat"][-1])
    for gen in streams.values():
        gen.close()
    return {"tok_s": {n: statistics.median(r) for n, r in rates.items()},
            "tok_s_range": {n: (min(r), max(r)) for n, r in rates.items()},
            "tokens_per_leaf": {n: statistics.mean(v) for n, v in per_leaf.items()},
            "ratio": statistics.median(ratios), "ratios": ratios}


def main(argv=None) -> dict:
    args = parse_args(argv)

    torch.set_num_threads(args.threads)
    branching = [int(b) for b in args.branching.split(",")]
    leaves = int(np.prod(branching))
    rows = args.rows or args.prompts * leaves
    cfgs = {"tree": TreeConfig(depth=len(branching), branching=branching, segment_tokens=args.segment_tokens,
                               max_tokens=args.max_tokens),
            "flat": TreeConfig(depth=1, branching=[leaves], segment_tokens=args.segment_tokens,
                               max_tokens=args.max_tokens)}
    with tempfile.TemporaryDirectory() as tmp:
        if args.engine == "vllm":  # the batch cap is vLLM's max_num_seqs; CPU: small KV cache, blocks of 32
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
            path = build_tiny_model(Path(tmp) / "tiny", **VLLM_CPU_TINY)
            actor = ActorConfig(engine="vllm", enforce_eager=True, vllm_block_size=32, vllm_max_num_seqs=rows,
                                max_model_len=max(256, 2 * args.max_tokens))
        else:
            path = build_tiny_model(Path(tmp) / "tiny", hidden_size=args.hidden)
            actor = ActorConfig()
        engine = make_engine(ModelConfig(path=str(path), device="cpu" if args.engine == "hf" else "auto"), actor)
        prompts = [_prompt(i, f"{10 + i}+{20 + 2 * i}=", engine.tokenizer) for i in range(max(args.prompts, 8))]
        reward = make_reward("arithmetic")
        try:
            call = run_calls(engine, cfgs, prompts[:args.prompts], reward, args.repeats)
            stream = run_streams(engine, cfgs, prompts, reward, rows, args.window_trees, args.repeats,
                                 fresh=args.engine == "vllm")
        finally:
            reward.close()
            if hasattr(engine, "close"):
                engine.close()
    result = {
        "bench": "sampler", "engine": args.engine, "prompts": args.prompts, "branching": branching,
        "leaves_per_tree": leaves,
        "segment_tokens": args.segment_tokens, "max_tokens": args.max_tokens, "rows": rows,
        "tree_tok_s": round(stream["tok_s"]["tree"], 1), "flat_tok_s": round(stream["tok_s"]["flat"], 1),
        "tree_tokens_per_leaf": round(stream["tokens_per_leaf"]["tree"], 2),
        "flat_tokens_per_leaf": round(stream["tokens_per_leaf"]["flat"], 2),
        "window_ratios": [round(r, 3) for r in stream["ratios"]],
        "call_tree_tok_s": round(call["tok_s"]["tree"], 1), "call_flat_tok_s": round(call["tok_s"]["flat"], 1),
        "call_ratio": round(call["ratio"], 3),
        "ratio": round(stream["ratio"], 3), "target": 0.8,
    }
    print(f"{'mode':<14} {'tok/s':>10} {'tok/leaf':>10}")
    for name in ("tree", "flat"):
        print(f"{'stream ' + name:<14} {stream['tok_s'][name]:>10.1f} {stream['tokens_per_leaf'][name]:>10.2f}")
    for name in ("tree", "flat"):
        print(f"{'call ' + name:<14} {call['tok_s'][name]:>10.1f} {call['tokens_per_leaf'][name]:>10.2f}")
    print(f"ratio tree/flat tok/s: stream {stream['ratio']:.3f} (target 0.8, {rows} rows), "
          f"one call {call['ratio']:.3f}; branching {branching}, segment {args.segment_tokens}, "
          f"max {args.max_tokens}, {args.prompts} prompts per call")
    if args.json:
        print(json.dumps(result))
    return result


def _prompt(i: int, text: str, tok):
    return Prompt(prompt_id=f"b{i}", text=text, answer=str(eval(text[:-1])),
                  token_ids=np.array(tok.encode(text), dtype=np.int32), meta={"task": "arithmetic"})


if __name__ == "__main__":
    main()
