"""`treerpo eval`: pass@1 and pass@k of a model on benchmark files or the synthetic task.

For problem i with n samples of which c_i are correct (Chen et al. 2021, the unbiased estimator):

    pass@k_i = 1 - C(n - c_i, k) / C(n, k)          (k <= n)
    pass@k   = mean_i pass@k_i                       pass@1 = mean_i c_i / n

Guarantees:
* prompts are built exactly as the actors build them (`common.data.PromptSource`: same template,
  chat template and tokenisation); the synthetic task uses its held-out split only
  (`common.tasks.eval_problems`, never trained on);
* generation is batched: `batch_prompts` prompts per engine call, each one request with n = k
  (the HF engine prefills a prompt once for its k samples); sampling is seeded;
* completions are scored by `data.reward` (`math`: last \\boxed{} under math-verify; `arithmetic`:
  the '#' answer; `dataset`: the source's own verifier; or a custom function), each with its
  prompt's entry, and the report counts every sample's reason;
* with a `reasoning_gym` config and no `--data`/`--task`, the problems are its held-out set
  (`split: eval`, never sharing a question with the train stream, common/data.py);
* `--model` takes an HF folder or a checkpoint folder holding `hf/` (the learner's export);
* a problem whose prompt + max_tokens exceeds the model's positions is skipped and counted
  (`skipped`, with its id in `skipped_ids`): pass@k is over the problems evaluated, and the table
  says how many were skipped; if every problem would be skipped, EngineError (one line, exit 6).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from actor.engine import GenerationRequest
from actor.engines import make_engine
from common.config import JobConfig, build_config, load_config
from common.data import PromptSource, read_rows
from common.errors import ConfigError, EngineError, ModelError
from common.rewards import make_reward
from common.rundir import setup_logging

log = logging.getLogger("treerpo.eval")
DEFAULT_TASK_PROBLEMS = 200


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for n samples with c correct: 1 - C(n-c, k) / C(n, k)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    # C(n-c, k) / C(n, k) = prod_{j=n-c+1}^{n} (1 - k / j), numerically stable
    return 1.0 - float(np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def ks_to_report(n: int) -> list[int]:
    """1, 2, 4, ... up to n, and n itself."""
    ks = [k for k in (2**i for i in range(32)) if k < n]
    return ks + [n]


@dataclass
class EvalReport:
    model: str
    task: str  # "arithmetic" or the data files
    reward: str
    num_problems: int
    samples_per_problem: int
    temperature: float
    max_tokens: int
    seed: int
    pass_at: dict[str, float]  # "1", "2", ..., str(k)
    mean_response_tokens: float
    reasons: dict[str, int]
    seconds: float
    generated_tokens: int
    per_problem: list[dict[str, Any]] = field(default_factory=list)  # id, correct (of k)
    skipped: int = 0  # problems not evaluated: prompt + max_tokens > the model's positions
    skipped_ids: list[str] = field(default_factory=list)

    @property
    def pass_at_1(self) -> float:
        return self.pass_at["1"]

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["pass_at_1"] = self.pass_at_1
        out["tokens_per_second"] = self.generated_tokens / max(self.seconds, 1e-9)
        return out


def resolve_model_dir(path: str | Path) -> Path:
    """An HF folder (has config.json), or a checkpoint folder whose hf/ is one."""
    path = Path(path)
    if (path / "config.json").exists():
        return path
    if (path / "hf" / "config.json").exists():
        return path / "hf"
    raise ModelError(f"--model {path}: no config.json there or in {path / 'hf'}; give an HF model folder "
                     "or a checkpoint folder (RUN_DIR/checkpoints/step-N)")


def split_fitting(prompts: Sequence, max_positions: int | None, max_tokens: int) -> tuple[list, list]:
    """(prompts whose context + max_tokens fits the model's positions, the others); None = no limit."""
    if not max_positions:
        return list(prompts), []
    fits = [p for p in prompts if len(p.token_ids) + max_tokens <= max_positions]
    return fits, [p for p in prompts if len(p.token_ids) + max_tokens > max_positions]


def load_prompts(cfg: JobConfig, tokenizer, num_problems: int | None) -> list:
    """The problems of the eval as `common.data.Prompt`s (pool order)."""
    source = PromptSource(cfg.data, tokenizer)
    prompts = source.all_prompts()
    return prompts[:num_problems] if num_problems else prompts


def evaluate(engine, prompts: Sequence, reward, *, k: int, temperature: float, max_tokens: int, top_p: float = 1.0,
             batch_prompts: int = 64, seed: int = 0) -> tuple[list[list[float]], list[list[int]], Counter]:
    """(rewards (P, k), response lengths (P, k), reason counts): k samples per prompt."""
    rewards: list[list[float]] = []
    lengths: list[list[int]] = []
    reasons: Counter[str] = Counter()
    stops = tuple(engine.eos_token_ids)
    for start in range(0, len(prompts), batch_prompts):
        chunk = prompts[start:start + batch_prompts]
        requests = [GenerationRequest(context=p.token_ids, n=k, max_tokens=max_tokens, stop_token_ids=stops,
                                      temperature=temperature, top_p=top_p, seed=(seed * 1_000_003 + start + j) % 2**31)
                    for j, p in enumerate(chunk)]
        results = engine.generate(requests)
        texts, answers, entries = [], [], []
        for p, samples in zip(chunk, results, strict=True):
            lengths.append([int(len(s.token_ids)) for s in samples])
            for s in samples:
                texts.append(engine.tokenizer.decode(s.token_ids.tolist(), skip_special_tokens=True))
                answers.append(str(p.answer))
                entries.append(getattr(p, "entry", None))
        scored = reward.score_many(texts, answers, entries=entries)
        reasons.update(r.reason for r in scored)
        flat = [float(r.reward) for r in scored]
        rewards.extend(flat[i * k:(i + 1) * k] for i in range(len(chunk)))
    return rewards, lengths, reasons


def summarise(prompts: Sequence, rewards: list[list[float]], lengths: list[list[int]],
              k: int) -> tuple[dict, float, list]:
    """(pass_at {"1": ..}, mean response tokens, per-problem rows)."""
    correct = [int(sum(1 for r in row if r >= 1.0)) for row in rewards]
    pass_at = {str(j): float(np.mean([pass_at_k(k, c, j) for c in correct])) if correct else 0.0
               for j in ks_to_report(k)}
    mean_len = float(np.mean([x for row in lengths for x in row])) if lengths else 0.0
    per_problem = [{"id": p.prompt_id, "correct": c} for p, c in zip(prompts, correct, strict=True)]
    return pass_at, mean_len, per_problem


def task_name(data) -> str:
    """The report's name of what was evaluated: the files, the reasoning-gym dataset, or the synthetic task."""
    if data.source == "files":
        return ",".join(data.paths)
    return f"reasoning_gym:{data.dataset}" if data.source == "reasoning_gym" else "arithmetic"


def eval_config(args) -> JobConfig:
    """The job config (default preset: demo) with the eval's data, model and engine settings applied."""
    cfg = load_config(args.config or ["demo"], args.overrides)
    data = cfg.data.model_dump()
    # a reward named on the command line, else one set by --set data.reward=..., else the default
    set_reward = cfg.data.reward if any(o.split("=", 1)[0].strip() == "data.reward" for o in args.overrides) else None
    if args.data:
        data.update(source="files", paths=list(args.data), reward=args.reward or set_reward or "math", shuffle=False,
                    dataset="", dataset_args={})
    elif cfg.data.source == "reasoning_gym" and not args.task:  # its held-out set; --num-problems takes a prefix
        data.update(split="eval", reward=args.reward or cfg.data.reward, shuffle=False)
    else:
        data.update(source="synthetic", split="eval", reward=args.reward or set_reward or "arithmetic", shuffle=False,
                    num_eval_problems=args.num_problems or DEFAULT_TASK_PROBLEMS, dataset="", dataset_args={})
    cfg = build_config({**cfg.model_dump(), "data": data})  # a bad --reward is a ConfigError, one line
    cfg.model.path = str(resolve_model_dir(args.model))
    if args.engine:
        cfg.actor.engine = args.engine
    cfg.actor.max_batch_rows = max(cfg.actor.max_batch_rows, args.batch_prompts * args.k)
    return cfg


def run_eval(args) -> EvalReport:
    if args.k < 1:
        raise ConfigError(f"-k {args.k}: need at least one sample per problem")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    cfg = eval_config(args)
    temperature = args.temperature if args.temperature is not None else cfg.tree.temperature
    top_p = args.top_p if args.top_p is not None else cfg.tree.top_p
    max_tokens = args.max_tokens or cfg.tree.max_tokens
    if cfg.data.source == "files":
        read_rows(cfg.data.paths, cfg.data)  # a bad row fails now (DataError), not after the model loaded
    engine = make_engine(cfg, seed=args.seed)
    prompts = load_prompts(cfg, engine.tokenizer, args.num_problems)
    max_positions = getattr(engine, "max_positions", None)
    prompts, too_long = split_fitting(prompts, max_positions, max_tokens)
    if too_long:
        longest = max(len(p.token_ids) for p in too_long)
        if not prompts:
            raise EngineError(f"no problem fits: every one of the {len(too_long)} prompts + max_tokens {max_tokens} "
                              f"exceeds the model's {max_positions} positions (longest prompt {longest} tokens); "
                              "use a model with a longer context or lower --max-tokens")
        log.warning("skipped %d of %d problems: prompt + max_tokens %d exceeds the model's %d positions (longest "
                    "prompt %d tokens); lower --max-tokens or use a longer-context model to evaluate them",
                    len(too_long), len(too_long) + len(prompts), max_tokens, max_positions, longest)
    reward = make_reward(cfg.data.reward, cfg.data.reward_timeout_s, cfg.data)
    started = time.perf_counter()
    try:
        rewards, lengths, reasons = evaluate(engine, prompts, reward, k=args.k, temperature=temperature,
                                             max_tokens=max_tokens, top_p=top_p, batch_prompts=args.batch_prompts,
                                             seed=args.seed)
    finally:
        reward.close()
    seconds = time.perf_counter() - started
    pass_at, mean_len, per_problem = summarise(prompts, rewards, lengths, args.k)
    return EvalReport(
        model=cfg.model.path, task=task_name(cfg.data), reward=cfg.data.reward,
        num_problems=len(prompts), samples_per_problem=args.k, temperature=temperature, max_tokens=max_tokens,
        seed=args.seed, pass_at=pass_at, mean_response_tokens=mean_len, reasons=dict(reasons), seconds=seconds,
        generated_tokens=int(sum(sum(row) for row in lengths)), per_problem=per_problem,
        skipped=len(too_long), skipped_ids=[p.prompt_id for p in too_long],
    )


def print_table(report: EvalReport) -> None:
    table = Table(title=f"treerpo eval: {report.task} ({report.num_problems} problems x {report.samples_per_problem})")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for j, v in report.pass_at.items():
        table.add_row(f"pass@{j}", f"{100 * v:.1f}%")
    table.add_row("mean response tokens", f"{report.mean_response_tokens:.1f}")
    if report.skipped:
        table.add_row("skipped (prompt + max_tokens > positions)", str(report.skipped))
    table.add_row("reasons", ", ".join(f"{r} {n}" for r, n in sorted(report.reasons.items())))
    table.add_row("time", f"{report.seconds:.1f} s ({report.generated_tokens / max(report.seconds, 1e-9):.0f} tok/s)")
    Console().print(table)


def run(args) -> int:
    setup_logging("eval")
    report = run_eval(args)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(str(args.out) + ".tmp")
        tmp.write_text(json.dumps(report.to_dict(), indent=2))
        tmp.replace(args.out)
    if not args.quiet:
        print_table(report)
    log.info("pass@1 %.4f over %d problems x %d samples (%s)%s", report.pass_at_1, report.num_problems,
             report.samples_per_problem, report.model,
             f"; {report.skipped} problems skipped (too long for the model)" if report.skipped else "")
    return 0 if math.isfinite(report.pass_at_1) else 1
