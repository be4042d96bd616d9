"""TreeSampler: sample, score and assemble reasoning trees for many prompts at once (design §3.1).

Guarantees:

* no level barrier: the trees are grown on one engine stream (`actor.engine.open_stream`) and
  a node's children are requested the moment the node finishes, while other nodes, levels and
  trees are still running; new prompts join as trees complete (`stream`), so the engine batch
  stays full across levels and prompt batches. On the HF engine the children fork the parent's
  KV-cache row (no prefill); on vLLM each request goes to AsyncLLM at once and each sibling is
  reported the moment it finishes (prefix caching shares the context); on engines without a
  native stream each step is one `generate` call over all ready requests. The siblings of one
  node are ONE request with `n = branching[level]`. A stream the caller stops early closes its
  engine stream (vLLM: the requests in flight are aborted);
* a node's context is `prompt_token_ids + its ancestors' token_ids`, as ids (never decoded
  and re-encoded); text is decoded only to score leaves;
* a non-final level is cut at `segment_tokens` (`split='tokens'`) or at the step delimiter or
  `segment_tokens`, whichever comes first (`split='step'`; the delimiter stays in the segment);
  the last level runs to EOS or the rest of the total budget `max_tokens` along the path;
* `branch_at: entropy` (design §3.1) replaces the fixed cut: every request runs to EOS or the
  path's budget, non-final levels report each token's sampling entropy, and a response forks at
  its highest-entropy token (`_fork_at_entropy`): the node ends before it, the response's rest
  is the node's first child (sampled under the same weights, so its log-probs and version stand
  as they are) and `branching - 1` new samples are drawn from the fork point (the request names
  the response as its parent: the HF engine forks its KV row cut at the fork point, vLLM's
  prefix cache holds it). Every generated token ends in the tree;
* a node's finish comes from its sample's by one table, `node_finish`: a segment ending in EOS
  (or a stop token) is a leaf "stop" at any level; a segment of the last level, or one that uses
  up the total budget, is a leaf "length"; any other segment is an inner node "segment";
* every node records the oldest weights that touched it: `engine.version` read when its
  generation started (the engine reports it), never newer than its parent's (design §4.3);
* nodes are stored breadth-first: by level, then parent, then sibling index (the order does not
  depend on which node finished first);
* a whole call is reproducible: `sample` / `stream` with the same seed, prompts and source
  answers return the same trees (one random stream per call, seeded by (seed, call number));
  on vLLM each request carries its seed on the CPU backend, while on CUDA the engine's seed
  drives one batched draw (a per-request seed costs a generator launch per row per step there),
  so GPU trees are reproducible only as far as vLLM's batching is;
* leaves are scored with `reward.score_many(path texts, answers, entries)` as soon as their
  tree is complete (entries: the prompts' `entry` rows, None where a prompt has none); each
  tree's meta holds the task name, answer, timings, `engine_calls` (levels generated: rounds of
  requests along the tree), `engine_steps` (stream steps while it was in flight) and its
  leaves' reward-reason counts; `last_reward_reasons` holds the counts of the
  latest call (for the actor's metrics);
* the trees pass `ReasoningTree.validate()`; depth 1 with branching [G] is GRPO: one group of G.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from actor.engine import Engine, GenerationRequest, SampleFinish, StreamResult, open_stream
from common.tree import Finish, Node, ReasoningTree, new_tree_id

if TYPE_CHECKING:  # pragma: no cover
    from common.config import TreeConfig

# `TreeSampler.stream`'s prompt feed: k -> up to k prompts, [] for none now, None when exhausted.
# The actor wraps its `common.data.PromptSource` in one.
PromptFn = Callable[[int], "Sequence[Any] | None"]


def node_finish(sample_finish: SampleFinish, path_ends: bool) -> Finish:
    """The tree node's finish (common/tree.py) for a sample's finish (actor/engine.py).

    `path_ends`: the segment is on the last level or used up the total budget `max_tokens`.

        sample_finish    path_ends=False    path_ends=True
        "stop"           "stop"             "stop"
        "delimiter"      "segment"          "length"
        "length"         "segment"          "length"
    """
    if sample_finish == "stop":
        return "stop"
    return "length" if path_ends else "segment"


@dataclass(eq=False)  # tags are hashed by identity
class _Group:
    """The sibling request below one node (the root: parent = -1)."""

    tree: _Tree
    parent: int  # index into tree.raw, -1 = root
    level: int
    context: np.ndarray  # int32, prompt + ancestors + the parent node
    used: int  # generated tokens along the path so far
    first: int = 0  # sibling index of the request's sample 0 (branch_at=entropy: 1, the rest of the response is 0)


@dataclass(eq=False)
class _Tree:
    serial: int
    prompt: Any
    started: float
    in_flight: int  # trees in flight when it was admitted (itself included)
    raw: list[tuple[int, int, int, Node]] = field(default_factory=list)  # (parent, level, sibling, node)
    pending: int = 0  # samples requested and not yet finished
    steps: int = 0
    generate_seconds: float = 0.0


class TreeSampler:
    """Grows the trees of many prompts together on one engine, without a level barrier."""

    def __init__(self, engine: Engine, tree_cfg: TreeConfig, reward: Any, actor_id: str, seed: int = 0) -> None:
        self.engine = engine
        self.cfg = tree_cfg
        self.reward = reward
        self.actor_id = actor_id
        self.seed = int(seed)
        self._calls = 0
        self.last_reward_reasons: Counter[str] = Counter()

    # -- public --------------------------------------------------------------------------------
    def sample(self, prompts: Sequence[Any]) -> list[ReasoningTree]:
        """One validated, scored tree per prompt (objects with prompt_id, answer, token_ids, meta), in order."""
        queue = list(prompts)[::-1]
        source = lambda k: [queue.pop() for _ in range(min(k, len(queue)))] if queue else None  # noqa: E731
        out: list[ReasoningTree | None] = [None] * len(prompts)
        for serial, _, tree in self._run(source, max(1, len(prompts))):
            out[serial] = tree  # serials follow the source's order
        return out  # type: ignore[return-value]

    def stream(self, source: PromptFn, max_trees_in_flight: int) -> Iterator[tuple[Any, ReasoningTree]]:
        """Yield (prompt, finished tree) as trees complete, asking `source(k)` for up to k new prompts.

        `source(k)` is called before every engine step while fewer than `max_trees_in_flight` trees
        are in flight and the engine batch has room (an engine stream with `free_rows()`: k is at
        most enough trees to fill it, so the batch stays full without queueing prompts); it
        returns up to k prompts, [] for none now, or None when it is exhausted. The stream ends
        when no tree is in flight and the source gives no prompt.
        """
        for _, prompt, tree in self._run(source, max_trees_in_flight):
            yield prompt, tree

    def _run(self, source: PromptFn, max_trees_in_flight: int) -> Iterator[tuple[int, Any, ReasoningTree]]:
        if max_trees_in_flight < 1:
            raise ValueError(f"max_trees_in_flight = {max_trees_in_flight}: must be >= 1")
        call = self._calls
        self._calls += 1
        engine_stream = open_stream(self.engine, self._seed(call))
        try:
            yield from self._grow(engine_stream, source, max_trees_in_flight, call)
        finally:  # also when the caller stops early: requests still in flight are dropped
            engine_stream.close()

    def _grow(self, engine_stream, source: PromptFn, max_trees_in_flight: int,
              call: int) -> Iterator[tuple[int, Any, ReasoningTree]]:
        trees: dict[int, _Tree] = {}
        serial = 0
        exhausted = False
        self.last_reward_reasons = Counter()
        while True:
            if not exhausted:
                free = max_trees_in_flight - len(trees)
                room = engine_stream.free_rows()
                if room is not None:  # fill the batch, do not queue prompts behind it
                    free = min(free, -(-room // self.cfg.branching[0]))
                got = source(free) if free > 0 else []
                if got is None:
                    exhausted = True
                if got and len(got) > free:
                    raise ValueError(f"the prompt source returned {len(got)} prompts when asked for at most {free}")
                admitted = [_Tree(serial + i, prompt, time.perf_counter(), len(trees) + len(got))
                            for i, prompt in enumerate(got or [])]
                for tree in admitted:
                    trees[tree.serial] = tree
                    root = _Group(tree, -1, 0, np.asarray(tree.prompt.token_ids, dtype=np.int32), 0)
                    self._request(engine_stream, root, call, None)
                serial += len(admitted)
            if not trees:
                return
            t0 = time.perf_counter()
            finished = engine_stream.step()
            dt = time.perf_counter() - t0
            for tree in trees.values():
                tree.steps += 1
                tree.generate_seconds += dt
            done = self._attach(engine_stream, finished, call)
            if done:
                for tree in done:
                    del trees[tree.serial]
                yield from self._finish_trees(done)

    # -- growing -------------------------------------------------------------------------------
    def _request(self, engine_stream, group: _Group, call: int, parent: tuple[Any, int] | None) -> None:
        cfg = self.cfg
        level = group.level
        final = level == cfg.depth - 1
        left = cfg.max_tokens - group.used
        entropy = cfg.branch_at == "entropy"
        budget = left if (final or entropy) else min(cfg.segment_tokens, left)
        stops = (cfg.step_delimiter,) if (cfg.split == "step" and not final) else ()
        n = cfg.branching[level] - group.first
        seed = np.random.SeedSequence([self.seed, call, group.tree.serial, group.parent + 1, level])
        req = GenerationRequest(
            context=group.context, n=n, max_tokens=budget,
            stop_token_ids=tuple(self.engine.eos_token_ids), stop_strings=stops,
            temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
            seed=int(seed.generate_state(1, dtype=np.uint32)[0]) >> 1,  # < 2**31 (vLLM: sibling i gets seed + i)
            entropy=entropy and not final,
        )
        group.tree.pending += n
        engine_stream.add(req, group, parent)

    def _attach(self, engine_stream, finished: list[StreamResult], call: int) -> list[_Tree]:
        """Record finished segments, request children of open ones; return the trees now complete."""
        done = []
        for f in finished:
            group: _Group = f.tag
            tree, level = group.tree, group.level
            # a child attends to its ancestors' KV: its version is the oldest weights that touched
            # its context or its tokens (design §4.3), never the newer one it was admitted under
            version = int(f.version) if group.parent < 0 else min(int(f.version), tree.raw[group.parent][3].version)
            tree.pending -= 1
            if self.cfg.branch_at == "entropy":
                self._fork_at_entropy(engine_stream, group, f.index, f.sample, version, call)
            else:
                path_ends = (level == self.cfg.depth - 1
                             or group.used + len(f.sample.token_ids) >= self.cfg.max_tokens)
                finish = node_finish(f.sample.finish, path_ends)
                node = Node(parent=-1, token_ids=f.sample.token_ids, logprobs=f.sample.logprobs,
                            version=version, finish=finish)
                tree.raw.append((group.parent, level, f.index, node))
                if finish == "segment":
                    child = _Group(tree, len(tree.raw) - 1, level + 1,
                                   np.concatenate([group.context, f.sample.token_ids]),
                                   group.used + len(f.sample.token_ids))
                    self._request(engine_stream, child, call, (group, f.index))
            if tree.pending == 0:
                done.append(tree)
        return done

    def _fork_at_entropy(self, engine_stream, group: _Group, index: int, sample: Any, version: int,
                         call: int) -> None:
        """`tree.branch_at: entropy`: a response sampled below `group`'s node (to EOS or the path's
        budget) at level l forks at its highest-entropy token p (the first of equals) with
        1 <= p <= L - (depth - 1 - l), so that the node keeps a token and the rest one per level
        below: the node is tokens[:p]; its children are the response's rest tokens[p:]
        (sibling 0, already sampled) and branching - 1 new samples from context + tokens[:p].
        The rest is forked the same way one level down, until the last level; a response too
        short for that (it ended in EOS) is a leaf where it stops."""
        tree, level, sibling = group.tree, group.level, group.first + index
        parent, context, used = group.parent, group.context, group.used
        tokens, logprobs, entropy = sample.token_ids, sample.logprobs, sample.entropy
        while level < self.cfg.depth - 1 and (last := len(tokens) - (self.cfg.depth - 1 - level)) >= 1:
            p = 1 + int(np.argmax(entropy[1:last + 1]))
            tree.raw.append((parent, level, sibling, Node(parent=-1, token_ids=tokens[:p], logprobs=logprobs[:p],
                                                         version=version, finish="segment")))
            parent, context, used = len(tree.raw) - 1, np.concatenate([context, tokens[:p]]), used + p
            if self.cfg.branching[level + 1] > 1:  # the engine may fork the response's state, cut at p
                self._request(engine_stream, _Group(tree, parent, level + 1, context, used, first=1), call,
                              (group, index))
            tokens, logprobs, entropy = tokens[p:], logprobs[p:], entropy[p:]
            level, sibling = level + 1, 0
        tree.raw.append((parent, level, sibling, Node(parent=-1, token_ids=tokens, logprobs=logprobs, version=version,
                                                      finish=node_finish(sample.finish, path_ends=True))))

    # -- finishing -----------------------------------------------------------------------------
    def _finish_trees(self, done: list[_Tree]) -> Iterator[tuple[int, Any, ReasoningTree]]:
        gen_done = time.perf_counter()
        nodes = [_bfs(tree.raw) for tree in done]
        reasons = self._score([t.prompt for t in done], nodes)
        score_seconds = time.perf_counter() - gen_done
        for tree, tree_nodes, why in zip(done, nodes, reasons, strict=True):
            prompt = tree.prompt
            meta = {
                "task": str(dict(prompt.meta).get("task", getattr(self.reward, "name", ""))),
                "answer": str(prompt.answer),
                "sample_seconds": gen_done - tree.started,
                "generate_seconds": tree.generate_seconds,
                "reward_seconds": score_seconds,
                "engine_calls": 1 + max(level for _, level, _, _ in tree.raw),
                "engine_steps": tree.steps,
                "batch_prompts": tree.in_flight,
                "reward_reasons": dict(why),
            }
            out = ReasoningTree(tree_id=new_tree_id(), prompt_id=str(prompt.prompt_id), actor_id=self.actor_id,
                                prompt_token_ids=np.asarray(prompt.token_ids, dtype=np.int32),
                                nodes=tree_nodes, meta=meta)
            self.last_reward_reasons += why
            yield tree.serial, prompt, out.validate(self.engine.vocab_size)

    def _seed(self, call: int) -> int:
        return int(np.random.SeedSequence([self.seed, call]).generate_state(1, dtype=np.uint32)[0])

    def _score(self, prompts: Sequence[Any], nodes: list[list[Node]]) -> list[Counter[str]]:
        """Set every leaf's reward from its decoded path text; reason counts per prompt."""
        texts, answers, entries, where = [], [], [], []
        for p, tree_nodes in enumerate(nodes):
            has_child = {n.parent for n in tree_nodes}
            for i in range(len(tree_nodes)):
                if i in has_child:
                    continue
                path, j = [], i
                while j >= 0:
                    path.append(tree_nodes[j].token_ids)
                    j = tree_nodes[j].parent
                ids = np.concatenate(path[::-1]).tolist()
                texts.append(self.engine.tokenizer.decode(ids, skip_special_tokens=True))
                answers.append(str(prompts[p].answer))
                entries.append(getattr(prompts[p], "entry", None))
                where.append((p, i))
        results = self.reward.score_many(texts, answers, entries=entries) if texts else []
        if len(results) != len(texts):
            raise RuntimeError(f"reward {self.reward!r} returned {len(results)} results for {len(texts)} completions")
        reasons: list[Counter[str]] = [Counter() for _ in prompts]
        for (p, i), res in zip(where, results, strict=True):
            nodes[p][i].reward = float(res.reward)
            reasons[p][res.reason] += 1
        return reasons


def _bfs(raw: list[tuple[int, int, int, Node]]) -> list[Node]:
    """Nodes in breadth-first order (level, then parent's new index, then sibling); parents remapped."""
    new_index: dict[int, int] = {-1: -1}
    order = sorted(range(len(raw)), key=lambda i: raw[i][1])  # stable: by level
    out: list[Node] = []
    level_start = 0
    while level_start < len(order):
        level = raw[order[level_start]][1]
        level_end = level_start
        while level_end < len(order) and raw[order[level_end]][1] == level:
            level_end += 1
        members = sorted(order[level_start:level_end], key=lambda i: (new_index[raw[i][0]], raw[i][2]))
        for i in members:
            new_index[i] = len(out)
            node = raw[i][3]
            node.parent = new_index[raw[i][0]]
            out.append(node)
        level_start = level_end
    return out
