"""TreeSampler: sample, score and assemble reasoning trees for many prompts at once (DESIGN §3).

Guarantees:

* all prompts of one `sample` call are expanded together, level by level: one
  `engine.generate` call per level covers every open node of every prompt, and the siblings of
  one node are ONE request with `n = branching[level]` (the engine prefills their context once);
* a node's context is `prompt_token_ids + its ancestors' token_ids`, as ids (never decoded
  and re-encoded); text is decoded only to score leaves;
* a non-final level is cut at `segment_tokens` (`split='tokens'`) or at the step delimiter or
  `segment_tokens`, whichever comes first (`split='step'`; the delimiter stays in the segment);
  the last level runs to EOS or the rest of the total budget `max_tokens` along the path;
* a segment ending in EOS before the last level is a leaf ("stop"); a non-final segment that
  uses up the total budget is a leaf ("length");
* every node records `engine.version` read just before its level's generation;
* leaves are scored with `reward.score_many(path texts, answers)`; each tree's meta holds the
  task name, answer, timings and its leaves' reward-reason counts, and `last_reward_reasons`
  holds the counts of the latest call (for the actor's metrics);
* the trees pass `ReasoningTree.validate()`; depth 1 with branching [G] is GRPO: one group of G.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from actor.engine import Engine, GenerationRequest, Sample
from common.tree import Node, ReasoningTree, new_tree_id

if TYPE_CHECKING:  # pragma: no cover
    from common.config import TreeConfig


@dataclass
class _Open:
    """A node whose children are still to be sampled (the root: node = -1)."""

    prompt: int  # index into the prompts of this call
    node: int  # index into that tree's nodes, -1 = root
    context: np.ndarray  # int32, prompt + ancestors + this node
    used: int  # generated tokens along the path so far


class TreeSampler:
    """Expands the trees of many prompts together on one engine."""

    def __init__(self, engine: Engine, tree_cfg: "TreeConfig", reward: Any, actor_id: str, seed: int = 0) -> None:
        self.engine = engine
        self.cfg = tree_cfg
        self.reward = reward
        self.actor_id = actor_id
        self.seed = int(seed)
        self._calls = 0
        self.last_reward_reasons: Counter[str] = Counter()

    # -- requests ------------------------------------------------------------------------------
    def _request(self, item: _Open, level: int, seed: int) -> GenerationRequest:
        cfg = self.cfg
        final = level == cfg.depth - 1
        left = cfg.max_tokens - item.used
        budget = left if final else min(cfg.segment_tokens, left)
        stops = (cfg.step_delimiter,) if (cfg.split == "step" and not final) else ()
        return GenerationRequest(
            context=item.context, n=cfg.branching[level], max_tokens=budget,
            stop_token_ids=tuple(self.engine.eos_token_ids), stop_strings=stops,
            temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k, seed=seed,
        )

    def _node_finish(self, sample: Sample, level: int, used: int) -> str:
        """Tree finish of a segment: 'segment' (open), 'stop' or 'length' (leaves)."""
        if sample.finish == "stop":
            return "stop"
        if level == self.cfg.depth - 1 or used + len(sample.token_ids) >= self.cfg.max_tokens:
            return "length"
        return "segment"

    def _seeds(self, count: int, level: int) -> list[int]:
        """Per-request seeds below 2**31 (vLLM gives sibling i the seed + i)."""
        state = np.random.SeedSequence([self.seed, self._calls, level]).generate_state(count, dtype=np.uint32)
        return [int(s) >> 1 for s in state]

    # -- sampling ------------------------------------------------------------------------------
    def sample(self, prompts: Sequence[Any]) -> list[ReasoningTree]:
        """One validated, scored tree per prompt (objects with prompt_id, answer, token_ids, meta)."""
        started = time.perf_counter()
        nodes: list[list[Node]] = [[] for _ in prompts]
        frontier = [_Open(p, -1, np.asarray(pr.token_ids, dtype=np.int32), 0) for p, pr in enumerate(prompts)]
        gen_seconds = 0.0
        engine_calls = 0
        for level in range(self.cfg.depth):
            if not frontier:
                break
            requests = [self._request(item, level, s) for item, s in zip(frontier, self._seeds(len(frontier), level))]
            version = int(self.engine.version)
            t0 = time.perf_counter()
            results = self.engine.generate(requests)
            gen_seconds += time.perf_counter() - t0
            engine_calls += 1
            frontier = self._attach(frontier, results, level, version, nodes)
        self._calls += 1
        gen_done = time.perf_counter()
        reasons = self._score(prompts, nodes)
        score_seconds = time.perf_counter() - gen_done
        trees = []
        for p, prompt in enumerate(prompts):
            meta = {
                "task": str(dict(prompt.meta).get("task", getattr(self.reward, "name", ""))),
                "answer": str(prompt.answer),
                "sample_seconds": gen_done - started,
                "generate_seconds": gen_seconds,
                "reward_seconds": score_seconds,
                "engine_calls": engine_calls,
                "batch_prompts": len(prompts),
                "reward_reasons": dict(reasons[p]),
            }
            tree = ReasoningTree(tree_id=new_tree_id(), prompt_id=str(prompt.prompt_id), actor_id=self.actor_id,
                                 prompt_token_ids=np.asarray(prompt.token_ids, dtype=np.int32),
                                 nodes=nodes[p], meta=meta)
            trees.append(tree.validate(self.engine.vocab_size))
        self.last_reward_reasons = sum(reasons, Counter())
        return trees

    def _attach(self, frontier: list[_Open], results: list[list[Sample]], level: int, version: int,
                nodes: list[list[Node]]) -> list[_Open]:
        """Append this level's segments (BFS order: frontier order) and return the next frontier."""
        nxt: list[_Open] = []
        for item, samples in zip(frontier, results):
            for sample in samples:
                finish = self._node_finish(sample, level, item.used)
                tree_nodes = nodes[item.prompt]
                tree_nodes.append(Node(parent=item.node, token_ids=sample.token_ids, logprobs=sample.logprobs,
                                       version=version, finish=finish))
                if finish == "segment":
                    nxt.append(_Open(item.prompt, len(tree_nodes) - 1,
                                     np.concatenate([item.context, sample.token_ids]),
                                     item.used + len(sample.token_ids)))
        return nxt

    def _score(self, prompts: Sequence[Any], nodes: list[list[Node]]) -> list[Counter[str]]:
        """Set every leaf's reward from its decoded path text; reason counts per prompt."""
        texts, answers, where = [], [], []
        for p, tree_nodes in enumerate(nodes):
            has_child = {n.parent for n in tree_nodes}
            for i, node in enumerate(tree_nodes):
                if i in has_child:
                    continue
                path, j = [], i
                while j >= 0:
                    path.append(tree_nodes[j].token_ids)
                    j = tree_nodes[j].parent
                ids = np.concatenate(path[::-1]).tolist()
                texts.append(self.engine.tokenizer.decode(ids, skip_special_tokens=True))
                answers.append(str(prompts[p].answer))
                where.append((p, i))
        results = self.reward.score_many(texts, answers) if texts else []
        if len(results) != len(texts):
            raise RuntimeError(f"reward {self.reward!r} returned {len(results)} results for {len(texts)} completions")
        reasons: list[Counter[str]] = [Counter() for _ in prompts]
        for (p, i), res in zip(where, results):
            nodes[p][i].reward = float(res.reward)
            reasons[p][res.reason] += 1
        return reasons
