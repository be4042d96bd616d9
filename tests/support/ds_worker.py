"""One rank of the multi-rank trainer test (run by tests/integration/test_trainer.py under torch.distributed.run).

Rank 0 builds the trees (seeded, so the test can rebuild them), trains `--steps` steps, saves a
checkpoint, trains one step more, loads the checkpoint back, and stops the followers; ranks > 0
follow. Each rank writes `rank<r>.json` with sha256 hashes of its full parameters at the start,
after the training steps and after the reload; rank 0 also writes its parameters after step 1
(`params_step1.safetensors`) and the step metrics (`metrics.json`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from common.config import JobConfig
from learner.checkpoint import LearnerState, load_checkpoint, save_checkpoint
from learner.trainer import Trainer
from tests.support.treegen import random_tree


def make_trees(seed: int, count: int, vocab_size: int):
    rng = np.random.default_rng(seed)
    return [random_tree(rng, vocab_size=vocab_size, max_depth=3, max_branch=3) for _ in range(count)]


def param_hash(trainer) -> str:
    h = hashlib.sha256()
    for name, p in trainer.module.named_parameters():
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def job_config(zero_stage: int, run_dir: str, minibatches: int = 1):
    return JobConfig.model_validate({
        "run_dir": run_dir,
        "learner": {"lr": 1e-3, "zero_stage": zero_stage, "micro_batch_tokens": 48, "warmup_steps": 1,
                    "minibatches": minibatches},
    })


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--zero-stage", type=int, default=2)
    ap.add_argument("--trees", type=int, default=6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--minibatches", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(1)

    out = Path(args.out)
    trainer = Trainer(job_config(args.zero_stage, str(out / "run"), args.minibatches), args.model)
    hashes = {"start": param_hash(trainer)}
    if trainer.rank == 0:
        metrics = []
        for step in range(args.steps):
            trees = make_trees(args.seed + step, args.trees, trainer.vocab_size)
            metrics.append(trainer.train_step(trees, learner_version=step))
            if step == 0:
                save_file({n: p.detach().clone() for n, p in trainer.module.named_parameters()},
                          str(out / "params_step1.safetensors"))
        hashes["trained"] = param_hash(trainer)
        ckpt = save_checkpoint(trainer, out / "run", LearnerState(version=args.steps, step=args.steps), keep=1)
        trainer.train_step(make_trees(args.seed + 100, args.trees, trainer.vocab_size), learner_version=args.steps)
        hashes["moved"] = param_hash(trainer)
        state = load_checkpoint(trainer, ckpt)
        hashes["reloaded"] = param_hash(trainer)
        hashes["reloaded_step"] = state.step
        trainer.stop_followers()
        (out / "metrics.json").write_text(json.dumps(metrics))
    else:
        trainer.follow()
        hashes["final"] = param_hash(trainer)
    (out / f"rank{trainer.rank}.json").write_text(json.dumps(hashes))


if __name__ == "__main__":
    main()
