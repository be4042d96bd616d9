"""Credits never leak (design §5.6): the real control plane over real ZeroMQ sockets, the real
buffer and ingest, and the actor's real `Credits` + `TreeSender` -- whose data socket is a
stand-in that holds frames "in transit" until the test delivers or loses them. The test drives
the control plane itself (`poll_once`, `sweep`), so every interleaving is chosen, none timed.

The invariant, once a heartbeat has been answered: the actor's credits + its trees in the buffer
+ its trees in transit = credits_per_actor. Each scenario here broke it before its fix (issue 18:
a job stalled with every process alive).
"""

from __future__ import annotations

import threading

import pytest

from actor.credits import Credits, TreeSender
from common.config import ReplayConfig, TransportConfig
from common.metrics import ActorMetrics, LearnerMetrics, new_registry
from common.transport import ActorEndpoints, LearnerEndpoints
from common.wire import Credit, Heartbeat, Register, Rejoin, Welcome
from learner.buffer import ReplayBuffer
from learner.control import ControlPlane, ControlState
from learner.ingest import Ingest
from tests.support.treegen import tree_from_parents

WAIT = 5.0
C = 3  # replay.credits_per_actor
ACTOR = "a0"


class TransitNet:
    """The data socket, stood in: `send_tree` queues the frame in `transit` (or runs `on_send`
    first, e.g. to land a Welcome while the send blocks); the test delivers or loses frames."""

    def __init__(self) -> None:
        self.transit: list[bytes] = []
        self.blocked_seconds = 0.0
        self.on_send = None  # called with the frame; returns False: "the queue stayed full"

    def send_tree(self, buf: bytes, timeout_s: float) -> bool:
        if self.on_send is not None:
            hook, self.on_send = self.on_send, None
            if hook(buf) is False:
                return False
        self.transit.append(buf)
        return True


class Learner:
    """One learner's control plane, buffer and ingest, driven by the test (no control thread).
    `sent` counts the control messages it handed to ZeroMQ, so an actor can catch up exactly."""

    def __init__(self, incarnation: int = 3, *, longest_allowed: int = 10_000, clock=None) -> None:
        self.cfg = TransportConfig(data_port=0, control_port=0, linger_s=0.2)
        self.endpoints = LearnerEndpoints(self.cfg)
        self.sent = 0
        send = self.endpoints.send_control

        def counted(identity, msg, timeout_s: float = 1.0) -> bool:
            ok = send(identity, msg, timeout_s)
            self.sent += ok
            return ok

        self.endpoints.send_control = counted
        self.registry = new_registry()
        self.metrics = LearnerMetrics(self.registry)
        kw = {"clock": clock} if clock else {}
        self.buffer = ReplayBuffer(ReplayConfig(credits_per_actor=C, batch_trees=C), incarnation,
                                   on_drop=lambda ev: self.metrics.dropped(ev.reason, ev.count), **kw)
        self.control = ControlPlane(self.endpoints, self.buffer, ControlState(incarnation, 0, "127.0.0.1", 1),
                                    peer_timeout_s=600, metrics=self.metrics, stalled_after_s=10.0)
        self.ingest = Ingest(self.endpoints, self.buffer, self.control, self.metrics, vocab_size=50,
                             longest_allowed=longest_allowed, version=lambda: 0)

    def confirm(self) -> None:
        """What a successful weight sync does: confirm the member, then grant."""
        self.control.confirm(ACTOR, 0)
        self.control.sweep()

    def sample(self, name: str, labels: dict | None = None) -> float:
        return self.registry.get_sample_value(name, labels or {}) or 0.0

    def close(self) -> None:
        self.endpoints.close()


class Actor:
    """The actor's real credit state and sender, its control socket real, its data socket a TransitNet."""

    def __init__(self, learner: Learner) -> None:
        self.net = TransitNet()
        self.control = None
        self.credits = Credits()
        self.registry = new_registry()
        self.metrics = ActorMetrics(self.registry, ACTOR)
        self.sender = TreeSender(self.net, self.credits, self.metrics, threading.Event(), retry_s=0.0)
        self.seed = 0
        self.connect(learner)

    def connect(self, learner: Learner) -> None:
        if self.control is not None:
            self.control.close()
        self.control = ActorEndpoints(learner.cfg, ACTOR, data_endpoint=learner.endpoints.data_endpoint,
                                      control_endpoint=learner.endpoints.control_endpoint)
        self.received = 0

    def catch_up(self, learner: Learner, *, apply: bool = True) -> list:
        """Receive every message the learner has sent this actor so far; apply them as the actor does."""
        got = []
        while self.received < learner.sent:
            msg = self.control.recv_control(WAIT)
            assert msg is not None, f"{learner.sent - self.received} message(s) did not arrive within {WAIT} s"
            self.received += 1
            if apply and isinstance(msg, Welcome):
                self.credits.welcome(msg)
            elif apply and isinstance(msg, Credit):
                assert self.credits.credit(msg)
            got.append(msg)
        return got

    def tell(self, learner: Learner, msg) -> list:
        assert self.control.send_control(msg, timeout_s=WAIT)
        assert learner.control.poll_once(WAIT), "the control plane got no message"
        return self.catch_up(learner)

    def register(self, learner: Learner) -> Welcome:
        got = self.tell(learner, Register(actor_id=ACTOR, incarnation_seen=self.credits.incarnation, version=0,
                                          pid=1, hostname="h", engine="hf", vocab_size=50, has_cuda=False))
        assert isinstance(got[-1], Welcome)
        return got[-1]

    def heartbeat(self, learner: Learner) -> Credit | Rejoin:
        got = self.tell(learner, Heartbeat(actor_id=ACTOR, incarnation_seen=self.credits.incarnation, version=0,
                                           **self.credits.heartbeat_fields()))
        assert isinstance(got[-1], Credit | Rejoin)
        return got[-1]

    def make_tree(self, *, prompt_len: int = 3):
        self.seed += 1
        tree = tree_from_parents([-1, -1], {0: 1.0, 1: 0.0}, seg_len=2, prompt_len=prompt_len, seed=self.seed)
        tree.actor_id = ACTOR
        tree.meta["incarnation"] = self.credits.incarnation
        return tree

    def send(self, n: int = 1) -> None:
        for _ in range(n):
            assert self.credits.available > 0, "the actor starts a tree only with a credit in hand"
            assert self.sender.send(self.make_tree(), self.credits.incarnation)

    def lost(self, reason: str) -> float:
        return self.registry.get_sample_value("treerpo_actor_trees_lost_total",
                                              {"actor_id": ACTOR, "reason": reason}) or 0.0

    def close(self) -> None:
        self.control.close()


def deliver(actor: Actor, learner: Learner, n: int | None = None) -> list[str | None]:
    """Hand the first n frames in transit to the learner's ingest; their verdicts."""
    n = len(actor.net.transit) if n is None else n
    frames, actor.net.transit = actor.net.transit[:n], actor.net.transit[n:]
    return [learner.ingest.receive(f) for f in frames]


def invariant(actor: Actor, learner: Learner) -> tuple[int, int, int]:
    """(actor credits, buffered trees, trees in transit), after a heartbeat brought the actor up to date."""
    assert isinstance(actor.heartbeat(learner), Credit)
    return actor.credits.available, len(learner.buffer), len(actor.net.transit)


@pytest.fixture
def pair():
    made: list = []

    def make(*, with_actor: bool = True, **kw):
        """(actor, learner), or a learner alone."""
        learner = Learner(**kw)
        made.append(learner)
        if not with_actor:
            return learner
        actor = Actor(learner)
        made.append(actor)
        return actor, learner

    yield make
    for obj in reversed(made):
        obj.close()


def joined(make, **kw) -> tuple[Actor, Learner]:
    actor, learner = make(**kw)
    actor.register(learner)
    learner.confirm()
    actor.catch_up(learner)
    assert actor.credits.available == C
    return actor, learner


def test_no_credit_while_pending_and_a_tree_sent_then_spends_its_own(pair):
    actor, learner = pair()
    welcome = actor.register(learner)
    assert actor.credits.available == 0  # pending: Welcome carries no credit
    reply = actor.heartbeat(learner)
    assert (reply.registration, reply.limit) == (welcome.registration, 0)
    # a tree sent anyway while pending (one the actor held from before its re-registration):
    # refused, and it spends its credit on both sides (before: refused, its credit never came back)
    assert actor.sender.send(actor.make_tree(), actor.credits.incarnation)
    assert deliver(actor, learner) == ["incarnation"]
    assert learner.sample("treerpo_learner_trees_dropped_total", {"reason": "incarnation"}) == 1
    learner.confirm()
    actor.catch_up(learner)
    assert invariant(actor, learner) == (C, 0, 0)
    actor.send(C)
    assert deliver(actor, learner) == [None] * C
    assert invariant(actor, learner) == (0, C, 0)
    assert len(learner.buffer.take(0)) == C
    learner.control.sweep()
    assert invariant(actor, learner) == (C, 0, 0)


def test_a_too_long_tree_spends_its_credit(pair):
    actor, learner = joined(pair, longest_allowed=12)
    actor.send(2)  # 3 prompt + 2 generated tokens each
    long_tree = actor.make_tree(prompt_len=20)
    assert actor.sender.send(long_tree, actor.credits.incarnation)
    assert invariant(actor, learner) == (0, 0, 3)
    assert deliver(actor, learner) == [None, None, "invalid"]
    assert invariant(actor, learner) == (C - 2, 2, 0)


def test_a_tree_sent_across_a_reregistration_is_charged_to_neither(pair):
    actor, learner = joined(pair)
    actor.send(1)
    learner.control.drop(ACTOR, "failed a weight sync")  # alive, but out of the group

    def rejoin_meanwhile(buf) -> None:  # while the next send blocks: Rejoin, then a new Welcome
        assert isinstance(actor.heartbeat(learner), Rejoin)
        assert actor.credits.lose() == 1  # (the actor counts it only if the learner itself is gone)
        actor.register(learner)

    actor.net.on_send = rejoin_meanwhile
    old = actor.credits.registration
    tree = actor.make_tree()
    assert actor.sender.send(tree, actor.credits.incarnation)
    assert tree.meta["registration"] == old != actor.credits.registration
    assert actor.credits.sent == 0  # the frame went out stamped with the old registration: not charged
    assert deliver(actor, learner) == ["incarnation", "incarnation"]  # pending: refused, charged to neither
    assert learner.buffer.stats().uncredited == 2
    learner.confirm()
    actor.catch_up(learner)
    assert invariant(actor, learner) == (C, 0, 0)


@pytest.mark.parametrize("queued", [False, True], ids=["gives-up", "queued-with-the-old-stamp"])
def test_a_tree_made_for_a_learner_that_restarted_spends_nothing_of_the_new_one(pair, queued):
    actor, old = joined(pair)
    new = pair(with_actor=False, incarnation=4)

    def restart_meanwhile(buf) -> bool:  # while a send blocks, the learner restarts and welcomes it
        actor.connect(new)
        actor.credits.lose()
        actor.register(new)
        return queued  # False: "the queue stayed full", and the next try sees the new incarnation

    actor.net.on_send = restart_meanwhile
    sent = actor.sender.send(actor.make_tree(), old.control.state.incarnation)
    assert actor.credits.sent == 0  # never charged to the new learner's registration
    if queued:  # out with the old learner's stamp: the new one refuses it and charges nobody
        assert sent and deliver(actor, new) == ["incarnation"] and new.buffer.stats().uncredited == 1
    else:  # given up and counted
        assert not sent and actor.lost("incarnation") == 1 and actor.net.transit == []
    new.confirm()
    actor.catch_up(new)
    assert invariant(actor, new) == (C, 0, 0)


def test_a_lost_tail_is_written_off_by_the_heartbeats(pair):
    actor, learner = joined(pair)
    actor.send(C)
    assert deliver(actor, learner, 1) == [None]
    actor.net.transit.clear()  # the other two die with their connection
    assert len(learner.buffer.take(0, min_trees=1)) == 1
    learner.control.sweep()
    # the learner counts 2 trees on the way, the actor holds 1 credit: one short of the share
    # until the third quiet heartbeat in a row writes the two off (before: short for good)
    assert invariant(actor, learner) == (1, 0, 0)
    assert invariant(actor, learner) == (1, 0, 0)
    assert invariant(actor, learner) == (C, 0, 0)
    assert learner.buffer.stats().written_off == 2
    assert learner.sample("treerpo_learner_credits_written_off_total") == 2


def test_a_gap_a_wire_error_and_a_lost_credit_are_made_good(pair):
    actor, learner = joined(pair)
    actor.send(C)
    actor.net.transit = actor.net.transit[2:]
    assert deliver(actor, learner) == [None]  # seq 3 arrives: 1 and 2 were lost on the way
    assert learner.buffer.stats().written_off == 2
    assert len(learner.buffer.take(0, min_trees=1)) == 1
    learner.control.sweep()  # grants 3 more (this Credit never reaches the actor), counts the gap
    assert learner.sample("treerpo_learner_credits_written_off_total") == 2
    assert [type(m) for m in actor.catch_up(learner, apply=False)] == [Credit]
    assert actor.credits.available == 0
    assert invariant(actor, learner) == (C, 0, 0)  # the heartbeat's Credit restates the limit
    # a frame that does not decode cannot be charged to anyone: the heartbeats settle it
    actor.send(1)
    assert learner.ingest.receive(actor.net.transit.pop()[:-8]) == "invalid"
    assert learner.sample("treerpo_learner_wire_errors_total", {"reason": "malformed"}) == 1
    assert [invariant(actor, learner) for _ in range(3)] == [(C - 1, 0, 0), (C - 1, 0, 0), (C, 0, 0)]


def test_a_lost_learner_counts_trees_not_credits(pair):
    actor, learner = pair()
    actor.register(learner)
    assert actor.credits.lose() == 0  # pending, nothing sent: nothing lost (it counted C before)
    actor, learner = joined(pair)
    actor.send(2)
    deliver(actor, learner)
    assert len(learner.buffer.take(0, min_trees=1, max_trees=1)) == 1
    learner.control.sweep()
    actor.catch_up(learner)
    assert (actor.credits.sent, actor.credits.settled) == (2, 1)
    assert actor.credits.lose() == 1  # the buffered one died with the learner


def test_a_stall_is_reported_and_cleared():
    now = [100.0]
    learner = Learner(clock=lambda: now[0])
    actor = Actor(learner)
    try:
        actor.register(learner)
        learner.confirm()
        actor.catch_up(learner)
        # a leak no count can see (an actor that lost its credits): it says it holds none
        actor.credits.limit = 0
        actor.heartbeat(learner)
        assert learner.buffer.take(0, timeout_s=0) == []  # the learner waits in vain from now on
        now[0] += 9.0
        learner.control.sweep()
        assert learner.control.stalled is False  # 9 s < stalled_after_s
        now[0] += 1.0
        learner.control.sweep()
        assert learner.control.stalled is True
        assert learner.sample("treerpo_learner_credit_stall") == 1
        assert learner.sample("treerpo_learner_credit_stalls_total") == 1
        learner.control.sweep()
        assert learner.sample("treerpo_learner_credit_stalls_total") == 1  # one stall, counted once
        actor.send(1)  # the heartbeat's Credit restored the actor's limit
        deliver(actor, learner)  # a tree arrives: no longer stalled
        learner.control.sweep()
        assert learner.control.stalled is False and learner.sample("treerpo_learner_credit_stall") == 0
    finally:
        actor.close()
        learner.close()
