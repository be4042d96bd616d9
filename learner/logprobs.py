"""Per-token log-probs of a packed batch under an HF causal LM (the learner's forward).

    logprob[b, t] = log_softmax(logits[b, pred_index[b, t]] / temperature)[input_ids[b, t]]

for every generated token (pred_index >= 0), 0 elsewhere. Only the positions some token is
predicted from go through the LM head (`logits_to_keep`), so prompts and padding cost no vocab
projection. Tree-packed rows are attended in one of two ways (`tree_attention`):

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

from typing import TYPE_CHECKING, Literal

import torch
from torch.nn.attention.flex_attention import create_block_mask

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


def flex_block_mask(batch: PackedBatch, device: torch.device):
    """FlexAttention BlockMask equal to `batch.allowed()`, built from span ids (no T x T tensor)."""
    span = batch.span_ids.to(device)  # (B, T)
    ancestors = batch.span_ancestors.to(device)  # (B, S, S)
    B, T = span.shape

    def tree_mask(b, h, q, kv):
        return (kv <= q) & ancestors[b, span[b, q], span[b, kv]]

    return create_block_mask(tree_mask, B, None, T, T, device=device)


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
    return {"attention_mask": no_masks(), "treerpo_spans": span_plan(batch, device)}  # planned on the host


def token_logprobs(
    model,
    batch: PackedBatch,
    temperature: float = 1.0,
    *,
    return_entropy: bool = False,
    tree_attention: TreeAttention = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """(B, T) log-probs of the generated tokens (0 elsewhere); with grad if grad is enabled.

    With `return_entropy`, also the (B, T) entropy of the predicting distribution (detached).
    `tree_attention` chooses how tree-packed rows are attended (module doc; learner.tree_attention).
    """
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be > 0 (use the sampling temperature)")
    device, _ = _model_device_dtype(model)
    attention = attention_inputs(model, batch, tree_attention)  # before the move: plans read host tensors
    batch = batch.to(device)
    B, T = batch.input_ids.shape
    pred = batch.pred_index  # (B, T)
    generated = pred >= 0  # (B, T)
    keep = torch.unique(pred[generated])  # (K,) sorted positions whose logits are needed
    out = model(
        input_ids=batch.input_ids,
        position_ids=batch.position_ids,
        **attention,
        logits_to_keep=keep,
        use_cache=False,
    )
    logits = out.logits.float() / temperature  # (B, K, V)
    logp = torch.log_softmax(logits, dim=-1)  # (B, K, V)
    k = torch.searchsorted(keep, pred.clamp(min=0))  # (B, T) index into K
    rows = torch.arange(B, device=device)[:, None].expand(B, T)  # (B, T)
    target = logp[rows, k.clamp(max=keep.numel() - 1), batch.input_ids]  # (B, T)
    target = torch.where(generated, target, 0.0)
    if not return_entropy:
        return target
    with torch.no_grad():
        entropy = -(logp.exp() * logp).sum(-1)  # (B, K)
        entropy = torch.where(generated, entropy[rows, k.clamp(max=keep.numel() - 1)], 0.0)  # (B, T)
    return target, entropy
