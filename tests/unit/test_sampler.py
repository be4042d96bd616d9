"""TreeSampler on the real tiny HF model: shapes, BFS order, early EOS, GRPO, seeding, stop
strings, budgets, rewards, and behaviour log-prob fidelity for every node of sampled trees."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from actor.engine import GenerationRequest
from actor.sampler import TreeSampler
from common.config import TreeConfig
from common.data import Prompt
from common.rewards import make_reward
from common.sampling import entropy_of, processed_logprobs
from tests.support.models import PathTextReward, bias_tokens, check_fidelity, hf_engine
from treerpo.tinymodel import EOS_ID

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def engine(tiny_model_dir):
    return hf_engine(tiny_model_dir)


@pytest.fixture(scope="session")
def no_eos_engine(tiny_model_dir, tmp_path_factory):
    return hf_engine(bias_tokens(tiny_model_dir, tmp_path_factory.mktemp("noeos"), {EOS_ID: -5.0}))


@pytest.fixture(scope="session")
def eos_engine(tiny_model_dir, tmp_path_factory):
    return hf_engine(bias_tokens(tiny_model_dir, tmp_path_factory.mktemp("eos"), {EOS_ID: 0.3}))


def prompts(engine, texts=("12+34=", "7*8=", "(1+2)*3=")):
    return [Prompt(prompt_id=f"p{i}", text=t, answer=str(i), meta={"task": "demo"},
                   token_ids=np.array(engine.tokenizer.encode(t), dtype=np.int32)) for i, t in enumerate(texts)]


def tree_cfg(**kw):
    base = dict(depth=3, branching=[2, 2, 2], segment_tokens=4, max_tokens=20)
    base.update(kw)
    return TreeConfig(**base)


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
        assert all(n.finish == "segment" for n, d in zip(tree.nodes, depths, strict=True) if d < 3)
        assert all(len(n) == 4 for n, d in zip(tree.nodes, depths, strict=True) if d < 3)  # cut at segment_tokens
        # last level runs to the rest of the budget: 20 - 2 * 4 = 12
        assert all(n.finish == "length" and len(n) == 12 for n, d in zip(tree.nodes, depths, strict=True) if d == 3)
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
    def key(trees):
        return [(n.parent, n.finish, n.token_ids.tolist(), n.logprobs.tolist()) for t in trees for n in t.nodes]

    cfg = tree_cfg(branching=[2, 1, 2])
    ps = prompts(engine)
    a = TreeSampler(engine, cfg, PathTextReward(), "a", seed=5).sample(ps)
    b = TreeSampler(engine, cfg, PathTextReward(), "a", seed=5).sample(ps)
    c = TreeSampler(engine, cfg, PathTextReward(), "a", seed=6).sample(ps)
    assert key(a) == key(b) and key(a) != key(c)
    assert len({t.tree_id for t in a + b}) == 6


def test_step_split_keeps_delimiter(tiny_model_dir, tmp_path):
    probe = hf_engine(tiny_model_dir)
    semi = int(probe.tokenizer.convert_tokens_to_ids(";"))
    eng = hf_engine(bias_tokens(tiny_model_dir, tmp_path / "semi", {semi: 0.8, EOS_ID: -5.0}))
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
                assert node.finish == "length"
                assert len(tree.context_ids(i)) - len(tree.prompt_token_ids) + len(node) == 24
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


# -- streaming (no level barrier) -------------------------------------------------------------
class GenerateOnly:
    """An engine without a native stream: the sampler falls back to GenerateStream."""

    def __init__(self, engine):
        self._engine, self.calls = engine, 0

    def generate(self, requests):
        self.calls += 1
        return self._engine.generate(requests)

    def __getattr__(self, name):
        if name == "open_stream":
            raise AttributeError(name)
        return getattr(self._engine, name)


def check_shapes(tree, branching, max_tokens, segment_tokens):
    """No EOS: every level full, parents in BFS order, budgets as in test_tree_shapes_and_bfs_order."""
    per_level = np.cumprod(branching)
    depths = tree.depths()
    assert [int((depths == d + 1).sum()) for d in range(len(branching))] == per_level.tolist()
    expected_parents, start = [-1] * branching[0], 0
    for d in range(1, len(branching)):
        for p in range(start, start + per_level[d - 1]):
            expected_parents += [p] * branching[d]
        start += per_level[d - 1]
    assert tree.parents.tolist() == expected_parents
    assert all(len(n) == segment_tokens and n.finish == "segment"
               for n, d in zip(tree.nodes, depths, strict=True) if d < len(branching))
    assert tree.path_lengths().tolist() == [max_tokens] * int(per_level[-1])


@pytest.mark.parametrize("rows", [256, 3])
def test_stream_refills_and_keeps_shapes(no_eos_engine, rows):
    # 7 prompts through at most 3 trees in flight; rows=3 makes forks wait (parked rows) and
    # prompts queue: shapes, BFS order, fidelity and the in-flight bound hold either way.
    cfg = tree_cfg(branching=[2, 1, 2])
    ps = prompts(no_eos_engine, ("1+2=", "33*4=", "5-6=", "7=", "(8)=", "9+9=", "10/2="))
    queue, asked, in_flight, peak = list(ps), [], [0], [0]

    def source(k):
        asked.append(k)
        got = [queue.pop(0) for _ in range(min(k, len(queue)))]
        in_flight[0] += len(got)
        peak[0] = max(peak[0], in_flight[0])
        return got if got or queue else None

    old_rows = no_eos_engine.max_batch_rows
    no_eos_engine.max_batch_rows = rows
    try:
        out = []
        for prompt, tree in TreeSampler(no_eos_engine, cfg, PathTextReward(), "a", seed=1).stream(source, 3):
            in_flight[0] -= 1
            out.append((prompt, tree))
    finally:
        no_eos_engine.max_batch_rows = old_rows
    assert sorted(p.prompt_id for p, _ in out) == sorted(p.prompt_id for p in ps)
    assert peak[0] <= 3 and all(k >= 1 for k in asked)
    for prompt, tree in out:
        assert tree.prompt_id == prompt.prompt_id
        assert tree.prompt_token_ids.tolist() == prompt.token_ids.tolist()
        check_shapes(tree, cfg.branching, cfg.max_tokens, cfg.segment_tokens)
        check_fidelity(no_eos_engine, tree, cfg)
        assert tree.meta["engine_steps"] >= cfg.max_tokens and tree.meta["engine_calls"] == 3


def test_generate_fallback_one_call_per_level(engine):
    # without a native stream each step is one generate call over every ready request: a
    # sample() call of 3 prompts needs exactly one call per level (the old per-level batching)
    cfg = tree_cfg(branching=[2, 2, 2], temperature=0.8, top_k=10, top_p=0.9)
    eng = GenerateOnly(engine)
    trees = TreeSampler(eng, cfg, PathTextReward(), "a", seed=3).sample(prompts(engine))
    assert eng.calls == 3
    for tree in trees:
        assert tree.meta["engine_steps"] == 3
        check_fidelity(engine, tree, cfg)
    again = TreeSampler(GenerateOnly(engine), cfg, PathTextReward(), "a", seed=3).sample(prompts(engine))
    ids = [n.token_ids.tolist() for t in trees for n in t.nodes]
    assert ids == [n.token_ids.tolist() for t in again for n in t.nodes]


class BumpingEngine:
    """The engine, whose stream bumps `engine.version` just before engine step `at` (a weight load)."""

    def __init__(self, engine, at):
        self._engine, self.at = engine, at

    def open_stream(self, seed):
        inner, engine, steps = self._engine.open_stream(seed), self._engine, [0]

        class Stream:
            add, busy, free_rows, close = inner.add, inner.busy, inner.free_rows, inner.close

            def step(self):
                steps[0] += 1
                if steps[0] == outer.at:
                    engine.version += 1
                return inner.step()

        outer = self
        return Stream()

    def __getattr__(self, name):
        return getattr(self._engine, name)


def test_stream_versions_are_the_oldest_weights_a_node_saw(no_eos_engine):
    # first segments are 4 tokens (steps 1-4); a version bump before step 5 (a weight load) comes
    # after level 1 finished at version 0. Levels 2 and 3 sample their tokens with version 1 but
    # attend to level 1's KV, written by version 0: a node's version is the oldest weights that
    # touched its context or its tokens (design §4.3), so every node of these trees is version 0.
    cfg = tree_cfg(branching=[2, 2, 1])
    try:
        trees = TreeSampler(BumpingEngine(no_eos_engine, 5), cfg, PathTextReward(), "a", seed=2).sample(
            prompts(no_eos_engine))
        assert no_eos_engine.version == 1
        # a bump before the first step: every node, roots included, is version 1
        fresh = TreeSampler(BumpingEngine(no_eos_engine, 1), cfg, PathTextReward(), "a", seed=2).sample(
            prompts(no_eos_engine))
    finally:
        no_eos_engine.version = 0
    assert len(trees) == 3
    for tree in trees:
        assert [n.version for n in tree.nodes] == [0] * len(tree.nodes)
    for tree in fresh:
        assert [n.version for n in tree.nodes] == [2] * len(tree.nodes)


# -- tree.branch_at: entropy --------------------------------------------------------------------
def _teacher_forced(engine, cfg, context, tokens):
    """Processed log-probs (L, V) of `tokens` after `context`, one forward."""
    ids = torch.from_numpy(np.concatenate([context, tokens]).astype(np.int64))[None]
    with torch.no_grad():
        logits = engine.model(input_ids=ids).logits[0].float()
    rows = logits[len(context) - 1:len(context) - 1 + len(tokens)]
    L = len(tokens)
    return processed_logprobs(rows, torch.full((L,), cfg.temperature), torch.full((L,), cfg.top_k),
                              torch.full((L,), cfg.top_p))


def _response_of(tree, i):
    """The response node i was cut from: node i, then its first child, that child's first child, ..."""
    kids = tree.children()
    parts = [i]
    while kids[parts[-1]]:
        parts.append(kids[parts[-1]][0])
    return np.concatenate([tree.nodes[j].token_ids for j in parts])


@pytest.mark.parametrize("branching,top_k,top_p", [([2, 2, 2], 0, 1.0), ([3, 1, 2], 10, 0.9)])
def test_entropy_branching_forks_at_the_highest_entropy_token(no_eos_engine, branching, top_k, top_p):
    # every response runs to the path's budget and forks where the model was least sure: node i
    # at level l ends just before the highest-entropy token, among positions 1 .. L - (2 - l)
    # (the rest keeps a token per level below), of the response it was cut from (node i + its
    # first-child chain); the entropies are recomputed here by a teacher-forced forward
    cfg = tree_cfg(branching=branching, branch_at="entropy", top_k=top_k, top_p=top_p)
    before = no_eos_engine.stats["prefill_tokens"]
    trees = TreeSampler(no_eos_engine, cfg, PathTextReward(), "a", seed=3).sample(prompts(no_eos_engine))
    # only the prompts were prefilled: every new sample forked its response's KV row, cut at the fork
    assert no_eos_engine.stats["prefill_tokens"] - before == sum(len(p.token_ids) for p in prompts(no_eos_engine))
    per_level = np.cumprod(branching)
    forks = set()
    for tree in trees:
        depths = tree.depths()
        assert [int((depths == d + 1).sum()) for d in range(3)] == per_level.tolist()  # no EOS: full
        assert tree.path_lengths().tolist() == [20] * int(per_level[-1])  # no token dropped from any path
        check_fidelity(no_eos_engine, tree, cfg)
        kids = tree.children()
        for i, node in enumerate(tree.nodes):
            if depths[i] == 3:
                assert kids[i] == [] and node.finish == "length"
                continue
            assert node.finish == "segment" and len(kids[i]) == branching[depths[i]]
            response = _response_of(tree, i)
            ent = entropy_of(_teacher_forced(no_eos_engine, cfg, tree.context_ids(i), response)).numpy()
            last = len(response) - (3 - depths[i])
            assert 1 <= len(node) <= last
            assert ent[len(node)] >= ent[1:last + 1].max() - 1e-4, (i, len(node), ent)
            forks.add(len(node))
    assert len(forks) >= 3  # the fork moves with the sample, not a fixed segment length


def test_entropy_branching_keeps_the_rest_and_samples_new_children(no_eos_engine, eos_engine):
    # a budget of 3 tokens over 3 levels leaves one fork position per response: every node is one
    # token, the rest of each response is sibling 0 and the tree is full; versions are the engine's
    cfg = tree_cfg(branching=[2, 2, 2], branch_at="entropy", max_tokens=3)
    no_eos_engine.version = 4
    try:
        trees = TreeSampler(no_eos_engine, cfg, PathTextReward(), "a", seed=8).sample(prompts(no_eos_engine))
    finally:
        no_eos_engine.version = 0
    for tree in trees:
        assert [len(n) for n in tree.nodes] == [1] * 14 and all(n.version == 4 for n in tree.nodes)
        assert tree.parents.tolist() == [-1, -1, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    # a response that ends in EOS before it can fork (L <= 3 - depth: no position leaves a token per
    # level below) is a leaf where it stops; a longer one forks and its EOS ends a deeper leaf
    cfg = tree_cfg(branching=[2, 2, 2], branch_at="entropy", max_tokens=12)
    early = 0
    for tree in TreeSampler(eos_engine, cfg, PathTextReward(), "a", seed=1).sample(prompts(eos_engine) * 4):
        depths, kids = tree.depths(), tree.children()
        check_fidelity(eos_engine, tree, cfg)
        for i, node in enumerate(tree.nodes):
            if node.finish == "segment":
                assert len(kids[i]) == 2 and EOS_ID not in node.token_ids
            elif node.finish == "stop":
                assert node.token_ids[-1] == EOS_ID and kids[i] == []
                assert depths[i] == 3 or len(node) <= 3 - depths[i]
                early += depths[i] < 3
            else:
                assert node.finish == "length" and depths[i] == 3
    assert early >= 2


def test_entropy_requests_report_the_sampling_entropy(engine):
    # Sample.entropy[t] is the entropy of the distribution token t was drawn from, and only
    # requests that ask for it carry it
    ctx = np.array(engine.tokenizer.encode("12+34="), dtype=np.int32)
    reqs = [GenerationRequest(context=ctx, n=2, max_tokens=6, temperature=0.8, top_k=10, top_p=0.9, seed=1,
                              entropy=True),
            GenerationRequest(context=ctx, n=1, max_tokens=6, seed=2)]
    with_ent, without = engine.generate(reqs)
    assert without[0].entropy is None
    cfg = TreeConfig(depth=1, branching=[2], temperature=0.8, top_k=10, top_p=0.9, max_tokens=6)
    for s in with_ent:
        ref = entropy_of(_teacher_forced(engine, cfg, ctx, s.token_ids)).numpy()
        np.testing.assert_allclose(s.entropy, ref, atol=1e-4, rtol=0)
        assert np.all(s.entropy > 0)


def test_entropy_branching_refuses_step_split():
    from common.config import ConfigError, load_config  # noqa: PLC0415

    with pytest.raises((ValueError, ConfigError), match="branch_at=entropy"):
        TreeConfig(depth=2, branching=[2, 2], split="step", branch_at="entropy")
    with pytest.raises(ConfigError, match="branch_at"):
        load_config(None, ["tree.branch_at=entropy", "tree.split=step"])


@pytest.mark.parametrize("rows", [4, 2])
def test_entropy_forks_that_wait_for_room_fork_the_parked_row(no_eos_engine, rows):
    # a small batch: forks wait with their response's state parked out of the batch, several
    # children (one per level) from one parked response, each cut at its own fork point; the
    # trees are what an unbounded batch makes (one random stream per row order aside: shapes,
    # budgets and log-probs are checked, not tokens)
    cfg = tree_cfg(branching=[2, 2, 2], branch_at="entropy", max_tokens=12)
    old_rows = no_eos_engine.max_batch_rows
    no_eos_engine.max_batch_rows = rows
    before = no_eos_engine.stats["prefill_tokens"]
    try:
        trees = TreeSampler(no_eos_engine, cfg, PathTextReward(), "a", seed=5).sample(prompts(no_eos_engine))
    finally:
        no_eos_engine.max_batch_rows = old_rows
    assert no_eos_engine.stats["prefill_tokens"] - before == sum(len(p.token_ids) for p in prompts(no_eos_engine))
    for tree in trees:
        assert tree.parents.tolist() == [-1, -1, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
        assert tree.path_lengths().tolist() == [12] * 8
        check_fidelity(no_eos_engine, tree, cfg)
