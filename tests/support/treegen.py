"""Tree builders for tests: from a parent list, or random (numpy-seeded) of any shape; `mutate`, one
random edit; and `step_endings`, the check of where sampled steps end."""

from __future__ import annotations

import numpy as np

from common.tree import Node, ReasoningTree, new_tree_id


def tree_from_parents(
    parents: list[int],
    rewards: dict[int, float],
    *,
    seg_len: int = 2,
    prompt_len: int = 3,
    version: int = 0,
    vocab_size: int = 50,
    seed: int = 0,
) -> ReasoningTree:
    """Nodes in the given (BFS) order; `rewards` maps leaf index -> reward."""
    rng = np.random.default_rng(seed)
    has_child = {p for p in parents if p >= 0}
    nodes = []
    for i, p in enumerate(parents):
        leaf = i not in has_child
        nodes.append(
            Node(
                parent=p,
                token_ids=rng.integers(3, vocab_size, seg_len).astype(np.int32),
                logprobs=-rng.random(seg_len).astype(np.float32) - 0.01,
                version=version,
                finish="stop" if leaf else "segment",
                reward=rewards[i] if leaf else None,
            )
        )
    return ReasoningTree(
        tree_id=new_tree_id(),
        prompt_id="p0",
        actor_id="test",
        prompt_token_ids=rng.integers(3, vocab_size, prompt_len).astype(np.int32),
        nodes=nodes,
    ).validate()


def random_tree(
    rng: np.random.Generator,
    *,
    max_depth: int = 4,
    max_branch: int = 3,
    p_early_stop: float = 0.2,
    reward_values: tuple[float, ...] | None = (0.0, 1.0),
    max_seg_len: int = 5,
    max_prompt_len: int = 6,
    vocab_size: int = 50,
    max_version: int = 0,
) -> ReasoningTree:
    """A random BFS-ordered tree: per-level branching, early leaves, random rewards and versions."""
    depth = int(rng.integers(1, max_depth + 1))
    branching = [int(rng.integers(1, max_branch + 1)) for _ in range(depth)]
    parents: list[int] = []
    level_open = [-1]  # nodes whose children the next level creates
    for d in range(depth):
        nxt = []
        for p in level_open:
            for _ in range(branching[d]):
                parents.append(p)
                i = len(parents) - 1
                if d < depth - 1 and rng.random() >= p_early_stop:
                    nxt.append(i)
        level_open = nxt
        if not level_open:
            break
    has_child = {p for p in parents if p >= 0}
    nodes = []
    for i, p in enumerate(parents):
        leaf = i not in has_child
        length = int(rng.integers(1, max_seg_len + 1))
        if reward_values is None:
            reward = float(rng.normal())
        else:
            reward = float(rng.choice(reward_values))
        nodes.append(
            Node(
                parent=p,
                token_ids=rng.integers(3, vocab_size, length).astype(np.int32),
                logprobs=(-rng.random(length) * 3 - 1e-3).astype(np.float32),
                version=int(rng.integers(0, max_version + 1)),
                finish=("stop" if rng.random() < 0.8 else "length") if leaf else "segment",
                reward=reward if leaf else None,
            )
        )
    return ReasoningTree(
        tree_id=new_tree_id(),
        prompt_id=f"p{int(rng.integers(1_000_000))}",
        actor_id="test",
        prompt_token_ids=rng.integers(3, vocab_size, int(rng.integers(1, max_prompt_len + 1))).astype(np.int32),
        nodes=nodes,
        meta={"task": "random"},
    ).validate()


def mutate(tree: ReasoningTree, rng: np.random.Generator, vocab_size: int) -> None:
    """One random edit of one field, in place (possibly harmless, e.g. a parent set to its own
    value): the validator and the wire decoder must agree on every such tree."""
    n = len(tree.nodes)
    nd = tree.nodes[int(rng.integers(n))]
    k = int(rng.integers(len(nd.token_ids)))
    choice = int(rng.integers(14))
    if choice == 0:
        nd.parent = int(rng.integers(-3, n + 2))
    elif choice == 1:
        nd.version = int(rng.choice([-1, 0, 5, 2**70]))
    elif choice == 2:
        nd.finish = str(rng.choice(["segment", "stop", "length", "eos"]))
    elif choice == 3:
        nd.reward = [None, float("nan"), float("inf"), 0.5, np.float32(1.0)][int(rng.integers(5))]
    elif choice == 4:
        nd.logprobs = nd.logprobs.copy()
        nd.logprobs[k] = rng.choice([np.nan, np.inf, -np.inf, -1.0])
    elif choice == 5:
        nd.token_ids = nd.token_ids.copy()
        nd.token_ids[k] = int(rng.choice([-1, vocab_size - 1, vocab_size, 2**31 - 1]))
    elif choice == 6:
        nd.token_ids, nd.logprobs = nd.token_ids[:0], nd.logprobs[:0]
    elif choice == 7:
        nd.logprobs = nd.logprobs[1:]
    elif choice == 8:
        nd.token_ids = nd.token_ids.astype(np.int64)
    elif choice == 9:
        nd.logprobs = nd.logprobs.astype(np.float64)
    elif choice == 10:
        tree.prompt_token_ids = tree.prompt_token_ids.copy()
        tree.prompt_token_ids[0] = int(rng.choice([-5, vocab_size]))
    elif choice == 11:
        tree.prompt_token_ids = tree.prompt_token_ids[:0]
    elif choice == 12:
        tree.tree_id = ""
    else:
        nd.parent = np.int32(nd.parent)  # numpy ints are ints


def step_endings(trees: list[ReasoningTree], decode, delimiter: str, depth: int, segment_tokens: int) -> dict[str, int]:
    """Check where every non-final segment of `trees` ended (design §3.1) and count how.

    A segment that holds the delimiter's text completes it in its last token, never earlier (that
    token kept whole); one without it is cut at `segment_tokens`; its children continue from
    exactly its ids. Returns {the last token's text, or "<prev> + <last>" when the delimiter
    completes across tokens: count}."""
    ended: dict[str, int] = {}
    for tree in trees:
        depths = tree.depths()
        for i, node in enumerate(tree.nodes):
            if depths[i] == depth or node.finish != "segment":
                continue
            toks = node.token_ids.tolist()
            text, before = decode(toks), decode(toks[:-1])
            at = text.find(delimiter)
            if at < 0:
                assert len(toks) == segment_tokens, (repr(text), toks)  # no delimiter: the segment budget
                continue
            assert delimiter not in before and at + len(delimiter) > len(before), (repr(text), toks)
            last = decode(toks[-1:])
            key = last if last.endswith(delimiter) or delimiter in last else f"{decode(toks[-2:-1])} + {last}"
            ended[key] = ended.get(key, 0) + 1
            for c in np.flatnonzero(tree.parents == i):
                assert tree.context_ids(int(c)).tolist()[-len(toks):] == toks
    return ended
