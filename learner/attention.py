"""Span attention: exact, block-sparse tree attention for tree-packed rows, as a transformers kernel.

A tree-packed row (learner/packing.py) holds spans: prompts, node segments, padding. Query token q
of span s may see key k iff span(k) is s or an ancestor of s and k <= q (`PackedBatch.allowed()`).
A dense (B, 1, T, T) mask makes SDPA compute all T² scores although a depth-3 tree allows ~20 %
of them. Here every span is attended separately against its own visible keys only:

    keys(s)   = [k : ancestors[s, span(k)] and k <= last query of s]     (row order)
    out[q]    = softmax(Q[q] · K[keys(s)]ᵀ · scale + M_s[q]) · V[keys(s)]  for q in s
    M_s[q, j] = 0 if keys(s)[j] <= q else −inf

so the work is Σ_s |s| · |keys(s)| (the allowed entries plus a bucket's padding) instead of T².
Spans of similar (queries, keys) sizes are padded to a common bucket (≤ 1/8 padding for spans of
64+ queries / 128+ keys; small ones round up to 8 / 16) and run as one batched SDPA call. The
gathers (index_select) and SDPA are differentiable, so backward is autograd's. The result equals
dense masked attention up to float summation order.

Use: `register_span_attention()` adds the kernel as attn_implementation "treerpo_span" (its mask
function is sdpa's), `use_span_attention(model)` switches a loaded model to it, and the forward
gets the plan as the keyword `treerpo_spans=span_plan(batch, device)` with
`attention_mask=no_masks(device)`. Without that keyword the kernel is transformers' sdpa verbatim (causal
rows, padded generation), so switching a model changes nothing else. learner/logprobs.py does all
of this; see `token_logprobs(..., tree_attention=...)`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from learner.packing import PackedBatch

SPAN_ATTENTION = "treerpo_span"


def no_masks(device: torch.device | str) -> torch.Tensor:
    """A placeholder `attention_mask` for a forward with a span plan, which the kernel ignores.

    transformers' mask creation returns a 4-D mask as it is, in every decoder (Qwen2's, which also
    takes a dict of masks per layer type, and Llama's, which does not); so this 1x1x1x1 tensor
    avoids building, then ignoring, a (B, 1, T, T) mask that transformers would otherwise infer
    from the tree's non-monotonic position ids (~40 ms at T=2048).
    """
    return torch.ones((1, 1, 1, 1), dtype=torch.bool, device=device)


@dataclass
class SpanGroup:
    """G spans padded to Lq queries and Lk keys; indices are flat (b * T + t) token indices."""

    q_index: torch.Tensor  # (G * Lq,) int64: query tokens (padding repeats a real token)
    k_index: torch.Tensor  # (G * Lk,) int64: visible key tokens (padding repeats a real token)
    mask: torch.Tensor  # (G or 1, 1, Lq, Lk) bool: key j visible from query i
    size: int  # G
    q_len: int  # Lq
    k_len: int  # Lk


@dataclass
class SpanPlan:
    """How to compute a batch's tree attention span by span; shared by all layers of a forward."""

    groups: list[SpanGroup]
    inverse: torch.Tensor  # (B * T,) int64: row of each token in the concatenated group outputs
    batch: int  # B
    length: int  # T
    work: int  # Σ G · Lq · Lk: scores computed per head (the dense mask computes B · T²)

    def to(self, device: torch.device | str) -> SpanPlan:
        groups = [SpanGroup(g.q_index.to(device), g.k_index.to(device), g.mask.to(device), g.size, g.q_len, g.k_len)
                  for g in self.groups]
        return SpanPlan(groups, self.inverse.to(device), self.batch, self.length, self.work)


def _bucket(n: np.ndarray, multiple: int) -> np.ndarray:
    """n rounded up to 4 significant bits (≤ 1/8 padding for n >= 8 * multiple) and to a multiple of `multiple`."""
    bits = np.floor(np.log2(np.maximum(n, 1))).astype(np.int64) + 1  # bit length of n >= 1
    step = np.maximum(np.left_shift(1, np.maximum(bits - 4, 0)), multiple)
    return -(-n // step) * step


def _spans(span_ids: np.ndarray, ancestors: np.ndarray):
    """Every (row, span) with tokens, as CSR lists of flat query and visible key indices (row order).

    Returns (q_len (N,), q_flat (Σ q_len,), k_len (N,), k_flat (Σ k_len,)); query/key lists of
    span n are consecutive slices. Cost O(S² + Σ k_len · log) per row, never S · T.
    """
    B, T = span_ids.shape
    S = ancestors.shape[1]
    q_len, q_flat, k_len, k_flat = [], [], [], []
    for b in range(B):
        sid = span_ids[b]  # (T,)
        order = np.argsort(sid, kind="stable")  # (T,) tokens grouped by span, row order inside
        counts = np.bincount(sid, minlength=S)  # (S,)
        starts = np.cumsum(counts) - counts  # (S,) first slot of each span in `order`
        present = np.flatnonzero(counts)  # (n,) spans with tokens
        last = np.zeros(S, dtype=np.int64)
        last[sid] = np.arange(T)  # last token of each span (later writes win)
        s_idx, a_idx = np.nonzero(ancestors[b][np.ix_(present, present)])  # (pairs,) a ancestor-or-self of s
        owner_span, anc_span = present[s_idx], present[a_idx]
        n = counts[anc_span]  # (pairs,) tokens each pair contributes
        owner = np.repeat(owner_span, n)  # (K,)
        slot = _ranges(starts[anc_span], n)  # (K,) into order
        key = order[slot]  # (K,)
        keep = key <= last[owner]  # causal: nothing after the span's last query
        owner, key = owner[keep], key[keep]
        sort = np.argsort(owner * T + key, kind="stable")  # by span, then row order
        q_len.append(counts[present]), q_flat.append(b * T + order)
        k_len.append(np.bincount(owner, minlength=S)[present]), k_flat.append(b * T + key[sort])
    return np.concatenate(q_len), np.concatenate(q_flat), np.concatenate(k_len), np.concatenate(k_flat)


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """concatenate(arange(a, a + n) for a, n in zip(starts, lengths)), vectorised."""
    return np.repeat(starts - (np.cumsum(lengths) - lengths), lengths) + np.arange(int(lengths.sum()))


def _ragged_to_padded(lengths: np.ndarray, flat: np.ndarray, width: int):
    """(G, width) array of G consecutive ragged lists; padding repeats each list's first entry."""
    G = len(lengths)
    starts = np.cumsum(lengths) - lengths  # (G,)
    rows = np.repeat(np.arange(G), lengths)  # (Σ,)
    cols = np.arange(len(flat)) - np.repeat(starts, lengths)  # (Σ,)
    out = np.repeat(flat[starts, None], width, axis=1)  # (G, width)
    out[rows, cols] = flat
    return out, rows, cols


def span_plan(batch: PackedBatch, device: torch.device | str | None = None) -> SpanPlan:
    """The span-by-span attention plan of a tree-packed batch (host numpy work, O(S·T + Σ |keys(s)|))."""
    if batch.span_ancestors is None:
        raise ValueError("span_plan needs a tree-packed batch (span_ancestors is None: causal rows need no plan)")
    span_ids = batch.span_ids.cpu().numpy()  # (B, T)
    ancestors = batch.span_ancestors.cpu().numpy()  # (B, S, S)
    B, T = span_ids.shape
    q_len, q_flat, k_len, k_flat = _spans(span_ids, ancestors)  # N spans
    q_start, k_start = np.cumsum(q_len) - q_len, np.cumsum(k_len) - k_len  # (N,)
    Lq_all, Lk_all = _bucket(q_len, 8), _bucket(k_len, 16)  # 16: aligned masks for GPU kernels
    buckets = np.unique(np.stack([Lq_all, Lk_all], 1), axis=0)  # (n_buckets, 2) sorted

    groups, inverse, offset, work = [], np.full(B * T, -1, dtype=np.int64), 0, 0
    big = 2 * T + 2  # padded queries sit "after" every real key, padded keys after everything
    for Lq, Lk in buckets.tolist():
        members = np.flatnonzero((Lq_all == Lq) & (Lk_all == Lk))  # (G,)
        G = len(members)
        ql, kl = q_len[members], k_len[members]
        q_sel = q_flat[_ranges(q_start[members], ql)]  # (Σ ql,) the members' query lists, in order
        k_sel = k_flat[_ranges(k_start[members], kl)]  # (Σ kl,)
        q_index, q_rows, q_cols = _ragged_to_padded(ql, q_sel, Lq)  # (G, Lq)
        k_index, _, _ = _ragged_to_padded(kl, k_sel, Lk)  # (G, Lk)
        q_pos = np.where(np.arange(Lq) < ql[:, None], q_index % T, big - 1)  # (G, Lq)
        k_pos = np.where(np.arange(Lk) < kl[:, None], k_index % T, big)  # (G, Lk)
        inverse[q_sel] = offset + q_rows * Lq + q_cols
        mask = k_pos[:, None, :] <= q_pos[:, :, None]  # (G, Lq, Lk): padded rows see all real keys
        if (mask == mask[:1]).all():
            mask = mask[:1]  # one pattern for the whole group: broadcast it
        groups.append(SpanGroup(torch.from_numpy(q_index.reshape(-1)), torch.from_numpy(k_index.reshape(-1)),
                                torch.from_numpy(np.ascontiguousarray(mask[:, None])), G, Lq, Lk))
        offset += G * Lq
        work += G * Lq * Lk
    assert (inverse >= 0).all(), "every token belongs to exactly one span"
    plan = SpanPlan(groups, torch.from_numpy(inverse), B, T, work)
    return plan.to(device) if device is not None else plan


def span_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, plan: SpanPlan, *,
                   scaling: float | None = None, dropout: float = 0.0) -> torch.Tensor:
    """(B, T, H, D) attention output of (B, H, T, D) queries and (B, Hkv, T, D) keys/values under `plan`."""
    B, H, T, D = query.shape
    Hkv, Dv = key.shape[1], value.shape[-1]
    if (B, T) != (plan.batch, plan.length):
        raise ValueError(f"span plan built for (B, T)={(plan.batch, plan.length)} but the queries are {(B, T)}: "
                         "build the plan from the batch being forwarded")
    if H % Hkv:
        raise ValueError(f"{H} query heads are not a multiple of {Hkv} key/value heads")
    rep = H // Hkv
    gqa_in_kernel = query.device.type == "cpu"  # CPU SDPA takes enable_gqa with a mask; elsewhere repeat K/V
    q_rows = query.transpose(1, 2).reshape(B * T, H * D)  # (B*T, H*D)
    k_rows = key.transpose(1, 2).reshape(B * T, Hkv * D)  # (B*T, Hkv*D)
    v_rows = value.transpose(1, 2).reshape(B * T, Hkv * Dv)  # (B*T, Hkv*Dv)
    outs = []
    for g in plan.groups:
        G, Lq, Lk = g.size, g.q_len, g.k_len
        q = q_rows.index_select(0, g.q_index).view(G, Lq, H, D).transpose(1, 2)  # (G, H, Lq, D)
        k = k_rows.index_select(0, g.k_index).view(G, Lk, Hkv, D).transpose(1, 2)  # (G, Hkv, Lk, D)
        v = v_rows.index_select(0, g.k_index).view(G, Lk, Hkv, Dv).transpose(1, 2)  # (G, Hkv, Lk, Dv)
        if rep > 1 and not gqa_in_kernel:
            k = k[:, :, None].expand(G, Hkv, rep, Lk, D).reshape(G, H, Lk, D)
            v = v[:, :, None].expand(G, Hkv, rep, Lk, Dv).reshape(G, H, Lk, Dv)
        o = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=g.mask, dropout_p=dropout, scale=scaling,
            enable_gqa=rep > 1 and gqa_in_kernel,
        )  # (G, H, Lq, Dv)
        outs.append(o.transpose(1, 2).reshape(G * Lq, H * Dv))
    rows = outs[0] if len(outs) == 1 else torch.cat(outs)  # (Σ G*Lq, H*Dv)
    return rows.index_select(0, plan.inverse).view(B, T, H, Dv)


def span_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                           scaling: float | None = None, treerpo_spans: SpanPlan | None = None, **kwargs):
    """transformers AttentionInterface entry: span attention with a plan, transformers' sdpa without."""
    # transformers loads with the model (learner/trainer.py), not when this module is imported
    from transformers.integrations.sdpa_attention import sdpa_attention_forward  # noqa: PLC0415

    if treerpo_spans is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    if kwargs.get("sliding_window") is not None:
        raise NotImplementedError(
            "span attention has no sliding window: use learner.tree_attention='mask' for sliding-window layers"
        )
    # the plan defines visibility completely: any mask transformers built (e.g. from position ids) is ignored
    return span_attention(query, key, value, treerpo_spans, scaling=scaling, dropout=dropout), None


def register_span_attention() -> None:
    """Register "treerpo_span" with transformers (idempotent); call before from_pretrained uses it."""
    # transformers loads with the model (learner/trainer.py), not when this module is imported
    from transformers import AttentionInterface  # noqa: PLC0415
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask  # noqa: PLC0415

    AttentionInterface.register(SPAN_ATTENTION, span_attention_forward)
    AttentionMaskInterface.register(SPAN_ATTENTION, sdpa_mask)


def use_span_attention(model) -> None:
    """Switch a loaded HF model (all its sub-modules) to "treerpo_span"; a no-op if it already is."""
    register_span_attention()
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) == SPAN_ATTENTION:
        return
    if not hasattr(model, "set_attn_implementation"):
        raise TypeError(f"{type(model).__name__} has no set_attn_implementation: pass the bare HF model "
                        "(Trainer.module under DeepSpeed)")
    model.set_attn_implementation(SPAN_ATTENTION)
    if config._attn_implementation != SPAN_ATTENTION:
        raise RuntimeError(f"{type(model).__name__} refused attn_implementation={SPAN_ATTENTION!r} (it does not "
                           "dispatch through transformers' AttentionInterface): use learner.tree_attention='mask'")
