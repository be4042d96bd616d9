"""learner/trainer.py and learner/ranks.py pure helpers: the LR schedule, splitting trees over ranks.

The Trainer itself (DeepSpeed on CPU, one and two ranks) is tested in tests/integration/test_trainer.py.
"""

from __future__ import annotations

import math

import pytest

from common.config import JobConfig
from learner.ranks import pack_blobs, split_by_tokens, unpack_blobs
from learner.trainer import lr_factor
from tests.support.treegen import tree_from_parents


def make_cfg(**learner) -> JobConfig:
    base = {"lr": 1e-3, "micro_batch_tokens": 48}
    base.update(learner)
    return JobConfig.model_validate({"learner": base})


def test_lr_factor_warmup_then_schedule():
    cos = make_cfg(warmup_steps=4, schedule="cosine", max_steps=8).learner
    # warm-up (k+1)/4, then cosine over the 4 remaining steps: 0.5 * (1 + cos(pi * (k - 4) / 4))
    got = [lr_factor(cos)(k) for k in range(9)]
    want = [0.25, 0.5, 0.75, 1.0,
            1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5, 0.5 * (1 + math.cos(3 * math.pi / 4)), 0.0]
    assert got == pytest.approx(want, abs=1e-12)
    lin = make_cfg(warmup_steps=0, schedule="linear", max_steps=4).learner
    assert [lr_factor(lin)(k) for k in range(5)] == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])
    with pytest.raises(ValueError, match="max_steps"):
        make_cfg(schedule="cosine", max_steps=0)


def test_split_by_tokens_balances_and_covers_every_tree():
    # costs (prompt 3 + 2 tokens per node): 3 + 2*n_nodes
    trees = [tree_from_parents([-1] * k, {i: float(i % 2) for i in range(k)}) for k in (6, 1, 3, 2, 2)]
    shares = split_by_tokens(trees, 2)
    # longest first (ties: lower index) to the least loaded rank:
    # 15 (t0) -> r0, 9 (t2) -> r1, 7 (t3) -> r1 = 16, 7 (t4) -> r0 = 22, 5 (t1) -> r1 = 21
    assert shares == [[0, 4], [1, 2, 3]]
    assert split_by_tokens(trees[:1], 3) == [[0], [], []]
    blobs = [b"abc", b"", b"\x00" * 5]
    assert [bytes(b) for b in unpack_blobs(pack_blobs(blobs))] == blobs
