"""The learner's memory savers change no number: gradient checkpointing (decoder activations
recomputed in the backward) and the chunked LM head (`token_logprobs(chunk=...)`, each chunk's
logits recomputed in the backward) give the step the plain forward gives. Real DeepSpeed on CPU."""

from __future__ import annotations

import numpy as np
import torch

from common.config import JobConfig
from learner.trainer import Trainer
from tests.support.treegen import random_tree

torch.set_num_threads(1)


def test_gradient_checkpointing_and_lm_head_chunks_give_the_same_step(tiny_model_dir, monkeypatch):
    rng = np.random.default_rng(0)
    trees = [random_tree(rng, vocab_size=50, max_depth=3, max_branch=3) for _ in range(4)]

    def step(gradient_checkpointing: bool, chunk: int | None):
        if chunk is not None:  # every token_logprobs call of the trainer in chunks of `chunk` positions
            import learner.logprobs as lp  # noqa: PLC0415 -- the module whose default is patched

            monkeypatch.setattr(lp, "LOGPROB_CHUNK", chunk)
            monkeypatch.setattr(lp.token_logprobs, "__kwdefaults__", {**lp.token_logprobs.__kwdefaults__,
                                                                       "chunk": chunk})
        cfg = JobConfig.model_validate({"learner": {"lr": 1e-3, "micro_batch_tokens": 48,
                                                    "gradient_checkpointing": gradient_checkpointing}})
        trainer = Trainer(cfg, tiny_model_dir)
        metrics = trainer.train_step(trees, learner_version=0)
        monkeypatch.undo()
        return metrics, {n: p.detach().clone() for n, p in trainer.module.named_parameters()}

    plain, plain_params = step(False, None)
    saved, saved_params = step(True, 2)
    assert saved["loss"] == plain["loss"] or abs(saved["loss"] - plain["loss"]) < 1e-6
    for name, p in plain_params.items():  # Adam moves each weight by ~lr = 1e-3: 1e-5 is 1% of a step
        torch.testing.assert_close(saved_params[name], p, rtol=0, atol=1e-5)
