"""learner/packing.py + learner/logprobs.py + learner/attention.py: tree vs flat vs naive equivalence.

Tree-packed rows run under both tree attentions: `mask` (the model's kernel with the dense tree
mask) and `span` (the block-sparse span kernel). The tiny Qwen2 is built, saved to tmp_path and
reloaded with from_pretrained (float32).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from common.config import AdvantageConfig, LossConfig
from common.treerpo import node_token_offsets, step_advantages, token_advantages
from learner.attention import SPAN_ATTENTION, register_span_attention, span_attention, span_plan
from learner.logprobs import token_logprobs
from learner.loss import LossInputs, treerpo_loss
from learner.packing import pack_trees
from tests.support.treegen import random_tree, tree_from_parents

VOCAB = 90  # < the tiny tokenizer's vocabulary
TEMP = 0.7
ADV = AdvantageConfig()
LOSS = LossConfig(clip_low=0.2, clip_high=0.28, is_cap=2.0, staleness_decay=0.9)


SMALL = {"hidden_size": 32, "num_layers": 2}  # the tiny model's variant used here

torch.set_num_threads(1)


def _load(make_tiny_model, attn: str):
    if attn == SPAN_ATTENTION:
        register_span_attention()
    model = AutoModelForCausalLM.from_pretrained(str(make_tiny_model(**SMALL)), dtype=torch.float32,
                                                 attn_implementation=attn)
    return model.eval()  # no dropout anyway; eval keeps it explicit


def _trees(seed: int, n: int = 5, **kw):
    rng = np.random.default_rng(seed)
    return [random_tree(rng, max_depth=3, max_branch=3, vocab_size=VOCAB, max_version=2, **kw) for _ in range(n)]


# ---------------------------------------------------------------------------------------------
# naive reference: one root-to-leaf path at a time, plain causal forward, no packing code
# ---------------------------------------------------------------------------------------------
def _naive_path_logprobs(model, tree, leaf):
    """{node: (L,) log-probs} for the nodes on the path to `leaf`, from one unpadded forward."""
    path = tree.path(leaf)
    ids = np.concatenate([tree.prompt_token_ids] + [tree.nodes[i].token_ids for i in path])
    x = torch.from_numpy(ids.astype(np.int64))[None]  # (1, L)
    logits = model(input_ids=x).logits[0].float() / TEMP  # (L, V)
    logp = torch.log_softmax(logits[:-1], -1).gather(1, x[0, 1:, None])[:, 0]  # (L-1,) predicts ids[1:]
    out, start = {}, len(tree.prompt_token_ids)
    for i in path:
        n = len(tree.nodes[i])
        out[i] = logp[start - 1:start - 1 + n]
        start += n
    return out


def _naive_layout(model, trees):
    """Per tree: (N,) log-probs in token_advantages layout, each node from its first path."""
    layouts = []
    for tree in trees:
        off = node_token_offsets(tree)
        lp = [None] * len(tree.nodes)
        for leaf in tree.leaves():
            for node, v in _naive_path_logprobs(model, tree, leaf).items():
                if lp[node] is None:
                    lp[node] = v
        layouts.append(torch.cat(lp))
        assert layouts[-1].shape[0] == off[-1]
    return layouts


def _scatter_to_layout(batches, lps, trees):
    """Every (tree, token) occurrence in the batches -> list of values, in layout order."""
    seen = [[[] for _ in range(node_token_offsets(t)[-1])] for t in trees]
    for b, lp in zip(batches, lps, strict=True):
        where = b.token_index >= 0
        for ti, tok, v in zip(b.tree_index[where].tolist(), b.token_index[where].tolist(), lp[where].tolist(),
                              strict=True):
            seen[ti][tok].append(v)
    return seen


def _proximal_layout(naive, seed):
    g = torch.Generator().manual_seed(seed)
    return [(v.detach() + 0.15 * torch.randn(v.shape, generator=g)).float() for v in naive]


def _batch_loss_inputs(batch, lp, prox_layout, normalizer):
    where = batch.token_index >= 0
    prox = torch.zeros_like(lp)
    for ti in batch.trees:
        sel = where & (batch.tree_index == ti)
        prox[sel] = prox_layout[ti][batch.token_index[sel]]
    return LossInputs(lp, prox, batch.behaviour_logprobs, batch.advantages, batch.loss_mask,
                      staleness=batch.staleness, normalizer=normalizer)


def _packed_grads(model, trees, mode, budget, prox_layout, tree_attention="auto", **kw):
    model.zero_grad(set_to_none=True)
    batches = pack_trees(trees, ADV, mode, budget, learner_version=2, **kw)
    total = sum(b.num_trainable_tokens for b in batches)
    lps = []
    for b in batches:
        lp = token_logprobs(model, b, TEMP, tree_attention=tree_attention)
        lps.append(lp.detach())
        loss, _ = treerpo_loss(_batch_loss_inputs(b, lp, prox_layout, total), LOSS)
        loss.backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    return batches, lps, grads


def _naive_grads(model, trees, prox_layout):
    """The same loss, one path per forward, each node trained on its first path only."""
    model.zero_grad(set_to_none=True)
    total = sum(int(token_advantages(t, ADV)[1].sum()) for t in trees)
    for ti, tree in enumerate(trees):
        adv, trainable = token_advantages(tree, ADV)
        off = node_token_offsets(tree)
        done: set[int] = set()
        for leaf in tree.leaves():
            lp_nodes = _naive_path_logprobs(model, tree, leaf)
            new = [i for i in lp_nodes if i not in done]
            done.update(new)
            if not new:
                continue
            idx = torch.cat([torch.arange(off[i], off[i + 1]) for i in new])
            lp = torch.cat([lp_nodes[i] for i in new])
            beh = torch.from_numpy(np.concatenate([tree.nodes[i].logprobs for i in new]))
            stale = torch.cat([torch.full((len(tree.nodes[i]),), 2 - tree.nodes[i].version) for i in new])
            inp = LossInputs(lp, prox_layout[ti][idx], beh, torch.from_numpy(adv)[idx],
                             torch.from_numpy(trainable)[idx], staleness=stale, normalizer=total)
            treerpo_loss(inp, LOSS)[0].backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def _assert_grads_close(a, b):
    rel = (a - b).norm() / b.norm()
    assert b.norm() > 0 and rel < 1e-4, f"relative gradient difference {rel:.2e}"
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item())


@pytest.mark.parametrize(("attn", "tree_attention"),
                         [("sdpa", "mask"), ("eager", "mask"), ("sdpa", "span"), (SPAN_ATTENTION, "auto")])
def test_tree_flat_naive_equivalence(make_tiny_model, attn, tree_attention):
    model = _load(make_tiny_model, attn)
    trees = _trees(seed=3)
    sizes = [len(t.prompt_token_ids) + t.num_tokens() for t in trees]
    budget = 24  # >= the longest path (6 + 3 * 5 tokens), < the largest trees
    assert max(sizes) > budget, "the test wants a tree split across rows"
    with torch.no_grad():
        naive = _naive_layout(model, trees)
    prox = _proximal_layout(naive, seed=0)

    grads = {}
    for mode, kw in (("tree", {}), ("flat", {}), ("tree", {"max_batch_rows": 3, "pad_multiple": 8})):
        batches, lps, grads[(mode, len(kw))] = _packed_grads(model, trees, mode, budget, prox, tree_attention, **kw)
        seen = _scatter_to_layout(batches, lps, trees)
        for ti in range(len(trees)):
            for tok, values in enumerate(seen[ti]):
                assert values, f"{mode}: tree {ti} token {tok} missing"
                for v in values:
                    assert v == pytest.approx(naive[ti][tok].item(), abs=1e-5), (mode, ti, tok)
    g_naive = _naive_grads(model, trees, prox)
    _assert_grads_close(grads[("tree", 0)], g_naive)
    _assert_grads_close(grads[("flat", 0)], g_naive)
    _assert_grads_close(grads[("tree", 2)], grads[("tree", 0)])


@pytest.mark.parametrize("mode", ["tree", "flat"])
@pytest.mark.parametrize("budget", [24, 1000])  # 24: longest path fits, big trees split
def test_each_node_counted_once(mode, budget):
    trees = _trees(seed=11, n=8) + _trees(seed=12, n=4, reward_values=None)
    batches = pack_trees(trees, AdvantageConfig(min_group_std=0.3), mode, budget, learner_version=2)
    want = 0
    for tree in trees:
        _, trainable = step_advantages(tree, AdvantageConfig(min_group_std=0.3))
        want += sum(len(n) for n, tr in zip(tree.nodes, trainable, strict=True) if tr)
    assert sum(b.num_trainable_tokens for b in batches) == want
    counted = [np.zeros(node_token_offsets(t)[-1], dtype=int) for t in trees]
    for b in batches:
        assert b.input_ids.shape[1] <= budget
        assert b.num_trainable_tokens == int(b.loss_mask.sum())
        for ti, tok in zip(b.tree_index[b.loss_mask].tolist(), b.token_index[b.loss_mask].tolist(), strict=True):
            counted[ti][tok] += 1
    for tree, c in zip(trees, counted, strict=True):
        assert np.array_equal(c, token_advantages(tree, AdvantageConfig(min_group_std=0.3))[1].astype(int))


@pytest.mark.parametrize("tree_attention", ["mask", "span"])
def test_tree_split_below_the_root(make_tiny_model, tree_attention):
    # 0,1 under the root; 2,3 under 0; 4,5 under 2; 4 tokens each, prompt 3: every path <= 15 tokens.
    # Budget 15: subtree(0) needs 3 + 20 > 15 → split at 0; chain [0] + subtree(2) = 3 + 4 + 12 > 15
    # → split at 2: units [p,0,2,4] (owns 0, 2, 4), [p,0,2,5] (owns 5), [p,0,3] (owns 3), [p,1].
    tree = tree_from_parents([-1, -1, 0, 0, 2, 2], {1: 1.0, 3: 0.0, 4: 1.0, 5: 0.0}, seg_len=4, prompt_len=3)
    batches = pack_trees([tree], ADV, "tree", 15, learner_version=0)
    assert [b.num_tokens for b in batches] == [15, 15, 11, 7]
    assert sum(b.num_trainable_tokens for b in batches) == 24  # 6 nodes x 4, each once
    model = _load(make_tiny_model, "sdpa")
    with torch.no_grad():
        naive = _naive_layout(model, [tree])[0]
        lps = [token_logprobs(model, b, TEMP, tree_attention=tree_attention) for b in batches]
    owned = np.zeros(24, dtype=int)
    for b, lp in zip(batches, lps, strict=True):
        where = b.token_index >= 0
        torch.testing.assert_close(lp[where], naive[b.token_index[where]], rtol=0, atol=1e-5)
        np.add.at(owned, b.token_index[b.loss_mask].numpy(), 1)
    assert owned.tolist() == [1] * 24


@pytest.mark.parametrize("tree_attention", ["mask", "span"])
def test_trees_in_one_row_do_not_leak(make_tiny_model, tree_attention):
    model = _load(make_tiny_model, "sdpa")
    a, b = _trees(seed=5, n=2)
    b2 = _trees(seed=5, n=2)[1]
    for node in b2.nodes:  # same shape, other tokens
        node.token_ids = (node.token_ids + 7) % VOCAB
    b2.prompt_token_ids = (b2.prompt_token_ids + 3) % VOCAB

    def logprobs_of(trees):
        (batch,) = pack_trees(trees, ADV, "tree", 1000, learner_version=2)
        assert batch.input_ids.shape[0] == 1 and batch.span_ancestors is not None  # one row, both trees
        with torch.no_grad():
            lp = token_logprobs(model, batch, TEMP, tree_attention=tree_attention)
        return [lp[batch.tree_index == i][batch.token_index[batch.tree_index == i] >= 0] for i in range(2)]

    a_with_b, b_lp = logprobs_of([a, b])
    a_with_b2, b2_lp = logprobs_of([a, b2])
    torch.testing.assert_close(a_with_b, a_with_b2, rtol=0, atol=1e-6)
    assert not torch.allclose(b_lp, b2_lp, atol=1e-3)


def test_small_tree_layout_by_hand():
    # prompt p0 p1 p2; node 0 and 1 under the root (1 a leaf), nodes 2 and 3 under node 0; 2 tokens each.
    tree = tree_from_parents([-1, -1, 0, 0], {1: 1.0, 2: 0.0, 3: 1.0}, seg_len=2, prompt_len=3)
    tree.nodes[3].version = 1
    (b,) = pack_trees([tree], ADV, "tree", 64, learner_version=3)
    # rows: prompt 0-2 | node0 3-4 | node1 5-6 | node2 7-8 | node3 9-10
    assert b.position_ids[0].tolist() == [0, 1, 2, 3, 4, 3, 4, 5, 6, 5, 6]
    assert b.pred_index[0].tolist() == [-1, -1, -1, 2, 3, 2, 5, 4, 7, 4, 9]
    assert b.staleness[0].tolist() == [0, 0, 0, 3, 3, 3, 3, 3, 3, 2, 2]
    ids = np.concatenate([tree.prompt_token_ids] + [n.token_ids for n in tree.nodes])
    assert b.input_ids[0].tolist() == ids.tolist()
    # V(2)=0, V(3)=1 → V(0)=0.5, V(1)=1. Root group {0.5, 1}: mean .75, std .3536 → A = ∓1/√2;
    # group {0, 1}: A = ∓1/√2. All trainable: 8 tokens.
    s = 2 ** -0.5
    assert b.advantages[0].tolist() == pytest.approx([0, 0, 0, -s, -s, s, s, -s, -s, s, s], abs=1e-5)
    assert b.num_trainable_tokens == 8
    allowed = b.allowed()[0, 0]
    assert allowed[9].nonzero().flatten().tolist() == [0, 1, 2, 3, 4, 9]  # node3: prompt, node0, itself
    assert allowed[6].nonzero().flatten().tolist() == [0, 1, 2, 5, 6]  # node1's 2nd token
    assert (b.attention_mask[0, 0][allowed] == 0).all()
    assert (b.attention_mask[0, 0][~allowed] == torch.finfo(torch.float32).min).all()

    (f,) = pack_trees([tree], ADV, "flat", 7, learner_version=3, max_batch_rows=8)
    # paths (longest first, stable): [leaf 2: p,n0,n2], [leaf 3: p,n0,n3], [leaf 1: p,n1 + pad]
    assert f.span_ancestors is None  # one path per row → plain causal, no mask
    assert f.position_ids.tolist() == [list(range(7))] * 3
    assert f.loss_mask.sum(1).tolist() == [4, 2, 2]  # node0 trained once, on the first path
    assert f.pred_index[2].tolist() == [-1, -1, -1, 2, 3, -1, -1]


@pytest.mark.parametrize("tree_attention", ["mask", "span"])
def test_padding_rows_have_no_nan(make_tiny_model, tree_attention):
    model = _load(make_tiny_model, "eager")
    trees = _trees(seed=9, n=4)
    for batch in pack_trees(trees, ADV, "tree", 80, learner_version=2, max_batch_rows=4, pad_multiple=16):
        assert (batch.input_ids == 0).any()  # padded
        lp = token_logprobs(model, batch, TEMP, tree_attention=tree_attention)
        assert torch.isfinite(lp).all()
        assert (lp[~batch.generated] == 0).all()


def test_errors_name_the_fix():
    tree = tree_from_parents([-1, -1], {0: 1.0, 1: 0.0}, seg_len=10, prompt_len=5)
    with pytest.raises(ValueError, match="micro_batch_tokens"):
        pack_trees([tree], ADV, "tree", 8, learner_version=0)
    with pytest.raises(ValueError, match="rejected before packing"):
        pack_trees([tree_from_parents([-1, -1], {0: 1.0, 1: 0.0}, version=3)], ADV, "tree", 64, learner_version=2)
    with pytest.raises(ValueError, match="packing mode"):
        pack_trees([tree], ADV, "paths", 64, learner_version=0)


# ---------------------------------------------------------------------------------------------
# span attention (learner/attention.py) against the dense tree mask
# ---------------------------------------------------------------------------------------------
def _span_batches():
    """Tree-packed batches with split trees, several trees per row, several rows and padding."""
    trees = _trees(seed=21, n=6)
    batches = (pack_trees(trees, ADV, "tree", 24, learner_version=2)
               + pack_trees(trees, ADV, "tree", 60, learner_version=2, max_batch_rows=3, pad_multiple=8))
    return [b for b in batches if b.span_ancestors is not None]  # causal rows (one chain) need no plan


def _plan_visibility(plan):
    """(B*T, B*T) int: how often the plan lets each real query token score each key token."""
    n = plan.batch * plan.length
    counts = torch.zeros(n, n, dtype=torch.int64)
    row = 0
    for g in plan.groups:
        q = g.q_index.view(g.size, g.q_len)
        k = g.k_index.view(g.size, g.k_len)
        mask = g.mask.expand(g.size, 1, g.q_len, g.k_len)[:, 0]  # (G, Lq, Lk)
        rows = row + torch.arange(g.size * g.q_len).view(g.size, g.q_len)  # rows in the concatenated output
        real = plan.inverse[q] == rows  # (G, Lq): padded query rows are not read back
        for gi, i in real.nonzero().tolist():
            counts[q[gi, i]].index_put_((k[gi][mask[gi, i]],), torch.tensor(1), accumulate=True)
        row += g.size * g.q_len
    return counts


def test_span_plan_is_exactly_the_tree_mask():
    batches = _span_batches()
    assert any(b.input_ids.shape[0] > 1 for b in batches) and any(len(b.trees) > 1 for b in batches)
    for batch in batches:
        plan = span_plan(batch)
        B, T = batch.span_ids.shape
        dense = torch.block_diag(*batch.allowed()[:, 0].long())  # (B*T, B*T): rows never see each other
        assert torch.equal(_plan_visibility(plan), dense)  # every allowed pair once, nothing else
        assert plan.work >= int(dense.sum())


def test_span_plan_of_a_small_tree_by_hand():
    # the tree of test_small_tree_layout_by_hand: spans prompt (3 tokens, 3 keys), node0 (2, 3+2),
    # node1 (2, 3+2), node2 (2, 3+2+2), node3 (2, 3+2+2). Buckets: queries -> 8, keys -> 16 (multiples),
    # so one group of 5 spans, 5 * 8 * 16 = 640 scores (tiny spans pay for padding; the dense mask: 121).
    tree = tree_from_parents([-1, -1, 0, 0], {1: 1.0, 2: 0.0, 3: 1.0}, seg_len=2, prompt_len=3)
    (b,) = pack_trees([tree], ADV, "tree", 64, learner_version=0)
    plan = span_plan(b)
    assert [(g.size, g.q_len, g.k_len) for g in plan.groups] == [(5, 8, 16)]
    assert plan.work == 640
    keys = plan.groups[0].k_index.view(5, 16)
    assert keys[4, :7].tolist() == [0, 1, 2, 3, 4, 9, 10]  # node3: prompt, node0, itself
    assert keys[2, :5].tolist() == [0, 1, 2, 5, 6]  # node1: prompt, itself


@pytest.mark.parametrize("heads", [(4, 2), (2, 2)])
def test_span_attention_matches_dense_sdpa(heads):
    H, Hkv = heads
    g = torch.Generator().manual_seed(0)
    for batch in _span_batches()[-2:]:
        B, T = batch.span_ids.shape
        q = torch.randn(B, H, T, 8, generator=g, requires_grad=True)
        k = torch.randn(B, Hkv, T, 8, generator=g, requires_grad=True)
        v = torch.randn(B, Hkv, T, 8, generator=g, requires_grad=True)
        up = torch.randn(B, T, H, 8, generator=g)  # upstream gradient
        out = span_attention(q, k, v, span_plan(batch), scaling=0.3)  # (B, T, H, D)
        grads = torch.autograd.grad((out * up).sum(), (q, k, v))
        kr, vr = (x.repeat_interleave(H // Hkv, dim=1) for x in (k, v))
        ref = torch.nn.functional.scaled_dot_product_attention(q, kr, vr, attn_mask=batch.allowed(), scale=0.3)
        ref = ref.transpose(1, 2)  # (B, T, H, D)
        ref_grads = torch.autograd.grad((ref * up).sum(), (q, k, v))
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
        for a, b in zip(grads, ref_grads, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_span_kernel_without_plan_is_sdpa(make_tiny_model):
    # no plan (causal rows, padded generation): "treerpo_span" runs transformers' sdpa verbatim
    ids = torch.tensor([[5, 6, 7, 8, 9], [0, 0, 11, 12, 13]])
    pad = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])  # left padding -> a real 2-D mask
    with torch.no_grad():
        want = _load(make_tiny_model, "sdpa")(input_ids=ids, attention_mask=pad).logits
        got = _load(make_tiny_model, SPAN_ATTENTION)(input_ids=ids, attention_mask=pad).logits
    assert torch.equal(got, want)


def test_span_errors_name_the_fix(make_tiny_model):
    tree = tree_from_parents([-1, -1], {0: 1.0, 1: 0.0}, seg_len=3, prompt_len=2)  # two siblings: a tree mask
    (b,) = pack_trees([tree], ADV, "tree", 64, learner_version=0)
    assert b.span_ancestors is not None
    with pytest.raises(ValueError, match="tree_attention"):
        token_logprobs(_load(make_tiny_model, "sdpa"), b, TEMP, tree_attention="dense")
    plan = span_plan(b)
    x = torch.zeros(1, 2, b.input_ids.shape[1] + 1, 4)
    with pytest.raises(ValueError, match="build the plan from the batch"):
        span_attention(x, x, x, plan)
    flat = pack_trees([tree], ADV, "flat", 5, learner_version=0)[0]  # one 5-token path per row: causal
    with pytest.raises(ValueError, match="causal rows need no plan"):
        span_plan(flat)


def test_chunked_lm_head_equals_the_model_forward(make_tiny_model):
    """The LM head in chunks of a few positions (each recomputed in the backward) gives the log-probs,
    entropies and gradients of the model's own forward over all kept positions at once."""
    model = _load(make_tiny_model, "sdpa")
    batches = pack_trees(_trees(3, n=4), ADV, "tree", 64, learner_version=2, max_batch_rows=2)

    def run(split: bool, chunk: int):
        model.zero_grad(set_to_none=True)
        if not split:  # no get_decoder: the model's own forward (logits of every kept position at once)
            model.get_decoder = None
        try:
            outs = [token_logprobs(model, b, TEMP, return_entropy=True, chunk=chunk) for b in batches]
        finally:
            model.__dict__.pop("get_decoder", None)
        sum((lp * b.loss_mask).sum() for (lp, _), b in zip(outs, batches, strict=True)).backward()
        return outs, torch.cat([p.grad.flatten() for p in model.parameters()])

    (whole, g_whole), (chunked, g_chunked) = run(False, 1 << 20), run(True, 3)
    assert any(int((b.pred_index >= 0).sum()) > 3 for b in batches)  # several chunks per batch
    for (lp_a, ent_a), (lp_b, ent_b) in zip(whole, chunked, strict=True):
        torch.testing.assert_close(lp_b, lp_a, rtol=0, atol=1e-5)
        torch.testing.assert_close(ent_b, ent_a, rtol=0, atol=1e-5)
    _assert_grads_close(g_chunked, g_whole)
