"""TreeSampler on the real tiny HF model: shapes, BFS order, early EOS, GRPO, seeding, stop
strings, budgets, rewards, and behaviour log-prob fidelity for every node of sampled trees."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from actor.engine import make_engine, processed_logprobs
from actor.sampler import TreeSampler
from common.config import ActorConfig, ModelConfig, TreeConfig
from common.data import Prompt
from common.rewards import RewardResult, make_reward
from common.tinymodel import EOS_ID, build_tiny_model

torch.set_num_threads(1)


def bias_tokens(src, dst, deltas: dict[int, float], dim: int = 0, big: float = 8.0):
    """Copy of the model with the logits of chosen tokens raised (see tests/test_engine.py)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(src))
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        emb[:, dim] = big  # tied embeddings: the final hidden state is dominated by +e_dim
        for tok, delta in deltas.items():
            emb[tok, dim] = big + delta
    model.save_pretrained(str(dst))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(f"{src}/{name}", f"{dst}/{name}")
    return dst


class PathTextReward:
    """Test-only reward: a pure function of the decoded path text, so tests can recompute it."""

    name = "path_text"

    @staticmethod
    def value(text: str) -> float:
        return (len(text) % 3) / 2.0

    def score_many(self, completions, answers):
        return [RewardResult(self.value(t), "ok" if self.value(t) > 0 else "wrong") for t in completions]

    def close(self):
        pass


def load(path):
    return make_engine(ModelConfig(path=str(path), device="cpu"), ActorConfig())


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def engine(tiny_dir):
    return load(tiny_dir)


@pytest.fixture(scope="session")
def no_eos_engine(tiny_dir, tmp_path_factory):
    return load(bias_tokens(tiny_dir, tmp_path_factory.mktemp("noeos"), {EOS_ID: -5.0}))


@pytest.fixture(scope="session")
def eos_engine(tiny_dir, tmp_path_factory):
    return load(bias_tokens(tiny_dir, tmp_path_factory.mktemp("eos"), {EOS_ID: 0.3}))


def prompts(engine, texts=("12+34=", "7*8=", "(1+2)*3=")):
    return [Prompt(prompt_id=f"p{i}", text=t, answer=str(i), meta={"task": "demo"},
                   token_ids=np.array(engine.tokenizer.encode(t), dtype=np.int32)) for i, t in enumerate(texts)]


def tree_cfg(**kw):
    base = dict(depth=3, branching=[2, 2, 2], segment_tokens=4, max_tokens=20)
    base.update(kw)
    return TreeConfig(**base)


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


@pytest.mark.parametrize("branching", [[2, 2, 2], [3, 1, 2]])
def test_tree_shapes_and_bfs_order(no_eos_engine, branching):
    cfg = tree_cfg(branching=branching)
    trees = TreeSampler(no_eos_engine, cfg, PathTextReward(), "actor-0", seed=0).sample(prompts(no_eos_engine))
    assert len(trees) == 3
    per_level = np.cumprod(branching)  # [2, 4, 8] or [3, 3, 6]: no EOS, so every branch is full
    for tree in trees:
        depths = tree.depths()
        assert [int((depths == d + 1).sum()) for d in range(3)] == per_level.tolist()
        assert np.all(np.diff(depths) >= 0)  # BFS: levels in order
        # parents: level 1 under the root, then each parent's children contiguous, parents in order
        expected_parents = [-1] * branching[0]
        start = 0
        for d in (1, 2):
            for p in range(start, start + per_level[d - 1]):
                expected_parents += [p] * branching[d]
            start += per_level[d - 1]
        assert tree.parents.tolist() == expected_parents
        assert all(n.finish == "segment" for n, d in zip(tree.nodes, depths) if d < 3)
        assert all(len(n) == 4 for n, d in zip(tree.nodes, depths) if d < 3)  # cut at segment_tokens
        # last level runs to the rest of the budget: 20 - 2 * 4 = 12
        assert all(n.finish == "length" and len(n) == 12 for n, d in zip(tree.nodes, depths) if d == 3)
        assert tree.path_lengths().tolist() == [20] * int(per_level[-1])
        assert tree.meta["task"] == "demo" and tree.actor_id == "actor-0"


def test_early_eos_makes_leaves(eos_engine):
    cfg = tree_cfg()
    trees = TreeSampler(eos_engine, cfg, PathTextReward(), "a", seed=1).sample(prompts(eos_engine) * 2)
    early = 0
    for tree in trees:
        kids = tree.children()
        depths = tree.depths()
        for i, node in enumerate(tree.nodes):
            if node.finish == "segment":  # inner: exactly branching[level] children
                assert len(kids[i]) == cfg.branching[depths[i]]
            else:
                assert kids[i] == []
            if node.finish == "stop":
                assert node.token_ids[-1] == EOS_ID and EOS_ID not in node.token_ids[:-1]
                early += depths[i] < 3
            if node.finish == "length":
                assert depths[i] == 3 and EOS_ID not in node.token_ids
        assert len(tree.root_children()) == 2
    assert early >= 3  # P(EOS within 4 tokens) is about 0.37 with this bias


def test_depth_one_is_grpo(engine):
    cfg = TreeConfig(depth=1, branching=[8], segment_tokens=4, max_tokens=16)
    trees = TreeSampler(engine, cfg, PathTextReward(), "a", seed=2).sample(prompts(engine))
    for tree in trees:
        assert tree.parents.tolist() == [-1] * 8
        assert all(n.finish in ("stop", "length") and n.reward is not None for n in tree.nodes)
        assert len({tuple(n.token_ids.tolist()) for n in tree.nodes}) == 8  # distinct samples
        assert all(len(n) == 16 for n in tree.nodes if n.finish == "length")


def test_seeded_sampler_reproduces(engine):
    cfg = tree_cfg(branching=[2, 1, 2])
    ps = prompts(engine)
    key = lambda trees: [(n.parent, n.finish, n.token_ids.tolist(), n.logprobs.tolist()) for t in trees for n in t.nodes]
    a = TreeSampler(engine, cfg, PathTextReward(), "a", seed=5).sample(ps)
    b = TreeSampler(engine, cfg, PathTextReward(), "a", seed=5).sample(ps)
    c = TreeSampler(engine, cfg, PathTextReward(), "a", seed=6).sample(ps)
    assert key(a) == key(b) and key(a) != key(c)
    assert len({t.tree_id for t in a + b}) == 6


def test_step_split_keeps_delimiter(tiny_dir, tmp_path):
    probe = load(tiny_dir)
    semi = int(probe.tokenizer.convert_tokens_to_ids(";"))
    eng = load(bias_tokens(tiny_dir, tmp_path / "semi", {semi: 0.8, EOS_ID: -5.0}))
    cfg = tree_cfg(split="step", step_delimiter=";", segment_tokens=6, max_tokens=24)
    trees = TreeSampler(eng, cfg, PathTextReward(), "a", seed=3).sample(prompts(eng))
    cut_at_delim = 0
    for tree in trees:
        for i, node in enumerate(tree.nodes):
            text = eng.tokenizer.decode(node.token_ids)
            if tree.depths()[i] < 3:
                assert node.finish == "segment"
                assert text.endswith(";") or len(node) == 6  # delimiter or segment budget
                assert ";" not in text[:-1]  # cut at the first delimiter, which is kept
                cut_at_delim += text.endswith(";")
            else:  # the last level ignores the delimiter and runs to the budget
                assert node.finish == "length" and len(tree.context_ids(i)) - len(tree.prompt_token_ids) + len(node) == 24
    assert cut_at_delim >= 10


def test_rewards_versions_and_meta(engine):
    engine.version = 7
    try:
        sampler = TreeSampler(engine, tree_cfg(branching=[2, 2, 1]), PathTextReward(), "a", seed=4)
        trees = sampler.sample(prompts(engine))
    finally:
        engine.version = 0
    total = 0
    for tree in trees:
        assert all(n.version == 7 for n in tree.nodes)
        for leaf in tree.leaves():
            ids = np.concatenate([tree.nodes[j].token_ids for j in tree.path(leaf)]).tolist()
            text = engine.tokenizer.decode(ids, skip_special_tokens=True)
            assert tree.nodes[leaf].reward == PathTextReward.value(text)
        assert sum(tree.meta["reward_reasons"].values()) == len(tree.leaves()) == 4
        assert tree.meta["engine_calls"] == 3 and tree.meta["answer"] in ("0", "1", "2")
        total += len(tree.leaves())
    assert sum(sampler.last_reward_reasons.values()) == total


def test_arithmetic_reward_scores_leaves(engine):
    reward = make_reward("arithmetic")
    try:
        trees = TreeSampler(engine, tree_cfg(), reward, "a", seed=0).sample(prompts(engine))
    finally:
        reward.close()
    for tree in trees:
        assert set(tree.leaf_rewards().tolist()) <= {0.0, 1.0}
        assert tree.meta["task"] == "demo"


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.7, 0, 1.0), (1.0, 0, 1.0), (0.8, 10, 0.9)])
def test_tree_logprob_fidelity(engine, eos_engine, temperature, top_k, top_p):
    # the plain random model, and the EOS-biased one (ragged leaves, rows dropped mid-call)
    cfg = tree_cfg(temperature=temperature, top_k=top_k, top_p=top_p, branching=[2, 2, 2])
    for eng in (engine, eos_engine):
        trees = TreeSampler(eng, cfg, PathTextReward(), "a", seed=9).sample(prompts(eng)[:2])
        for tree in trees:
            check_fidelity(eng, tree, cfg)
