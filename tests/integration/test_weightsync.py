"""Weight sync between real processes: gloo broadcasts, ZeroMQ control, a SIGKILLed actor, rogue
clients of the rendezvous store.

The learner side runs in this process (WeightPublisher + a ZeroMQ ROUTER); each actor is a
subprocess running tests/support/weightsync_actor.py (a DEALER + WeightReceiver + a tiny HF model
loaded with from_pretrained); a rogue is a subprocess running tests/support/rogue_store.py (a
store client holding nothing the control plane hands out). Announce and ack travel as
common.wire control messages. The zero-copy install and seal tests run learner and receiver in
threads of this process, over real gloo.
Bucket layout, checksums and swap_in validation are unit-tested in tests/unit/test_weightsync.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zmq
from transformers import AutoModelForCausalLM

from actor.engine import Engine, EngineError, GenerationRequest, Installed
from actor.engines import make_engine
from common.config import ActorConfig, ModelConfig, WeightsConfig
from common.wire import Register, Shutdown, WeightAck, decode_message, encode_message
from tests.support.models import hf_engine
from tests.support.paths import REPO
from tests.support.sync import sync_weights
from weightsync.buckets import broadcast_bucket, wait_work
from weightsync.errors import Deadline, WeightSyncError
from weightsync.group import connect_store, make_group, wait_group_drops
from weightsync.layout import flatten_into
from weightsync.publisher import WeightPublisher
from weightsync.receiver import WeightReceiver
from weightsync.seal import make_seal, new_secret, tensor_checksum

ACTOR_SCRIPT = REPO / "tests" / "support" / "weightsync_actor.py"
ROGUE_SCRIPT = REPO / "tests" / "support" / "rogue_store.py"
TEST_TIMEOUT_S = 120.0  # the test's own generous bound on any single wait


# ============================================================================================
# Integration harness: learner in this process, actors as subprocesses
# ============================================================================================
class Learner:
    """Publisher + ROUTER, driving announce -> broadcast -> ack as the learner process will."""

    def __init__(self, model_dir: Path, bucket_mb: float, timeout_s: float):
        self.model = AutoModelForCausalLM.from_pretrained(str(model_dir))
        self.version = 0
        cfg = WeightsConfig(backend="gloo", rendezvous_port=0, bucket_mb=bucket_mb, timeout_s=timeout_s)
        self.pub = WeightPublisher(cfg, "127.0.0.1")
        self.ctx = zmq.Context()
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.router.setsockopt(zmq.LINGER, 0)
        self.router.bind("tcp://127.0.0.1:0")
        self.endpoint = self.router.getsockopt_string(zmq.LAST_ENDPOINT)

    def recv(self, timeout_s: float):
        if not self.router.poll(int(timeout_s * 1000)):
            return None
        identity, payload = self.router.recv_multipart()
        return identity.decode(), decode_message(payload)

    def wait_registered(self, ids: set[str]) -> None:
        seen: set[str] = set()
        end = time.monotonic() + TEST_TIMEOUT_S
        while seen != ids and time.monotonic() < end:
            got = self.recv(1.0)
            if got is not None and isinstance(got[1], Register):
                seen.add(got[0])
        assert seen == ids, f"registered {seen}, expected {ids}"

    def send(self, actor_id: str, msg) -> None:
        self.router.send_multipart([actor_id.encode(), encode_message(msg)])

    def train_step(self) -> None:
        """Stand-in for an optimizer step: every parameter moves, version += 1."""
        with torch.no_grad():
            for p in self.model.parameters():
                p.add_(torch.randn_like(p) * 0.01)
        self.version += 1

    def sync(self, members: list[str], pause=None):
        """Announce, broadcast, collect acks; returns (PreparedSync, SyncResult, {actor: WeightAck}).

        pause: (k, fn) calls fn() before the k-th tensor is handed over (a slow ZeRO-3 gather)."""
        sync = self.pub.prepare(self.pub.plan(self.model.named_parameters(), self.version), members)
        for actor_id, announce in zip(sync.members, sync.announcements, strict=True):
            self.send(actor_id, announce)

        def tensors():
            for i, item in enumerate(self.model.named_parameters()):
                if pause is not None and i == pause[0]:
                    pause[1]()
                yield item

        result = self.pub.broadcast(sync, tensors())
        acks: dict[str, WeightAck] = {}
        waiting = set(result.ok_members) | set(result.aborted_members)
        end = time.monotonic() + TEST_TIMEOUT_S
        while waiting - set(acks) and time.monotonic() < end:
            got = self.recv(1.0)
            if got is not None and isinstance(got[1], WeightAck) and got[1].sync_id == sync.sync_id:
                acks[got[0]] = got[1]
        return sync, result, acks

    def close(self) -> None:
        self.router.close(0)
        self.ctx.term()


def _spawn_actor(endpoint: str, actor_id: str, model_dir: Path, out_dir: Path, stall_after: int = -1):
    cmd = [sys.executable, str(ACTOR_SCRIPT), "--endpoint", endpoint, "--actor-id", actor_id,
           "--model", str(model_dir), "--out", str(out_dir), "--stall-after", str(stall_after)]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return subprocess.Popen(cmd, env=env)


def _end(procs) -> None:
    for p in procs:
        if p.poll() is None:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()  # by pid: only processes this test started
                p.wait()


def _learner_params(learner: Learner) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in learner.model.named_parameters()}


def _assert_actor_equals(out_dir: Path, actor_id: str, version: int, expected: dict[str, torch.Tensor]) -> None:
    dumped = torch.load(out_dir / f"{actor_id}_v{version}.pt")
    assert set(dumped) == set(expected)
    for name, t in expected.items():
        assert torch.equal(dumped[name].view(torch.int32), t.view(torch.int32)), name


@pytest.fixture(autouse=True)
def no_group_teardown_left_over():
    """Group teardowns and abandoned gloo constructions run in daemon threads of this process and
    end by themselves (within 5x their group's timeout); `wait_group_drops` waits for all of them.
    Each test starts and ends with none pending, so a test that measures its own (the mid-rendezvous
    one) never waits for another test's, and one that leaves a teardown hanging fails itself."""
    assert wait_group_drops(TEST_TIMEOUT_S), "a group teardown from before this test did not end"
    yield
    assert wait_group_drops(TEST_TIMEOUT_S), "this test left a group teardown that did not end"


@pytest.fixture
def models(make_tiny_model):
    # Same architecture, different init per process (~110K float32 parameters).
    return {k: make_tiny_model(seed=s, max_position_embeddings=64) for k, s in (("learner", 0), ("a0", 1), ("a1", 2))}


def test_sync_two_actors_bit_exact(models, tmp_path):
    torch.set_num_threads(1)
    out = tmp_path / "out"
    out.mkdir()
    learner = Learner(models["learner"], bucket_mb=4.0, timeout_s=60.0)
    procs = [_spawn_actor(learner.endpoint, a, models[a], out) for a in ("a0", "a1")]
    try:
        learner.wait_registered({"a0", "a1"})
        learner.train_step()  # version 1: differs from every saved init
        sync, result, acks = learner.sync(["a0", "a1"])
        assert result.ok and result.ok_members == ["a0", "a1"] and result.failed_members == []
        assert result.bytes == sync.plan.nbytes == sum(p.numel() * 4 for p in learner.model.parameters())
        independent = tensor_checksum(learner.model.named_parameters())
        assert result.checksum == independent
        for a in ("a0", "a1"):
            assert acks[a].ok and acks[a].version == 1 and acks[a].checksum == independent, acks[a]
            assert learner.pub.check_ack(sync, result, acks[a]) is None
        expected = _learner_params(learner)
        for a in ("a0", "a1"):
            _assert_actor_equals(out, a, 1, expected)
    finally:
        for a in ("a0", "a1"):
            learner.send(a, Shutdown(reason="test done"))
        _end(procs)
        learner.close()
    assert [p.returncode for p in procs] == [0, 0]


def test_sync_survives_sigkill_and_restarted_actor_catches_up(models, tmp_path):
    torch.set_num_threads(1)
    out = tmp_path / "out"
    out.mkdir()
    flag = out / "a1_stalled"
    # Buckets of 16 KiB: the embedding (102 x 64 floats = 26 KB) goes alone, then ~10 more buckets.
    learner = Learner(models["learner"], bucket_mb=1 / 64, timeout_s=30.0)
    a0 = _spawn_actor(learner.endpoint, "a0", models["a0"], out)
    a1 = _spawn_actor(learner.endpoint, "a1", models["a1"], out, stall_after=0)
    procs = [a0, a1]

    def kill_when_stalled() -> None:  # SIGKILL a1 once its first bucket arrived and it stalls
        end = time.monotonic() + TEST_TIMEOUT_S
        while not flag.exists() and time.monotonic() < end:
            time.sleep(0.01)
        os.kill(a1.pid, signal.SIGKILL)

    killer = threading.Thread(target=kill_when_stalled, daemon=True)
    try:
        learner.wait_registered({"a0", "a1"})
        learner.train_step()
        killer.start()
        # The learner hands over the first half of the tensors (bucket 0 goes out), then waits for
        # a1's death before the rest, so later buckets certainly meet a dead peer.
        half = len(list(learner.model.parameters())) // 2
        _, result, acks = learner.sync(["a0", "a1"], pause=(half, lambda: killer.join(TEST_TIMEOUT_S)))
        assert flag.exists() and a1.wait(TEST_TIMEOUT_S) == -signal.SIGKILL
        # The sync returned (before the test's own bound), failed, and blamed only the dead actor.
        assert not result.ok and result.reason in ("actor_lost", "timeout")
        assert result.failed_members == ["a1"] and result.aborted_members == ["a0"]
        assert not acks["a0"].ok and acks["a0"].error  # a0 is alive and says the sync failed

        # The learner goes on: next version, the surviving actor only.
        learner.train_step()
        sync, result, acks = learner.sync(["a0"])
        assert result.ok and acks["a0"].ok and acks["a0"].version == 2
        assert acks["a0"].checksum == result.checksum == tensor_checksum(learner.model.named_parameters())
        _assert_actor_equals(out, "a0", 2, _learner_params(learner))

        # A restarted a1 registers later and gets the current weights (version 2) before anything else.
        a1b = _spawn_actor(learner.endpoint, "a1", models["a1"], out)
        procs.append(a1b)
        learner.wait_registered({"a1"})
        sync, result, acks = learner.sync(["a1"])
        assert result.ok and acks["a1"].ok and acks["a1"].version == 2
        assert acks["a1"].checksum == tensor_checksum(learner.model.named_parameters())
        _assert_actor_equals(out, "a1", 2, _learner_params(learner))
    finally:
        for a in ("a0", "a1"):
            try:
                learner.send(a, Shutdown(reason="test done"))
            except Exception:  # noqa: BLE001 - a dead actor's identity is unroutable
                pass
        _end(procs)
        learner.close()
    assert a0.returncode == 0 and procs[-1].returncode == 0


# ============================================================================================
# Zero-copy install (HFEngine.swap_in): learner and receiver in threads of this process, real gloo
# ============================================================================================
def _publisher(**kw):
    # 4 KiB buckets and solo >= 8 KiB: the 64x64 and larger matrices (16 KiB+) go straight from
    # their own memory, norms and biases are flattened together: both learner paths run.
    cfg = WeightsConfig(backend="gloo", rendezvous_port=0, bucket_mb=4 / 1024, timeout_s=kw.pop("timeout_s", 30.0))
    return WeightPublisher(cfg, "127.0.0.1", solo_bytes=8 << 10)


def _sync_threads(pub, model, receiver, engine, version: int, tensors=None, swap: bool = True):
    """One sync: broadcast here, receive in a thread with swap_fn=engine.swap_in (or copy only).
    Returns (SyncResult or the exception broadcast raised, receiver's (checksum, s) or its error)."""
    sync = pub.prepare(pub.plan(model.named_parameters(), version), ["a"])
    got: dict[str, object] = {}

    def actor() -> None:
        try:
            got["ok"] = receiver.receive(
                sync.announcements[0], lambda named: engine.load_weights(named, version),
                read_back=engine.named_parameters_for_sync,
                swap_fn=(lambda named: engine.swap_in(named, version)) if swap else None)
        except WeightSyncError as e:
            got["err"] = e

    thread = threading.Thread(target=actor, daemon=True)
    thread.start()
    try:
        result = pub.broadcast(sync, tensors if tensors is not None else model.named_parameters())
    except ValueError as e:
        result = e
    thread.join(TEST_TIMEOUT_S)
    assert not thread.is_alive(), "the receiver did not return"
    return result, got.get("ok", got.get("err"))


def _bits(named) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone().view(torch.int32) for n, t in named}


def _step(model, scale: float = 0.01) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)


def test_publish_confirms_right_acks_and_drops_the_rest_with_their_reasons(models):
    # the whole sync on the learner's side (WeightPublisher.publish: broadcast, then the acks until
    # the deadline); each member an HF engine taking part through the Engine protocol
    # (receive_weights -> Installed). a acks what it installed; b acks a checksum it does not hold;
    # c installs but never acks (an ack of another sync is discarded)
    torch.set_num_threads(1)
    learner = AutoModelForCausalLM.from_pretrained(str(models["learner"]))
    _step(learner)
    engines = {m: hf_engine(models["a0" if m != "b" else "a1"]) for m in ("a", "b", "c")}
    assert all(isinstance(e, Engine) for e in engines.values())
    pub = _publisher(timeout_s=3.0)
    sync = pub.prepare(pub.plan(learner.named_parameters(), 1), ["a", "b", "c"])
    acks: queue.Queue = queue.Queue()
    acks.put(WeightAck(actor_id="c", sync_id=sync.sync_id + 1, version=0, ok=True, checksum="0" * 32,
                       load_seconds=0.0, error=""))
    installed: dict[str, Installed] = {}

    def member(m: str, announce) -> None:
        got = installed[m] = engines[m].receive_weights(announce)
        if m != "c":
            acks.put(WeightAck(actor_id=m, sync_id=announce.sync_id, version=announce.version, ok=True,
                               checksum=got.checksum if m == "a" else "f" * 32, load_seconds=got.seconds, error=""))

    threads = [threading.Thread(target=member, args=(m, a), daemon=True)
               for m, a in zip(sync.members, sync.announcements, strict=True)]
    for t in threads:
        t.start()
    outcome = pub.publish(sync, learner.named_parameters(), acks)
    for t in threads:
        t.join(TEST_TIMEOUT_S)
    sent = tensor_checksum(learner.named_parameters())
    assert outcome.result.ok and outcome.result.checksum == sent
    assert outcome.confirmed == ["a"] and outcome.kept == []
    assert outcome.dropped == {"b": "checksum", "c": "timeout"}
    assert outcome.acks == {"a": {"problem": None, "checksum": sent},
                            "b": {"problem": "checksum", "checksum": "f" * 32}}
    for m in ("a", "b", "c"):  # every engine installed what was sent; the acks decided
        assert installed[m].checksum == sent and installed[m].pause_s is None
        assert engines[m].version == 1 and tensor_checksum(engines[m].named_parameters_for_sync()) == sent
    pub.close()


def test_a_sync_that_leaves_a_parameter_out_installs_nothing_on_the_hf_engine(models):
    # before: the HF engine adopted what came and kept its old final norm under the new version
    # (nothing checked that a sync covers the model; the checksum covers only what was sent)
    torch.set_num_threads(1)
    learner = AutoModelForCausalLM.from_pretrained(str(models["learner"]))
    _step(learner)
    engine = hf_engine(models["a0"])
    held = _bits(engine.named_parameters_for_sync())
    left_out = "model.norm.weight"
    named = [(n, p) for n, p in learner.named_parameters() if n != left_out]
    assert len(named) == len(held) - 1
    pub = _publisher()
    _, result, err = sync_weights(engine, pub, named, 1)
    assert result.ok  # all that was announced arrived, sealed
    assert isinstance(err, WeightSyncError) and err.reason == "load" and left_out in str(err), err
    assert engine.version == 0
    now = _bits(engine.named_parameters_for_sync())
    assert all(torch.equal(now[n], held[n]) for n in held)
    pub.close()


def test_swap_install_bit_exact_zero_copy_ping_pong_and_tied(models):
    torch.set_num_threads(1)
    learner = AutoModelForCausalLM.from_pretrained(str(models["learner"]))
    engine = hf_engine(models["a0"])
    pub, receiver = _publisher(), WeightReceiver()
    sets_seen = []
    for version in (1, 2, 3):
        _step(learner)
        expected = tensor_checksum(learner.named_parameters())
        before = tensor_checksum(engine.named_parameters_for_sync())
        seen = []
        # Mid-sync (after each bucket), the engine still holds exactly the previous version: a
        # sync never writes into the buffer set the engine adopted from the last one.
        receiver.on_bucket = lambda b, n, seen=seen: seen.append(tensor_checksum(engine.named_parameters_for_sync()))
        result, (checksum, _) = _sync_threads(pub, learner, receiver, engine, version)
        assert result.ok and receiver.last_swapped and engine.version == version
        assert seen and set(seen) == {before}
        assert checksum == result.checksum == expected
        assert _bits(engine.named_parameters_for_sync()).keys() == _bits(learner.named_parameters()).keys()
        for name, bits in _bits(learner.named_parameters()).items():
            assert torch.equal(_bits(engine.named_parameters_for_sync())[name], bits), name
        model = engine.model
        assert model.lm_head.weight is model.get_input_embeddings().weight  # still one tied Parameter
        # Zero-copy: every parameter lives in one of the receiver's staging buffers.
        ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
        live = {buf.untyped_storage().data_ptr() for buf in receiver._sets[receiver._live].values()}
        assert ptrs <= live
        sets_seen.append(receiver._live)
    assert sets_seen == [0, 1, 0]  # ping-pong between two sets


class _PostFails:
    """A process group whose `broadcast` raises when posting the `fail_at`-th one (0-based), as a
    non-blocking NCCL communicator that failed to form does (DistBackendError); the rest delegates."""

    def __init__(self, pg, fail_at: int):
        self._pg, self._left = pg, fail_at

    def broadcast(self, tensors, opts):
        if self._left == 0:
            raise torch.distributed.DistBackendError("NCCL error in: ProcessGroupNCCL.cpp: unhandled system error")
        self._left -= 1
        return self._pg.broadcast(tensors, opts)

    def __getattr__(self, name):
        return getattr(self._pg, name)


@pytest.mark.parametrize("side", ["learner", "actor"])
def test_a_broadcast_that_fails_to_post_fails_the_sync_and_nothing_else(models, monkeypatch, side):
    # issue 21 (2): pg.broadcast() itself raising was re-raised as a crash (learner: dies and
    # restarts into the same error; actor: no 'alive, failed' report). Now it is a failed sync
    # (peer_lost) on the side it happens, the other side fails by the group closing or the deadline,
    # the engine keeps its weights, and the next sync goes through bit-exact.
    import weightsync.publisher  # noqa: PLC0415 -- patched below
    import weightsync.receiver  # noqa: PLC0415

    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(str(models["learner"]))
    engine = hf_engine(models["a0"])
    pub, receiver = _publisher(timeout_s=5.0), WeightReceiver()
    held = _bits(engine.named_parameters_for_sync())
    module = weightsync.publisher if side == "learner" else weightsync.receiver
    real = module.make_group
    monkeypatch.setattr(module, "make_group", lambda *a, **kw: _PostFails(real(*a, **kw), fail_at=1))
    _step(model)
    result, err = _sync_threads(pub, model, receiver, engine, 1, swap=False)
    assert not isinstance(result, BaseException) and not result.ok, result
    assert isinstance(err, WeightSyncError) and err.reason in ("peer_lost", "timeout"), err
    if side == "learner":
        assert result.reason == "actor_lost" and "posting the broadcast failed" in result.error
    else:
        assert err.reason == "peer_lost" and "posting the broadcast failed" in str(err)
    now = _bits(engine.named_parameters_for_sync())
    assert engine.version == 0 and all(torch.equal(now[n], held[n]) for n in held)
    monkeypatch.setattr(module, "make_group", real)
    result, (checksum, _) = _sync_threads(pub, model, receiver, engine, 2)
    assert result.ok and engine.version == 2 and checksum == tensor_checksum(model.named_parameters())
    pub.close()
    receiver.close()


def test_swap_failed_sync_leaves_engine_untouched_then_recovers(models):
    torch.set_num_threads(1)
    learner = AutoModelForCausalLM.from_pretrained(str(models["learner"]))
    engine = hf_engine(models["a0"])
    pub, receiver = _publisher(), WeightReceiver()
    _step(learner)
    result, _ = _sync_threads(pub, learner, receiver, engine, 1)  # engine now holds set 0
    assert result.ok and receiver.last_swapped
    held = _bits(engine.named_parameters_for_sync())

    # Version 2 fails midway: the learner's iterator breaks after half the tensors (buckets
    # already on the wire were received into set 1), the group closes, the receiver fails.
    _step(learner)
    params = list(learner.named_parameters())

    def broken():
        yield from params[: len(params) // 2]
        raise ValueError("gather failed")

    result, err = _sync_threads(pub, learner, receiver, engine, 2, tensors=broken())
    assert isinstance(result, ValueError) and isinstance(err, WeightSyncError)
    assert err.reason in ("peer_lost", "timeout")
    assert engine.version == 1 and receiver._live == 0
    now = _bits(engine.named_parameters_for_sync())
    assert now.keys() == held.keys() and all(torch.equal(now[n], held[n]) for n in held)
    assert engine.model.lm_head.weight is engine.model.get_input_embeddings().weight

    # The next sync of version 2 succeeds, bit-exact.
    result, (checksum, _) = _sync_threads(pub, learner, receiver, engine, 2)
    assert result.ok and engine.version == 2 and checksum == tensor_checksum(learner.named_parameters())



def test_swap_declined_falls_back_to_copy_and_swap_error_is_a_load_failure(models, tmp_path):
    torch.set_num_threads(1)
    learner = AutoModelForCausalLM.from_pretrained(str(models["learner"]))
    _step(learner)
    # A bfloat16 engine cannot adopt float32 buckets: swap_in declines, load_weights converts.
    engine = make_engine(ModelConfig(path=str(models["a0"]), device="cpu", dtype="bfloat16"), ActorConfig())
    pub, receiver = _publisher(), WeightReceiver()
    result, (checksum, _) = _sync_threads(pub, learner, receiver, engine, 1)
    assert result.ok and not receiver.last_swapped and receiver._live is None and engine.version == 1
    held = dict(engine.named_parameters_for_sync())
    for name, p in learner.named_parameters():
        assert held[name].dtype == torch.bfloat16 and torch.equal(held[name], p.detach().to(torch.bfloat16)), name
    assert checksum == tensor_checksum(held.items()) != result.checksum  # the learner would flag "checksum"

    # checksum_received (vLLM: no read-back under the sent names): the checksum is of what
    # arrived, i.e. the learner's float32 weights, although the engine converted them.
    sync = pub.prepare(pub.plan(learner.named_parameters(), 1), ["a"])
    got = []
    thread = threading.Thread(target=lambda: got.append(receiver.receive(
        sync.announcements[0], lambda named: engine.load_weights(named, 1), checksum_received=True)), daemon=True)
    thread.start()
    result = pub.broadcast(sync, learner.named_parameters())
    thread.join(TEST_TIMEOUT_S)
    assert result.ok and got[0][0] == result.checksum == tensor_checksum(learner.named_parameters())

    # A swap_fn that raises: WeightSyncError('load'), the engine keeps its weights and version,
    # and the buffer set it was handed is never received into again.
    engine32 = hf_engine(models["a1"])
    before = tensor_checksum(engine32.named_parameters_for_sync())
    sync = pub.prepare(pub.plan(learner.named_parameters(), 2), ["a"])
    errors = []

    def failing_swap(named):
        raise EngineError("no room")

    def actor():
        try:
            receiver.receive(sync.announcements[0], lambda named: engine32.load_weights(named, 2),
                             read_back=engine32.named_parameters_for_sync, swap_fn=failing_swap)
        except WeightSyncError as e:
            errors.append(e)

    thread = threading.Thread(target=actor, daemon=True)
    thread.start()
    assert pub.broadcast(sync, learner.named_parameters()).ok
    thread.join(TEST_TIMEOUT_S)
    assert len(errors) == 1 and errors[0].reason == "load" and "no room" in str(errors[0])
    assert engine32.version == 0 and tensor_checksum(engine32.named_parameters_for_sync()) == before
    assert receiver._sets[0] == {}


def test_stream_across_swap_matches_stream_across_copy(models):
    """Two engines with the same init and seed run the same continuous-batching stream; between
    steps one installs new weights by swap (through a real sync), the other by load_weights
    (copy). Every sample must be identical: a swap between steps is a weight load like any other."""
    torch.set_num_threads(1)
    learner = AutoModelForCausalLM.from_pretrained(str(models["learner"]))
    _step(learner, 0.05)
    swapped, copied = hf_engine(models["a0"]), hf_engine(models["a0"])
    req = lambda text: GenerationRequest(  # noqa: E731
        context=swapped.tokenizer.encode(text), n=2, max_tokens=12, temperature=1.0)
    streams = [e.open_stream(seed=11) for e in (swapped, copied)]
    outs: list[list] = [[], []]
    for stream in streams:
        stream.add(req("1+2="), tag="a")
    for _ in range(4):
        for k, stream in enumerate(streams):
            outs[k] += stream.step()
    pub, receiver = _publisher(), WeightReceiver()
    result, (checksum, _) = _sync_threads(pub, learner, receiver, swapped, 1)
    assert result.ok and receiver.last_swapped and checksum == result.checksum
    copied.load_weights(learner.named_parameters(), version=1)
    for stream in streams:
        stream.add(req("3*4="), tag="b")
    while any(s.busy() for s in streams):
        for k, stream in enumerate(streams):
            outs[k] += stream.step()
    assert len(outs[0]) == len(outs[1]) == 4
    for x, y in zip(*outs, strict=True):
        assert (x.tag, x.index, x.version, x.sample.finish) == (y.tag, y.index, y.version, y.sample.finish)
        assert np.array_equal(x.sample.token_ids, y.sample.token_ids)
        assert np.array_equal(x.sample.logprobs.view(np.int32), y.sample.logprobs.view(np.int32))
    assert {f.version for f in outs[0] if f.tag == "b"} == {1}
    # generate() after the swap also matches the copy-loaded engine.
    seeded = GenerationRequest(context=swapped.tokenizer.encode("7-5="), n=3, max_tokens=10, seed=5)
    a, b = swapped.generate([seeded])[0], copied.generate([seeded])[0]
    assert len(a) == len(b) == 3
    for x, y in zip(a, b, strict=True):
        assert np.array_equal(x.token_ids, y.token_ids) and np.array_equal(x.logprobs, y.logprobs)


_EXIT_DURING_DROP = """
import sys, time
from weightsync.group import drop_group_later

class SlowTeardown:  # stands in for a gloo group: its destructor takes a while
    def __del__(self):
        time.sleep(0.5)
        open(sys.argv[1], "w").write("torn down")

drop_group_later([SlowTeardown()])
# exit at once, while the drop thread is inside the teardown
"""


def test_exiting_interpreter_joins_pending_group_drops(tmp_path):
    # Without the atexit join, finalization freezes the daemon drop thread mid-teardown (a real
    # gloo group destroyed that way aborts the process): the marker would never be written.
    marker = tmp_path / "torn_down"
    proc = subprocess.run([sys.executable, "-c", _EXIT_DURING_DROP, str(marker)], capture_output=True, text=True,
                          timeout=60, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert marker.read_text() == "torn down"


def _receive_thread(pub, model, receiver, version: int, epoch):
    """One sync with `epoch` (group reuse); the receiver stages only. (prepared, result, (checksum, s), staged)."""
    sync = pub.prepare(pub.plan(model.named_parameters(), version), ["a"], epoch=epoch)
    got: dict[str, object] = {}
    staged: list = []
    thread = threading.Thread(target=lambda: got.update(ok=receiver.receive(
        sync.announcements[0], staged.extend, checksum_received=True)), daemon=True)
    thread.start()
    result = pub.broadcast(sync, model.named_parameters())
    thread.join(TEST_TIMEOUT_S)
    return sync, result, got.get("ok"), staged


def test_group_is_reused_while_membership_is_unchanged(models):
    """One communicator per membership, not per sync: the same members and epoch reuse the last
    sync's group on both sides (no rendezvous); a new epoch (a member re-registered) builds a new one."""
    torch.set_num_threads(1)
    learner = AutoModelForCausalLM.from_pretrained(str(models["learner"]))
    pub, receiver = _publisher(), WeightReceiver()
    groups, kept = [], []
    for version, epoch in ((1, "e1"), (2, "e1"), (3, "e1"), (4, "e2"), (5, "e2")):
        sync, result, (checksum, _), _ = _receive_thread(pub, learner, receiver, version, epoch)
        assert result.ok and checksum == result.checksum
        groups.append((sync.group, sync.reuse))
        kept.append(receiver._group[1][0])  # the process group object the receiver keeps
    assert [reuse for _, reuse in groups] == [False, True, True, False, True]
    assert groups[0][0] == groups[1][0] == groups[2][0] != groups[3][0] == groups[4][0]
    assert kept[0] is kept[1] is kept[2] and kept[3] is kept[4] and kept[2] is not kept[3]
    # without an epoch (as before): a fresh group every sync
    a, b = (_receive_thread(pub, learner, receiver, v, None)[0] for v in (6, 7))
    assert not a.reuse and not b.reuse and a.group != b.group
    pub.close()
    receiver.close()


def test_bounded_device_ring_stages_on_host(models):
    """`stage_on_host` (the vLLM worker on a GPU): buckets pass through a ring of at most
    MAX_IN_FLIGHT wire buffers and are staged in host memory; the checksum is of what arrived.
    On CPU the ring is forced (`ring=True`): the same code path as over NCCL."""
    from weightsync.buckets import MAX_IN_FLIGHT  # noqa: PLC0415 -- one constant for this test

    torch.set_num_threads(1)
    learner = AutoModelForCausalLM.from_pretrained(str(models["learner"]))
    pub, receiver = _publisher(), WeightReceiver(stage_on_host=True, ring=True)
    for version in (1, 2):
        _step(learner)
        sync, result, (checksum, _), staged = _receive_thread(pub, learner, receiver, version, "e")
        assert result.ok and len(sync.plan.buckets) > 2 * MAX_IN_FLIGHT
        assert checksum == result.checksum == tensor_checksum(learner.named_parameters())
        assert tensor_checksum(staged) == checksum  # the staged copies are bit-exact
        slots = {slot for slot, _ in receiver._ring}
        assert slots <= set(range(MAX_IN_FLIGHT))  # bounded: never a buffer per bucket on the wire device
        ring_ptrs = {buf.untyped_storage().data_ptr() for buf in receiver._ring.values()}
        assert not ring_ptrs & {t.untyped_storage().data_ptr() for _, t in staged}  # staged apart from the ring
    pub.close()
    receiver.close()


# ============================================================================================
# Rogue clients of the rendezvous store: they reach its port but hold nothing CURVE hands out
# ============================================================================================
ROGUE_TIMEOUT_S = 8.0  # the sync deadline in these tests (weights.timeout_s)


def _spawn_rogue(mode: str, port: int, out_dir: Path, model_dir: Path | None = None):
    cmd = [sys.executable, str(ROGUE_SCRIPT), "--mode", mode, "--port", str(port), "--out", str(out_dir),
           "--bucket-mb", str(1 / 64)] + (["--model", str(model_dir)] if model_dir else [])
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    with open(out_dir / f"rogue_{mode}.log", "w") as log:  # torch logs every connection it drops
        return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)


def _kill(proc) -> None:
    if proc.poll() is None:
        proc.kill()  # by pid: only the rogue this test started
    proc.wait()


def _wait_for(path: Path, proc) -> None:
    end = time.monotonic() + TEST_TIMEOUT_S
    while not path.exists() and proc.poll() is None and time.monotonic() < end:
        time.sleep(0.02)
    assert path.exists(), f"{path.name} never appeared (rogue exit code {proc.poll()})"


def _collect_acks(learner: Learner, acks: dict[int, WeightAck], sync_ids, timeout_s: float = TEST_TIMEOUT_S):
    """Gather WeightAcks by sync id until every one of sync_ids has come (or the test's bound)."""
    end = time.monotonic() + timeout_s
    while not set(sync_ids) <= set(acks) and time.monotonic() < end:
        got = learner.recv(0.5)
        if got is not None and isinstance(got[1], WeightAck):
            acks[got[1].sync_id] = got[1]
    assert set(sync_ids) <= set(acks), f"acks of syncs {sorted(set(sync_ids) - set(acks))} never came"


def _announce(learner: Learner, members: list[str]):
    sync = learner.pub.prepare(learner.pub.plan(learner.model.named_parameters(), learner.version), members)
    for actor_id, announce in zip(sync.members, sync.announcements, strict=True):
        learner.send(actor_id, announce)
    return sync


def _assert_learners_weights_or_none(out: Path, actor_id: str, version: int, ack: WeightAck, result,
                                     learner: Learner) -> None:
    """The guarantee under attack: an actor installs the learner's weights, verified by checksum,
    or nothing at all (it saves OUT/<actor>_v<version>.pt only after a successful receive)."""
    if ack.ok:
        assert result.ok and ack.checksum == result.checksum == tensor_checksum(learner.model.named_parameters())
        _assert_actor_equals(out, actor_id, version, _learner_params(learner))
    else:
        assert not (out / f"{actor_id}_v{version}.pt").exists(), f"{actor_id} installed v{version} and failed it"


@contextlib.contextmanager
def _rogue_job(models, tmp_path, mode: str, rogue_model: Path | None = None):
    """A learner, actor a0 (registered) and a rogue store client in `mode`: yields (learner, out, rogue);
    ends all three after, and checks the actor exited cleanly."""
    torch.set_num_threads(1)
    out = tmp_path / "out"
    out.mkdir()
    learner = Learner(models["learner"], bucket_mb=1 / 64, timeout_s=ROGUE_TIMEOUT_S)
    actor = _spawn_actor(learner.endpoint, "a0", models["a0"], out)
    rogue = _spawn_rogue(mode, learner.pub.port, out, rogue_model)
    try:
        learner.wait_registered({"a0"})
        yield learner, out, rogue
    finally:
        _kill(rogue)
        learner.send("a0", Shutdown(reason="test done"))
        _end([actor])
        learner.close()
    assert actor.returncode == 0


def test_a_rogue_impersonating_the_learner_gets_nothing_installed(models, tmp_path):
    """A rogue finds the group in the store as soon as the actor's gloo address appears, joins it as
    rank 0 before the learner does and broadcasts weights of its own. The actor installs nothing
    (the rogue's store values lack the sync's MAC), the learner's own part ends by its deadline
    and keeps the actor (its failure report carries the MAC), and the next sync succeeds."""
    acks: dict[int, WeightAck] = {}
    with _rogue_job(models, tmp_path, "impersonate", models["a0"]) as (learner, out, rogue):
        _wait_for(out / "rogue_ready", rogue)
        learner.train_step()
        # the rogue has the whole stage: the learner joins only once the actor has answered
        sync = _announce(learner, ["a0"])
        _collect_acks(learner, acks, [sync.sync_id])
        t0 = time.monotonic()
        result = learner.pub.broadcast(sync, learner.model.named_parameters())
        assert time.monotonic() - t0 < ROGUE_TIMEOUT_S + 2.0
        _assert_learners_weights_or_none(out, "a0", 1, acks[sync.sync_id], result, learner)
        assert not acks[sync.sync_id].ok and "[forged]" in acks[sync.sync_id].error, acks[sync.sync_id]
        assert not result.ok and result.aborted_members == ["a0"] and result.failed_members == []
        assert not (out / "rogue_sent").exists()  # the actor never took a bucket from it

        _kill(rogue)
        learner.train_step()
        sync, result, got = learner.sync(["a0"])
        assert result.ok and got["a0"].ok and got["a0"].version == 2
        _assert_learners_weights_or_none(out, "a0", 2, got["a0"], result, learner)


def test_a_vandal_in_the_store_can_fail_syncs_but_never_change_installed_weights(models, tmp_path):
    """A rogue rewrites, deletes, compare_sets and adds to every key it sees, pre-seeds the names the
    old scheme would use next, floods keys and holds idle, half-sent and blocked connections.
    Each sync ends by its deadline with the learner's weights (checksum verified) or nothing
    installed; once the rogue is gone the next sync succeeds."""
    acks: dict[int, WeightAck] = {}
    with _rogue_job(models, tmp_path, "vandal") as (learner, out, rogue):
        _wait_for(out / "rogue_holding", rogue)
        results, groups = {}, set()
        for pause in (0.0, 0.5, 1.5):  # how long the actor's keys stand alone in the store
            learner.train_step()
            sync = _announce(learner, ["a0"])
            groups.add(sync.group)
            time.sleep(pause)
            t0 = time.monotonic()
            results[sync.sync_id] = (learner.version, learner.pub.broadcast(sync, learner.model.named_parameters()))
            assert time.monotonic() - t0 < ROGUE_TIMEOUT_S + 2.0
            _collect_acks(learner, acks, [sync.sync_id])  # the actor ends its part by its own deadline
            version, result = results[sync.sync_id]
            _assert_learners_weights_or_none(out, "a0", version, acks[sync.sync_id], result, learner)
        assert rogue.poll() is None, "the rogue died: the attack did not run the whole time"
        end = time.monotonic() + TEST_TIMEOUT_S  # it found every sync's group (its counts lag by <= 0.2 s)
        while not groups <= set(json.loads((out / "vandal.json").read_text())["groups"]) and time.monotonic() < end:
            time.sleep(0.1)
        seen = json.loads((out / "vandal.json").read_text())
        assert groups <= set(seen["groups"]) and seen["overwritten"] and seen["deleted"], seen
        _kill(rogue)

        learner.train_step()
        sync, result, got = learner.sync(["a0"])
        assert result.ok and got["a0"].ok
        _assert_learners_weights_or_none(out, "a0", learner.version, got["a0"], result, learner)


def test_idle_half_sent_and_waiting_store_clients_do_not_hold_up_a_sync(models, tmp_path):
    """The store serves every connection from one event loop: clients that connect and say nothing,
    send half a frame, or block on keys that never come do not delay the learner's rendezvous."""
    with _rogue_job(models, tmp_path, "hang") as (learner, out, rogue):
        _wait_for(out / "rogue_holding", rogue)
        learner.train_step()
        sync, result, got = learner.sync(["a0"])
        assert result.ok and got["a0"].ok and result.seconds < ROGUE_TIMEOUT_S / 2
        _assert_learners_weights_or_none(out, "a0", 1, got["a0"], result, learner)
        assert rogue.poll() is None  # its connections were held the whole time


def _rank0_in_the_middle(pub, sync, named, *, flip: bool, seal_secret: str, sealed_checksum: str) -> None:
    """Rank 0 of sync's group as a man in the middle of a hijacked connection would be: the
    learner's layout and (optionally bit-flipped) bytes, then a seal of its choosing."""
    pg = make_group("127.0.0.1", pub.port, sync.group, 0, 2, 30.0, secret=sync.secret, store=pub.store)
    params = dict(named)
    for b, (first, end, count) in enumerate(sync.plan.buckets):
        flat = flatten_into(torch.empty(count), [params[n].detach() for n in sync.plan.names[first:end]])
        if flip and b == len(sync.plan.buckets) // 2:
            flat.view(torch.int32)[count // 2] ^= 1  # one bit, changed in transit
        wait_work(broadcast_bucket(pg, flat, Deadline(30.0), f"bucket {b}"), Deadline(30.0), "gloo", "mitm")
    seal = torch.frombuffer(bytearray(make_seal(seal_secret, sync.sync_id, sync.plan.version, sealed_checksum)),
                            dtype=torch.uint8)
    wait_work(broadcast_bucket(pg, seal, Deadline(30.0), "seal"), Deadline(30.0), "gloo", "mitm")


@pytest.mark.parametrize("receiver_checksum", [True, False])
def test_the_seal_refuses_bytes_changed_in_transit_and_a_seal_made_without_the_secret(models, receiver_checksum):
    """Whatever reached the group, the actor installs only what the learner sealed: one flipped bit
    under the learner's seal, or the learner's bytes under a seal made with another secret, fail
    the sync ('forged') with the engine untouched. The receiver hashes what arrived to check it
    even when its own weights.checksum is off."""
    torch.set_num_threads(1)
    learner = AutoModelForCausalLM.from_pretrained(str(models["learner"]))
    _step(learner)
    engine = hf_engine(models["a0"])
    held = _bits(engine.named_parameters_for_sync())
    pub, receiver = _publisher(), WeightReceiver(checksum=receiver_checksum)
    genuine = tensor_checksum(learner.named_parameters())
    for flip, seal_secret in ((True, None), (False, new_secret())):
        sync = pub.prepare(pub.plan(learner.named_parameters(), 1), ["a"])
        got: dict[str, object] = {}

        def actor(sync=sync, got=got) -> None:
            try:
                got["ok"] = receiver.receive(sync.announcements[0], lambda named: engine.load_weights(named, 1),
                                             read_back=engine.named_parameters_for_sync,
                                             swap_fn=lambda named: engine.swap_in(named, 1))
            except WeightSyncError as e:
                got["err"] = e

        thread = threading.Thread(target=actor, daemon=True)
        thread.start()
        _rank0_in_the_middle(pub, sync, learner.named_parameters(), flip=flip,
                             seal_secret=seal_secret or sync.secret, sealed_checksum=genuine)
        thread.join(TEST_TIMEOUT_S)
        assert isinstance(got.get("err"), WeightSyncError) and got["err"].reason == "forged", got
        now = _bits(engine.named_parameters_for_sync())
        assert engine.version == 0 and all(torch.equal(now[n], held[n]) for n in held)
    # the learner's own sync goes through, bit-exact
    result, (checksum, _) = _sync_threads(pub, learner, receiver, engine, 1)
    assert result.ok and engine.version == 1 and result.checksum == genuine
    assert checksum == (genuine if receiver_checksum else "")  # the ack's proof is this side's choice
    pub.close()
    receiver.close()


def test_a_peer_that_left_mid_rendezvous_costs_a_gloo_group_no_more_than_its_deadline():
    # gloo retries its connections: a side waiting for a peer that wrote its address and then left
    # (gave up, died, or had a key deleted under it) would wait 5x the group's timeout
    store = connect_store("127.0.0.1", 0, 10.0, is_master=True)
    for attempt in range(2):
        secret, name = new_secret(), f"left{attempt}"
        with pytest.raises(WeightSyncError):  # rank 1 writes its address and gives up
            make_group("127.0.0.1", store.port, name, 1, 2, 0.3, secret=secret,
                       store=connect_store("127.0.0.1", store.port, 10.0))
        assert wait_group_drops(10.0)  # ... for good: its gloo gave up too
        t0 = time.monotonic()
        with pytest.raises(WeightSyncError, match=r"\[(timeout|rendezvous)\]"):
            make_group("127.0.0.1", store.port, name, 0, 2, 0.5, secret=secret, store=store)
        assert time.monotonic() - t0 < 1.0
    assert wait_group_drops(10.0)  # the abandoned constructions end by themselves
