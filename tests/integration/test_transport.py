"""ZeroMQ endpoints over real loopback sockets: data, control, CURVE, bind policy, backpressure."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import zmq

from common.config import TransportConfig
from common.transport import ActorEndpoints, LearnerEndpoints, TransportError, generate_keys
from common.wire import Credit, Register, Welcome, WireError, decode_tree, encode_tree
from tests.support.treegen import random_tree

WAIT = 5.0  # generous receive timeout: a correct run returns as soon as the frame arrives


def _cfg(**kw) -> TransportConfig:
    return TransportConfig(data_port=0, control_port=0, linger_s=0.2, **kw)


def _actor(learner: LearnerEndpoints, cfg: TransportConfig, actor_id: str = "actor-0") -> ActorEndpoints:
    data = learner.data_endpoint.replace("0.0.0.0", "127.0.0.1")
    control = learner.control_endpoint.replace("0.0.0.0", "127.0.0.1")
    return ActorEndpoints(cfg, actor_id, data_endpoint=data, control_endpoint=control)


def _trees(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [random_tree(rng) for _ in range(n)]


def test_trees_flow_from_actor_to_learner_in_order():
    cfg = _cfg()
    with LearnerEndpoints(cfg) as learner, _actor(learner, cfg) as actor:
        assert learner.data_port > 0 and learner.control_port > 0
        assert learner.data_endpoint.startswith("tcp://127.0.0.1:")
        trees = _trees(5)
        for tree in trees:
            assert actor.send_tree(encode_tree(tree), timeout_s=WAIT)
        got = [decode_tree(learner.recv_tree(WAIT), vocab_size=50) for _ in trees]
        assert [t.tree_id for t in got] == [t.tree_id for t in trees]
        assert np.array_equal(got[3].nodes[0].token_ids, trees[3].nodes[0].token_ids)
        assert actor.trees_sent == 5 and actor.send_timeouts == 0
        zero_copy = learner.recv_tree(0.05, copy=False)
        assert zero_copy is None  # nothing left
        assert actor.send_tree(encode_tree(trees[0]), timeout_s=WAIT)
        view = learner.recv_tree(WAIT, copy=False)
        assert isinstance(view, memoryview) and decode_tree(view).tree_id == trees[0].tree_id


def test_garbage_on_the_data_socket_does_not_stop_the_receiver():
    cfg = _cfg()
    with LearnerEndpoints(cfg) as learner:
        ctx = zmq.Context()
        rogue = ctx.socket(zmq.PUSH)
        rogue.setsockopt(zmq.LINGER, 0)
        rogue.connect(learner.data_endpoint)
        good = _trees(1)[0]
        rogue.send(b"\x00garbage")
        rogue.send_multipart([encode_tree(good), b"second part"])
        rogue.send(encode_tree(good))
        with pytest.raises(WireError) as info:
            decode_tree(learner.recv_tree(WAIT))
        assert info.value.reason == "bad_magic"
        with pytest.raises(WireError) as info:
            learner.recv_tree(WAIT)
        assert info.value.reason == "malformed"
        assert decode_tree(learner.recv_tree(WAIT)).tree_id == good.tree_id
        rogue.close()
        ctx.term()


def test_control_round_trip_over_router_and_dealer():
    cfg = _cfg()
    with LearnerEndpoints(cfg) as learner, _actor(learner, cfg, "actor-7") as actor:
        reg = Register(actor_id="actor-7", incarnation_seen=-1, version=-1, pid=1, hostname="h", engine="hf",
                       vocab_size=50, has_cuda=False)
        assert actor.send_control(reg)
        identity, msg = learner.recv_control(WAIT)
        assert identity == b"actor-7" and msg == reg
        welcome = Welcome(incarnation=1, version=0, registration=(1 << 32) + 1,
                          rendezvous_host="127.0.0.1", rendezvous_port=29600)
        assert learner.send_control(identity, welcome)
        assert actor.recv_control(WAIT) == welcome
        # an actor that is not connected: refused, not silently dropped
        credit = Credit(incarnation=1, version=0, registration=1, limit=1, settled=0)
        assert not learner.send_control(b"nobody", credit, timeout_s=0.1)
        # garbage on the control plane raises WireError naming the sender; the next message arrives
        ctx = zmq.Context()
        rogue = ctx.socket(zmq.DEALER)
        rogue.setsockopt(zmq.LINGER, 0)
        rogue.setsockopt(zmq.ROUTING_ID, b"rogue")
        rogue.connect(learner.control_endpoint)
        rogue.send(b"junk")
        with pytest.raises(WireError) as info:
            learner.recv_control(WAIT)
        assert info.value.identity == b"rogue" and info.value.reason == "bad_magic"
        rogue.close()
        ctx.term()
        # after reconnect (fresh sockets, same routing id) the learner can still reach the actor
        actor.reconnect()
        assert actor.send_control(reg)
        identity, msg = learner.recv_control(WAIT)
        assert identity == b"actor-7"
        assert learner.send_control(identity, welcome)
        assert actor.recv_control(WAIT) == welcome


def test_curve_admits_allow_listed_actors_only(tmp_path):
    keys = tmp_path / "keys"
    generate_keys(keys, ["actor-0"])
    assert sorted(p.name for p in (keys / "actors").iterdir()) == ["actor-0.key"]  # public keys only
    # an intruder with a valid key pair that is not on the allow-list (but knows the server key)
    rogue_keys = tmp_path / "rogue"
    generate_keys(rogue_keys, ["actor-1"])
    shutil.copyfile(keys / "learner.key", rogue_keys / "learner.key")

    cfg = _cfg(curve=True, curve_dir=str(keys))
    with LearnerEndpoints(cfg) as learner:
        tree = _trees(1)[0]
        with _actor(learner, _cfg(curve=True, curve_dir=str(rogue_keys)), "actor-1") as intruder:
            # its handshake fails, so no connection comes up and nothing is queued (ZMQ_IMMEDIATE)
            assert not intruder.send_tree(encode_tree(tree), timeout_s=0.5)
            # may queue; never arrives
            intruder.send_control(Credit(incarnation=0, version=0, registration=1, limit=1, settled=0))
            assert learner.recv_tree(1.5) is None
            assert learner.recv_control(0.2) is None
        with _actor(learner, _cfg(), "plain") as plaintext:  # no CURVE at all
            plaintext.send_tree(encode_tree(tree), timeout_s=0.5)
            assert learner.recv_tree(1.0) is None
        with _actor(learner, cfg, "actor-0") as actor:
            assert actor.send_tree(encode_tree(tree), timeout_s=WAIT)
            assert decode_tree(learner.recv_tree(WAIT)).tree_id == tree.tree_id


def test_non_loopback_bind_needs_curve_or_insecure():
    with pytest.raises(TransportError, match="--insecure"):
        LearnerEndpoints(_cfg(bind_host="0.0.0.0"))
    cfg = _cfg(bind_host="0.0.0.0", insecure=True)
    with LearnerEndpoints(cfg) as learner, _actor(learner, cfg) as actor:
        assert learner.data_endpoint.startswith("tcp://0.0.0.0:")
        tree = _trees(1)[0]
        assert actor.send_tree(encode_tree(tree), timeout_s=WAIT)
        assert decode_tree(learner.recv_tree(WAIT)).tree_id == tree.tree_id


def test_backpressure_blocks_and_times_out_instead_of_dropping():
    cfg = _cfg(send_hwm=1, recv_hwm=1, max_message_bytes=2 * 2**20)
    frame = 2**20  # 1 MiB frames fill the socket buffers after a handful
    with LearnerEndpoints(cfg) as learner:
        actor = _actor(learner, cfg)
        with pytest.raises(ValueError, match="max_message_bytes"):
            actor.send_tree(bytes(3 * 2**20), timeout_s=0.1)
        sent = 0
        for i in range(300):  # the learner does not read: the queues must fill up
            if not actor.send_tree(bytes([i % 251]) * frame, timeout_s=0.2):
                break
            sent += 1
        else:
            pytest.fail("300 MiB were queued with HWM 1 and no reader: no backpressure")
        assert actor.send_timeouts == 1 and actor.trees_sent == sent and actor.blocked_seconds > 0
        received = []
        while (buf := learner.recv_tree(WAIT if len(received) < sent else 0.5)) is not None:
            received.append(buf)
        # every frame that send_tree accepted arrives, intact and in order; the refused one never does
        assert [b[0] for b in received] == [i % 251 for i in range(sent)]
        assert all(len(b) == frame and b.count(b[0]) == frame for b in received)
        # once drained, the actor can send again
        assert actor.send_tree(b"x" * 10, timeout_s=WAIT)
        assert learner.recv_tree(WAIT) == b"x" * 10
        actor.close()


def test_close_does_not_hang_with_undeliverable_frames():
    cfg = _cfg()
    with LearnerEndpoints(cfg) as learner:
        data, control = learner.data_endpoint, learner.control_endpoint
    # the learner is gone: trees and control frames are refused (no live connection: nothing is
    # parked for a learner that may never come back), and close() must still return
    actor = ActorEndpoints(cfg, "actor-0", data_endpoint=data, control_endpoint=control)
    for _ in range(3):
        assert not actor.send_tree(b"y" * 100, timeout_s=0.1)
    assert actor.send_timeouts == 3 and actor.trees_sent == 0
    assert not actor.send_control(Credit(incarnation=0, version=0, registration=1, limit=1, settled=0), timeout_s=0.1)
    actor.close()
