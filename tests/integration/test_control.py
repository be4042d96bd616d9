"""The learner's control plane over real ZeroMQ sockets: registration, credits, drop and rejoin."""

from __future__ import annotations

import time

import pytest

from common.config import ReplayConfig, TransportConfig
from common.transport import ActorEndpoints, LearnerEndpoints
from common.wire import Credit, Heartbeat, Register, Rejoin, Shutdown, Welcome
from learner.buffer import ReplayBuffer
from learner.control import ControlPlane, ControlState

WAIT = 5.0


def _register(actor: ActorEndpoints, actor_id: str, gpu_uuid: str = "") -> None:
    assert actor.send_control(Register(actor_id=actor_id, incarnation_seen=-1, version=-1, pid=1, hostname="h",
                                       engine="hf", vocab_size=99, has_cuda=bool(gpu_uuid), gpu_uuid=gpu_uuid),
                              timeout_s=WAIT)


def _heartbeat(actor: ActorEndpoints, actor_id: str, registration: int = -1) -> None:
    assert actor.send_control(Heartbeat(actor_id=actor_id, incarnation_seen=3, registration=registration, version=0,
                                        trees_sent=0, credits=0), timeout_s=WAIT)


def _recv(actor: ActorEndpoints, kind: type):
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        msg = actor.recv_control(0.2)
        if isinstance(msg, kind):
            return msg
    raise AssertionError(f"no {kind.__name__} within {WAIT} s")


@pytest.fixture
def plane():
    cfg = TransportConfig(data_port=0, control_port=0, linger_s=0.2)
    endpoints = LearnerEndpoints(cfg)
    buffer = ReplayBuffer(ReplayConfig(credits_per_actor=5), incarnation=3)
    control = ControlPlane(endpoints, buffer, ControlState(3, 7, "127.0.0.1", 1234), peer_timeout_s=60).start()
    actors: list[ActorEndpoints] = []

    def connect(actor_id: str) -> ActorEndpoints:
        actor = ActorEndpoints(cfg, actor_id, data_endpoint=endpoints.data_endpoint,
                               control_endpoint=endpoints.control_endpoint)
        actors.append(actor)
        return actor

    yield control, connect
    control.stop()
    for a in actors:
        a.close()
    endpoints.close()


def test_register_gets_welcome_and_credits_follow_the_weights(plane):
    control, connect = plane
    actor = connect("a0")
    _register(actor, "a0")
    welcome = _recv(actor, Welcome)
    assert (welcome.incarnation, welcome.version) == (3, 7)
    assert welcome.registration == (3 << 32) + 1  # unique across incarnations
    assert (welcome.rendezvous_host, welcome.rendezvous_port) == ("127.0.0.1", 1234)
    assert control.pending() == ["a0"]  # no credit until its weights are confirmed
    _heartbeat(actor, "a0", welcome.registration)
    assert _recv(actor, Credit) == Credit(incarnation=3, version=7, registration=welcome.registration, limit=0,
                                          settled=0)
    control.confirm("a0", 7)
    assert control.pending() == [] and control.is_member("a0")
    _heartbeat(actor, "a0", welcome.registration)
    assert _recv(actor, Credit).limit == 5


def test_the_learner_keeps_each_members_gpu_for_the_sync_backend(plane):
    control, connect = plane
    gpu = "GPU-8f1e2a3b-0c4d-5e6f-7a8b-9c0d1e2f3a4b"
    for actor_id, uuid in (("a0", gpu), ("a1", "")):  # a1: no GPU, or an older actor that sends none
        actor = connect(actor_id)
        _register(actor, actor_id, uuid)
        _recv(actor, Welcome)
    assert control.gpu_uuids(["a1", "a0", "gone"]) == ["", gpu, ""]
    assert control.all_have_cuda(["a0"]) and not control.all_have_cuda(["a0", "a1"])


def test_unknown_or_dropped_actor_is_told_to_rejoin(plane):
    control, connect = plane
    stranger = connect("stranger")
    _heartbeat(stranger, "stranger")  # never registered (e.g. it knew the previous learner)
    msg = _recv(stranger, Rejoin)
    assert msg.incarnation == 3
    actor = connect("a1")
    _register(actor, "a1")
    _recv(actor, Welcome)
    control.confirm("a1", 7)
    control.drop("a1", "failed a weight sync")  # alive, but out of the group
    assert control.member_ids() == []
    _heartbeat(actor, "a1")
    assert isinstance(_recv(actor, Rejoin), Rejoin)
    _register(actor, "a1")  # and it can come back, with a new registration
    assert _recv(actor, Welcome).registration == (3 << 32) + 2
    assert control.member_ids() == ["a1"] and control.pending() == ["a1"]


def test_register_under_another_identity_is_refused(plane):
    control, connect = plane
    actor = connect("real")
    _register(actor, "impostor")
    assert actor.recv_control(0.5) is None
    assert control.member_ids() == []


def test_actor_shutdown_leaves_the_group(plane):
    control, connect = plane
    actor = connect("a2")
    _register(actor, "a2")
    _recv(actor, Welcome)
    assert actor.send_control(Shutdown(reason="bye"), timeout_s=WAIT)
    deadline = time.monotonic() + WAIT
    while control.member_ids() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert control.member_ids() == []
