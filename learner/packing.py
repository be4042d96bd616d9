"""Reasoning trees -> model inputs, in two layouts, with the loss targets aligned per token.

* `tree`: a tree's prompt and every node's segment are laid out ONCE in a row. A token attends to
  the prompt, its ancestors' segments and the earlier tokens of its own segment; positions
  continue along the path (a node's first position = prompt_len + Σ ancestors' lengths), so each
  token sees exactly the context it was sampled from, at the positions it was sampled at.
* `flat`: one sequence per root-to-leaf path (prompt + path segments), plain causal attention.
  A node lying on several paths is trainable only in the first of them (leaf order).

Both layouts bin-pack their units (trees, or paths) into rows of at most `max_row_tokens`
(first-fit decreasing); units in one row never attend to each other. A tree larger than a row is
split into sub-units (prompt + ancestor chain as context + a subtree), each node still trained once.

Guarantees (tests/unit/test_packing.py checks them):
* every generated token of every tree appears in a row with its own context; each node's tokens
  are in `loss_mask` exactly once (iff the node is trainable), so `num_trainable_tokens` equals
  the sum of the trainable nodes' lengths;
* `pred_index[b, t]` is the position whose logits predict token t: t − 1 inside a segment, the
  parent segment's (or the prompt's) last token for a segment's first token, −1 for prompts/pads;
* advantages and trainable flags come from `common.treerpo.token_advantages` (not recomputed here);
  staleness per token = learner_version − node.version;
* no attention row is empty: padding forms its own causal span, so masks never produce NaN.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import Literal

import numpy as np
import torch

from common.config import AdvantageConfig
from common.tree import ReasoningTree
from common.treerpo import node_token_offsets, token_advantages

PackingMode = Literal["tree", "flat"]


@dataclass
class PackedBatch:
    """One micro-batch. Per-token tensors are (B, T); −1 marks "none" in index tensors."""

    input_ids: torch.Tensor  # (B, T) int64; padding holds 0
    position_ids: torch.Tensor  # (B, T) int64
    pred_index: torch.Tensor  # (B, T) int64: position whose logits predict this token, −1 none
    loss_mask: torch.Tensor  # (B, T) bool: trainable tokens, each node once
    advantages: torch.Tensor  # (B, T) float32
    behaviour_logprobs: torch.Tensor  # (B, T) float32
    staleness: torch.Tensor  # (B, T) int64: learner_version − node.version
    span_ids: torch.Tensor  # (B, T) int64: row-local span (prompt / segment / padding) of each token
    # (B, S, S) bool: [b, i, j] = span j is span i or its ancestor; None = causal rows
    span_ancestors: torch.Tensor | None
    tree_index: torch.Tensor  # (B, T) int64: index into pack_trees' `trees`, −1 padding
    node_index: torch.Tensor  # (B, T) int64: node of the tree, −1 prompt/padding
    token_index: torch.Tensor  # (B, T) int64: index in the tree's token_advantages layout, −1 none
    num_trainable_tokens: int  # loss_mask.sum()
    num_tokens: int  # non-padding tokens (what the forward really has to process)
    trees: list[int]  # indices of the trees with tokens in this batch
    mode: str

    @property
    def generated(self) -> torch.Tensor:
        """(B, T) bool: positions holding a generated token (prediction target)."""
        return self.pred_index >= 0

    @property
    def attention_mask(self) -> torch.Tensor | None:
        """(B, 1, T, T) float32 additive mask (0 allowed, finfo.min disallowed), or None = causal."""
        return self.additive_mask(torch.float32)

    def allowed(self) -> torch.Tensor | None:
        """(B, 1, T, T) bool: key k visible from query q (k <= q and span(k) ancestor-or-self of span(q))."""
        if self.span_ancestors is None:
            return None
        B, T = self.span_ids.shape
        S = self.span_ancestors.shape[-1]
        rows = self.span_ancestors.gather(1, self.span_ids[:, :, None].expand(B, T, S))  # (B, T, S)
        visible = rows.gather(2, self.span_ids[:, None, :].expand(B, T, T))  # (B, T, T)
        causal = torch.ones(T, T, dtype=torch.bool, device=visible.device).tril_()  # (T, T)
        return (visible & causal)[:, None]  # (B, 1, T, T)

    def additive_mask(self, dtype: torch.dtype, device: torch.device | str | None = None) -> torch.Tensor | None:
        allowed = self.allowed()
        if allowed is None:
            return None
        allowed = allowed.to(device) if device is not None else allowed
        mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)  # (B, 1, T, T)
        return mask.masked_fill_(~allowed, torch.finfo(dtype).min)

    def to(self, device: torch.device | str) -> PackedBatch:
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        async_copy = torch.device(device).type == "cuda"  # host -> device only; never read back early
        for name, value in moved.items():
            if isinstance(value, torch.Tensor):
                moved[name] = value.to(device, non_blocking=async_copy)
        return replace(self, **moved)


# ----------------------------------------------------------------------------------------------
# Units: what one row holds per tree (the whole tree, a sub-tree with its context, or one path)
# ----------------------------------------------------------------------------------------------
@dataclass
class _Unit:
    tree: int
    nodes: list[int]  # per span: node index, −1 = the prompt (span 0)
    parents: list[int]  # per span: unit-local parent span, −1 for the prompt
    owned: list[bool]  # per span: this unit trains the span's tokens
    length: int


def _span_lengths(tree: ReasoningTree) -> np.ndarray:
    return np.fromiter((len(n) for n in tree.nodes), dtype=np.int64, count=len(tree.nodes))


def _flat_units(ti: int, tree: ReasoningTree) -> list[_Unit]:
    lens, P = _span_lengths(tree), len(tree.prompt_token_ids)
    seen: set[int] = set()
    units = []
    for leaf in tree.leaves():
        path = tree.path(leaf)
        owned = [False] + [i not in seen for i in path]
        seen.update(path)
        units.append(_Unit(ti, [-1] + path, list(range(-1, len(path))), owned, P + int(lens[path].sum())))
    return units


def _tree_units(ti: int, tree: ReasoningTree, budget: int) -> list[_Unit]:
    lens, P = _span_lengths(tree), len(tree.prompt_token_ids)
    parents = tree.parents
    kids = tree.children()
    subtree = lens.copy()  # tokens in the subtree below (and including) each node
    for i in range(len(lens) - 1, -1, -1):
        if parents[i] >= 0:
            subtree[parents[i]] += subtree[i]
    units: list[_Unit] = []

    def emit(chain: list[tuple[int, bool]], root: int) -> None:
        size = P + sum(int(lens[c]) for c, _ in chain) + int(subtree[root])
        if size > budget:
            if not kids[root]:
                raise ValueError(
                    f"tree {tree.tree_id}: the path to node {root} needs {size} tokens but "
                    f"max_row_tokens is {budget}: raise learner.micro_batch_tokens above the longest path"
                )
            context = [(c, False) for c, _ in chain] + [(root, False)]
            emit(chain + [(root, True)], kids[root][0])  # the first child's unit trains the chain
            for child in kids[root][1:]:
                emit(context, child)
            return
        nodes, par, owned = [-1], [-1], [False]
        for c, own in chain:
            nodes.append(c), par.append(len(nodes) - 2), owned.append(own)
        span_of = {}
        for i in range(root, len(lens)):
            if i == root or parents[i] in span_of:
                span_of[i] = len(nodes)
                par.append(span_of[parents[i]] if i != root else len(nodes) - 1)
                nodes.append(i), owned.append(True)
        units.append(_Unit(ti, nodes, par, owned, size))

    if P + int(lens.sum()) <= budget:  # the common case: one unit, spans = prompt + nodes in order
        return [_Unit(ti, [-1] + list(range(len(lens))), [-1] + [int(p) + 1 for p in parents],
                      [False] + [True] * len(lens), P + int(lens.sum()))]
    for r in tree.root_children():
        emit([], r)
    return units


def _bin_pack(units: list[_Unit], budget: int) -> list[list[_Unit]]:
    """First-fit decreasing: rows of total length <= budget."""
    rows: list[list[_Unit]] = []
    room: list[int] = []
    for unit in sorted(units, key=lambda u: -u.length):
        if unit.length > budget:
            raise ValueError(
                f"a packing unit of {unit.length} tokens exceeds max_row_tokens={budget}: raise "
                "learner.micro_batch_tokens above the longest prompt + path"
            )
        for r, free in enumerate(room):
            if unit.length <= free:
                rows[r].append(unit)
                room[r] -= unit.length
                break
        else:
            rows.append([unit])
            room.append(budget - unit.length)
    return rows


# ----------------------------------------------------------------------------------------------
# Rows -> tensors
# ----------------------------------------------------------------------------------------------
@dataclass
class _TreeTokens:
    """Per-token arrays of one tree in token_advantages layout (nodes in order, each once)."""

    offsets: np.ndarray  # int64[n + 1]
    advantages: np.ndarray  # float32[N]
    trainable: np.ndarray  # bool[N]
    behaviour: np.ndarray  # float32[N]
    staleness: np.ndarray  # int64[N]


def _tree_tokens(tree: ReasoningTree, adv_cfg: AdvantageConfig, learner_version: int) -> _TreeTokens:
    adv, trainable = token_advantages(tree, adv_cfg)
    lens = _span_lengths(tree)
    versions = np.array([n.version for n in tree.nodes], dtype=np.int64)
    if (versions > learner_version).any():
        raise ValueError(
            f"tree {tree.tree_id} holds a node of version {int(versions.max())} > learner_version "
            f"{learner_version}: such trees must be rejected before packing"
        )
    return _TreeTokens(
        offsets=node_token_offsets(tree),
        advantages=adv,
        trainable=trainable,
        behaviour=np.concatenate([n.logprobs for n in tree.nodes]).astype(np.float32),
        staleness=np.repeat(learner_version - versions, lens),
    )


_COLUMNS = ("input_ids", "position_ids", "pred_index", "loss_mask", "advantages", "behaviour_logprobs",
            "staleness", "span_ids", "tree_index", "node_index", "token_index")


def _row_arrays(row: list[_Unit], trees: Sequence[ReasoningTree], toks: list[_TreeTokens]):
    """Concatenated per-token arrays of one row, and its span parent list (row-local ids)."""
    cols: dict[str, list[np.ndarray]] = {c: [] for c in _COLUMNS}
    span_parents: list[int] = []
    cursor = 0
    for unit in row:
        tree, tt = trees[unit.tree], toks[unit.tree]
        base = len(span_parents)
        start, pos0, length = [], [], []  # per unit span: row start, first position, length
        for s, (node, parent) in enumerate(zip(unit.nodes, unit.parents, strict=True)):
            ids = tree.prompt_token_ids if node < 0 else tree.nodes[node].token_ids
            L = len(ids)
            p0 = 0 if parent < 0 else pos0[parent] + length[parent]
            start.append(cursor), pos0.append(p0), length.append(L)
            span_parents.append(-1 if parent < 0 else base + parent)
            ar = np.arange(L, dtype=np.int64)
            cols["input_ids"].append(ids.astype(np.int64))
            cols["position_ids"].append(p0 + ar)
            cols["span_ids"].append(np.full(L, base + s, dtype=np.int64))
            cols["tree_index"].append(np.full(L, unit.tree, dtype=np.int64))
            if node < 0:
                for c, fill in (("pred_index", -1), ("node_index", -1), ("token_index", -1), ("staleness", 0)):
                    cols[c].append(np.full(L, fill, dtype=np.int64))
                cols["loss_mask"].append(np.zeros(L, dtype=bool))
                cols["advantages"].append(np.zeros(L, dtype=np.float32))
                cols["behaviour_logprobs"].append(np.zeros(L, dtype=np.float32))
            else:
                lo, hi = int(tt.offsets[node]), int(tt.offsets[node + 1])
                pred = cursor + ar - 1
                pred[0] = start[parent] + length[parent] - 1  # last token of the parent span
                cols["pred_index"].append(pred)
                cols["node_index"].append(np.full(L, node, dtype=np.int64))
                cols["token_index"].append(np.arange(lo, hi, dtype=np.int64))
                cols["staleness"].append(tt.staleness[lo:hi])
                cols["loss_mask"].append(tt.trainable[lo:hi] & unit.owned[s])
                cols["advantages"].append(tt.advantages[lo:hi])
                cols["behaviour_logprobs"].append(tt.behaviour[lo:hi])
            cursor += L
    return {c: np.concatenate(v) for c, v in cols.items()}, span_parents


def _is_causal_row(row: list[_Unit]) -> bool:
    """One unit whose spans form a chain: the plain causal mask is exact."""
    return len(row) == 1 and all(p == s - 1 for s, p in enumerate(row[0].parents))


def _batch(rows: list[list[_Unit]], trees, toks, mode: str, pad_multiple: int) -> PackedBatch:
    arrays = [_row_arrays(r, trees, toks) for r in rows]
    T = max(len(a["input_ids"]) for a, _ in arrays)
    T = -(-T // pad_multiple) * pad_multiple
    B = len(rows)
    causal = all(_is_causal_row(r) for r in rows)
    S = max(len(sp) for _, sp in arrays) + 1  # + the padding span
    pad = {"input_ids": 0, "pred_index": -1, "loss_mask": False, "advantages": 0.0, "behaviour_logprobs": 0.0,
           "staleness": 0, "tree_index": -1, "node_index": -1, "token_index": -1}
    out = {c: np.full((B, T), pad.get(c, 0), dtype=arrays[0][0][c].dtype) for c in _COLUMNS}
    ancestors = np.zeros((B, S, S), dtype=bool)
    for b, (a, span_parents) in enumerate(arrays):
        n = len(a["input_ids"])
        for c in _COLUMNS:
            out[c][b, :n] = a[c]
        # padding: positions continue (HF must not mistake pads for a new packed sequence), own span
        out["position_ids"][b, n:] = (a["position_ids"][-1] + 1) + np.arange(T - n)
        out["span_ids"][b, n:] = len(span_parents)
        for s, p in enumerate(span_parents):
            ancestors[b, s] = ancestors[b, p] if p >= 0 else False
            ancestors[b, s, s] = True
        ancestors[b, len(span_parents), len(span_parents)] = True
    t = {c: torch.from_numpy(v) for c, v in out.items()}
    return PackedBatch(
        **t,
        span_ancestors=None if causal else torch.from_numpy(ancestors),
        num_trainable_tokens=int(out["loss_mask"].sum()),
        num_tokens=int(sum(len(a["input_ids"]) for a, _ in arrays)),
        trees=sorted({u.tree for r in rows for u in r}),
        mode=mode,
    )


def pack_trees(
    trees: Sequence[ReasoningTree],
    adv_cfg: AdvantageConfig,
    mode: PackingMode,
    max_row_tokens: int,
    learner_version: int,
    *,
    max_batch_rows: int = 1,
    pad_multiple: int = 1,
) -> list[PackedBatch]:
    """Micro-batches of at most `max_batch_rows` rows of at most `max_row_tokens` tokens each.

    The step's loss normalizer is `sum(b.num_trainable_tokens for b in batches)`.
    """
    if mode not in ("tree", "flat"):
        raise ValueError(f"packing mode {mode!r}: use 'tree' or 'flat'")
    if max_row_tokens < 2 or max_batch_rows < 1 or pad_multiple < 1:
        raise ValueError("pack_trees needs max_row_tokens >= 2, max_batch_rows >= 1, pad_multiple >= 1")
    toks = [_tree_tokens(t, adv_cfg, learner_version) for t in trees]
    units: list[_Unit] = []
    for ti, tree in enumerate(trees):
        units += _flat_units(ti, tree) if mode == "flat" else _tree_units(ti, tree, max_row_tokens)
    rows = _bin_pack(units, max_row_tokens)
    return [_batch(rows[i:i + max_batch_rows], trees, toks, mode, pad_multiple)
            for i in range(0, len(rows), max_batch_rows)]

