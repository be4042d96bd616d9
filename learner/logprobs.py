"""Per-token log-probs of a packed batch under an HF causal LM (the learner's forward).

    logprob[b, t] = log_softmax(logits[b, pred_index[b, t]] / temperature)[input_ids[b, t]]

for every generated token (pred_index >= 0), 0 elsewhere. Only the positions some token is
predicted from go through the LM head (`logits_to_keep`), so prompts and padding cost no vocab
projection. The attention mask is the batch's tree mask, built on the model's device:

* `sdpa` / `eager`: a dense additive (B, 1, T, T) mask in the model's dtype (0 allowed,
  finfo.min disallowed); transformers passes a ready 4-D mask through untouched;
* `flex_attention` (CUDA): a FlexAttention BlockMask from the span ids and the span-ancestor
  table, so no T x T tensor is materialised and fully masked blocks are skipped;
* rows that are plain causal sequences (flat packing, one path per row): no mask at all, so
  SDPA takes its `is_causal` fast path.

Call it with the bare HF model (for DeepSpeed, `engine.module` works: ZeRO hooks live on the
submodules) or anything whose forward takes the HF keywords.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from learner.packing import PackedBatch


def _model_device_dtype(model) -> tuple[torch.device, torch.dtype]:
    param = next(model.parameters())
    dtype = getattr(model, "dtype", None)
    return param.device, dtype if isinstance(dtype, torch.dtype) else param.dtype


def _attn_implementation(model) -> str:
    config = getattr(model, "config", None)
    return str(getattr(config, "_attn_implementation", None) or "sdpa")


def flex_block_mask(batch: "PackedBatch", device: torch.device):
    """FlexAttention BlockMask equal to `batch.allowed()`, built from span ids (no T x T tensor)."""
    from torch.nn.attention.flex_attention import create_block_mask

    span = batch.span_ids.to(device)  # (B, T)
    ancestors = batch.span_ancestors.to(device)  # (B, S, S)
    B, T = span.shape

    def tree_mask(b, h, q, kv):
        return (kv <= q) & ancestors[b, span[b, q], span[b, kv]]

    return create_block_mask(tree_mask, B, None, T, T, device=device)


def attention_mask_for(model, batch: "PackedBatch"):
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


def token_logprobs(
    model,
    batch: "PackedBatch",
    temperature: float = 1.0,
    *,
    return_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """(B, T) log-probs of the generated tokens (0 elsewhere); with grad if grad is enabled.

    With `return_entropy`, also the (B, T) entropy of the predicting distribution (detached).
    """
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be > 0 (use the sampling temperature)")
    device, _ = _model_device_dtype(model)
    batch = batch.to(device)
    B, T = batch.input_ids.shape
    pred = batch.pred_index  # (B, T)
    generated = pred >= 0  # (B, T)
    keep = torch.unique(pred[generated])  # (K,) sorted positions whose logits are needed
    out = model(
        input_ids=batch.input_ids,
        position_ids=batch.position_ids,
        attention_mask=attention_mask_for(model, batch),
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
