"""Tree model validation: each broken invariant names the node and the field."""

from __future__ import annotations

import numpy as np
import pytest

from common.tree import Node, ReasoningTree, TreeError
from tests.treegen import tree_from_parents


def _tree(changes=None):
    tree = tree_from_parents([-1, -1, 1, 1], {0: 1.0, 2: 0.0, 3: 1.0})
    for (i, field), value in (changes or {}).items():
        setattr(tree.nodes[i], field, value)
    return tree


def test_keyword_construction_and_helpers():
    tree = tree_from_parents([-1, -1, 1, 1], {0: 1.0, 2: 0.0, 3: 1.0}, seg_len=2, prompt_len=3)
    assert tree.leaves() == [0, 2, 3]
    assert tree.children() == [[], [2, 3], [], []]
    assert tree.path(3) == [1, 3]
    assert tree.depths().tolist() == [1, 1, 2, 2]
    assert tree.num_tokens() == 8
    assert tree.path_lengths().tolist() == [2, 4, 4]
    ctx = tree.context_ids(3)
    assert ctx.tolist() == tree.prompt_token_ids.tolist() + tree.nodes[1].token_ids.tolist()


@pytest.mark.parametrize(
    "changes, message",
    [
        ({(2, "parent"): 3}, r"nodes\[2\]\.parent = 3"),
        ({(3, "parent"): 0}, r"nodes\[3\]\.parent = 0 after a node with parent 1"),
        ({(1, "finish"): "stop"}, r"nodes\[1\] has children, so its finish must be 'segment'"),
        ({(2, "finish"): "segment"}, r"nodes\[2\] is a leaf"),
        ({(2, "reward"): None}, r"nodes\[2\] is a leaf and needs a finite reward"),
        ({(2, "reward"): float("nan")}, r"nodes\[2\] is a leaf and needs a finite reward"),
        ({(1, "reward"): 1.0}, r"nodes\[1\]\.reward is set on an inner node"),
        ({(2, "logprobs"): np.array([-1.0], dtype=np.float32)}, r"nodes\[2\]\.logprobs has 1 entries for 2 tokens"),
        ({(2, "logprobs"): np.array([-1.0, np.inf], dtype=np.float32)}, r"nodes\[2\]\.logprobs holds a non-finite"),
        ({(2, "logprobs"): np.array([-1.0, -1.0])}, r"nodes\[2\]\.logprobs must be a 1-D float32"),
        ({(2, "token_ids"): np.array([1, 2], dtype=np.int64)}, r"nodes\[2\]\.token_ids must be a 1-D int32"),
        ({(2, "token_ids"): np.array([], dtype=np.int32), (2, "logprobs"): np.array([], dtype=np.float32)}, r"nodes\[2\]\.token_ids is empty"),
        ({(2, "version"): -1}, r"nodes\[2\]\.version = -1"),
        ({(2, "finish"): "eos"}, r"nodes\[2\]\.finish = 'eos'"),
    ],
)
def test_invalid_trees_name_node_and_field(changes, message):
    with pytest.raises(TreeError, match=message):
        _tree(changes).validate()


def test_bfs_order_enforced():
    nodes = [
        Node(parent=-1, token_ids=[5], logprobs=[-1.0], version=0, finish="segment"),
        Node(parent=-1, token_ids=[5], logprobs=[-1.0], version=0, finish="segment"),
        Node(parent=1, token_ids=[5], logprobs=[-1.0], version=0, finish="stop", reward=1.0),
        Node(parent=0, token_ids=[5], logprobs=[-1.0], version=0, finish="stop", reward=0.0),
    ]
    tree = ReasoningTree(tree_id="t", prompt_id="p", actor_id="a", prompt_token_ids=[1], nodes=nodes)
    with pytest.raises(TreeError, match=r"nodes\[3\]\.parent = 0 after a node with parent 1: .*breadth-first"):
        tree.validate()


def test_vocab_bound():
    tree = _tree()
    tree.nodes[2].token_ids = np.array([1, 60], dtype=np.int32)
    with pytest.raises(TreeError, match=r"nodes\[2\]\.token_ids holds token id 60 >= vocab size 50"):
        tree.validate(vocab_size=50)
    tree.validate(vocab_size=61)
