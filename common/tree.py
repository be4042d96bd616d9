"""The reasoning tree: one prompt, its sampled segments, their behaviour log-probs and rewards.

Invariants (checked by `ReasoningTree.validate`, which both the actor before sending and the
wire decoder after receiving run):

* `nodes` are in breadth-first order: `nodes[i].parent < i` and parents never decrease along
  the list; parent `-1` is the root (the prompt).
* every node has `len(token_ids) == len(logprobs) >= 1`, int32 ids and finite float32 log-probs;
* inner nodes (those with children) have `finish == "segment"` and no reward;
  leaves have `finish in {"stop", "length"}` and a finite reward.

A child's context is `prompt_token_ids + token_ids of its ancestors`, as ids: text is never
decoded and re-encoded between levels, so the learner can recompute every behaviour log-prob
from the tree alone.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

Finish = Literal["segment", "stop", "length"]
FINISH_REASONS: tuple[str, ...] = ("segment", "stop", "length")


class TreeError(ValueError):
    """A tree that breaks one of the module's invariants; the message names node and field."""


def new_tree_id() -> str:
    return uuid.uuid4().hex


@dataclass(eq=False)
class Node:
    """One generated segment; it continues its parent's text (parent -1: the prompt)."""

    parent: int
    token_ids: np.ndarray  # int32[L]
    logprobs: np.ndarray  # float32[L], behaviour log-probs under the distribution sampled from
    version: int  # weight version that generated the segment
    finish: Finish
    reward: float | None = None  # leaves only

    def __post_init__(self) -> None:
        self.token_ids = np.asarray(self.token_ids, dtype=np.int32)
        self.logprobs = np.asarray(self.logprobs, dtype=np.float32)

    def __len__(self) -> int:
        return int(self.token_ids.shape[0])


@dataclass(eq=False)
class ReasoningTree:
    """One prompt -> one tree of segments. Construct with keyword arguments."""

    tree_id: str
    prompt_id: str
    actor_id: str
    prompt_token_ids: np.ndarray  # int32[P]
    nodes: list[Node]
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.prompt_token_ids = np.asarray(self.prompt_token_ids, dtype=np.int32)

    # -- structure ---------------------------------------------------------------------------
    @property
    def parents(self) -> np.ndarray:
        return np.fromiter((n.parent for n in self.nodes), dtype=np.int64, count=len(self.nodes))

    def children(self) -> list[list[int]]:
        kids: list[list[int]] = [[] for _ in self.nodes]
        for i, node in enumerate(self.nodes):
            if node.parent >= 0:
                kids[node.parent].append(i)
        return kids

    def root_children(self) -> list[int]:
        return [i for i, n in enumerate(self.nodes) if n.parent == -1]

    def is_leaf(self) -> np.ndarray:
        """bool[n]: True for nodes without children."""
        leaf = np.ones(len(self.nodes), dtype=bool)
        parents = self.parents
        leaf[parents[parents >= 0]] = False
        return leaf

    def depths(self) -> np.ndarray:
        """int64[n]: 1 for the root's children, 2 below them, ..."""
        depth = np.zeros(len(self.nodes), dtype=np.int64)
        for i, node in enumerate(self.nodes):
            depth[i] = 1 if node.parent < 0 else depth[node.parent] + 1
        return depth

    def path(self, i: int) -> list[int]:
        """Node indices from the root's child down to node i (inclusive)."""
        out = []
        while i >= 0:
            out.append(i)
            i = self.nodes[i].parent
        return out[::-1]

    def leaves(self) -> list[int]:
        return [int(i) for i in np.flatnonzero(self.is_leaf())]

    def context_ids(self, i: int) -> np.ndarray:
        """Token ids node i was generated from: prompt + its ancestors' segments."""
        parts = [self.prompt_token_ids] + [self.nodes[j].token_ids for j in self.path(i)[:-1]]
        return np.concatenate(parts).astype(np.int32, copy=False)

    def num_tokens(self) -> int:
        """Generated tokens, each node counted once."""
        return sum(len(n) for n in self.nodes)

    def leaf_rewards(self) -> np.ndarray:
        return np.array([self.nodes[i].reward for i in self.leaves()], dtype=np.float64)

    def min_version(self) -> int:
        return min(n.version for n in self.nodes)

    def path_lengths(self) -> np.ndarray:
        """int64[n_leaves]: generated tokens on each root-to-leaf path (the response length)."""
        total = np.zeros(len(self.nodes), dtype=np.int64)
        for i, node in enumerate(self.nodes):
            total[i] = len(node) + (total[node.parent] if node.parent >= 0 else 0)
        return total[self.is_leaf()]

    # -- validation --------------------------------------------------------------------------
    def validate(self, vocab_size: int | None = None) -> "ReasoningTree":
        """Raise TreeError naming the node and field of the first broken invariant."""
        if not isinstance(self.tree_id, str) or not self.tree_id:
            raise TreeError("tree_id must be a non-empty string")
        _check_ids("prompt_token_ids", self.prompt_token_ids, vocab_size)
        if self.prompt_token_ids.shape[0] < 1:
            raise TreeError("prompt_token_ids must hold at least one token")
        if not self.nodes:
            raise TreeError("a tree needs at least one node")
        n = len(self.nodes)
        has_child = np.zeros(n, dtype=bool)
        last_parent = -1
        for i, node in enumerate(self.nodes):
            where = f"nodes[{i}]"
            if not isinstance(node.parent, (int, np.integer)) or not -1 <= node.parent < i:
                raise TreeError(f"{where}.parent = {node.parent!r}: must satisfy -1 <= parent < {i}")
            if node.parent < last_parent:
                raise TreeError(
                    f"{where}.parent = {node.parent} after a node with parent {last_parent}: "
                    "nodes must be in breadth-first order"
                )
            last_parent = node.parent
            if node.parent >= 0:
                has_child[node.parent] = True
            _check_ids(f"{where}.token_ids", node.token_ids, vocab_size)
            if node.token_ids.shape[0] < 1:
                raise TreeError(f"{where}.token_ids is empty: a segment holds at least one token")
            if node.logprobs.dtype != np.float32 or node.logprobs.ndim != 1:
                raise TreeError(f"{where}.logprobs must be a 1-D float32 array")
            if node.logprobs.shape != node.token_ids.shape:
                raise TreeError(
                    f"{where}.logprobs has {node.logprobs.shape[0]} entries for "
                    f"{node.token_ids.shape[0]} tokens"
                )
            if not np.all(np.isfinite(node.logprobs)):
                raise TreeError(f"{where}.logprobs holds a non-finite value")
            if not isinstance(node.version, (int, np.integer)) or node.version < 0:
                raise TreeError(f"{where}.version = {node.version!r}: must be an int >= 0")
            if node.finish not in FINISH_REASONS:
                raise TreeError(f"{where}.finish = {node.finish!r}: must be one of {FINISH_REASONS}")
        for i, node in enumerate(self.nodes):
            where = f"nodes[{i}]"
            if has_child[i]:
                if node.finish != "segment":
                    raise TreeError(f"{where} has children, so its finish must be 'segment', not {node.finish!r}")
                if node.reward is not None:
                    raise TreeError(f"{where}.reward is set on an inner node; rewards go on leaves only")
            else:
                if node.finish == "segment":
                    raise TreeError(f"{where} is a leaf, so its finish must be 'stop' or 'length', not 'segment'")
                if node.reward is None or not np.isfinite(float(node.reward)):
                    raise TreeError(f"{where} is a leaf and needs a finite reward, got {node.reward!r}")
        return self


def _check_ids(where: str, ids: np.ndarray, vocab_size: int | None) -> None:
    if ids.dtype != np.int32 or ids.ndim != 1:
        raise TreeError(f"{where} must be a 1-D int32 array")
    if ids.size and ids.min() < 0:
        raise TreeError(f"{where} holds a negative token id")
    if vocab_size is not None and ids.size and ids.max() >= vocab_size:
        raise TreeError(f"{where} holds token id {int(ids.max())} >= vocab size {vocab_size}")
