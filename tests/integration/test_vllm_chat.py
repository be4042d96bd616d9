"""vLLM actors on a chat model's shape (a Llama with a byte-level BPE vocabulary, ChatML template,
two end ids: treerpo.tinymodel tokenizer="bpe"), on vLLM's CPU backend: chat-templated prompts,
`split: step` where the delimiter "\\n\\n" merges into other tokens ("\\n\\n\\n", " \\n\\n"), and
behaviour log-probs equal to the learner's tree-packed recompute. The same rule of where a step
ends as the HF engine's (tests/unit/test_chat_model.py): with the token that completes it, whole.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from actor.sampler import TreeSampler
from common.config import ActorConfig, AdvantageConfig, DataConfig, ModelConfig, TreeConfig
from common.data import PromptSource
from common.rewards import make_reward
from learner.logprobs import token_logprobs
from learner.packing import pack_trees
from tests.support.models import bias_tokens
from tests.support.treegen import step_endings
from treerpo.tinymodel import VLLM_CPU_TINY

FIDELITY_TOL = 1e-3  # |vLLM processed_logprobs - learner recompute|, float32 on both sides
BREAKS = ("\n\n\n", " \n\n", "\n\n", "\n")


@pytest.fixture(scope="module")
def chat_engine(make_tiny_model, tmp_path_factory):
    """vLLM on the chat-shaped tiny model, its step-break tokens made likelier (one engine for the module)."""
    from tests.support.vllm import VLLM_ACTOR, require_vllm_here  # noqa: PLC0415 -- only for vllm tests

    require_vllm_here()
    from transformers import AutoTokenizer  # noqa: PLC0415 -- with the engine's imports

    from actor.engines import make_engine  # noqa: PLC0415 -- vLLM loads with the engine

    src = make_tiny_model(architecture="llama", tokenizer="bpe", **VLLM_CPU_TINY)
    tok = AutoTokenizer.from_pretrained(str(src))
    ids = {t: tok.convert_tokens_to_ids(tok.tokenize(t))[0] for t in BREAKS}
    path = bias_tokens(src, tmp_path_factory.mktemp("vllm-chat") / "model", {i: 0.5 for i in ids.values()})
    engine = make_engine(ModelConfig(path=str(path)), ActorConfig(**VLLM_ACTOR))
    yield engine, path
    engine.close()


@pytest.mark.vllm
def test_vllm_chat_steps_end_like_hf_and_log_probs_match_the_learner(chat_engine):
    engine, path = chat_engine
    tok = engine.tokenizer
    assert set(engine.eos_token_ids) == {tok.convert_tokens_to_ids("<|im_end|>"),
                                         tok.convert_tokens_to_ids("<|endoftext|>")}
    prompts = PromptSource(DataConfig(source="synthetic", chat_template=True), tok).next_batch(4)
    assert all(p.text.endswith("<|im_start|>assistant\n") for p in prompts)
    cfg = TreeConfig(depth=3, branching=[2, 2, 2], split="step", step_delimiter="\n\n", segment_tokens=8,
                     max_tokens=24, temperature=0.9)
    trees = TreeSampler(engine, cfg, make_reward("arithmetic", 5.0), "vllm-chat", seed=2).sample(prompts)
    ended_by = step_endings(trees, tok.decode, "\n\n", cfg.depth, cfg.segment_tokens)
    assert {"\n\n\n", " \n\n", "\n\n"} <= set(ended_by), ended_by

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    diffs, tokens = [], 0
    for batch in pack_trees(trees, AdvantageConfig(), "tree", 256, learner_version=0):
        with torch.no_grad():
            lp = token_logprobs(model, batch, cfg.temperature)  # (B, T)
        tokens += int(batch.generated.sum())
        diffs.append((lp - batch.behaviour_logprobs)[batch.generated].abs().max().item())
    assert tokens == sum(t.num_tokens() for t in trees)
    print(f"\nvLLM (chat model) vs learner log-probs: max |diff| = {max(diffs):.2e} over {tokens} tokens; "
          f"steps ended by {ended_by}")
    assert max(diffs) <= FIDELITY_TOL
    assert np.isfinite(max(diffs))


@pytest.mark.vllm
def test_ci_runs_the_vllm_the_image_ships():
    # the Docker image pins the vLLM release CI tests (tests/deploy: test_the_image_ships_the_vllm_ci_tests)
    from tests.support.vllm import CI_VLLM, require_vllm_here  # noqa: PLC0415

    require_vllm_here()
    import vllm  # noqa: PLC0415

    assert tuple(int(x) for x in vllm.__version__.split(".")[:2]) == CI_VLLM, vllm.__version__
