"""A chat model's shape through the actor: a Llama with a byte-level BPE vocabulary, a ChatML
template and two end ids (treerpo.tinymodel, tokenizer="bpe") -- the shape of SmolLM2 and Qwen.

Where a step ends on a BPE vocabulary (design §3.1): the delimiter is text, the segment is tokens.
A segment ends with the token in which the delimiter's text is completed, and that token stays
whole -- "\\n\\n\\n" and " \\n\\n" are single tokens here (as in SmolLM2's vocabulary), so the
segment may run one character past the delimiter; "\\n" + "\\n" completes it across two tokens.
Text is never decoded and re-encoded, so the children continue from exactly those ids.
"""

from __future__ import annotations

import numpy as np
import pytest

from actor.sampler import TreeSampler
from common.config import DataConfig, TreeConfig
from common.data import PromptSource
from tests.support.models import PathTextReward, bias_tokens, check_fidelity, hf_engine
from tests.support.treegen import step_endings

CHAT = {"architecture": "llama", "tokenizer": "bpe"}


@pytest.fixture(scope="module")
def chat_dir(make_tiny_model):
    return make_tiny_model(**CHAT)


def chat_prompts(engine, n: int = 3):
    cfg = DataConfig(source="synthetic", chat_template=True, prompt_template="{problem} Answer in \\boxed{}.")
    return PromptSource(cfg, engine.tokenizer).next_batch(n)


def test_chat_prompts_go_through_the_template(chat_dir):
    engine = hf_engine(chat_dir)
    tok = engine.tokenizer
    im_start = tok.convert_tokens_to_ids("<|im_start|>")
    for p in chat_prompts(engine):
        assert p.text.startswith("<|im_start|>user\n") and p.text.endswith("<|im_end|>\n<|im_start|>assistant\n")
        assert "Answer in \\boxed{}." in p.text
        # the template's specials are single ids, not spelled out in characters
        assert p.token_ids[0] == im_start and (p.token_ids == im_start).sum() == 2
        assert tok.decode(p.token_ids) == p.text
    # both end ids of the generation config end a sample: <|im_end|> (end of turn) and <|endoftext|>
    assert set(engine.eos_token_ids) == {tok.convert_tokens_to_ids("<|im_end|>"),
                                         tok.convert_tokens_to_ids("<|endoftext|>")}


def test_a_step_ends_with_the_token_that_completes_the_delimiter(chat_dir, tmp_path):
    probe = hf_engine(chat_dir).tokenizer
    ids = {t: probe.convert_tokens_to_ids(probe.tokenize(t))[0] for t in ("\n\n\n", " \n\n", "\n\n", "\n")}
    assert all(len(probe.tokenize(t)) == 1 for t in ids), "the BPE vocabulary lost a merged break token"
    engine = hf_engine(bias_tokens(chat_dir, tmp_path / "breaks", {i: 0.6 for i in ids.values()}))
    cfg = TreeConfig(depth=3, branching=[2, 2, 2], split="step", step_delimiter="\n\n", segment_tokens=8,
                     max_tokens=24)
    trees = TreeSampler(engine, cfg, PathTextReward(), "a", seed=1).sample(chat_prompts(engine, 4))
    ended = step_endings(trees, engine.tokenizer.decode, "\n\n", cfg.depth, cfg.segment_tokens)
    # every way the delimiter can end a BPE step happened
    assert {"\n\n\n", " \n\n", "\n\n", "\n + \n"} <= set(ended), ended


def test_end_of_turn_makes_a_leaf_and_log_probs_are_exact(chat_dir, tmp_path):
    tok = hf_engine(chat_dir).tokenizer
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    engine = hf_engine(bias_tokens(chat_dir, tmp_path / "eot", {im_end: 0.35}))
    cfg = TreeConfig(depth=2, branching=[2, 2], segment_tokens=6, max_tokens=16, temperature=0.9, top_p=0.95)
    trees = TreeSampler(engine, cfg, PathTextReward(), "a", seed=2).sample(chat_prompts(engine, 3))
    ended = [n for t in trees for n in t.nodes if n.finish == "stop"]
    assert all(n.token_ids[-1] in engine.eos_token_ids for n in ended)
    assert sum(n.token_ids[-1] == im_end for n in ended) >= 3  # the end of turn ends samples
    for tree in trees:
        for i, node in enumerate(tree.nodes):
            if node.finish == "stop":  # ended its turn: a leaf (no children), scored
                assert not np.any(tree.parents == i) and node.reward is not None
        check_fidelity(engine, tree, cfg)
