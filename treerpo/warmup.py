"""`treerpo warmup`: build the demo's tiny char-level Qwen2 and warm it up, once (cached).

The demo needs a policy that starts *low but non-zero*: a model that holds several plausible
strategies, one of them right, so RL has something to select. The warm-up is a short supervised
phase on `common.tasks.warmup_examples`: `(a+b)*c` worked with the right plan (a share
`right_fraction`, default 30%) and with two wrong plans (`b*c` first; `a*c` first), every step's
arithmetic correct. Loss: token cross-entropy on the completion (and its EOS) only,

    L = - (1 / |C|) * sum_{t in C} log p_theta(x_t | x_<t)          C = completion tokens

Guarantees:
* the result is an HF folder (safetensors + config + tokenizer) that `from_pretrained`, the
  actors, the learner and `treerpo eval` load like any other model;
* it is cached under CACHE_DIR/warmup-<hash> where the hash covers every setting that changes
  the weights (architecture, data, optimisation, seed, WARMUP_FORMAT); a folder is used only if
  its `warmup.json` marker exists, which is written last (after an atomic rename), so a killed
  warm-up never leaves a half-written model that a later run would pick up;
* prompts are tokenised exactly as the actors tokenise them (`common.data.format_prompt`), so
  the supervised contexts and the RL contexts are the same token ids.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from common.config import ConfigError, DataConfig
from common.data import format_prompt
from common.rundir import setup_logging
from common.tasks import TASK_SHAPES, TaskSpec, warmup_examples
from treerpo.tinymodel import build_tiny_model

log = logging.getLogger("treerpo.warmup")

WARMUP_FORMAT = 1  # bump when the recipe changes in a way the settings do not show
MARKER = "warmup.json"


@dataclass(frozen=True)
class WarmupSettings:
    """Everything that determines the warmed-up weights (hashed into the cache key)."""

    # architecture (treerpo.tinymodel.build_tiny_model); defaults: ~0.55M parameters
    hidden_size: int = 128
    num_layers: int = 3
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 341
    max_position_embeddings: int = 256
    # data (common.tasks.warmup_examples)
    operand_min: int = 2
    operand_max: int = 14
    right_fraction: float = 0.3
    examples: int = 20_000
    task: str = "add_mul"  # = data.task; "chain": task_steps steps, a slip at slip_step (0 = any), filler
    task_steps: int = 2
    slip_step: int = 0
    filler: float = 0.0
    # optimisation
    steps: int = 2000
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 0.01
    seed: int = 0

    def key(self) -> str:
        fields = asdict(self)
        for name in CHAIN_FIELDS:  # left out at their defaults: the demo's cached warm-ups keep their keys
            if fields[name] == CHAIN_DEFAULTS[name]:
                del fields[name]
        blob = json.dumps({"format": WARMUP_FORMAT, **fields}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


CHAIN_FIELDS = ("task", "task_steps", "slip_step", "filler")
CHAIN_DEFAULTS = {name: getattr(WarmupSettings, name) for name in CHAIN_FIELDS}


def default_cache_dir() -> Path:
    return Path(os.environ.get("TREERPO_CACHE", Path.home() / ".cache" / "treerpo"))


def cached_model(settings: WarmupSettings, cache_dir: str | Path) -> Path | None:
    """The finished warm-up folder for these settings, or None."""
    path = Path(cache_dir) / f"warmup-{settings.key()}"
    return path if (path / MARKER).exists() else None


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------
def encode_examples(settings: WarmupSettings, tokenizer) -> list[tuple[list[int], int]]:
    """(ids, prompt_len) per example: prompt ids as the actors make them, then completion + EOS."""
    data_cfg = DataConfig(operand_min=settings.operand_min, operand_max=settings.operand_max, task=settings.task,
                          task_steps=settings.task_steps)
    spec = TaskSpec.from_config(data_cfg)
    out = []
    for ex in warmup_examples(spec, settings.examples, settings.right_fraction, seed=settings.seed,
                              slip_step=settings.slip_step, filler=settings.filler):
        _, prompt_ids = format_prompt(ex.prompt, data_cfg, tokenizer)
        completion = tokenizer(ex.completion, add_special_tokens=False)["input_ids"]
        out.append((list(map(int, prompt_ids)) + completion + [tokenizer.eos_token_id], len(prompt_ids)))
    return out


def make_batch(rows: list[tuple[list[int], int]], pad_id: int):
    """Right-padded (input_ids, labels, attention_mask), each (B, T); labels -100 off the completion."""
    import torch  # noqa: PLC0415 -- a cached warm-up never loads torch

    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # (B, T)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(rows), width), dtype=torch.long)  # (B, T)
    for r, (seq, prompt_len) in enumerate(rows):
        ids[r, : len(seq)] = torch.tensor(seq)
        labels[r, prompt_len: len(seq)] = torch.tensor(seq[prompt_len:])
        mask[r, : len(seq)] = 1
    return ids, labels, mask


# --------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------
def train(settings: WarmupSettings, out_dir: Path, on_step=None) -> dict:
    """Build the tiny model in out_dir, run the supervised phase, save it back (HF format)."""
    import torch  # noqa: PLC0415 -- a cached warm-up never loads torch
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415 -- not on a cached warm-up

    build_tiny_model(out_dir, hidden_size=settings.hidden_size, num_layers=settings.num_layers,
                     num_heads=settings.num_heads, num_kv_heads=settings.num_kv_heads,
                     intermediate_size=settings.intermediate_size,
                     max_position_embeddings=settings.max_position_embeddings, seed=settings.seed)
    tokenizer = AutoTokenizer.from_pretrained(str(out_dir))
    model = AutoModelForCausalLM.from_pretrained(str(out_dir), dtype=torch.float32)
    model.train()
    rows = encode_examples(settings, tokenizer)
    gen = torch.Generator().manual_seed(settings.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay,
                            betas=(0.9, 0.98))
    warm = max(1, settings.steps // 20)

    def lr_at(k: int) -> float:  # linear warm-up, then cosine to 10%
        if k < warm:
            return settings.lr * (k + 1) / warm
        progress = (k - warm) / max(1, settings.steps - warm)
        return settings.lr * (0.1 + 0.45 * (1.0 + math.cos(math.pi * progress)))

    started = time.perf_counter()
    loss_value = float("nan")
    for k in range(settings.steps):
        pick = torch.randint(len(rows), (settings.batch_size,), generator=gen).tolist()
        ids, labels, mask = make_batch([rows[i] for i in pick], tokenizer.pad_token_id)
        for group in opt.param_groups:
            group["lr"] = lr_at(k)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        loss_value = float(loss.detach())
        if not math.isfinite(loss_value):
            raise RuntimeError(f"warm-up loss became {loss_value} at step {k}: lower --lr")
        if on_step is not None:
            on_step(k + 1, loss_value)
    model.eval()
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    params = sum(p.numel() for p in model.parameters())
    return {"final_loss": loss_value, "seconds": time.perf_counter() - started, "parameters": int(params)}


def ensure_warm_model(settings: WarmupSettings, cache_dir: str | Path, threads: int = 0,
                      on_step=None) -> tuple[Path, dict]:
    """The cached folder, building it first if needed. Returns (path, info with 'cached')."""
    cache_dir = Path(cache_dir)
    found = cached_model(settings, cache_dir)
    if found is not None:
        return found, dict(json.loads((found / MARKER).read_text()), cached=True)
    import torch  # noqa: PLC0415 -- a cached warm-up never loads torch

    if threads > 0:
        torch.set_num_threads(threads)
    final = cache_dir / f"warmup-{settings.key()}"
    tmp = cache_dir / f".tmp-{settings.key()}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        info = train(settings, tmp, on_step)
        info["settings"] = asdict(settings)
        if final.exists():  # an unfinished folder from a killed run (no marker): replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    (final / MARKER).write_text(json.dumps(info, indent=2))
    return final, dict(info, cached=False)


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------
def settings_from_args(args) -> WarmupSettings:
    """Settings from `treerpo warmup` arguments (treerpo/cli.py: add_warmup_args); None = default."""
    d = WarmupSettings()
    pick = lambda name, default: default if getattr(args, name, None) is None else getattr(args, name)  # noqa: E731
    hidden = pick("hidden", d.hidden_size)
    heads = pick("heads", d.num_heads if hidden % d.num_heads == 0 else 1)
    if heads < 1 or hidden % heads:
        raise ConfigError(f"--heads {heads} must divide --hidden {hidden}")
    settings = WarmupSettings(
        hidden_size=hidden, num_layers=pick("layers", d.num_layers), num_heads=heads,
        num_kv_heads=d.num_kv_heads if heads == d.num_heads else 1,
        intermediate_size=pick("intermediate", d.intermediate_size * hidden // d.hidden_size),
        examples=pick("examples", d.examples), steps=pick("steps", d.steps),
        batch_size=pick("batch_size", d.batch_size),
        lr=pick("lr", d.lr), right_fraction=pick("right_fraction", d.right_fraction), seed=pick("seed", d.seed),
        operand_min=pick("operand_min", d.operand_min), operand_max=pick("operand_max", d.operand_max),
        task=pick("task", d.task), task_steps=pick("task_steps", d.task_steps),
        slip_step=pick("slip_step", d.slip_step), filler=pick("filler", d.filler),
    )
    if settings.task not in TASK_SHAPES:
        raise ConfigError(f"--task {settings.task}: choose one of {', '.join(TASK_SHAPES)}")
    if settings.task == "chain" and not 0 <= settings.slip_step <= settings.task_steps:
        raise ConfigError(f"--slip-step {settings.slip_step} must lie in [0, --task-steps {settings.task_steps}]")
    if settings.task != "chain" and (settings.slip_step or settings.filler):
        raise ConfigError("--slip-step and --filler shape the chain task's warm-up: add --task chain")
    if not 0.0 <= settings.filler <= 1.0 or settings.task_steps < 1:
        raise ConfigError(f"--filler {settings.filler} must lie in [0, 1] and --task-steps >= 1")
    if not 0 <= settings.operand_min <= settings.operand_max:
        raise ConfigError(f"operand range [{settings.operand_min}, {settings.operand_max}] is empty or negative")
    if not 0.0 <= settings.right_fraction <= 1.0:
        raise ConfigError(f"--right-fraction={settings.right_fraction} must lie in [0, 1]")
    if min(settings.steps, settings.batch_size, settings.examples, settings.hidden_size, settings.num_layers) < 1:
        raise ConfigError("--steps, --batch-size, --examples, --hidden and --layers must be >= 1")
    return settings


def run(args) -> int:
    setup_logging("warmup")
    settings = settings_from_args(args)
    cache_dir = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    every = max(1, settings.steps // 10)

    def on_step(k: int, loss: float) -> None:
        if k % every == 0 or k == settings.steps:
            log.info("warm-up step %d/%d loss %.4f", k, settings.steps, loss)

    path, info = ensure_warm_model(settings, cache_dir, args.threads, on_step)
    log.info("%s warm model: %s", "cached" if info["cached"] else "built", path)
    if args.json:
        print(json.dumps({"path": str(path), **info}), flush=True)
    return 0
