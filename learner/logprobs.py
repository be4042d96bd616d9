"""Per-token log-probs of a packed batch under an HF causal LM (the learner's forward).

    logprob[b, t] = processed_logprobs(logits[b, pred_index[b, t]], temperature, top_k, top_p)[input_ids[b, t]]

for every generated token (pred_index >= 0), 0 elsewhere: the distribution the actors sampled from
(common/sampling.py, the one definition the engines use; with top_k 0 and top_p 1 a plain
log_softmax of logits / temperature). Under truncation a token outside the kept set of these
logits gets -inf; the trainer masks such tokens out of the loss. Only the positions some token is
predicted from go through the LM head, so prompts and padding cost no vocab projection.

Memory: the full-vocabulary logits are never held for all positions at once. The decoder's last
hidden states of the kept positions go through the LM head in chunks of `chunk` positions; each
chunk's logits, float32 copy, log-softmax and entropy temporaries live only inside that chunk and
(with grad) are recomputed in the backward (`torch.utils.checkpoint`), so the peak is a few
chunk x vocab tensors instead of several kept-positions x vocab ones (the paper preset, ~16k kept
positions x 151,936 vocab, would hold ~10 GB per float32 copy).

Tree-packed rows are attended in one of two ways (`tree_attention`):

* `span` (learner/attention.py): each span against its visible keys only, exact and
  block-sparse; the model is switched to attn_implementation "treerpo_span" (transformers' sdpa
  for everything but tree-packed batches) and the forward gets the span plan, no mask;
* `mask`: the batch's tree mask for the model's own kernel, built on the model's device:
  `sdpa` / `eager`: a dense additive (B, 1, T, T) mask in the model's dtype (0 allowed, finfo.min
  disallowed; transformers passes a ready 4-D mask through untouched); `flex_attention` (CUDA): a
  FlexAttention BlockMask from the span ids and the span-ancestor table (no T x T tensor);
* `auto` (default): `span` if the model runs "treerpo_span", or "sdpa" on CPU (where SDPA computes
  every entry of a dense mask), else `mask`.

Rows that are plain causal sequences (flat packing, one path per row) get no mask at all, so
SDPA takes its `is_causal` fast path.

Call it with the bare HF model (under DeepSpeed, `Trainer.module`, the model inside DeepSpeed's
wrapper: ZeRO hooks live on its submodules) or anything whose forward takes the HF keywords.

Layering inside learner/: packing (batches, no model) <- attention (the span kernel) <- logprobs
(the forward); nothing below imports what is above it.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Literal

import torch
from torch.nn.attention.flex_attention import create_block_mask
from torch.utils.checkpoint import checkpoint

from common.sampling import entropy_of, processed_logprobs_uniform
from learner.attention import SPAN_ATTENTION, no_masks, span_plan, use_span_attention

if TYPE_CHECKING:
    from learner.packing import PackedBatch


def _model_device_dtype(model) -> tuple[torch.device, torch.dtype]:
    param = next(model.parameters())
    dtype = getattr(model, "dtype", None)
    return param.device, dtype if isinstance(dtype, torch.dtype) else param.dtype


def _attn_implementation(model) -> str:
    config = getattr(model, "config", None)
    return str(getattr(config, "_attn_implementation", None) or "sdpa")


@functools.cache
def _create_block_mask():
    """`create_block_mask` under torch.compile: evaluated eagerly it vmaps the mask function over
    every (q, kv) pair, a dense (B, 1, T, T) tensor; compiled, it works block by block."""
    return torch.compile(create_block_mask, dynamic=True)


def flex_block_mask(batch: PackedBatch, device: torch.device):
    """FlexAttention BlockMask equal to `batch.allowed()`, built from span ids (no T x T tensor)."""
    span = batch.span_ids.to(device)  # (B, T)
    ancestors = batch.span_ancestors.to(device)  # (B, S, S)
    B, T = span.shape

    def tree_mask(b, h, q, kv):
        return (kv <= q) & ancestors[b, span[b, q], span[b, kv]]

    return _create_block_mask()(tree_mask, B, None, T, T, device=device)


def attention_mask_for(model, batch: PackedBatch):
    """The mask object the model's attention implementation wants, or None for causal rows."""
    if batch.span_ancestors is None:
        return None
    device, dtype = _model_device_dtype(model)
    if _attn_implementation(model) == "flex_attention":
        if device.type != "cuda":
            raise ValueError(
                "model.attn_implementation='flex_attention' needs CUDA here; use 'sdpa' on CPU"
            )
        return flex_block_mask(batch, device)
    return batch.additive_mask(dtype, device)


TreeAttention = Literal["auto", "span", "mask"]


def resolve_tree_attention(model, tree_attention: TreeAttention = "auto") -> str:
    """'span' or 'mask': how tree-packed batches are attended under `model` (see the module doc)."""
    if tree_attention not in ("auto", "span", "mask"):
        raise ValueError(f"tree_attention={tree_attention!r}: use 'auto', 'span' or 'mask'")
    if tree_attention != "auto":
        return tree_attention
    impl = _attn_implementation(model)
    device, _ = _model_device_dtype(model)
    return "span" if impl == SPAN_ATTENTION or (impl == "sdpa" and device.type == "cpu") else "mask"


def attention_inputs(model, batch: PackedBatch, tree_attention: TreeAttention = "auto") -> dict:
    """The attention keywords of the forward: `attention_mask` (and `treerpo_spans` for span attention).

    Span attention switches `model` to attn_implementation "treerpo_span" for good (idempotent;
    identical to sdpa for every forward without a span plan).
    """
    how = resolve_tree_attention(model, tree_attention)  # validates tree_attention for every batch
    if batch.span_ancestors is None:
        return {"attention_mask": None}
    device, _ = _model_device_dtype(model)
    if how == "mask":
        return {"attention_mask": attention_mask_for(model, batch.to(device))}  # built on the device
    use_span_attention(model)
    return {"attention_mask": no_masks(device), "treerpo_spans": span_plan(batch, device)}  # planned on the host


LOGPROB_CHUNK = 2048
"""Kept positions per LM-head chunk of `token_logprobs` (2048 x 151,936 float32 = 1.2 GB)."""


def _split_head(model):
    """(decoder, lm_head) when the model is a plain decoder + linear LM head, else None (then the
    model's own forward computes the logits, all kept positions at once)."""
    get_decoder, head = getattr(model, "get_decoder", None), getattr(model, "get_output_embeddings", None)
    if get_decoder is None or head is None:
        return None
    config = getattr(model, "config", None)
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None):
        return None  # the model transforms its logits beyond the head
    decoder, lm_head = get_decoder(), head()
    if decoder is None or not isinstance(lm_head, torch.nn.Linear):
        return None
    return decoder, lm_head


def _chunk_logprobs(lm_head, sampling: tuple[float, int, float], hidden: torch.Tensor, row: torch.Tensor,
                    token: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs of `token` under the rows `row` of this chunk's logits, and each row's entropy.

    `lm_head` is None when `hidden` already holds the chunk's logits."""
    logits = hidden if lm_head is None else lm_head(hidden)  # (C, V)
    logp = processed_logprobs_uniform(logits, *sampling)  # (C, V)
    entropy = entropy_of(logp.detach())  # (C,)
    return logp[row, token], entropy


def dummy_logprobs(model, token_id: int) -> torch.Tensor:
    """A zero-valued scalar (attached to the graph when grad is on) from a 1-token forward through
    exactly the modules and checkpointing of a one-chunk `token_logprobs` call. A ZeRO-3 rank with
    no data of its own runs it: ZeRO hooks every module call and its backward with collectives
    (parameter gathers, gradient reduction, the top-level module's step counter), so a dummy that
    took another path through the model than the other ranks' real forwards would hang them."""
    device, _ = _model_device_dtype(model)
    ids = torch.full((1, 1), int(token_id), dtype=torch.long, device=device)  # (1, 1)
    split = _split_head(model)
    if split is None:
        logits = model(input_ids=ids, use_cache=False, logits_to_keep=torch.zeros(1, dtype=torch.long, device=device))
        return logits.logits.float().sum() * 0.0
    decoder, lm_head = split
    hidden = decoder(input_ids=ids, use_cache=False).last_hidden_state.reshape(1, -1)  # (1, H)
    row, token = torch.zeros(1, dtype=torch.long, device=device), ids[0]  # (1,), (1,)
    if torch.is_grad_enabled():
        value, _ = checkpoint(_chunk_logprobs, lm_head, (1.0, 0, 1.0), hidden, row, token, use_reentrant=False)
    else:
        value, _ = _chunk_logprobs(lm_head, (1.0, 0, 1.0), hidden, row, token)
    return value.sum() * 0.0


def token_logprobs(
    model,
    batch: PackedBatch,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    *,
    return_entropy: bool = False,
    tree_attention: TreeAttention = "auto",
    chunk: int = LOGPROB_CHUNK,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """(B, T) log-probs of the generated tokens (0 elsewhere); with grad if grad is enabled.

    `temperature`, `top_k`, `top_p`: the actors' sampling parameters (tree.*); -inf marks a token
    outside the kept set when they truncate.
    With `return_entropy`, also the (B, T) entropy of the predicting distribution (detached).
    `tree_attention` chooses how tree-packed rows are attended (module doc; learner.tree_attention).
    `chunk`: kept positions per LM-head chunk (module doc).
    """
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be > 0 (use the sampling temperature)")
    if chunk < 1:
        raise ValueError(f"chunk={chunk} must be >= 1")
    if top_k < 0 or not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_k={top_k}, top_p={top_p}: need top_k >= 0 and 0 < top_p <= 1")
    sampling = (temperature, top_k, top_p)
    device, _ = _model_device_dtype(model)
    attention = attention_inputs(model, batch, tree_attention)  # before the move: plans read host tensors
    batch = batch.to(device)
    B, T = batch.input_ids.shape
    pred = batch.pred_index  # (B, T)
    generated = pred >= 0  # (B, T)
    keep = torch.unique(pred[generated])  # (K,) sorted positions whose logits are needed
    K = keep.numel()
    inputs = dict(input_ids=batch.input_ids, position_ids=batch.position_ids, **attention, use_cache=False)
    split = _split_head(model)
    if split is None:
        out = model(**inputs, logits_to_keep=keep)
        logits, out = out.logits, None  # (B, K, V)
        hidden, lm_head = None, None
    else:
        decoder, lm_head = split
        hidden = decoder(**inputs).last_hidden_state[:, keep].reshape(B * K, -1)  # (B*K, H)
    # every generated token: its predicting row (b, k) of the kept positions, and its id
    b_idx, t_idx = generated.nonzero(as_tuple=True)  # (M,)
    row = b_idx * K + torch.searchsorted(keep, pred[b_idx, t_idx])  # (M,) into B*K
    token = batch.input_ids[b_idx, t_idx]  # (M,)
    order = torch.argsort(row)
    row, token, b_idx, t_idx = row[order], token[order], b_idx[order], t_idx[order]
    values, entropies = [], []
    for start in range(0, B * K, chunk):
        end = min(start + chunk, B * K)
        lo, hi = (int(i) for i in torch.searchsorted(row, torch.tensor([start, end], device=device)))
        if hidden is None:
            rows_logits = logits.reshape(B * K, -1)[start:end]  # (C, V)
            value, entropy = _chunk_logprobs(None, sampling, rows_logits, row[lo:hi] - start, token[lo:hi])
        elif torch.is_grad_enabled():  # the chunk's logits are recomputed in the backward, not kept
            value, entropy = checkpoint(_chunk_logprobs, lm_head, sampling, hidden[start:end], row[lo:hi] - start,
                                        token[lo:hi], use_reentrant=False)
        else:
            value, entropy = _chunk_logprobs(lm_head, sampling, hidden[start:end], row[lo:hi] - start, token[lo:hi])
        values.append(value)
        entropies.append(entropy)
    target = torch.zeros(B, T, dtype=torch.float32, device=device)
    target = target.index_put((b_idx, t_idx), torch.cat(values))  # (B, T), differentiable
    if not return_entropy:
        return target
    with torch.no_grad():
        entropy = torch.zeros(B, T, dtype=torch.float32, device=device)
        entropy[b_idx, t_idx] = torch.cat(entropies)[row]  # (B, T)
    return target, entropy
