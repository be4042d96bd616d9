"""The sampling distribution: one definition shared by the engines and the learner (design §4.1).

An actor draws each token from

    z  = logits / temperature
    z' = z with every token outside top-k, then outside the top-p nucleus, set to -inf
    logprob = log_softmax(z')[token]

(top-k keeps tokens whose logit is >= the k-th largest; top-p keeps the highest-probability
tokens until their mass reaches p, at least one; the same semantics as vLLM's sampler, whose
`processed_logprobs` mode reports the same numbers). The HF engine samples from
`processed_logprobs`; the learner recomputes θ, proximal and reference log-probs with it, so the
importance ratios compare log-probs of one distribution. A token outside the learner's kept set
gets -inf there: the learner masks it out of the loss (`kept`).
"""

from __future__ import annotations

import torch


def truncates(top_k: int, top_p: float) -> bool:
    """True if (top_k, top_p) changes the distribution (top_k 0 and top_p 1 are off)."""
    return top_k > 0 or top_p < 1.0


def processed_logprobs(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                       top_p: torch.Tensor) -> torch.Tensor:
    """Log-probs of the distribution sampled from (module docstring), float32, differentiable.

    logits (B, V); temperature (B,) float > 0; top_k (B,) int, 0 = off; top_p (B,) float, 1 = off.
    Returns (B, V) with -inf outside the kept set.
    """
    z = logits.float() / temperature.float().to(logits.device).unsqueeze(1)  # (B, V)
    vocab = z.shape[1]
    top_k, top_p = top_k.to(logits.device), top_p.to(logits.device)
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), torch.full_like(top_k, vocab))
    need_k = bool((k < vocab).any())
    need_p = bool((top_p < 1.0).any())
    if need_k or need_p:
        z_sorted, order = z.sort(dim=-1, descending=False)  # (B, V) ascending
        if need_k:
            kth = z_sorted.gather(1, (vocab - k).long().unsqueeze(1))  # (B, 1) k-th largest
            z_sorted = z_sorted.masked_fill(z_sorted < kth, float("-inf"))
        if need_p:
            cum = z_sorted.detach().softmax(dim=-1).cumsum(dim=-1)  # (B, V) mass from the tail up
            drop = cum <= (1.0 - top_p.float()).unsqueeze(1)
            drop[:, -1] = False  # the most likely token always stays
            z_sorted = z_sorted.masked_fill(drop, float("-inf"))
        z = torch.empty_like(z).scatter(1, order, z_sorted)
    return torch.log_softmax(z, dim=-1)


def processed_logprobs_uniform(logits: torch.Tensor, temperature: float, top_k: int = 0,
                               top_p: float = 1.0) -> torch.Tensor:
    """`processed_logprobs` with one (temperature, top_k, top_p) for every row of logits (C, V)."""
    if not truncates(top_k, top_p):
        return torch.log_softmax(logits.float() / temperature, dim=-1)  # no sort when nothing is cut
    rows = logits.shape[0]
    return processed_logprobs(logits, torch.full((rows,), float(temperature)),
                              torch.full((rows,), int(top_k), dtype=torch.long),
                              torch.full((rows,), float(top_p)))


def entropy_of(logp: torch.Tensor) -> torch.Tensor:
    """Entropy of each row of log-probs (C, V) -> (C,); -inf entries (cut tokens) count 0."""
    return -torch.where(torch.isfinite(logp), logp.exp() * logp, 0.0).sum(-1)
