"""learner/loss.py: hand-derived values, a naive per-token loop, degenerate batches, normalizer."""

from __future__ import annotations

import math

import pytest
import torch

from common.config import LossConfig
from common.metrics import STEP_RECORD
from learner.loss import LossInputs, treerpo_loss

LN = math.log
DT = torch.float64


def _inputs(theta, prox, beh, adv, mask=None, **kw) -> LossInputs:
    theta = torch.tensor(theta, dtype=DT, requires_grad=True)
    mask = torch.ones(theta.shape, dtype=torch.bool) if mask is None else torch.tensor(mask)
    return LossInputs(
        logprobs=theta,
        proximal_logprobs=torch.tensor(prox, dtype=DT),
        behaviour_logprobs=torch.tensor(beh, dtype=DT),
        advantages=torch.tensor(adv, dtype=DT),
        mask=mask,
        **kw,
    )


def _one_token(r: float, adv: float, w: float = 1.0, cfg: LossConfig | None = None):
    """Loss and dL/dθ of one token with ratio r, advantage adv and IS weight exp(p - b) = w."""
    p = -1.0
    inp = _inputs([p + LN(r)], [p], [p - LN(w)], [adv])
    loss, metrics = treerpo_loss(inp, cfg or LossConfig())
    loss.backward()
    return loss.item(), inp.logprobs.grad.item(), metrics


# ε_low = ε_high = 0.2, is_cap = 2 (defaults). ℓ = −w·min(r·A, clip(r)·A); dℓ/dθ = −w·A·r when the
# unclipped term is the min, 0 when the clipped (constant) term is.
@pytest.mark.parametrize(
    "r, adv, w, loss, grad",
    [
        (1.1, 1.0, 1.0, -1.1, -1.1),  # clip inactive: min(1.1, 1.1) = 1.1
        (1.5, 1.0, 1.0, -1.2, 0.0),  # clip high active: min(1.5, 1.2) = 1.2, constant
        (0.5, -1.0, 1.0, 0.8, 0.0),  # clip low active: min(-0.5, -0.8) = -0.8, constant
        (0.9, -2.0, 1.0, 1.8, 1.8),  # negative A inside the band: min(-1.8, -1.8); grad = -A·r = 1.8
        (1.5, -1.0, 1.0, 1.5, 1.5),  # negative A above the band: min(-1.5, -1.2) = -1.5 (unclipped)
        (0.5, 1.0, 1.0, -0.5, -0.5),  # positive A below the band: min(0.5, 0.8) = 0.5 (unclipped)
        (1.0, 1.0, 3.0, -2.0, -2.0),  # IS weight 3 capped at 2: ℓ = -2·1·1, grad = -2·A·r
        (1.0, 1.0, 0.5, -0.5, -0.5),  # IS weight 0.5 under the cap
        (1.3, 0.0, 1.0, 0.0, 0.0),  # zero advantage: nothing
    ],
)
def test_hand_derived_single_token(r, adv, w, loss, grad):
    got_loss, got_grad, _ = _one_token(r, adv, w)
    assert got_loss == pytest.approx(loss, abs=1e-12)
    assert got_grad == pytest.approx(grad, abs=1e-12)


def test_clip_metrics_hand_derived():
    # tokens: (r=1.5, A=+1) clipped high; (r=0.5, A=-1) clipped low; (r=1.0, A=1, w=3) capped;
    # (r=1.5, A=-1) outside the band but NOT clipped (pessimistic unclipped term)
    p = [-1.0] * 4
    inp = _inputs([-1 + LN(1.5), -1 + LN(0.5), -1.0, -1 + LN(1.5)], p, [-1.0, -1.0, -1 - LN(3), -1.0],
                  [1.0, -1.0, 1.0, -1.0])
    _, m = treerpo_loss(inp, LossConfig())
    assert m["clip_fraction_high"] == pytest.approx(0.25)
    assert m["clip_fraction_low"] == pytest.approx(0.25)
    assert m["is_weight_capped_fraction"] == pytest.approx(0.25)
    assert m["is_weight_max"] == pytest.approx(2.0)
    assert m["is_weight_mean"] == pytest.approx((1 + 1 + 2 + 1) / 4)
    assert m["advantage_mean"] == pytest.approx(0.0)
    assert m["advantage_std"] == pytest.approx(1.0)  # ddof 0 over ±1
    assert (m["advantage_min"], m["advantage_max"]) == (-1.0, 1.0)
    # approx KL to behaviour (k3, x = θ − b): token 3 has x = ln 3 → 3 − ln 3 − 1; tokens 1,2,4 by r
    k3 = lambda x: math.exp(x) - x - 1  # noqa: E731
    want = (k3(LN(1.5)) + k3(LN(0.5)) + k3(LN(3)) + k3(LN(1.5))) / 4
    assert m["approx_kl_behaviour"] == pytest.approx(want)


def test_masked_tokens_contribute_nothing_even_if_garbage():
    # token 2 is pruned and holds -inf / huge log-probs: loss = token 1 alone, no NaN anywhere
    inp = _inputs([-1 + LN(1.1), -1e30], [-1.0, float("-inf")], [-1.0, 50.0], [1.0, 7.0], mask=[True, False])
    loss, m = treerpo_loss(inp, LossConfig())
    loss.backward()
    assert loss.item() == pytest.approx(-1.1, abs=1e-12)  # normalizer = 1 trainable token
    assert inp.logprobs.grad.tolist() == pytest.approx([-1.1, 0.0], abs=1e-12)
    assert m["trainable_tokens"] == 1.0 and m["trainable_token_fraction"] == 0.5
    assert all(math.isfinite(v) for v in m.values())


def test_staleness_decay():
    # γ = 0.5; token 1 staleness 0 (×1), token 2 staleness 2 (×0.25); both r = 1.1, A = 1:
    # L = (-1.1·1 - 1.1·0.25) / 2 = -0.6875; grads (-1.1/2, -1.1·0.25/2)
    cfg = LossConfig(staleness_decay=0.5)
    p = [-1.0, -2.0]
    inp = _inputs([p[0] + LN(1.1), p[1] + LN(1.1)], p, p, [1.0, 1.0], staleness=torch.tensor([0, 2]))
    loss, m = treerpo_loss(inp, cfg)
    loss.backward()
    assert loss.item() == pytest.approx(-0.6875, abs=1e-12)
    assert inp.logprobs.grad.tolist() == pytest.approx([-0.55, -0.1375], abs=1e-12)
    assert m["token_staleness_max"] == 2.0
    # γ = 1 (off) ignores staleness
    inp = _inputs([p[0] + LN(1.1), p[1] + LN(1.1)], p, p, [1.0, 1.0], staleness=torch.tensor([0, 2]))
    assert treerpo_loss(inp, LossConfig())[0].item() == pytest.approx(-1.1, abs=1e-12)


def test_kl_k3_term():
    # β = 0.1, A = 0 (policy term 0), ref − θ = ln 2: KL_k3 = 2 − ln 2 − 1 = 0.3068528...
    # dKL/dθ = −exp(ref − θ) + 1 = −1 → grad = β·(−1) = −0.1
    cfg = LossConfig(kl_coef=0.1)
    inp = _inputs([-1.0], [-1.0], [-1.0], [0.0], ref_logprobs=torch.tensor([-1.0 + LN(2)], dtype=DT))
    loss, m = treerpo_loss(inp, cfg)
    loss.backward()
    assert loss.item() == pytest.approx(0.1 * (1 - LN(2)), abs=1e-12)
    assert inp.logprobs.grad.item() == pytest.approx(-0.1, abs=1e-12)
    assert m["kl_ref"] == pytest.approx(1 - LN(2))
    with pytest.raises(ValueError, match="ref_logprobs"):
        treerpo_loss(_inputs([-1.0], [-1.0], [-1.0], [0.0]), cfg)


def test_metric_keys_are_names_of_the_metric_table():
    # every optional input given, so every key the loss can emit appears
    inp = _inputs([-1.0, -2.0], [-1.0, -2.0], [-1.5, -2.0], [1.0, -1.0], ref_logprobs=torch.tensor([-1.0, -2.0]),
                  staleness=torch.tensor([0, 1]), entropy=torch.tensor([0.5, 0.7]), valid=torch.tensor([True, True]))
    _, m = treerpo_loss(inp, LossConfig(kl_coef=0.1))
    assert {"kl_ref", "entropy", "token_staleness_max"} <= set(m)
    assert set(m) <= set(STEP_RECORD), set(m) - set(STEP_RECORD)


def _naive_loss(theta, prox, beh, adv, mask, ref, stale, cfg: LossConfig, normalizer=None):
    """design §4.1 token by token, in python."""
    total = theta.new_zeros(())
    n = 0
    for t in range(theta.shape[0]):
        if not mask[t]:
            continue
        n += 1
        r = torch.exp(theta[t] - prox[t])
        w = min(math.exp(float(prox[t] - beh[t])), cfg.is_cap)
        clipped = min(max(r, torch.tensor(1 - cfg.clip_low, dtype=DT)), torch.tensor(1 + cfg.clip_high, dtype=DT))
        ell = -w * torch.minimum(r * adv[t], clipped * adv[t])
        d = ref[t] - theta[t]
        ell = ell + cfg.kl_coef * (torch.exp(d) - d - 1)
        ell = ell * cfg.staleness_decay ** int(stale[t])
        total = total + ell
    return total / max(normalizer if normalizer is not None else n, 1)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_naive_loop(seed):
    g = torch.Generator().manual_seed(seed)
    N = 64
    theta0 = -torch.rand(N, generator=g, dtype=DT) * 3
    prox = theta0 + torch.randn(N, generator=g, dtype=DT) * 0.3
    beh = prox + torch.randn(N, generator=g, dtype=DT) * 0.8
    adv = torch.randn(N, generator=g, dtype=DT)
    mask = torch.rand(N, generator=g) < 0.7
    ref = theta0 + torch.randn(N, generator=g, dtype=DT) * 0.2
    stale = torch.randint(0, 4, (N,), generator=g)
    cfg = LossConfig(clip_low=0.2, clip_high=0.28, is_cap=1.5, kl_coef=0.05, staleness_decay=0.9)

    theta = theta0.clone().requires_grad_()
    loss, _ = treerpo_loss(LossInputs(theta, prox, beh, adv, mask, ref_logprobs=ref, staleness=stale), cfg)
    loss.backward()
    theta_n = theta0.clone().requires_grad_()
    naive = _naive_loss(theta_n, prox, beh, adv, mask, ref, stale, cfg)
    naive.backward()
    assert loss.item() == pytest.approx(naive.item(), rel=1e-12, abs=1e-14)
    torch.testing.assert_close(theta.grad, theta_n.grad, rtol=1e-12, atol=1e-14)


def test_all_pruned_batch_is_finite_zero_and_backprops():
    theta = torch.full((2, 3), -1.0, dtype=DT, requires_grad=True)
    inp = LossInputs(theta, torch.full((2, 3), float("-inf"), dtype=DT), torch.zeros(2, 3, dtype=DT),
                     torch.ones(2, 3, dtype=DT), torch.zeros(2, 3, dtype=torch.bool),
                     staleness=torch.zeros(2, 3, dtype=torch.long))
    loss, m = treerpo_loss(inp, LossConfig(staleness_decay=0.5))
    loss.backward()
    assert loss.item() == 0.0 and loss.requires_grad
    assert torch.equal(theta.grad, torch.zeros(2, 3, dtype=DT))
    assert all(math.isfinite(v) for v in m.values()) and m["trainable_tokens"] == 0.0


def test_normalizer_two_micro_batches_equal_one_batch():
    g = torch.Generator().manual_seed(7)
    N = 40
    theta0 = -torch.rand(N, generator=g, dtype=DT)
    prox = theta0 + 0.2 * torch.randn(N, generator=g, dtype=DT)
    beh = prox + 0.5 * torch.randn(N, generator=g, dtype=DT)
    adv = torch.randn(N, generator=g, dtype=DT)
    mask = torch.rand(N, generator=g) < 0.6
    cfg = LossConfig()

    theta = theta0.clone().requires_grad_()
    full, _ = treerpo_loss(LossInputs(theta, prox, beh, adv, mask), cfg)
    full.backward()

    theta_mb = theta0.clone().requires_grad_()
    total = float(mask.sum())  # the step's global trainable-token count
    parts = []
    for sl in (slice(0, 13), slice(13, N)):  # uneven split: a plain per-batch mean would differ
        part, _ = treerpo_loss(
            LossInputs(theta_mb[sl], prox[sl], beh[sl], adv[sl], mask[sl], normalizer=total), cfg)
        part.backward()
        parts.append(part.item())
    assert sum(parts) == pytest.approx(full.item(), rel=1e-12)
    torch.testing.assert_close(theta_mb.grad, theta.grad, rtol=1e-12, atol=1e-15)


def test_proximal_behaviour_mode_and_shape_errors():
    inp = _inputs([-1 + LN(1.1)], [-1.0], [-1.0], [1.0])
    inp.proximal_logprobs = None
    with pytest.raises(ValueError, match="recompute"):
        treerpo_loss(inp, LossConfig())
    loss, _ = treerpo_loss(inp, LossConfig(proximal="behaviour"))  # p = b = -1 → r = 1.1
    assert loss.item() == pytest.approx(-1.1, abs=1e-12)
    bad = _inputs([-1.0, -1.0], [-1.0, -1.0], [-1.0, -1.0], [1.0, 1.0])
    bad.advantages = bad.advantages[:1]
    with pytest.raises(ValueError, match="advantages has shape"):
        treerpo_loss(bad, LossConfig())


def test_pg_metric_is_the_clipped_policy_term_mean():
    # two trainable tokens, p = b (w = 1): token 1 r = e^0.1 = 1.105 < 1.2, A = 1 -> -1.105;
    # token 2 r = e^0.5 = 1.649 > 1.2 with A = -1 -> max(1.649, 1.2) = 1.649; third token masked.
    theta = torch.tensor([0.1, 0.5, 3.0])
    zero = torch.zeros(3)
    inputs = LossInputs(logprobs=theta, proximal_logprobs=zero, behaviour_logprobs=zero,
                        advantages=torch.tensor([1.0, -1.0, 5.0]), mask=torch.tensor([True, True, False]))
    loss, m = treerpo_loss(inputs, LossConfig(kl_coef=0.0))
    expected = (-math.exp(0.1) + math.exp(0.5)) / 2
    assert m["pg_loss"] == pytest.approx(expected, rel=1e-6)
    assert float(loss) == pytest.approx(expected, rel=1e-6)  # no KL, no decay: the loss is the pg term
