"""TreeRPO math (design §3): node values and step-level advantages, vectorised with numpy.

Values, bottom-up:

    V(leaf) = reward
    V(node) = mean_{c in children(node)} V(c)

Step-level groups: the children of one parent (the root included), G = {c_1..c_k}. For k >= 2

    A(c_i) = (V(c_i) - mean_G V) / (std_G V + eps)     norm = "group"
    A(c_i) =  V(c_i) - mean_G V                        norm = "none"   (Dr.GRPO style)
    A(c_i) = (V(c_i) - mean_G V) / (std_T V + eps)     norm = "tree"
    A(c_i) = (V(c_i) - mean_G V) / (std_L V + eps)     norm = "level"

with the sample std (ddof = 1, as torch.std), std_T taken over every node that has at least
one sibling (0 if fewer than two) and std_L over those at c_i's depth. A group with
std_G V < min_group_std, or with k = 1, is pruned: advantage 0, not trainable. Every token of a
node carries that node's advantage. With weight = "node" each node's tokens count once in the
loss however many leaves lie below it; with weight = "leaves" node c's advantage is multiplied
by

    w(c) = leaves(c) / W,    W = sum_trainable leaves(c) |c| / sum_trainable |c|

(|c| = tokens of c): a node counts as often as root-to-leaf paths run through it, as if every
path were trained on its own, and W keeps the tree's token-mean weight at 1 (the loss scale of
"node"). The clipped loss is homogeneous in A for positive w, so scaling A scales the node's
token losses.

Depth 1 with branching [G] is GRPO: one group, A = (r - mean r) / (std r + eps).
"""

from __future__ import annotations

import numpy as np

from common.config import AdvantageConfig
from common.tree import ReasoningTree


def _parents(tree: ReasoningTree) -> np.ndarray:
    return tree.parents  # int64[n], -1 = root


def node_depths(parents: np.ndarray) -> np.ndarray:
    """int64[n]: depth of each node (root's children = 1), for BFS-ordered `parents`."""
    depth = np.where(parents < 0, 1, 0).astype(np.int64)
    inner = parents >= 0
    # BFS order: every pass fixes at least one more level; depth <= n bounds the passes.
    while True:
        new = depth.copy()
        new[inner] = np.where(depth[parents[inner]] > 0, depth[parents[inner]] + 1, 0)
        if np.array_equal(new, depth):
            return depth
        depth = new


def node_values(tree: ReasoningTree) -> np.ndarray:
    """float64[n]: V(leaf) = reward, V(node) = mean of its children's values (bottom-up)."""
    parents = _parents(tree)
    n = parents.shape[0]
    num_children = np.bincount(parents[parents >= 0], minlength=n)  # (n,)
    values = np.zeros(n, dtype=np.float64)
    leaf = num_children == 0
    values[leaf] = [float(tree.nodes[i].reward) for i in np.flatnonzero(leaf)]
    depth = node_depths(parents)
    for level in range(int(depth.max()), 1, -1):
        at = np.flatnonzero(depth == level)  # children at this level
        sums = np.bincount(parents[at], weights=values[at], minlength=n)  # (n,)
        up = np.unique(parents[at])
        values[up] = sums[up] / num_children[up]
    return values


def group_stats(parents: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per node: (size, mean, ddof-1 std) of its sibling group; std is 0 for singletons."""
    key = parents + 1  # group id: 0 = the root's children, p + 1 = the children of node p
    m = int(key.max()) + 1
    size = np.bincount(key, minlength=m)  # (m,)
    mean = np.bincount(key, weights=values, minlength=m) / np.maximum(size, 1)
    sq = np.bincount(key, weights=(values - mean[key]) ** 2, minlength=m)
    std = np.sqrt(sq / np.maximum(size - 1, 1))
    std[size < 2] = 0.0
    return size[key], mean[key], std[key]


def _std_with_siblings(values: np.ndarray, size: np.ndarray, where: np.ndarray) -> float:
    """ddof-1 std of the values of the nodes in `where` that have a sibling (0 if fewer than two)."""
    picked = values[where & (size >= 2)]
    return float(np.std(picked, ddof=1)) if picked.shape[0] >= 2 else 0.0


def leaves_below(parents: np.ndarray) -> np.ndarray:
    """int64[n]: root-to-leaf paths through each node (1 for a leaf), for BFS-ordered `parents`."""
    n = parents.shape[0]
    leaves = (np.bincount(parents[parents >= 0], minlength=n) == 0).astype(np.int64)
    for i in range(n - 1, -1, -1):  # children follow their parent in BFS order
        if parents[i] >= 0:
            leaves[parents[i]] += leaves[i]
    return leaves


def step_advantages(tree: ReasoningTree, cfg: AdvantageConfig) -> tuple[np.ndarray, np.ndarray]:
    """(advantage float64[n], trainable bool[n]) per node, as in the module docstring."""
    parents = _parents(tree)
    values = node_values(tree)
    size, mean, std = group_stats(parents, values)  # each (n,)
    trainable = (size >= 2) & ~(std < cfg.min_group_std)
    centred = values - mean
    if cfg.norm == "group":
        adv = centred / (std + cfg.eps)
    elif cfg.norm == "none":
        adv = centred
    elif cfg.norm == "tree":
        adv = centred / (_std_with_siblings(values, size, np.ones_like(trainable)) + cfg.eps)
    elif cfg.norm == "level":
        depth = node_depths(parents)
        std_level = np.zeros(depth.shape[0], dtype=np.float64)
        for d in np.unique(depth):
            std_level[depth == d] = _std_with_siblings(values, size, depth == d)
        adv = centred / (std_level + cfg.eps)
    else:  # pragma: no cover - the config's Literal rules it out
        raise ValueError(f"unknown advantage norm {cfg.norm!r}")
    adv = np.where(trainable, adv, 0.0)
    if cfg.weight == "leaves" and trainable.any():
        leaves = leaves_below(parents).astype(np.float64)
        tokens = np.fromiter((len(node) for node in tree.nodes), dtype=np.float64, count=len(tree.nodes))
        mean_weight = float((leaves * tokens)[trainable].sum() / max(tokens[trainable].sum(), 1.0))
        adv = adv * leaves / (mean_weight if mean_weight > 0 else 1.0)
    return adv, trainable


def token_advantages(tree: ReasoningTree, cfg: AdvantageConfig) -> tuple[np.ndarray, np.ndarray]:
    """Per generated token, nodes in order, each node once: (advantage float32[T], trainable bool[T]).

    This is the layout of `tree` packing (every node's segment once, in node order); other
    layouts index into it with `node_token_offsets`.
    """
    adv, trainable = step_advantages(tree, cfg)
    lengths = np.fromiter((len(n) for n in tree.nodes), dtype=np.int64, count=len(tree.nodes))
    return np.repeat(adv, lengths).astype(np.float32), np.repeat(trainable, lengths)


def node_token_offsets(tree: ReasoningTree) -> np.ndarray:
    """int64[n + 1]: node i's tokens are [offsets[i], offsets[i+1]) in the per-token layout."""
    lengths = np.fromiter((len(n) for n in tree.nodes), dtype=np.int64, count=len(tree.nodes))
    return np.concatenate([[0], np.cumsum(lengths)])
