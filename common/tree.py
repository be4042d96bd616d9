"""The reasoning tree: one prompt, its sampled segments, their behaviour log-probs and rewards.

Invariants (checked by `ReasoningTree.validate`, which the actor runs before sending, and by
`validate_flat`, which `validate` calls on the tree's gathered arrays and the wire decoder calls
directly on the decoded arrays -- one implementation of every value and structure rule):

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

import math
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

# Node.finish: "segment" = cut at the segment budget (an inner node), "stop" = ended with EOS or
# a stop token, "length" = hit the total budget (design §2). The one vocabulary of the tree, the
# wire (as FINISH_CODE, uint8) and the learner; the engines' own finish (actor/engine.py
# `SampleFinish`) is mapped onto it by actor/sampler.py `node_finish`.
Finish = Literal["segment", "stop", "length"]
FINISH_REASONS: tuple[str, ...] = ("segment", "stop", "length")
FINISH_CODE: dict[str, int] = {name: i for i, name in enumerate(FINISH_REASONS)}  # wire code of each
UNKNOWN_FINISH_CODE = 255  # the code of a value outside FINISH_REASONS (validation rejects it)
_I32, _F32 = np.dtype(np.int32), np.dtype(np.float32)
_new_object = object.__new__


TREE_RULES: tuple[str, ...] = (
    "types",  # a field of the wrong Python type, dtype or shape
    "layout",  # flat arrays whose lengths do not add up (only the wire can produce this)
    "tree_id",
    "empty_prompt",
    "no_nodes",
    "parent",  # outside -1 <= parent < i
    "order",  # parents decrease: not breadth-first
    "token_range",  # a token id outside [0, vocab_size)
    "empty_segment",
    "non_finite",  # a NaN/inf log-prob
    "version",
    "finish",  # not one of FINISH_REASONS
    "structure",  # finish/reward do not match inner node vs leaf
)


class TreeError(ValueError):
    """A tree that breaks one of the module's invariants; the message names node and field.

    `rule` (one of TREE_RULES) says which invariant, e.g. for the wire decoder's error reasons.
    """

    def __init__(self, message: str, rule: str = "types") -> None:
        super().__init__(message)
        self.rule = rule


def new_tree_id() -> str:
    return uuid.uuid4().hex


@dataclass(eq=False, slots=True)
class Node:
    """One generated segment; it continues its parent's text (parent -1: the prompt).

    The constructor converts token_ids / logprobs to int32 / float32 arrays (no copy when they
    already are); `Node.trusted` skips that for callers that hold arrays of the right dtype.
    """

    parent: int
    token_ids: np.ndarray  # int32[L]
    logprobs: np.ndarray  # float32[L], behaviour log-probs under the distribution sampled from
    version: int  # weight version that generated the segment
    finish: Finish
    reward: float | None = None  # leaves only

    def __post_init__(self) -> None:
        if not (type(self.token_ids) is np.ndarray and self.token_ids.dtype == _I32):
            self.token_ids = np.asarray(self.token_ids, dtype=np.int32)
        if not (type(self.logprobs) is np.ndarray and self.logprobs.dtype == _F32):
            self.logprobs = np.asarray(self.logprobs, dtype=np.float32)

    @classmethod
    def trusted(
        cls, parent: int, token_ids: np.ndarray, logprobs: np.ndarray, version: int, finish: Finish,
        reward: float | None,
    ) -> Node:
        """A node from arrays that already are int32 / float32 (no conversion, no checks)."""
        node = _new_object(cls)
        node.parent, node.token_ids, node.logprobs = parent, token_ids, logprobs
        node.version, node.finish, node.reward = version, finish, reward
        return node

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
        total: list[int] = []  # plain lists: one numpy element access per node cost more than the sum
        leaf = [True] * len(self.nodes)
        for node in self.nodes:
            parent = node.parent
            total.append(len(node.token_ids) + (total[parent] if parent >= 0 else 0))
            if parent >= 0:
                leaf[parent] = False
        return np.array([t for t, is_leaf in zip(total, leaf, strict=True) if is_leaf], dtype=np.int64)

    # -- validation --------------------------------------------------------------------------
    def validate(self, vocab_size: int | None = None) -> ReasoningTree:
        """Raise TreeError naming the node and field of the first broken invariant; return self.

        Two passes: the types of every node's fields (lowest node first, plain attribute checks),
        then `validate_flat` on the tree's arrays gathered once.
        """
        if not _is_array(self.prompt_token_ids, _I32):
            raise TreeError("prompt_token_ids must be a 1-D int32 array", "types")
        nodes = self.nodes
        n = len(nodes)
        parents, versions, finish = [0] * n, [0] * n, [0] * n
        has_reward, rewards, lengths = [False] * n, [_NAN] * n, [0] * n
        tokens, logprobs = [_NO_IDS] * n, [_NO_LOGPROBS] * n
        code_of = FINISH_CODE.get
        for i, node in enumerate(nodes):
            ids, lp, parent, version, reward = node.token_ids, node.logprobs, node.parent, node.version, node.reward
            if type(parent) is not int and not isinstance(parent, (int, np.integer)):
                raise TreeError(f"nodes[{i}].parent = {parent!r}: must satisfy -1 <= parent < {i}", "parent")
            if not _is_array(ids, _I32):
                raise TreeError(f"nodes[{i}].token_ids must be a 1-D int32 array", "types")
            if not _is_array(lp, _F32):
                raise TreeError(f"nodes[{i}].logprobs must be a 1-D float32 array", "types")
            if lp.shape[0] != ids.shape[0]:
                raise TreeError(f"nodes[{i}].logprobs has {lp.shape[0]} entries for {ids.shape[0]} tokens", "types")
            if type(version) is not int and not isinstance(version, (int, np.integer)):
                raise TreeError(f"nodes[{i}].version = {version!r}: must be an int >= 0", "version")
            if reward is not None:
                if type(reward) is not float and not isinstance(reward, _REAL):
                    raise TreeError(f"nodes[{i}].reward = {reward!r}: must be a real number or None", "types")
                has_reward[i], rewards[i] = True, reward
            parents[i], versions[i], tokens[i], logprobs[i], lengths[i] = parent, version, ids, lp, ids.shape[0]
            f = node.finish
            finish[i] = code_of(f, UNKNOWN_FINISH_CODE) if type(f) is str else UNKNOWN_FINISH_CODE
        validate_flat(
            tree_id=self.tree_id,
            prompt=self.prompt_token_ids,
            tokens=np.concatenate(tokens) if n else _NO_IDS,
            logprobs=np.concatenate(logprobs) if n else _NO_LOGPROBS,
            lengths=np.array(lengths, dtype=np.int64),
            parents=_int64s(parents),
            versions=_int64s(versions),
            finish=np.array(finish, dtype=np.uint8),
            rewards=np.array(rewards, dtype=np.float64),
            has_reward=np.array(has_reward, dtype=bool),
            vocab_size=vocab_size,
            show=lambda name, i: getattr(nodes[i], name),
        )
        return self


# ---------------------------------------------------------------------------------------------
# the flat form: one implementation of every value and structure rule
# ---------------------------------------------------------------------------------------------
_NAN = float("nan")
_NO_IDS, _NO_LOGPROBS = np.zeros(0, dtype=np.int32), np.zeros(0, dtype=np.float32)
_SEGMENT = FINISH_CODE["segment"]
_REAL = (int, float, np.integer, np.floating)
_INT64_MAX = 2**63 - 1
_ARANGE = np.arange(4096, dtype=np.int64)
_min, _max, _sum, _all = np.minimum.reduce, np.maximum.reduce, np.add.reduce, np.logical_and.reduce
_U32 = np.dtype(np.uint32)


def _is_array(a: Any, dtype: np.dtype) -> bool:
    return isinstance(a, np.ndarray) and a.ndim == 1 and a.dtype == dtype


def _int64s(values: list) -> np.ndarray:
    """int64 array of Python/numpy ints; ints beyond int64 are clamped (same sign, same verdicts)."""
    try:
        return np.array(values, dtype=np.int64)
    except OverflowError:
        return np.array([max(-_INT64_MAX, min(_INT64_MAX, int(v))) for v in values], dtype=np.int64)


def _arange(n: int) -> np.ndarray:
    return _ARANGE[:n] if n <= _ARANGE.shape[0] else np.arange(n, dtype=np.int64)


def _ids_ok(ids: np.ndarray, vocab_size: int | None) -> bool:
    """All ids in [0, vocab_size) (vocab_size None: >= 0), in one reduction where possible."""
    if not ids.shape[0]:
        return True
    if vocab_size is not None and 0 < vocab_size <= 2**31:
        return bool(_max(ids.view(_U32)) < vocab_size)  # negative ids wrap to >= 2**31
    return bool(_min(ids) >= 0) and (vocab_size is None or bool(_max(ids) < vocab_size))


def _bad_ids_message(where: str, ids: np.ndarray, vocab_size: int | None) -> str:
    if _min(ids) < 0:
        return f"{where} holds a negative token id"
    return f"{where} holds token id {int(_max(ids))} >= vocab size {vocab_size}"


def validate_flat(
    *,
    tree_id: Any,
    prompt: np.ndarray,
    tokens: np.ndarray,
    logprobs: np.ndarray,
    lengths: np.ndarray,
    parents: np.ndarray,
    versions: np.ndarray,
    finish: np.ndarray,
    rewards: np.ndarray,
    has_reward: np.ndarray | None = None,
    vocab_size: int | None = None,
    show: Callable[[str, int], Any] | None = None,
) -> None:
    """Check a tree given as flat arrays; raise TreeError (with `.rule`) naming the first break.

    Node i of n owns tokens[s_i : s_i + lengths[i]] and the same slice of logprobs, where
    s_i = lengths[0] + ... + lengths[i-1]. Arrays (1-D; dtypes are the caller's job):

        prompt int32[P]   tokens int32[T]   logprobs float32[T]
        lengths, parents, versions: int[n]   finish: uint8[n], codes into FINISH_REASONS
        rewards float64[n]   has_reward bool[n], with rewards NaN where it is False;
                             has_reward None: NaN means "no reward" (the wire's encoding)

    `show(field, i)` gives node i's original parent / version / finish / reward for messages
    (default: read from the arrays). After the tree-level checks (tree_id, prompt ids in
    [0, vocab_size) and non-empty, n >= 1), the per-node rules are reported for the lowest
    node index and, within a node, in this order: -1 <= parent < i; parent >= the previous
    node's parent (breadth-first); token ids in [0, vocab_size); at least one token; finite
    log-probs; version >= 0; a known finish code. Only if all hold, the structure: inner nodes
    have finish 'segment' and no reward, leaves another finish and a finite reward.
    The passing path costs a fixed number of numpy operations, O(n + T) work; the offending
    index is searched only after a check failed.
    """
    n, n_tokens = lengths.shape[0], tokens.shape[0]
    total = int(_sum(lengths, dtype=np.int64)) if n else 0
    if total != n_tokens or logprobs.shape[0] != n_tokens:
        raise TreeError(
            f"node lengths sum to {total} but the tree holds {n_tokens} token ids and {logprobs.shape[0]} log-probs",
            "layout",
        )
    if not isinstance(tree_id, str) or not tree_id:
        raise TreeError("tree_id must be a non-empty string", "tree_id")
    if not _ids_ok(prompt, vocab_size):
        raise TreeError(_bad_ids_message("prompt_token_ids", prompt, vocab_size), "token_range")
    if prompt.shape[0] < 1:
        raise TreeError("prompt_token_ids must hold at least one token", "empty_prompt")
    if n == 0:
        raise TreeError("a tree needs at least one node", "no_nodes")
    show = show or _array_show(parents, versions, finish, rewards)
    values_ok = (
        parents[0] >= -1
        and _max(parents - _arange(n)) < 0  # parent < i
        and (n == 1 or _min(parents[1:] - parents[:-1]) >= 0)  # (in range: cannot overflow)
        and _min(lengths) >= 1
        and _ids_ok(tokens, vocab_size)
        and math.isfinite(_sum(logprobs, dtype=np.float64))  # NaN/inf propagate; float32 cannot overflow it
        and _min(versions) >= 0
        and _max(finish) < len(FINISH_REASONS)
    )
    if not values_ok:
        _raise_value_error(tokens, logprobs, lengths, parents, versions, finish, vocab_size, show)
    marks = np.zeros(n + 1, dtype=bool)
    marks[parents] = True  # parent -1 marks the extra last slot
    has_child = marks[:n]
    segment = finish == _SEGMENT
    # inner: 'segment' and no reward; leaf: another finish and a finite reward
    no_reward = np.isnan(rewards) if has_reward is None else ~has_reward
    reward_ok = np.where(has_child, no_reward, np.isfinite(rewards))
    if not _all(reward_ok & (segment == has_child)):
        _raise_structure_error(has_child, segment, ~reward_ok, show)


def _array_show(parents: np.ndarray, versions: np.ndarray, finish: np.ndarray, rewards: np.ndarray) -> Callable:
    def show(name: str, i: int) -> Any:
        if name == "finish":
            code = int(finish[i])
            return FINISH_REASONS[code] if code < len(FINISH_REASONS) else code
        if name == "reward":
            reward = float(rewards[i])
            return None if math.isnan(reward) else reward
        return int((parents if name == "parent" else versions)[i])

    return show


def _first(mask: np.ndarray, offset: int = 0) -> int | None:
    hits = np.flatnonzero(mask)
    return int(hits[0]) + offset if hits.shape[0] else None


def _raise_value_error(
    tokens: np.ndarray,
    logprobs: np.ndarray,
    lengths: np.ndarray,
    parents: np.ndarray,
    versions: np.ndarray,
    finish: np.ndarray,
    vocab_size: int | None,
    show: Callable[[str, int], Any],
) -> None:
    """Find the lowest (node, rule) among the per-node value rules and raise its TreeError."""
    n = lengths.shape[0]
    ends = np.cumsum(lengths, dtype=np.int64)  # (n,)
    empty = _first(lengths < 1)
    # tokens have known owners only up to the first empty (or negative-length) node
    known = tokens.shape[0] if empty is None else (int(ends[empty - 1]) if empty else 0)

    def owner(mask: np.ndarray) -> int | None:
        j = _first(mask[:known])
        return None if j is None else int(np.searchsorted(ends, j, side="right"))

    def span(i: int) -> slice:
        return slice(int(ends[i] - lengths[i]), int(ends[i]))

    bad_id = tokens < 0 if vocab_size is None else (tokens < 0) | (tokens >= vocab_size)
    found = [  # (node, rule order, rule, message maker), in rule order
        (_first((parents < -1) | (parents >= _arange(n))), "parent",
         lambda i: f"nodes[{i}].parent = {show('parent', i)!r}: must satisfy -1 <= parent < {i}"),
        (_first(parents[1:] < parents[:-1], 1), "order",
         lambda i: f"nodes[{i}].parent = {show('parent', i)} after a node with parent {show('parent', i - 1)}: "
         "nodes must be in breadth-first order"),
        (owner(bad_id), "token_range",
         lambda i: _bad_ids_message(f"nodes[{i}].token_ids", tokens[span(i)], vocab_size)),
        (empty, "empty_segment", lambda i: f"nodes[{i}].token_ids is empty: a segment holds at least one token"),
        (owner(~np.isfinite(logprobs)), "non_finite", lambda i: f"nodes[{i}].logprobs holds a non-finite value"),
        (_first(versions < 0), "version",
         lambda i: f"nodes[{i}].version = {show('version', i)!r}: must be an int >= 0"),
        (_first(finish >= len(FINISH_REASONS)), "finish",
         lambda i: f"nodes[{i}].finish = {show('finish', i)!r}: must be one of {FINISH_REASONS}"),
    ]
    i, _, rule, message = min((i, k, rule, msg) for k, (i, rule, msg) in enumerate(found) if i is not None)
    raise TreeError(message(i), rule)


def _raise_structure_error(
    has_child: np.ndarray, segment: np.ndarray, reward_bad: np.ndarray, show: Callable[[str, int], Any]
) -> None:
    bad_finish, bad_reward = _first(segment != has_child), _first(reward_bad)
    if bad_reward is None or (bad_finish is not None and bad_finish <= bad_reward):
        i = bad_finish
        if has_child[i]:
            raise TreeError(f"nodes[{i}] has children, so its finish must be 'segment', not {show('finish', i)!r}",
                            "structure")
        raise TreeError(f"nodes[{i}] is a leaf, so its finish must be 'stop' or 'length', not 'segment'", "structure")
    i = bad_reward
    if has_child[i]:
        raise TreeError(f"nodes[{i}].reward is set on an inner node; rewards go on leaves only", "structure")
    raise TreeError(f"nodes[{i}] is a leaf and needs a finite reward, got {show('reward', i)!r}", "structure")
