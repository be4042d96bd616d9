"""Tree model validation: each broken invariant names the node and the field."""

from __future__ import annotations

import numpy as np
import pytest

from common.tree import Node, ReasoningTree, TreeError, validate_flat
from tests.support.treegen import mutate, random_tree, tree_from_parents


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
        ({(2, "token_ids"): np.array([], dtype=np.int32), (2, "logprobs"): np.array([], dtype=np.float32)},
         r"nodes\[2\]\.token_ids is empty"),
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


# ---------------------------------------------------------------------------------------------
# the vectorised validate against the per-node reference it replaced
# ---------------------------------------------------------------------------------------------
def _reference_validate(tree: ReasoningTree, vocab_size=None) -> None:
    """The former per-node loop (one numpy call per node and field), kept as the test oracle."""
    def ids(where, a):
        if a.dtype != np.int32 or a.ndim != 1:
            raise TreeError(f"{where} must be a 1-D int32 array")
        if a.size and a.min() < 0:
            raise TreeError(f"{where} holds a negative token id")
        if vocab_size is not None and a.size and a.max() >= vocab_size:
            raise TreeError(f"{where} holds token id {int(a.max())} >= vocab size {vocab_size}")

    if not isinstance(tree.tree_id, str) or not tree.tree_id:
        raise TreeError("tree_id must be a non-empty string")
    ids("prompt_token_ids", tree.prompt_token_ids)
    if tree.prompt_token_ids.shape[0] < 1:
        raise TreeError("prompt_token_ids must hold at least one token")
    if not tree.nodes:
        raise TreeError("a tree needs at least one node")
    has_child, last = np.zeros(len(tree.nodes), dtype=bool), -1
    for i, nd in enumerate(tree.nodes):
        w = f"nodes[{i}]"
        if not isinstance(nd.parent, (int, np.integer)) or not -1 <= nd.parent < i:
            raise TreeError(f"{w}.parent = {nd.parent!r}: must satisfy -1 <= parent < {i}")
        if nd.parent < last:
            raise TreeError(f"{w}.parent = {nd.parent} after a node with parent {last}: "
                            "nodes must be in breadth-first order")
        last = nd.parent
        if nd.parent >= 0:
            has_child[nd.parent] = True
        ids(f"{w}.token_ids", nd.token_ids)
        if nd.token_ids.shape[0] < 1:
            raise TreeError(f"{w}.token_ids is empty: a segment holds at least one token")
        if nd.logprobs.dtype != np.float32 or nd.logprobs.ndim != 1:
            raise TreeError(f"{w}.logprobs must be a 1-D float32 array")
        if nd.logprobs.shape != nd.token_ids.shape:
            raise TreeError(f"{w}.logprobs has {nd.logprobs.shape[0]} entries for {nd.token_ids.shape[0]} tokens")
        if not np.all(np.isfinite(nd.logprobs)):
            raise TreeError(f"{w}.logprobs holds a non-finite value")
        if not isinstance(nd.version, (int, np.integer)) or nd.version < 0:
            raise TreeError(f"{w}.version = {nd.version!r}: must be an int >= 0")
        if nd.finish not in ("segment", "stop", "length"):
            raise TreeError(f"{w}.finish = {nd.finish!r}: must be one of ('segment', 'stop', 'length')")
    for i, nd in enumerate(tree.nodes):
        w = f"nodes[{i}]"
        if has_child[i]:
            if nd.finish != "segment":
                raise TreeError(f"{w} has children, so its finish must be 'segment', not {nd.finish!r}")
            if nd.reward is not None:
                raise TreeError(f"{w}.reward is set on an inner node; rewards go on leaves only")
        else:
            if nd.finish == "segment":
                raise TreeError(f"{w} is a leaf, so its finish must be 'stop' or 'length', not 'segment'")
            if nd.reward is None or not np.isfinite(float(nd.reward)):
                raise TreeError(f"{w} is a leaf and needs a finite reward, got {nd.reward!r}")


VOCAB = 50


def _outcome(fn, tree):
    try:
        fn(tree)
    except TreeError as e:
        return str(e)
    return None


def test_validate_matches_the_per_node_reference_on_single_edits():
    """2000 random trees, each with one random edit: same verdict and the same message."""
    rng = np.random.default_rng(7)
    raised = 0
    for _ in range(2000):
        tree = random_tree(rng, max_depth=3, max_branch=3, max_seg_len=4, vocab_size=VOCAB)
        mutate(tree, rng, VOCAB)
        want = _outcome(lambda t: _reference_validate(t, VOCAB), tree)
        assert _outcome(lambda t: t.validate(VOCAB), tree) == want
        raised += want is not None
    assert 1000 < raised < 2000  # both kinds of outcome were exercised


def test_errors_carry_their_rule():
    cases = {
        (2, "parent"): (3, "parent"),
        (3, "parent"): (0, "order"),
        (2, "version"): (-1, "version"),
        (2, "finish"): ("eos", "finish"),
        (1, "finish"): ("stop", "structure"),
        (2, "logprobs"): (np.array([np.nan, -1.0], dtype=np.float32), "non_finite"),
        (2, "token_ids"): (np.array([1, 2], dtype=np.int64), "types"),
    }
    for (i, field), (value, rule) in cases.items():
        with pytest.raises(TreeError) as info:
            _tree({(i, field): value}).validate()
        assert info.value.rule == rule, (i, field)


def test_lowest_node_is_reported_first():
    # node 3 has a NaN log-prob, node 1 a negative version: the lower index wins, whatever the rule order
    tree = _tree({(1, "version"): -1, (3, "logprobs"): np.array([np.nan, -1.0], dtype=np.float32)})
    with pytest.raises(TreeError, match=r"nodes\[1\]\.version = -1"):
        tree.validate()
    # same node: parent range comes before everything else of that node
    tree = _tree({(2, "parent"): 7, (2, "version"): -1})
    with pytest.raises(TreeError, match=r"nodes\[2\]\.parent = 7"):
        tree.validate()


def test_non_numeric_reward_is_a_tree_error():
    with pytest.raises(TreeError, match=r"nodes\[2\]\.reward = 'x': must be a real number"):
        _tree({(2, "reward"): "x"}).validate()


def test_validate_flat_checks_the_layout_and_names_nodes():
    # two nodes: root child 0 (2 tokens, inner) -> node 1 (1 token, leaf)
    flat = dict(
        tree_id="t", prompt=np.array([1, 2], dtype=np.int32), tokens=np.array([3, 4, 5], dtype=np.int32),
        logprobs=np.full(3, -1.0, dtype=np.float32), lengths=np.array([2, 1]), parents=np.array([-1, 0]),
        versions=np.array([0, 1]), finish=np.array([0, 1], dtype=np.uint8), rewards=np.array([np.nan, 1.0]),
    )
    validate_flat(**flat, vocab_size=6)
    with pytest.raises(TreeError, match=r"nodes\[1\]\.token_ids holds token id 5 >= vocab size 5") as info:
        validate_flat(**flat, vocab_size=5)  # token 5 lies in node 1's slice [2, 3)
    assert info.value.rule == "token_range"
    with pytest.raises(TreeError) as info:
        validate_flat(**{**flat, "lengths": np.array([1, 1])})
    assert info.value.rule == "layout"
    with pytest.raises(TreeError, match=r"nodes\[1\] is a leaf and needs a finite reward, got None"):
        validate_flat(**{**flat, "rewards": np.array([np.nan, np.nan])})  # NaN: no reward
    with pytest.raises(TreeError, match=r"nodes\[0\]\.reward is set on an inner node"):
        validate_flat(**{**flat, "rewards": np.array([np.inf, 1.0])})


def test_trusted_node_equals_constructed_node():
    ids, lp = np.array([4, 5], dtype=np.int32), np.array([-1.0, -2.0], dtype=np.float32)
    a = Node(parent=-1, token_ids=ids, logprobs=lp, version=3, finish="stop", reward=1.0)
    b = Node.trusted(-1, ids, lp, 3, "stop", 1.0)
    assert (a.parent, a.version, a.finish, a.reward) == (b.parent, b.version, b.finish, b.reward)
    assert a.token_ids is ids and b.token_ids is ids and a.logprobs is lp and b.logprobs is lp
    c = Node(parent=-1, token_ids=[4, 5], logprobs=[-1.0, -2.0], version=3, finish="stop", reward=1.0)
    assert c.token_ids.dtype == np.int32 and c.logprobs.dtype == np.float32
