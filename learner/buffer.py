"""The learner's replay buffer and admission control (design §4.3, §7). Thread-safe.

Guarantees:

* Every tree passed to ``add`` ends exactly one way: taken once by ``take`` (trained), or
  dropped and counted under one reason of ``DROP_REASONS`` -- at ``add``, at batch time
  (``stale``), on eviction (``capacity``) or by ``drain_for_shutdown`` (``shutdown``). So at any
  moment ``added == taken + sum(drops over trees) + len(buffer)``.
* At most once: a tree whose ``tree_id`` is buffered or was accepted before (remembered in a
  bounded LRU of ``remember_ids`` ids, saved by ``state_dict``) is dropped as ``duplicate``.
* Staleness: with learner version ``v``, ``staleness = v - min(node.version)``; a tree with
  ``staleness > max_staleness`` is dropped as ``stale``, checked at ``add`` and again at batch
  time since ``v`` advances. A tree with ``max(node.version) > v`` was made by weights this
  learner never had and is dropped as ``incarnation``, as is a tree whose
  ``meta['incarnation']`` differs from the buffer's -- unless ``resume_version`` is given, the
  tree comes from an older incarnation and all its versions are ``<= resume_version`` (weights
  both incarnations share). A tree without an int ``meta['incarnation']`` is ``invalid``.
* Credits: actor ``a`` has at most ``credits_per_actor`` trees in flight, counted as
  ``granted (unconsumed) + held in the buffer``. ``grant_credits(a)`` hands out the difference;
  a received tree consumes one credit; a tree leaving the buffer (trained or dropped) frees one.
* Rounds (``learner.mode: sync``; a buffer made with ``rounds=True``): from the start, grants
  (Welcome's included) are further bounded by each actor's allowance for the current round, and
  the allowances of the live actors plus the trees already buffered add up to the round's target
  (one batch): no actor starts a tree beyond it, so every tree of a round is made by the weights
  the round was opened with. ``top_up_round`` re-grants what was lost (a dropped tree, an actor
  that left).

Metrics: ``stats()`` and an optional ``on_drop(DropEvent)`` callback (called outside the lock);
the buffer updates no metric itself. Its drop reasons are ``common.metrics.DROP_REASONS``, the
label values of ``treerpo_learner_trees_dropped_total``, defined once there.
"""

from __future__ import annotations

import random
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from common.config import ReplayConfig
from common.metrics import DROP_REASONS
from common.tree import ReasoningTree

FROM_CONFIG = object()  # take()'s default: use the ReplayConfig value


@dataclass(frozen=True)
class AddResult:
    accepted: bool
    reason: str | None = None  # the drop reason when not accepted

    def __bool__(self) -> bool:
        return self.accepted


@dataclass(frozen=True)
class DropEvent:
    reason: str
    tree_id: str | None
    actor_id: str | None
    count: int = 1


@dataclass(frozen=True)
class BufferStats:
    size: int
    tokens: int
    oldest_age_s: float
    accepted: int
    taken: int
    drops: dict[str, int]
    uncredited: int  # trees received from an actor holding no credit (accepted, but counted)


@dataclass
class _Entry:
    tree: ReasoningTree
    arrival: float  # monotonic seconds
    tokens: int  # prompt + generated tokens (each node once)
    min_version: int


def tree_tokens(tree: ReasoningTree) -> int:
    """Tokens the tree costs a packed batch: the prompt once plus every node once."""
    return int(tree.prompt_token_ids.shape[0]) + tree.num_tokens()


class ReplayBuffer:
    def __init__(
        self,
        cfg: ReplayConfig,
        incarnation: int = 0,
        *,
        resume_version: int | None = None,
        seed: int = 0,
        on_drop: Callable[[DropEvent], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        rounds: bool = False,
    ) -> None:
        self.cfg = cfg
        self.incarnation = int(incarnation)
        self.resume_version = resume_version
        self._on_drop = on_drop
        self._clock = clock
        self._rng = random.Random(seed)
        self._cond = threading.Condition(threading.Lock())
        self._entries: OrderedDict[str, _Entry] = OrderedDict()  # arrival order, oldest first
        self._remembered: OrderedDict[str, None] = OrderedDict()
        self._drops = {r: 0 for r in DROP_REASONS}
        self._accepted = 0
        self._taken = 0
        self._uncredited = 0
        self._tokens = 0
        self._min_versions: dict[int, int] = {}  # min node version -> buffered trees with it
        self._closed = False
        self._granted: dict[str, int] = {}
        self._held: dict[str, int] = {}
        self._round: dict[str, int] | None = {} if rounds else None  # sync mode: trees each actor may still get
        self._waiting_for = 1  # trees a waiting take() needs before an add is worth waking it for

    # -- ingest -----------------------------------------------------------------------------
    def add(self, tree: ReasoningTree, learner_version: int) -> AddResult:
        """Accept the tree into the buffer, or drop it and say why (never raises on content)."""
        events: list[DropEvent] = []
        with self._cond:
            self._consume_credit(tree.actor_id)
            reason = self._admission(tree, learner_version)
            if reason is not None:
                self._count(reason, tree, events)
            else:
                self._insert(tree, events)
                if len(self._entries) >= self._waiting_for:  # wake a take() only once it can return
                    self._cond.notify_all()
        self._emit(events)
        return AddResult(reason is None, reason)

    def record_drop(self, reason: str, actor_id: str | None = None, count: int = 1) -> None:
        """Count trees lost before they became trees (e.g. a WireError: 'invalid')."""
        if reason not in DROP_REASONS:
            raise ValueError(f"unknown drop reason {reason!r}; use one of {DROP_REASONS}")
        with self._cond:
            self._drops[reason] += count
        self._emit([DropEvent(reason, None, actor_id, count)])

    def _admission(self, tree: ReasoningTree, v: int) -> str | None:
        if self._closed:
            return "shutdown"
        incarnation = tree.meta.get("incarnation") if isinstance(tree.meta, dict) else None
        if not isinstance(incarnation, int) or isinstance(incarnation, bool) or not tree.nodes:
            return "invalid"
        if tree.tree_id in self._entries or tree.tree_id in self._remembered:
            return "duplicate"
        versions = [n.version for n in tree.nodes]
        if max(versions) > v:
            return "incarnation"
        if incarnation != self.incarnation:
            shared_lineage = (
                self.resume_version is not None
                and incarnation < self.incarnation
                and max(versions) <= self.resume_version
            )
            if not shared_lineage:
                return "incarnation"
        if v - min(versions) > self.cfg.max_staleness:
            return "stale"
        return None

    def _insert(self, tree: ReasoningTree, events: list[DropEvent]) -> None:
        entry = _Entry(tree, self._clock(), tree_tokens(tree), tree.min_version())
        self._entries[tree.tree_id] = entry
        self._tokens += entry.tokens
        self._min_versions[entry.min_version] = self._min_versions.get(entry.min_version, 0) + 1
        self._held[tree.actor_id] = self._held.get(tree.actor_id, 0) + 1
        self._accepted += 1
        self._remember(tree.tree_id)
        while len(self._entries) > self.cfg.capacity:
            _, oldest = self._entries.popitem(last=False)
            self._release(oldest)
            self._count("capacity", oldest.tree, events)

    def _remember(self, tree_id: str) -> None:
        self._remembered[tree_id] = None
        self._remembered.move_to_end(tree_id)
        while len(self._remembered) > self.cfg.remember_ids:
            self._remembered.popitem(last=False)

    # -- batches ----------------------------------------------------------------------------
    def take(
        self,
        learner_version: int,
        *,
        max_trees: int | None = None,
        max_tokens: int | None | object = FROM_CONFIG,
        min_trees: int = 1,
        timeout_s: float = 0.0,
    ) -> list[ReasoningTree]:
        """A batch for weights `learner_version`: up to max_trees (default cfg.batch_trees) trees,
        cut before the token budget (default cfg.batch_tokens; None = no budget) would be
        exceeded, at least one tree. Stale trees are dropped first. Waits up to timeout_s for min_trees admissible
        trees; returns [] if there are still fewer (or after shutdown)."""
        max_trees = self.cfg.batch_trees if max_trees is None else max_trees
        max_tokens = self.cfg.batch_tokens if max_tokens is FROM_CONFIG else max_tokens
        if max_trees < 1 or min_trees < 1:
            raise ValueError(f"take(max_trees={max_trees}, min_trees={min_trees}): both must be >= 1")
        deadline = self._clock() + timeout_s
        events: list[DropEvent] = []
        with self._cond:
            while True:
                self._purge_stale(learner_version, events)
                if self._closed or len(self._entries) >= min_trees:
                    break
                left = deadline - self._clock()
                if left <= 0:
                    break
                self._waiting_for = min_trees
                try:
                    self._cond.wait(left)
                finally:
                    self._waiting_for = 1
            batch = [] if self._closed or len(self._entries) < min_trees else self._pick(max_trees, max_tokens)
            for entry in batch:
                del self._entries[entry.tree.tree_id]
                self._release(entry)
            self._taken += len(batch)
        self._emit(events)
        return [e.tree for e in batch]

    def _pick(self, max_trees: int, max_tokens: int | None) -> list[_Entry]:
        # oldest / newest walk the arrival order from one end: the cost is the batch's, not the buffer's
        entries = self._entries.values()
        if self.cfg.sampling == "newest":
            entries = reversed(entries)
        elif self.cfg.sampling == "uniform":
            entries = list(entries)
            self._rng.shuffle(entries)
        batch: list[_Entry] = []
        total = 0
        for entry in entries:
            if len(batch) == max_trees:
                break
            if batch and max_tokens is not None and total + entry.tokens > max_tokens:
                break
            batch.append(entry)
            total += entry.tokens
        return batch

    def purge_stale(self, learner_version: int) -> int:
        """Drop (and count) buffered trees staler than max_staleness; returns how many."""
        events: list[DropEvent] = []
        with self._cond:
            self._purge_stale(learner_version, events)
        self._emit(events)
        return len(events)

    def _purge_stale(self, v: int, events: list[DropEvent]) -> None:
        if not self._min_versions or v - min(self._min_versions) <= self.cfg.max_staleness:
            return  # nothing stale: no scan (take() calls this every batch)
        stale = [tid for tid, e in self._entries.items() if v - e.min_version > self.cfg.max_staleness]
        for tid in stale:
            entry = self._entries.pop(tid)
            self._release(entry)
            self._count("stale", entry.tree, events)

    def drain_for_shutdown(self) -> int:
        """Drop every buffered tree as 'shutdown', refuse later adds the same way; returns the count."""
        events: list[DropEvent] = []
        with self._cond:
            self._closed = True
            while self._entries:
                _, entry = self._entries.popitem(last=False)
                self._release(entry)
                self._count("shutdown", entry.tree, events)
            self._cond.notify_all()
        self._emit(events)
        return len(events)

    # -- credits ----------------------------------------------------------------------------
    def register_actor(self, actor_id: str) -> int:
        """A (re)registered actor holds no credits; returns its initial grant."""
        with self._cond:
            self._granted[actor_id] = 0
            self._held.setdefault(actor_id, 0)
            return self._grant(actor_id)

    def forget_actor(self, actor_id: str) -> None:
        with self._cond:
            self._granted.pop(actor_id, None)
            if self._round is not None:
                self._round.pop(actor_id, None)

    def top_up_round(self, actors: list[str], target: int) -> int:
        """Sync mode: make the round's allowances of `actors` plus their granted credits plus the
        buffered trees add up to `target`, the shortfall spread over the actors holding the least;
        returns the trees added to allowances. Call it only while `actors` hold the weights the
        round's trees must be made with (after the sync)."""
        if target < 1:
            raise ValueError(f"top_up_round(target={target}) must be >= 1")
        with self._cond:
            if self._round is None:
                raise ValueError("top_up_round on a buffer made without rounds=True (learner.mode: async)")
            for gone in set(self._round) - set(actors):
                del self._round[gone]
            live = [a for a in actors if a in self._granted]
            if not live:
                return 0
            outstanding = {a: self._round.get(a, 0) + self._granted[a] for a in live}
            short = target - len(self._entries) - sum(outstanding.values())
            for _ in range(max(0, short)):
                a = min(live, key=lambda x: (outstanding[x], live.index(x)))
                outstanding[a] += 1
                self._round[a] = self._round.get(a, 0) + 1
            return max(0, short)

    def grant_credits(self, actor_id: str) -> int:
        """New credits to send `actor_id` now (recorded as granted); 0 if it has its full share."""
        with self._cond:
            return self._grant(actor_id)

    def pending_grants(self) -> dict[str, int]:
        """Grant every registered actor what it may have; only non-zero grants are returned."""
        with self._cond:
            grants = {a: self._grant(a) for a in list(self._granted)}
        return {a: n for a, n in grants.items() if n > 0}

    def in_flight(self, actor_id: str) -> int:
        with self._cond:
            return self._granted.get(actor_id, 0) + self._held.get(actor_id, 0)

    def _grant(self, actor_id: str) -> int:
        if actor_id not in self._granted or self._closed:
            return 0
        n = max(0, self.cfg.credits_per_actor - self._granted[actor_id] - self._held.get(actor_id, 0))
        if self._round is not None:
            n = min(n, self._round.get(actor_id, 0))
            if n:
                self._round[actor_id] -= n
        self._granted[actor_id] += n
        return n

    def _consume_credit(self, actor_id: str) -> None:
        if self._granted.get(actor_id, 0) > 0:
            self._granted[actor_id] -= 1
        else:
            self._uncredited += 1

    def _release(self, entry: _Entry) -> None:
        self._tokens -= entry.tokens
        left = self._min_versions[entry.min_version] - 1
        if left:
            self._min_versions[entry.min_version] = left
        else:
            del self._min_versions[entry.min_version]
        actor = entry.tree.actor_id
        self._held[actor] = self._held.get(actor, 0) - 1

    # -- observation ------------------------------------------------------------------------
    def __len__(self) -> int:
        with self._cond:
            return len(self._entries)

    def oldest_age_s(self) -> float:
        """Seconds since the oldest buffered tree arrived (0.0 when empty)."""
        with self._cond:
            return self._oldest_age()

    def _oldest_age(self) -> float:
        if not self._entries:
            return 0.0
        return max(0.0, self._clock() - next(iter(self._entries.values())).arrival)

    def oldest_version(self) -> int | None:
        """Smallest node version among buffered trees (None when empty)."""
        with self._cond:
            return min(self._min_versions, default=None)

    @property
    def drop_counts(self) -> dict[str, int]:
        with self._cond:
            return dict(self._drops)

    def stats(self) -> BufferStats:
        with self._cond:
            return BufferStats(
                size=len(self._entries),
                tokens=self._tokens,
                oldest_age_s=self._oldest_age(),
                accepted=self._accepted,
                taken=self._taken,
                drops=dict(self._drops),
                uncredited=self._uncredited,
            )

    def _count(self, reason: str, tree: ReasoningTree, events: list[DropEvent]) -> None:
        self._drops[reason] += 1
        events.append(DropEvent(reason, tree.tree_id, tree.actor_id))

    def _emit(self, events: list[DropEvent]) -> None:
        if self._on_drop is not None:
            for event in events:
                self._on_drop(event)

    # -- checkpoint -------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Remembered tree ids, so a resumed learner still refuses trees it trained. Buffered
        trees and counters are not saved: the trees belong to this incarnation, and counters
        are per process like the Prometheus counters they feed."""
        with self._cond:
            return {"incarnation": self.incarnation, "remembered": list(self._remembered)}

    def load_state_dict(self, state: dict) -> None:
        """Restore remembered ids; the buffer keeps its own (new) incarnation."""
        remembered = state.get("remembered")
        if not isinstance(remembered, list):
            raise ValueError(
                "buffer state lacks a 'remembered' list of tree ids: was it made by ReplayBuffer.state_dict?"
            )
        with self._cond:
            for tree_id in remembered:
                self._remember(str(tree_id))
