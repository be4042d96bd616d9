"""TreeRPO math: hand-derived values, a naive reference implementation, and properties."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from common.config import AdvantageConfig
from common.treerpo import node_token_offsets, node_values, step_advantages, token_advantages
from tests.support.treegen import random_tree, tree_from_parents

EPS = 1e-6
R2 = 1 / math.sqrt(2)  # a two-member group's normalised advantage is always +-1/sqrt(2)

# Depth-3 binary tree, BFS order:
#   level 1: 0, 1            (root's children)
#   level 2: 2, 3 <- 0 ; 4, 5 <- 1
#   level 3: 6, 7 <- 2 ; 8, 9 <- 3 ; 10, 11 <- 4 ; 12, 13 <- 5
BINARY3 = [-1, -1, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
BINARY3_REWARDS = {6: 1.0, 7: 0.0, 8: 1.0, 9: 1.0, 10: 0.0, 11: 0.0, 12: 1.0, 13: 0.0}
# V2 = (1+0)/2 = .5, V3 = 1, V4 = 0, V5 = .5, V0 = (.5+1)/2 = .75, V1 = (0+.5)/2 = .25
BINARY3_VALUES = [0.75, 0.25, 0.5, 1.0, 0.0, 0.5, 1, 0, 1, 1, 0, 0, 1, 0]


def test_node_values_depth3_binary():
    tree = tree_from_parents(BINARY3, BINARY3_REWARDS)
    np.testing.assert_allclose(node_values(tree), BINARY3_VALUES, rtol=0, atol=1e-15)


def test_group_norm_depth3_binary():
    tree = tree_from_parents(BINARY3, BINARY3_REWARDS)
    adv, trainable = step_advantages(tree, AdvantageConfig())
    # Each pair {x, y} with x > y: mean (x+y)/2, ddof-1 std |x-y|/sqrt(2), so A = +-(|x-y|/2)/(|x-y|/sqrt2 + eps).
    # root {.75,.25}: d=.5 ; {.5,1}: d=.5 ; {0,.5}: d=.5 ; {1,0}: d=1 ; {1,1}, {0,0}: std 0 -> A = 0.
    s = 0.5 / math.sqrt(2)  # std of a pair that differs by .5
    a_half = 0.25 / (s + EPS)
    a_one = 0.5 / (2 * s + EPS)
    expected = [a_half, -a_half, -a_half, a_half, -a_half, a_half, a_one, -a_one, 0, 0, 0, 0, a_one, -a_one]
    np.testing.assert_allclose(adv, expected, rtol=1e-12, atol=1e-15)
    assert abs(a_half - R2) < 1e-5  # sanity on the derivation
    assert trainable.all()  # tau = 0 prunes nothing with k >= 2, equal groups included


def test_none_norm_is_centred_value():
    tree = tree_from_parents(BINARY3, BINARY3_REWARDS)
    adv, _ = step_advantages(tree, AdvantageConfig(norm="none"))
    # A = V - mean_G: root .75-.5 ; group0 .5-.75, 1-.75 ; group1 0-.25, .5-.25 ; leaves +-.5 or 0
    expected = [0.25, -0.25, -0.25, 0.25, -0.25, 0.25, 0.5, -0.5, 0, 0, 0, 0, 0.5, -0.5]
    np.testing.assert_allclose(adv, expected, rtol=0, atol=1e-15)


def test_tree_norm_uses_std_over_nodes_with_siblings():
    tree = tree_from_parents(BINARY3, BINARY3_REWARDS)
    adv, _ = step_advantages(tree, AdvantageConfig(norm="tree"))
    # All 14 nodes have a sibling. Sum of values = 7 -> mean .5. Squared deviations:
    # nodes 0,1: .0625 each; 2,5: 0; 3,4: .25 each; 6..13: .25 each -> 2.625; var = 2.625/13.
    std_t = math.sqrt(2.625 / 13)
    centred = [0.25, -0.25, -0.25, 0.25, -0.25, 0.25, 0.5, -0.5, 0, 0, 0, 0, 0.5, -0.5]
    np.testing.assert_allclose(adv, np.array(centred) / (std_t + EPS), rtol=1e-12, atol=1e-15)
    assert abs(adv[0] - 0.5563474) < 1e-6  # .25 / (.4493585 + 1e-6)


def test_level_norm_uses_std_over_each_depth():
    tree = tree_from_parents(BINARY3, BINARY3_REWARDS)
    adv, _ = step_advantages(tree, AdvantageConfig(norm="level"))
    # depth 1 {.75, .25}: std .25*sqrt2 ; depth 2 {.5, 1, 0, .5}: mean .5, var (0+.25+.25+0)/3 ;
    # depth 3 {1,0,1,1,0,0,1,0}: mean .5, var 8*.25/7. Centred values as for norm="none".
    s1, s2, s3 = 0.25 * math.sqrt(2), math.sqrt(0.5 / 3), math.sqrt(2 / 7)
    expected = [0.25 / (s1 + EPS), -0.25 / (s1 + EPS)] + [x / (s2 + EPS) for x in (-0.25, 0.25, -0.25, 0.25)] + [
        x / (s3 + EPS) for x in (0.5, -0.5, 0, 0, 0, 0, 0.5, -0.5)]
    np.testing.assert_allclose(adv, expected, rtol=1e-12, atol=1e-15)
    assert abs(adv[0] - R2) < 1e-5 and abs(adv[6] - 0.9354126) < 1e-6  # .5 / (.5345225 + 1e-6)


def test_leaves_weight_counts_each_path_through_a_node():
    # 0 stops at depth 1 (r=1); 1 branches into 2 (r=0) and 3 (r=1). Paths [0], [1,2], [1,3]: node 1 is on two.
    tree = tree_from_parents([-1, -1, 1, 1], {0: 1.0, 2: 0.0, 3: 1.0})  # 2 tokens per node
    plain, trainable = step_advantages(tree, AdvantageConfig())
    np.testing.assert_allclose(plain, [R2, -R2, -R2, R2], rtol=1e-5)
    adv, same = step_advantages(tree, AdvantageConfig(weight="leaves"))
    assert same.tolist() == trainable.tolist()
    # leaves (1, 2, 1, 1); W = (1+2+1+1)*2 tokens / 8 tokens = 1.25
    np.testing.assert_allclose(adv, plain * np.array([1, 2, 1, 1]) / 1.25, rtol=1e-12)
    assert abs(adv[1] - (-R2 * 1.6)) < 1e-5


def test_leaves_weight_on_a_uniform_tree_and_after_pruning():
    tree = tree_from_parents(BINARY3, BINARY3_REWARDS)
    plain, _ = step_advantages(tree, AdvantageConfig())
    adv, _ = step_advantages(tree, AdvantageConfig(weight="leaves"))
    # leaves 4 / 2 / 1 by depth, 2 tokens each: W = (2*4 + 4*2 + 8*1) / 14 = 24/14
    w = np.array([4] * 2 + [2] * 4 + [1] * 8) / (24 / 14)
    np.testing.assert_allclose(adv, plain * w, rtol=1e-12, atol=1e-15)
    # tau = .4 keeps only leaves 6, 7, 12, 13 (weight 1 each): W = 1, nothing changes
    cfg = AdvantageConfig(min_group_std=0.4)
    np.testing.assert_array_equal(step_advantages(tree, cfg.model_copy(update={"weight": "leaves"}))[0],
                                  step_advantages(tree, cfg)[0])


def test_min_group_std_prunes_groups():
    tree = tree_from_parents(BINARY3, BINARY3_REWARDS)
    adv, trainable = step_advantages(tree, AdvantageConfig(min_group_std=0.4))
    # Group stds: root, group(0), group(1): .5/sqrt2 = .354 < .4 -> pruned; group(2), group(5): 1/sqrt2 kept;
    # group(3), group(4): 0 -> pruned. Survivors: nodes 6, 7, 12, 13.
    assert np.flatnonzero(trainable).tolist() == [6, 7, 12, 13]
    np.testing.assert_allclose(adv[[6, 7, 12, 13]], [0.5 / (R2 + EPS), -0.5 / (R2 + EPS)] * 2, rtol=1e-12)
    assert np.all(adv[~trainable] == 0.0)


def test_early_eos_leaf_at_depth1():
    # 0 stops at depth 1 with reward 1; 1 branches into 2 (r=0) and 3 (r=1).
    tree = tree_from_parents([-1, -1, 1, 1], {0: 1.0, 2: 0.0, 3: 1.0})
    np.testing.assert_allclose(node_values(tree), [1.0, 0.5, 0.0, 1.0], atol=1e-15)
    adv, trainable = step_advantages(tree, AdvantageConfig())
    # root {1, .5}: mean .75, std .5/sqrt2 ; group(1) {0, 1}: mean .5, std 1/sqrt2
    s = 0.5 / math.sqrt(2)
    expected = [0.25 / (s + EPS), -0.25 / (s + EPS), -0.5 / (2 * s + EPS), 0.5 / (2 * s + EPS)]
    np.testing.assert_allclose(adv, expected, rtol=1e-12)
    assert trainable.all()


def test_all_equal_rewards_give_zero_advantage():
    tree = tree_from_parents(BINARY3, {i: 1.0 for i in range(6, 14)})
    np.testing.assert_allclose(node_values(tree), np.ones(14), atol=0)
    adv, trainable = step_advantages(tree, AdvantageConfig())
    assert np.all(adv == 0.0) and trainable.all()  # kept (tau = 0) but contributes no gradient
    _, trainable = step_advantages(tree, AdvantageConfig(min_group_std=1e-9))
    assert not trainable.any()  # any tau > 0 prunes zero-variance groups


def test_singleton_groups_are_pruned():
    # 0 -> 2 and 1 -> 3 are single children: their groups have k = 1.
    tree = tree_from_parents([-1, -1, 0, 1], {2: 1.0, 3: 0.0})
    adv, trainable = step_advantages(tree, AdvantageConfig())
    assert trainable.tolist() == [True, True, False, False]
    np.testing.assert_allclose(adv, [0.5 / (R2 + EPS), -0.5 / (R2 + EPS), 0.0, 0.0], rtol=1e-12)


def test_depth1_group_of_three_hand_derived():
    tree = tree_from_parents([-1, -1, -1], {0: 1.0, 1: 0.0, 2: 0.0})
    adv, _ = step_advantages(tree, AdvantageConfig())
    # mean 1/3; ddof-1 var = ((2/3)^2 + 2 (1/3)^2) / 2 = 1/3 -> std = .57735
    std = math.sqrt(1 / 3)
    np.testing.assert_allclose(adv, [(2 / 3) / (std + EPS), -(1 / 3) / (std + EPS), -(1 / 3) / (std + EPS)], rtol=1e-12)


@pytest.mark.parametrize("g", [2, 4, 8, 16])
def test_depth1_is_grpo(g):
    rng = np.random.default_rng(g)
    rewards = rng.normal(size=g)
    tree = tree_from_parents([-1] * g, dict(enumerate(rewards.tolist())))
    adv, trainable = step_advantages(tree, AdvantageConfig())
    r = torch.tensor(rewards, dtype=torch.float64)
    grpo = (r - r.mean()) / (r.std() + EPS)  # torch.std is ddof = 1
    np.testing.assert_allclose(adv, grpo.numpy(), rtol=1e-12, atol=1e-14)
    assert trainable.all()


def test_token_expansion_lays_out_each_node_once():
    tree = tree_from_parents([-1, -1, 1, 1], {0: 1.0, 2: 0.0, 3: 1.0}, seg_len=3)
    adv, trainable = step_advantages(tree, AdvantageConfig())
    tok_adv, tok_mask = token_advantages(tree, AdvantageConfig())
    offsets = node_token_offsets(tree)
    assert offsets.tolist() == [0, 3, 6, 9, 12]
    assert tok_adv.dtype == np.float32 and tok_adv.shape == (12,)
    for i in range(4):
        assert np.all(tok_adv[offsets[i] : offsets[i + 1]] == np.float32(adv[i]))
        assert np.all(tok_mask[offsets[i] : offsets[i + 1]] == trainable[i])


# -- a naive reference: recursion for values, explicit loops over groups ------------------------
def naive_values(tree) -> list[float]:
    kids = tree.children()

    def value(i: int) -> float:
        if not kids[i]:
            return float(tree.nodes[i].reward)
        return sum(value(c) for c in kids[i]) / len(kids[i])

    return [value(i) for i in range(len(tree.nodes))]


def naive_advantages(tree, cfg: AdvantageConfig):
    values = naive_values(tree)
    groups: dict[int, list[int]] = {}
    for i, node in enumerate(tree.nodes):
        groups.setdefault(node.parent, []).append(i)
    kids = tree.children()

    def depth(i: int) -> int:
        return 1 if tree.nodes[i].parent < 0 else 1 + depth(tree.nodes[i].parent)

    def leaves(i: int) -> int:
        return 1 if not kids[i] else sum(leaves(c) for c in kids[i])

    def std_of(picked: list[float]) -> float:
        return float(torch.tensor(picked, dtype=torch.float64).std()) if len(picked) >= 2 else 0.0

    with_sibling = [i for g in groups.values() if len(g) >= 2 for i in g]
    std_t = std_of([values[i] for i in with_sibling])
    std_l = {d: std_of([values[i] for i in with_sibling if depth(i) == d]) for d in map(depth, range(len(values)))}
    adv = [0.0] * len(values)
    trainable = [False] * len(values)
    for members in groups.values():
        if len(members) < 2:
            continue
        v = torch.tensor([values[i] for i in members], dtype=torch.float64)
        mean, std = float(v.mean()), float(v.std())
        if std < cfg.min_group_std:
            continue
        for i in members:
            trainable[i] = True
            denom = {"group": std + cfg.eps, "none": 1.0, "tree": std_t + cfg.eps,
                     "level": std_l[depth(i)] + cfg.eps}[cfg.norm]
            adv[i] = (values[i] - mean) / denom
    if cfg.weight == "leaves":  # each node once per path through it, rescaled to a token-mean weight of 1
        on = [i for i in range(len(values)) if trainable[i]]
        tokens = {i: len(tree.nodes[i]) for i in on}
        mean_w = sum(leaves(i) * tokens[i] for i in on) / max(1, sum(tokens.values())) if on else 1.0
        adv = [a * leaves(i) / (mean_w or 1.0) for i, a in enumerate(adv)]
    return np.array(adv), np.array(trainable)


@settings(max_examples=200, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    norm=st.sampled_from(["group", "none", "tree", "level"]),
    weight=st.sampled_from(["node", "leaves"]),
    tau=st.sampled_from([0.0, 0.1, 0.3]),
    continuous=st.booleans(),
)
def test_matches_naive_reference_and_properties(seed, norm, weight, tau, continuous):
    rng = np.random.default_rng(seed)
    tree = random_tree(rng, reward_values=None if continuous else (0.0, 1.0), max_depth=4, max_branch=4)
    cfg = AdvantageConfig(norm=norm, weight=weight, min_group_std=tau)
    values = node_values(tree)
    np.testing.assert_allclose(values, naive_values(tree), rtol=1e-12, atol=1e-12)
    adv, trainable = step_advantages(tree, cfg)
    ref_adv, ref_trainable = naive_advantages(tree, cfg)
    assert trainable.tolist() == ref_trainable.tolist()
    np.testing.assert_allclose(adv, ref_adv, rtol=1e-9, atol=1e-9)
    # values lie within the leaf rewards' range
    leaf_rewards = tree.leaf_rewards()
    assert values.min() >= leaf_rewards.min() - 1e-12 and values.max() <= leaf_rewards.max() + 1e-12
    # every unpruned group's advantages sum to ~0 (siblings' weights differ under "leaves");
    # pruned nodes carry exactly 0
    parents = tree.parents
    for p in np.unique(parents):
        members = parents == p
        if weight == "node" and trainable[members].any():
            assert abs(adv[members].sum()) < 1e-9 * max(1.0, np.abs(adv[members]).max())
    assert np.all(adv[~trainable] == 0.0)
