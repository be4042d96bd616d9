"""Replay buffer: dedupe, staleness, incarnation, capacity, order, token budgets, credits,
shutdown, and a two-thread add/take run that loses nothing."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from common.config import ReplayConfig
from common.metrics import DROP_REASONS
from common.tree import Node, ReasoningTree
from learner.buffer import CreditGrant, DropEvent, ReplayBuffer, tree_tokens


def make_tree(
    tree_id: str,
    versions=(0, 0, 0),
    *,
    actor: str = "a0",
    incarnation: int | None = 0,
    prompt_len: int = 2,
    seg_len: int = 3,
    sent: tuple[int, int] | None = None,
) -> ReasoningTree:
    """A root child (versions[0]) with len(versions)-1 leaf children."""
    nodes = [Node(parent=-1, token_ids=np.full(seg_len, 5), logprobs=np.full(seg_len, -1.0), version=versions[0],
                  finish="segment")]
    for v in versions[1:]:
        nodes.append(Node(parent=0, token_ids=np.full(seg_len, 6), logprobs=np.full(seg_len, -1.0), version=v,
                          finish="stop", reward=1.0))
    meta = {} if incarnation is None else {"incarnation": incarnation}
    if sent is not None:  # (registration, seq): the actor's stamp when it sent the tree
        meta["registration"], meta["seq"] = sent
    tree = ReasoningTree(tree_id=tree_id, prompt_id="p", actor_id=actor, prompt_token_ids=np.full(prompt_len, 7),
                         nodes=nodes, meta=meta)
    return tree.validate()


def cfg(**kw) -> ReplayConfig:
    return ReplayConfig(**kw)


def ids(trees) -> list[str]:
    return [t.tree_id for t in trees]


def test_tree_tokens():
    # prompt 2 + three nodes of 3 tokens = 11
    assert tree_tokens(make_tree("t")) == 11


def test_dedupe_buffered_and_trained():
    drops: list[DropEvent] = []
    buf = ReplayBuffer(cfg(), on_drop=drops.append)
    assert buf.add(make_tree("x"), 0)
    r = buf.add(make_tree("x"), 0)  # still buffered
    assert (r.accepted, r.reason) == (False, "duplicate")
    assert ids(buf.take(0)) == ["x"]
    assert buf.add(make_tree("x"), 0).reason == "duplicate"  # already trained
    assert buf.drop_counts["duplicate"] == 2
    assert [(e.reason, e.tree_id) for e in drops] == [("duplicate", "x"), ("duplicate", "x")]


def test_remembered_ids_are_bounded_and_survive_state_round_trip():
    buf = ReplayBuffer(cfg(remember_ids=3, capacity=10))
    for i in range(5):
        buf.add(make_tree(f"t{i}"), 0)
    buf.take(0, max_trees=10)
    # only the 3 most recent ids are remembered: t0 may come back, t4 may not
    assert buf.add(make_tree("t0"), 0).accepted
    state = buf.state_dict()
    assert state["remembered"] == ["t3", "t4", "t0"]
    resumed = ReplayBuffer(cfg(remember_ids=3), incarnation=1)
    resumed.load_state_dict(state)
    assert resumed.add(make_tree("t4", incarnation=1), 0).reason == "duplicate"
    assert resumed.add(make_tree("t9", incarnation=1), 0).accepted


def test_staleness_at_add_and_at_batch_time():
    buf = ReplayBuffer(cfg(max_staleness=2, capacity=10))
    # learner at v=5: staleness = 5 - min(versions)
    assert buf.add(make_tree("s3", (3, 4, 5)), 5).accepted  # staleness 2: kept
    assert buf.add(make_tree("s2", (2, 5, 5)), 5).reason == "stale"  # staleness 3 > 2
    assert buf.add(make_tree("s4", (4, 4, 4)), 5).accepted  # staleness 1
    assert buf.add(make_tree("s5", (5, 5, 5)), 5).accepted  # staleness 0
    # the learner moves to v=7: s3 (7-3=4) and s4 (7-4=3) became stale at batch time
    assert ids(buf.take(7, max_trees=10)) == ["s5"]
    assert buf.drop_counts == {"stale": 3, "invalid": 0, "duplicate": 0, "incarnation": 0, "shutdown": 0, "capacity": 0}
    assert len(buf) == 0


def test_purge_stale_counts_without_taking():
    buf = ReplayBuffer(cfg(max_staleness=0))
    buf.add(make_tree("a", (1, 1, 1)), 1)
    buf.add(make_tree("b", (2, 2, 2)), 2)
    assert buf.purge_stale(2) == 1
    assert len(buf) == 1 and buf.drop_counts["stale"] == 1


def test_incarnation_rules():
    buf = ReplayBuffer(cfg(), incarnation=2)
    assert buf.add(make_tree("newer", (3, 4, 4), incarnation=2), 3).reason == "incarnation"  # version 4 > 3
    assert buf.add(make_tree("old", (3, 3, 3), incarnation=1), 3).reason == "incarnation"
    assert buf.add(make_tree("future", (3, 3, 3), incarnation=3), 3).reason == "incarnation"
    assert buf.add(make_tree("nometa", incarnation=None), 3).reason == "invalid"
    assert buf.add(make_tree("ok", (3, 3, 3), incarnation=2), 3).accepted
    assert buf.drop_counts["incarnation"] == 3 and buf.drop_counts["invalid"] == 1


def test_older_incarnation_on_shared_weights_accepted_when_resume_version_given():
    # resumed at version 10 (checkpoint); incarnation 1 had gone on to version 12 before dying
    buf = ReplayBuffer(cfg(max_staleness=4), incarnation=2, resume_version=10)
    assert buf.add(make_tree("shared", (9, 10, 10), incarnation=1), 11).accepted
    assert buf.add(make_tree("lost", (10, 11, 11), incarnation=1), 11).reason == "incarnation"
    assert buf.add(make_tree("tooold", (6, 10, 10), incarnation=1), 11).reason == "stale"  # 11 - 6 = 5 > 4


def test_capacity_evicts_oldest():
    drops: list[DropEvent] = []
    buf = ReplayBuffer(cfg(capacity=3), on_drop=drops.append)
    for i in range(5):
        assert buf.add(make_tree(f"t{i}"), 0).accepted
    assert len(buf) == 3
    assert buf.drop_counts["capacity"] == 2
    assert [e.tree_id for e in drops] == ["t0", "t1"]
    assert ids(buf.take(0, max_trees=10)) == ["t2", "t3", "t4"]


@pytest.mark.parametrize(
    "sampling, expected",
    [("oldest", ["t0", "t1"]), ("newest", ["t4", "t3"])],
)
def test_sampling_order(sampling, expected):
    buf = ReplayBuffer(cfg(sampling=sampling))
    for i in range(5):
        buf.add(make_tree(f"t{i}"), 0)
    assert ids(buf.take(0, max_trees=2)) == expected


def test_uniform_sampling_is_seeded_and_complete():
    def run(seed):
        buf = ReplayBuffer(cfg(sampling="uniform"), seed=seed)
        for i in range(8):
            buf.add(make_tree(f"t{i}"), 0)
        return [ids(buf.take(0, max_trees=3)) for _ in range(3)]

    first = run(1)
    assert first == run(1)
    flat = [t for batch in first for t in batch]
    assert sorted(flat) == [f"t{i}" for i in range(8)] and [len(b) for b in first] == [3, 3, 2]
    assert first != run(2)


def test_token_budget_batches():
    buf = ReplayBuffer(cfg(batch_trees=10, batch_tokens=25))
    # 11 tokens each (prompt 2 + 3 nodes x 3); a 40-token tree: prompt 4 + 3 nodes x 12
    buf.add(make_tree("a"), 0)
    buf.add(make_tree("b"), 0)
    buf.add(make_tree("big", prompt_len=4, seg_len=12), 0)
    for name in ("c", "d", "e"):
        buf.add(make_tree(name), 0)
    assert ids(buf.take(0)) == ["a", "b"]  # 22 tokens; +40 would exceed 25
    assert ids(buf.take(0)) == ["big"]  # over budget alone: a batch holds at least one tree
    assert ids(buf.take(0, max_tokens=None)) == ["c", "d", "e"]  # explicit None: no budget (33 > 25)
    assert buf.stats().tokens == 0


def test_take_waits_for_min_trees_and_returns_empty_on_timeout():
    buf = ReplayBuffer(cfg())
    buf.add(make_tree("a"), 0)
    assert buf.take(0, min_trees=2, timeout_s=0.05) == []
    assert len(buf) == 1  # nothing was taken
    threading.Timer(0.05, lambda: buf.add(make_tree("b"), 0)).start()
    assert ids(buf.take(0, min_trees=2, timeout_s=30.0)) == ["a", "b"]


def test_credits_bound_trees_in_flight():
    buf = ReplayBuffer(cfg(credits_per_actor=3, capacity=100))
    reg = buf.register_actor("a0")
    assert buf.in_flight("a0") == 0  # registered = pending: no credit until its weights are confirmed
    assert buf.grant("a0") == CreditGrant(reg, limit=3, settled=0, added=3)
    assert buf.grant("a0") == CreditGrant(reg, limit=3, settled=0, added=0)  # all 3 out: the same limit
    buf.add(make_tree("t0", sent=(reg, 1)), 0)  # consumes a credit, held in the buffer: still 3 in flight
    assert buf.in_flight("a0") == 3 and buf.grant("a0").added == 0
    buf.add(make_tree("t0", sent=(reg, 2)), 0)  # duplicate: dropped, its credit comes back
    assert buf.in_flight("a0") == 2
    assert buf.grant("a0") == CreditGrant(reg, limit=4, settled=1, added=1)  # settled: seq 2 (seq 1 is buffered)
    buf.take(0, max_trees=1)  # trained: frees one more
    assert buf.in_flight("a0") == 2 and buf.grant("a0") == CreditGrant(reg, limit=5, settled=2, added=1)
    assert buf.in_flight("a0") == 3
    # re-registration (actor restart): a new registration, no credit; the old one's trees are not its
    reg2 = buf.register_actor("a0")
    assert reg2 != reg and buf.in_flight("a0") == 0
    buf.add(make_tree("old", sent=(reg, 3)), 0)  # still on the way: kept, counted as uncredited
    assert buf.stats().uncredited == 1 and buf.in_flight("a0") == 1  # held: it counts against the share
    assert buf.grant("a0") == CreditGrant(reg2, limit=2, settled=0, added=2)
    assert buf.stats().uncredited == 1 and buf.stats().written_off == 0
    assert buf.grant("stranger") is None  # unregistered actors get nothing


def test_registration_ids_differ_across_incarnations():
    # a tree stamped by the previous learner must never pass for one of this learner's registrations
    first = {ReplayBuffer(cfg(), incarnation=i).register_actor("a0") for i in range(3)}
    assert len(first) == 3


def test_every_received_tree_spends_its_credit_refused_or_not():
    drops: list[DropEvent] = []
    buf = ReplayBuffer(cfg(credits_per_actor=2), on_drop=drops.append)
    reg = buf.register_actor("a0")
    assert buf.grant("a0").limit == 2
    buf.refuse(make_tree("p", sent=(reg, 1)), "incarnation")  # e.g. its actor was not yet confirmed
    buf.refuse(make_tree("q", sent=(reg, 2)), "invalid")  # e.g. too long to train
    assert buf.drop_counts["incarnation"] == 1 and buf.drop_counts["invalid"] == 1
    assert [(e.reason, e.tree_id, e.actor_id) for e in drops] == [("incarnation", "p", "a0"), ("invalid", "q", "a0")]
    # both credits were spent and nothing is held: the actor gets both back
    assert buf.in_flight("a0") == 0 and buf.grant("a0") == CreditGrant(reg, limit=4, settled=2, added=2)
    with pytest.raises(ValueError, match="unknown drop reason"):
        buf.refuse(make_tree("r", sent=(reg, 3)), "bogus")


def test_a_gap_in_seq_is_written_off_and_a_late_tree_is_uncredited():
    buf = ReplayBuffer(cfg(credits_per_actor=4))
    reg = buf.register_actor("a0")
    buf.grant("a0")
    buf.add(make_tree("t1", sent=(reg, 1)), 0)
    buf.add(make_tree("t4", sent=(reg, 4)), 0)  # 2 and 3 died on the way (in order per connection)
    s = buf.stats()
    assert (s.written_off, s.uncredited) == (2, 0)
    assert buf.in_flight("a0") == 2  # two held, none unused: the two lost come back as credits
    assert buf.grant("a0") == CreditGrant(reg, limit=6, settled=2, added=2)
    buf.add(make_tree("t3", sent=(reg, 3)), 0)  # written off, and here after all: kept, uncredited
    assert buf.stats().uncredited == 1 and len(buf) == 3


def test_reconcile_writes_off_a_tail_that_never_arrives():
    buf = ReplayBuffer(cfg(credits_per_actor=3))
    reg = buf.register_actor("a0")
    buf.grant("a0")
    buf.add(make_tree("t1", sent=(reg, 1)), 0)
    # the actor says it sent 3: two are on the way, or lost; only a gap that lasts (nothing sent,
    # nothing arrived) over three heartbeats in a row is written off
    assert buf.reconcile("a0", reg, 3) == 0
    assert buf.reconcile("a0", reg, 3) == 0
    buf.add(make_tree("t2", sent=(reg, 2)), 0)  # one arrives: the count starts over
    assert buf.reconcile("a0", reg, 3) == 0
    assert buf.reconcile("a0", reg, 3) == 0
    assert buf.grant("a0").added == 0  # the learner still counts seq 3 as on the way
    assert buf.reconcile("a0", reg, 3) == 1  # third quiet heartbeat: seq 3 is lost
    assert buf.stats().written_off == 1 and buf.grant("a0") == CreditGrant(reg, limit=4, settled=1, added=1)
    assert buf.reconcile("a0", reg + 1, 9) == 0 and buf.reconcile("b0", reg, 9) == 0  # not this registration
    assert buf.reconcile("a0", reg, 3) == 0  # nothing missing


def test_tree_without_credit_is_counted_but_kept():
    buf = ReplayBuffer(cfg())
    assert buf.add(make_tree("t", actor="unknown"), 0).accepted
    assert buf.stats().uncredited == 1


def test_shutdown_drains_and_refuses():
    drops: list[DropEvent] = []
    buf = ReplayBuffer(cfg(), on_drop=drops.append)
    buf.register_actor("a0")
    for i in range(3):
        buf.add(make_tree(f"t{i}"), 0)
    assert buf.drain_for_shutdown() == 3
    assert buf.add(make_tree("late"), 0).reason == "shutdown"
    assert buf.take(0, timeout_s=10.0) == []  # returns at once after shutdown
    assert buf.drop_counts["shutdown"] == 4
    assert buf.grant("a0").added == 0  # no credit after shutdown


def test_record_drop_for_wire_errors():
    drops: list[DropEvent] = []
    buf = ReplayBuffer(cfg(), on_drop=drops.append)
    buf.record_drop("invalid", actor_id="a1", count=2)
    assert buf.drop_counts["invalid"] == 2 and drops[0].count == 2
    with pytest.raises(ValueError, match="unknown drop reason"):
        buf.record_drop("bogus")


def test_oldest_age_and_version():
    now = [100.0]
    buf = ReplayBuffer(cfg(), clock=lambda: now[0])
    assert buf.oldest_age_s() == 0.0 and buf.oldest_version() is None
    buf.add(make_tree("a", (2, 3, 3)), 3)
    now[0] = 104.5
    buf.add(make_tree("b", (3, 3, 3)), 3)
    now[0] = 110.0
    assert buf.oldest_age_s() == 10.0 and buf.oldest_version() == 2


def test_concurrent_add_and_take_lose_nothing():
    # every added tree is either taken exactly once or dropped with a reason
    c = ReplayConfig(capacity=64, max_staleness=2, batch_trees=7, credits_per_actor=1000)
    drops: list[DropEvent] = []  # on_drop runs in both threads: list.append is atomic
    buf = ReplayBuffer(c, on_drop=drops.append)
    version = [0]
    added: list[str] = []
    taken: list[str] = []
    rng = np.random.default_rng(0)
    plan = [(f"t{i}", int(rng.integers(0, 3)), bool(rng.random() < 0.05)) for i in range(3000)]
    done = threading.Event()

    def producer():
        for tree_id, lag, dup in plan:
            v = version[0]
            tid = added[-1] if dup and added else tree_id
            buf.add(make_tree(tid, (max(0, v - lag),) * 3), v)
            if tid == tree_id:
                added.append(tid)
        done.set()

    def consumer():
        while not (done.is_set() and len(buf) == 0):
            batch = buf.take(version[0], timeout_s=0.01)
            taken.extend(ids(batch))
            if batch:
                version[0] += 1  # an optimizer step publishes a new version

    threads = [threading.Thread(target=producer), threading.Thread(target=consumer)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)

    dropped = [e.tree_id for e in drops if e.reason != "duplicate"]
    assert len(taken) == len(set(taken))  # taken at most once
    assert sorted(taken + dropped) == sorted(added)  # each distinct tree taken or dropped, once
    s = buf.stats()
    # every add() call ended one way: taken, or one counted drop (the buffer is empty now)
    assert len(buf) == 0 and s.taken == len(taken)
    assert len(plan) == s.taken + sum(s.drops.values())
    assert sum(s.drops.values()) == len(drops)
    assert set(s.drops) == set(DROP_REASONS)
    print(f"\nconcurrent run: taken {s.taken}, drops {s.drops}")
    assert len(taken) > 0 and s.drops["duplicate"] > 0


def test_sync_rounds_bound_the_grants_to_one_batch():
    buf = ReplayBuffer(cfg(credits_per_actor=8, capacity=100))
    buf.register_actor("a0")
    assert buf.grant("a0").added == 8  # no rounds: async
    with pytest.raises(ValueError, match="without rounds"):
        buf.top_up_round(["a0"], 5)
    buf2 = ReplayBuffer(cfg(credits_per_actor=8, capacity=100), rounds=True)
    reg = {a: buf2.register_actor(a) for a in ("a0", "a1")}

    def grants() -> dict[str, int]:
        return {a: n for a in ("a0", "a1") if (g := buf2.grant(a)) is not None and (n := g.added)}

    # nothing before the first round opens: such credits made trees the learner trained one
    # version later (a sync-mode system test caught it)
    assert grants() == {}
    assert buf2.top_up_round([], 5) == 0  # nobody to give it to
    assert buf2.top_up_round(["a0", "a1"], 5) == 5
    assert grants() == {"a0": 3, "a1": 2}  # the shortfall spread, first actor first
    assert grants() == {}  # nothing beyond the round, although credits_per_actor is 8
    for i in range(3):
        buf2.add(make_tree(f"x{i}", actor="a0", sent=(reg["a0"], i + 1)), 0)
    buf2.add(make_tree("x0", actor="a1", sent=(reg["a1"], 1)), 0)  # a duplicate: dropped, one tree short now
    # a0: 3 sent, 0 outstanding; a1: 1 credit left -> the lost tree goes to a0
    assert buf2.top_up_round(["a0", "a1"], 5) == 1 and grants() == {"a0": 1}
    buf2.forget_actor("a1")  # a1 left holding its last credit: it goes to a0
    assert buf2.top_up_round(["a0"], 5) == 1 and grants() == {"a0": 1}
    buf2.add(make_tree("x3", actor="a0", sent=(reg["a0"], 4)), 0)
    buf2.add(make_tree("x4", actor="a0", sent=(reg["a0"], 5)), 0)
    assert buf2.top_up_round(["a0"], 5) == 0  # the round is complete
    assert len(buf2.take(0, max_trees=5, min_trees=5)) == 5
    assert buf2.top_up_round(["a0"], 5) == 5 and grants() == {"a0": 5}  # the next round
    assert buf2.stats().uncredited == 0
    with pytest.raises(ValueError, match="target"):
        buf2.top_up_round(["a0"], 0)


@pytest.mark.parametrize("sampling", ["oldest", "newest"])
def test_random_operations_match_a_reference_model(sampling):
    """take / purge / eviction / drain against a plain list model of the rules, over 3,000 random
    operations: same batches, same drops, same oldest_version. The buffer walks only the batch and
    skips the stale scan when nothing is stale; the model scans everything every time."""
    rng = np.random.default_rng(7)
    c = cfg(capacity=12, max_staleness=2, sampling=sampling, batch_trees=4, batch_tokens=40)
    drops: list[DropEvent] = []
    buf = ReplayBuffer(c, on_drop=drops.append)
    model: list[tuple[str, int, int]] = []  # (tree_id, tokens, min version), arrival order
    model_drops: list[tuple[str, str]] = []
    v, serial = 0, 0
    for _ in range(3000):
        op = rng.integers(0, 10)
        if op < 6:  # add a tree made 0-3 versions ago, with 1-3 leaves and 2-4 token segments
            made = int(max(0, v - rng.integers(0, 4)))
            leaves = int(rng.integers(1, 4))
            tree = make_tree(f"t{serial}", (made,) + (made,) * leaves, seg_len=int(rng.integers(2, 5)))
            serial += 1
            result = buf.add(tree, v)
            if v - made > c.max_staleness:
                assert result.reason == "stale"
                model_drops.append(("stale", tree.tree_id))
                continue
            assert result.accepted
            model.append((tree.tree_id, tree_tokens(tree), made))
            if len(model) > c.capacity:
                model_drops.append(("capacity", model.pop(0)[0]))
        elif op < 9:  # take at the current version
            stale = [e for e in model if v - e[2] > c.max_staleness]
            model_drops += [("stale", e[0]) for e in stale]
            model = [e for e in model if e not in stale]
            order = model if sampling == "oldest" else model[::-1]
            want, total = [], 0
            for tid, tokens, _ in order:
                if len(want) == c.batch_trees or (want and total + tokens > c.batch_tokens):
                    break
                want.append(tid)
                total += tokens
            assert ids(buf.take(v)) == want
            model = [e for e in model if e[0] not in want]
        else:
            v += 1
        assert [(e.reason, e.tree_id) for e in drops] == model_drops
        assert len(buf) == len(model)
        assert buf.oldest_version() == min((e[2] for e in model), default=None)
        assert buf.stats().tokens == sum(e[1] for e in model)
    assert buf.drain_for_shutdown() == len(model)
    assert buf.oldest_version() is None and buf.stats().tokens == 0
