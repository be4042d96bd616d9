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
* Credits (design §5.6): each registration of an actor gets an id; its trees carry
  ``meta['registration']`` and ``meta['seq']`` (1, 2, ... in the order sent). The learner keeps,
  per registration, ``limit`` (the actor may send trees up to that seq) and ``seen`` (the highest
  seq received). ``credits_per_actor`` bounds ``limit - seen`` (credits not yet used) plus the
  trees held in the buffer; ``grant(a)`` raises ``limit`` to it. Every received tree of the
  registration consumes its credit, whether ``add`` accepts it or ``refuse`` turns it away; a gap
  in seq (trees lost on the way) is written off at once, a tail that never arrives by
  ``reconcile`` (the actor's heartbeat counts). Credits are cumulative, so a lost Credit message
  only delays: the next one carries the same limit. Pending members get no credit
  (``register_actor`` grants nothing).
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
    uncredited: int  # trees received outside any credit (no or an old registration, beyond the limit, late)
    written_off: int  # trees sent under a credit that never arrived (a gap in seq, or reconcile)


@dataclass(frozen=True)
class CreditGrant:
    """What a Credit message tells an actor: it may send trees up to seq `limit` under
    `registration`; `settled` of those the learner is done with (received, and no longer
    buffered: a lower bound). `added`: credits this call granted (0: the message only restates)."""

    registration: int
    limit: int
    settled: int
    added: int


@dataclass
class _Ledger:
    """One registration's credits, as sequence numbers: trees 1..seen arrived (or were written off),
    the actor may send up to `limit`."""

    registration: int
    limit: int = 0
    seen: int = 0
    reported: int = 0  # trees_sent of the last heartbeat
    quiet: int = 0  # heartbeats in a row that found a gap and nothing sent or arrived since the last
    quiet_seen: int = 0  # seen at the last heartbeat


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
        self._written_off = 0
        self._registrations = 0
        self._last_arrival = clock()
        self._hungry_since: float | None = None  # a take() found too few trees since then
        self._tokens = 0
        self._min_versions: dict[int, int] = {}  # min node version -> buffered trees with it
        self._closed = False
        self._ledgers: dict[str, _Ledger] = {}
        self._held: dict[str, int] = {}
        self._round: dict[str, int] | None = {} if rounds else None  # sync mode: trees each actor may still get
        self._waiting_for = 1  # trees a waiting take() needs before an add is worth waking it for

    # -- ingest -----------------------------------------------------------------------------
    def add(self, tree: ReasoningTree, learner_version: int) -> AddResult:
        """Accept the tree into the buffer, or drop it and say why (never raises on content)."""
        events: list[DropEvent] = []
        with self._cond:
            self._receive(tree)
            reason = self._admission(tree, learner_version)
            if reason is not None:
                self._count(reason, tree, events)
            else:
                self._insert(tree, events)
                if len(self._entries) >= self._waiting_for:  # wake a take() only once it can return
                    self._cond.notify_all()
        self._emit(events)
        return AddResult(reason is None, reason)

    def refuse(self, tree: ReasoningTree, reason: str) -> None:
        """Drop a received tree before admission (e.g. from an actor that is not a confirmed member,
        or too long to train) and count it; like `add`, it consumes the tree's credit."""
        _check_reason(reason)
        events: list[DropEvent] = []
        with self._cond:
            self._receive(tree)
            self._count(reason, tree, events)
        self._emit(events)

    def record_drop(self, reason: str, actor_id: str | None = None, count: int = 1) -> None:
        """Count trees lost before they became trees (e.g. a WireError: 'invalid'). No credit moves
        (the tree's registration is unknown); the actor's next tree or heartbeat settles it."""
        _check_reason(reason)
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
            if batch:
                self._hungry_since = None
            elif self._hungry_since is None and not self._closed:
                self._hungry_since = self._clock()
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
        """A (re)registered actor: a new registration with no credit (it gets some once its weights
        are confirmed); returns the registration id, unique across this run's incarnations.
        Trees it still has buffered keep counting against its share until they leave."""
        with self._cond:
            self._registrations += 1
            registration = (self.incarnation << 32) + self._registrations
            self._ledgers[actor_id] = _Ledger(registration)
            self._held.setdefault(actor_id, 0)
            return registration

    def forget_actor(self, actor_id: str) -> None:
        with self._cond:
            self._ledgers.pop(actor_id, None)
            if self._round is not None:
                self._round.pop(actor_id, None)

    def top_up_round(self, actors: list[str], target: int) -> int:
        """Sync mode: make the round's allowances of `actors` plus their unused credits plus the
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
            live = [a for a in actors if a in self._ledgers]
            if not live:
                return 0
            outstanding = {a: self._round.get(a, 0) + self._unused(self._ledgers[a]) for a in live}
            short = target - len(self._entries) - sum(outstanding.values())
            for _ in range(max(0, short)):
                a = min(live, key=lambda x: (outstanding[x], live.index(x)))
                outstanding[a] += 1
                self._round[a] = self._round.get(a, 0) + 1
            return max(0, short)

    def grant(self, actor_id: str) -> CreditGrant | None:
        """Raise the actor's limit to what it may have now; the state for a Credit message (None:
        not registered). Safe to call any time: a grant is the same however often it is asked."""
        with self._cond:
            ledger = self._ledgers.get(actor_id)
            if ledger is None:
                return None
            added = self._grant(actor_id, ledger)
            held = self._held.get(actor_id, 0)
            return CreditGrant(ledger.registration, ledger.limit, max(0, ledger.seen - held), added)

    def reconcile(self, actor_id: str, registration: int, trees_sent: int) -> int:
        """An actor's heartbeat says it sent `trees_sent` trees under `registration`. Trees that it
        sent and that have not arrived by the third such heartbeat in a row -- the actor sending
        nothing, nothing arriving in between -- were lost on the way: written off (their credits
        come back at the next grant). Returns how many were written off now.

        A tree written off and arriving after all is kept and counted as uncredited: the actor
        then has one tree more in flight until one leaves the buffer."""
        with self._cond:
            ledger = self._ledgers.get(actor_id)
            if ledger is None or ledger.registration != registration:
                return 0
            gap = min(trees_sent, ledger.limit) - ledger.seen
            if gap <= 0:
                ledger.quiet = 0
            elif trees_sent == ledger.reported and ledger.seen == ledger.quiet_seen:
                ledger.quiet += 1
            else:
                ledger.quiet = 1
            ledger.reported, ledger.quiet_seen = trees_sent, ledger.seen
            if ledger.quiet < 3:
                return 0
            ledger.seen += gap
            ledger.quiet = 0
            self._written_off += gap
            return gap

    def in_flight(self, actor_id: str) -> int:
        """Trees the actor may have in flight now, as the learner counts them: unused credits
        plus trees in the buffer."""
        with self._cond:
            ledger = self._ledgers.get(actor_id)
            return (self._unused(ledger) if ledger else 0) + self._held.get(actor_id, 0)

    def starving_s(self) -> float:
        """Seconds that a take() has found too few trees AND no tree has arrived (0.0 otherwise)."""
        with self._cond:
            if self._hungry_since is None or self._closed:
                return 0.0
            return max(0.0, self._clock() - max(self._hungry_since, self._last_arrival))

    @staticmethod
    def _unused(ledger: _Ledger) -> int:
        return max(0, ledger.limit - ledger.seen)

    def _grant(self, actor_id: str, ledger: _Ledger) -> int:
        if self._closed:
            return 0
        n = max(0, self.cfg.credits_per_actor - self._unused(ledger) - self._held.get(actor_id, 0))
        if self._round is not None:
            n = min(n, self._round.get(actor_id, 0))
            if n:
                self._round[actor_id] -= n
        ledger.limit = max(ledger.limit, ledger.seen) + n
        return n

    def _receive(self, tree: ReasoningTree) -> None:
        """Charge an arriving tree to its registration's credits (every tree, accepted or not)."""
        self._last_arrival = self._clock()
        ledger = self._ledgers.get(tree.actor_id)
        meta = tree.meta if isinstance(tree.meta, dict) else {}
        registration, seq = meta.get("registration"), meta.get("seq")
        if (ledger is None or not _is_int(registration) or not _is_int(seq) or registration != ledger.registration
                or seq <= ledger.seen):
            self._uncredited += 1  # a stranger's, an old registration's, or one written off before
            return
        if seq > ledger.limit:
            self._uncredited += 1  # sent beyond its grant (an actor's bug): the newest seq all the same
        self._written_off += max(0, min(seq - 1, ledger.limit) - ledger.seen)  # a gap: lost on the way
        ledger.seen = seq

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
                written_off=self._written_off,
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


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_reason(reason: str) -> None:
    if reason not in DROP_REASONS:
        raise ValueError(f"unknown drop reason {reason!r}; use one of {DROP_REASONS}")
