"""The FlexAttention BlockMask of tree-packed rows is built compiled (no dense T x T mask) and
matches the tree mask. Integration tier: compiling takes ~20-30 s on a CPU."""

from __future__ import annotations

import torch

from common.config import AdvantageConfig
from learner.logprobs import flex_block_mask
from learner.packing import pack_trees
from tests.support.treegen import tree_from_parents


def test_compiled_block_mask_matches_the_tree_mask():
    # two trees in one row: siblings, a grandchild, and a second prompt (spans must not leak)
    trees = [tree_from_parents([-1, -1, 0, 2], {1: 1.0, 3: 0.0}, seg_len=40, prompt_len=30),
             tree_from_parents([-1, 0, 0], {1: 0.5, 2: 0.0}, seg_len=50, prompt_len=20)]
    (batch,) = pack_trees(trees, AdvantageConfig(), "tree", 512, learner_version=0)
    assert batch.span_ancestors is not None and batch.input_ids.shape[1] > 128  # several blocks
    block_mask = flex_block_mask(batch, torch.device("cpu"))
    allowed = batch.allowed()[:, 0]  # (B, T, T)
    B, T, _ = allowed.shape
    q, kv = torch.meshgrid(torch.arange(T), torch.arange(T), indexing="ij")
    for b in range(B):  # the mask function is exactly the tree mask, entry by entry
        got = block_mask.mask_mod(torch.tensor(b), torch.tensor(0), q, kv)
        assert torch.equal(got, allowed[b])
    # and the block structure keeps every block holding an allowed pair
    n = block_mask.to_dense().shape[-1]
    pad = n * 128 - T
    blocks = torch.nn.functional.pad(allowed, (0, pad, 0, pad)).reshape(B, n, 128, n, 128).any(4).any(2)
    assert torch.equal(block_mask.to_dense()[:, 0].bool(), blocks)
