"""The staleness-aware TreeRPO loss (design §4.1): a pure function `(inputs, cfg) -> (loss, metrics)`.

For trainable token t with current log-prob θ_t, proximal log-prob p_t, behaviour log-prob b_t
(from the actor) and advantage A_t:

    r_t = exp(θ_t − p_t)                                   ratio (policy ratio)
    w_t = min(exp(p_t − b_t), is_cap)   (detached)         is_weight (behaviour -> proximal)
    ℓ_t = − w_t · min(r_t·A_t, clip(r_t, 1−ε_low, 1+ε_high)·A_t)  +  β · KL_k3(θ ‖ ref)_t
    ℓ_t ← ℓ_t · γ^staleness_t                              (when staleness is given)
    L   = Σ_{t: mask} ℓ_t / normalizer                     normalizer = the step's trainable tokens

    KL_k3(θ ‖ ref)_t = exp(ref_t − θ_t) − (ref_t − θ_t) − 1

Since −min(x, y) = max(−x, −y) the policy term is written cleanrl-style:
pg_loss1 = −A·r, pg_loss2 = −A·clip(r), pg_loss = max(pg_loss1, pg_loss2).

Guarantees:
* Token mean over the whole optimizer step: each micro-batch passes the step's global
  trainable-token count as `normalizer`, so the micro-batch losses (and gradients) sum to the
  loss of one big batch. Without it the normalizer is this call's `mask.sum()`.
* Tokens outside `mask` contribute exactly nothing, not even NaN: their log-ratios are zeroed
  before any exp, so garbage (padding, -inf) under the mask cannot poison the gradient.
* A call with no trainable token returns a finite 0 loss that is still attached to the graph of
  `logprobs` (backward works, gradients are zero).
* No logging, optimizer or collectives. Metrics are plain floats (one host sync per call), means
  over this call's trainable tokens (0.0 when there are none); `trainable_tokens` is the weight to
  combine them across micro-batches. Their keys are names of common/metrics.py's table (rows of
  the learner's step record), so the same name reaches metrics.jsonl and Prometheus.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from common.config import LossConfig


@dataclass
class LossInputs:
    """Per-token tensors of one shape, (B, T) or (N,). Only tokens with `mask` count."""

    logprobs: torch.Tensor  # θ, with grad
    proximal_logprobs: torch.Tensor | None  # p; None allowed only with cfg.proximal == "behaviour"
    behaviour_logprobs: torch.Tensor  # b, from the actor
    advantages: torch.Tensor  # A
    mask: torch.Tensor  # bool: trainable tokens
    ref_logprobs: torch.Tensor | None = None  # needed when cfg.kl_coef > 0
    staleness: torch.Tensor | None = None  # int: learner version − node version
    normalizer: float | None = None  # the step's global trainable-token count; default mask.sum()
    entropy: torch.Tensor | None = None  # optional, metrics only
    valid: torch.Tensor | None = None  # optional bool: positions holding a generated token (metrics only)


def _check_shapes(inputs: LossInputs) -> None:
    shape = inputs.logprobs.shape
    for name in ("proximal_logprobs", "behaviour_logprobs", "advantages", "mask", "ref_logprobs",
                 "staleness", "entropy", "valid"):
        value = getattr(inputs, name)
        if value is not None and value.shape != shape:
            raise ValueError(
                f"LossInputs.{name} has shape {tuple(value.shape)} but logprobs has {tuple(shape)}: "
                "every per-token tensor must have the same shape"
            )


def _masked_stats(x: torch.Tensor, mask: torch.Tensor, count: torch.Tensor) -> list[torch.Tensor]:
    """[mean, std (ddof 0), min, max] of x over mask; zeros when the mask is empty."""
    x = x.detach().float()
    denom = count.clamp(min=1)
    mean = torch.where(mask, x, 0.0).sum() / denom
    var = torch.where(mask, (x - mean) ** 2, 0.0).sum() / denom
    has = count > 0
    lo = torch.where(mask, x, float("inf")).min() if x.numel() else x.new_zeros(())
    hi = torch.where(mask, x, float("-inf")).max() if x.numel() else x.new_zeros(())
    zero = x.new_zeros(())
    return [mean, var.sqrt(), torch.where(has, lo, zero), torch.where(has, hi, zero)]


def treerpo_loss(inputs: LossInputs, cfg: LossConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """The design §4.1 loss and its metrics; see the module docstring for the equation."""
    _check_shapes(inputs)
    mask = inputs.mask.bool()  # (B, T)
    logprobs = inputs.logprobs  # (B, T), θ
    behaviour = inputs.behaviour_logprobs.detach().to(logprobs.dtype)  # (B, T), b
    if inputs.proximal_logprobs is None:
        if cfg.proximal != "behaviour":
            raise ValueError(
                "LossInputs.proximal_logprobs is None but loss.proximal='recompute': pass the "
                "recomputed log-probs, or set loss.proximal='behaviour'"
            )
        proximal = behaviour
    else:
        proximal = inputs.proximal_logprobs.detach().to(logprobs.dtype)  # (B, T), p
    advantages = inputs.advantages.detach().to(logprobs.dtype)  # (B, T), A

    # zero the log-ratios off the mask before any exp: no inf/NaN can leak into the graph
    logratio = torch.where(mask, logprobs - proximal, 0.0)  # (B, T), θ − p
    ratio = torch.exp(logratio)  # (B, T), r
    is_logratio = torch.where(mask, proximal - behaviour, 0.0)  # (B, T), p − b
    is_weight_raw = torch.exp(is_logratio)  # (B, T)
    is_weight = is_weight_raw.clamp(max=cfg.is_cap)  # (B, T), w (no grad: p, b detached)

    pg_loss1 = -advantages * ratio  # (B, T)
    pg_loss2 = -advantages * torch.clamp(ratio, 1.0 - cfg.clip_low, 1.0 + cfg.clip_high)  # (B, T)
    pg_loss = torch.max(pg_loss1, pg_loss2)  # (B, T)
    token_loss = is_weight * pg_loss  # (B, T)
    pg_term = token_loss.detach()  # (B, T), the clipped policy-gradient term alone (metric)

    kl_ref = None
    if inputs.ref_logprobs is not None:
        ref_logratio = torch.where(mask, inputs.ref_logprobs.detach().to(logprobs.dtype) - logprobs, 0.0)
        kl_ref = torch.exp(ref_logratio) - ref_logratio - 1.0  # (B, T), KL_k3(θ ‖ ref)
        if cfg.kl_coef > 0:
            token_loss = token_loss + cfg.kl_coef * kl_ref
    elif cfg.kl_coef > 0:
        raise ValueError(f"loss.kl_coef={cfg.kl_coef} > 0 needs LossInputs.ref_logprobs (reference log-probs)")

    if inputs.staleness is not None and cfg.staleness_decay != 1.0:
        decay = torch.pow(cfg.staleness_decay, inputs.staleness.to(logprobs.dtype).clamp(min=0))  # (B, T), γ^s
        token_loss = token_loss * decay

    count = mask.sum()  # trainable tokens in this call
    if inputs.normalizer is None:
        normalizer = count.clamp(min=1).to(logprobs.dtype)
    else:
        if inputs.normalizer < 0:
            raise ValueError(f"LossInputs.normalizer={inputs.normalizer} must be >= 0 (a token count)")
        normalizer = max(float(inputs.normalizer), 1.0)
    loss = torch.where(mask, token_loss, 0.0).sum() / normalizer

    metrics = _metrics(inputs, cfg, mask, count, ratio, is_weight, is_weight_raw, logratio,
                       logprobs, behaviour, advantages, kl_ref, pg_term)
    return loss, metrics


def _metrics(inputs, cfg, mask, count, ratio, is_weight, is_weight_raw, logratio,
             logprobs, behaviour, advantages, kl_ref, pg_term) -> dict[str, float]:
    """All metrics gathered into one tensor so the host syncs once."""
    denom = count.clamp(min=1).float()
    mf = mask.float()
    ratio = ratio.detach().float()
    clip_low = ((ratio < 1.0 - cfg.clip_low) & (advantages < 0)).float()  # gradient zeroed below
    clip_high = ((ratio > 1.0 + cfg.clip_high) & (advantages > 0)).float()  # gradient zeroed above
    # k3 estimator of KL(π_b ‖ π_θ) on tokens sampled from π_b: x = θ − b; exp(x) − x − 1
    x_b = torch.where(mask, logprobs.detach() - behaviour, 0.0).float()
    x_p = logratio.detach().float()
    names = ["clip_fraction_low", "clip_fraction_high", "is_weight_mean", "is_weight_max",
             "is_weight_capped_fraction", "approx_kl_behaviour", "approx_kl_proximal", "ratio_mean"]
    values = [
        (clip_low * mf).sum() / denom,
        (clip_high * mf).sum() / denom,
        (is_weight.float() * mf).sum() / denom,
        torch.where(mask, is_weight.float(), 0.0).max() if mask.numel() else denom * 0,
        ((is_weight_raw > cfg.is_cap).float() * mf).sum() / denom,
        ((torch.exp(x_b) - x_b - 1.0) * mf).sum() / denom,
        ((torch.exp(x_p) - x_p - 1.0) * mf).sum() / denom,
        (ratio * mf).sum() / denom,
    ]
    names.append("pg_loss")  # token mean of w·max(-A·r, -A·clip(r)) over this call's trainable tokens
    values.append((torch.where(mask, pg_term, 0.0).float()).sum() / denom)
    names += ["advantage_mean", "advantage_std", "advantage_min", "advantage_max"]
    values += _masked_stats(advantages, mask, count)
    valid = inputs.valid.bool() if inputs.valid is not None else torch.ones_like(mask)
    names += ["trainable_tokens", "trainable_token_fraction"]
    values += [count.float(), count.float() / valid.sum().clamp(min=1).float()]
    if kl_ref is not None:
        names.append("kl_ref")
        values.append((kl_ref.detach().float() * mf).sum() / denom)
    if inputs.entropy is not None:
        names.append("entropy")
        values.append((inputs.entropy.detach().float() * mf).sum() / denom)
    if inputs.staleness is not None:
        names += ["token_staleness_mean", "token_staleness_max"]
        stale = inputs.staleness.float()
        values += [(stale * mf).sum() / denom, torch.where(mask, stale, 0.0).max() if mask.numel() else denom * 0]
    flat = torch.stack([v.reshape(()).float().to(mf.device) for v in values]).tolist()  # one host sync
    return dict(zip(names, flat, strict=True))
