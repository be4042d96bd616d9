"""Weight sync: bucket layout and checksum units, and real-process syncs (gloo + ZeroMQ control).

The integration tests run the learner side in this process (WeightPublisher + a ZeroMQ ROUTER) and
each actor as a subprocess running this file's `__main__` (a DEALER + WeightReceiver + a tiny HF
model loaded with from_pretrained). Announce and ack travel as common.wire control messages.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from common.weightsync import (
    WeightSyncError,
    check_layout,
    drop_group_later,
    flatten_into,
    plan_layout,
    tensor_checksum,
    unflatten,
    wait_group_drops,
)

REPO = Path(__file__).resolve().parents[1]
TEST_TIMEOUT_S = 120.0  # the test's own generous bound on any single wait


# ============================================================================================
# Units: layout, flatten, checksum
# ============================================================================================
def test_layout_groups_by_dtype_and_splits_by_size():
    f32, bf16 = torch.float32, torch.bfloat16
    meta = [("a", [10], f32), ("b", [3, 2], bf16), ("c", [100], f32), ("d", [5], f32), ("e", [4], bf16),
            ("f", [2, 2], f32)]
    plan = plan_layout(meta, bucket_bytes=64, version=7)
    # dtype groups in order of first appearance: f32 (a, c, d, f) then bf16 (b, e).
    assert plan.names == ["a", "c", "d", "f", "b", "e"]
    # f32, 64 B = 16 elements per bucket: a (10) alone since a + c = 110 > 16; c (100) is larger
    # than a bucket -> its own; d (5) + f (4) = 9 <= 16 share one. bf16, 32 elements per bucket:
    # b (6) + e (4) = 10 share one.
    assert plan.buckets == [[0, 1, 10], [1, 2, 100], [2, 4, 9], [4, 6, 10]]
    assert plan.dtypes == ["float32"] * 4 + ["bfloat16"] * 2
    assert plan.nbytes == (10 + 100 + 9) * 4 + 10 * 2
    assert plan.offsets() == [0, 0, 0, 5, 0, 6]
    assert plan.bucket_of() == [0, 1, 2, 2, 3, 3]
    # The receiver's validation accepts exactly this layout ...
    again = check_layout(plan.names, plan.shapes, plan.dtypes, plan.buckets, 7)
    assert again.buckets == plan.buckets and again.names == plan.names
    # ... and refuses a bucket that mixes dtypes, skips a parameter or lies about numel.
    for buckets in ([[0, 5, 125], [5, 6, 4]], [[0, 1, 10], [2, 4, 9], [4, 6, 10]],
                    [[0, 1, 10], [1, 2, 99], [2, 4, 9], [4, 6, 10]]):
        with pytest.raises(WeightSyncError) as e:
            check_layout(plan.names, plan.shapes, plan.dtypes, buckets)
        assert e.value.reason == "invalid_announce"


def test_layout_is_deterministic_and_one_bucket_when_large():
    meta = [(f"p{i}", [i + 1, 3], torch.float32) for i in range(20)]
    one = plan_layout(meta, bucket_bytes=1 << 30, version=0)
    assert one.buckets == [[0, 20, 3 * sum(range(1, 21))]]  # 3 * 210 = 630 elements
    assert plan_layout(meta, 100, 0) == plan_layout(list(meta), 100, 0)
    with pytest.raises(ValueError, match="twice"):
        plan_layout(meta + [("p0", [1], torch.float32)], 100, 0)


def test_layout_solo_bytes_gives_large_tensors_their_own_bucket():
    f32 = torch.float32
    meta = [("a", [3], f32), ("b", [8], f32), ("c", [2], f32), ("d", [1], f32), ("e", [9], f32), ("f", [2], f32)]
    plan = plan_layout(meta, bucket_bytes=1 << 20, version=0, solo_bytes=32)
    # solo_bytes 32 = 8 float32: b (8) and e (9) stand alone, cutting the run of small ones:
    # [a] [b] [c d] [e] [f]; without solo_bytes everything fits one 1 MiB bucket.
    assert plan.buckets == [[0, 1, 3], [1, 2, 8], [2, 4, 3], [4, 5, 9], [5, 6, 2]]
    assert plan_layout(meta, 1 << 20, 0).buckets == [[0, 6, 25]]
    assert check_layout(plan.names, plan.shapes, plan.dtypes, plan.buckets).buckets == plan.buckets
    with pytest.raises(ValueError, match="solo_bytes"):
        plan_layout(meta, 1 << 20, 0, solo_bytes=0)


def test_flatten_unflatten_round_trip_bit_exact():
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(3, 4, generator=g).to(torch.bfloat16), torch.randn(7, generator=g).to(torch.bfloat16),
               torch.randn(2, 1, 5, generator=g).to(torch.bfloat16), torch.zeros(0, 3, dtype=torch.bfloat16)]
    buf = flatten_into(torch.empty(12 + 7 + 10, dtype=torch.bfloat16), tensors)
    views = unflatten(buf, [list(t.shape) for t in tensors])
    for t, v in zip(tensors, views):
        assert v.shape == t.shape and torch.equal(v.view(torch.int16), t.view(torch.int16))
    assert views[1].data_ptr() == buf.data_ptr() + 12 * 2  # views, not copies
    with pytest.raises(ValueError):
        flatten_into(torch.empty(5, dtype=torch.bfloat16), tensors)


def test_checksum_bit_sensitive_and_order_independent():
    g = torch.Generator().manual_seed(1)
    named = [("w", torch.randn(4, 4, generator=g)), ("b", torch.randn(4, generator=g).to(torch.bfloat16))]
    base = tensor_checksum(named)
    assert base == tensor_checksum(list(reversed(named)))  # sorted by name internally
    assert base == tensor_checksum([(n, t.clone()) for n, t in named])
    for name, t in named:  # flip the lowest bit of one element: a different checksum
        flipped = t.clone()
        ints = flipped.view(torch.int32 if t.dtype == torch.float32 else torch.int16).reshape(-1)
        ints[3] ^= 1
        assert tensor_checksum([(n, flipped if n == name else u) for n, u in named]) != base
    # Same bytes, other name / dtype / shape: different checksums.
    assert tensor_checksum([("w2", named[0][1]), named[1]]) != base
    assert tensor_checksum([("w", named[0][1].view(torch.int32)), named[1]]) != base
    assert tensor_checksum([("w", named[0][1].reshape(2, 8)), named[1]]) != base
    # -0.0 and 0.0 compare equal as floats but differ in bits.
    assert tensor_checksum([("z", torch.tensor([0.0]))]) != tensor_checksum([("z", torch.tensor([-0.0]))])


# ============================================================================================
# Integration harness: learner in this process, actors as subprocesses
# ============================================================================================
class Learner:
    """Publisher + ROUTER, driving announce -> broadcast -> ack as the learner process will."""

    def __init__(self, model_dir: Path, bucket_mb: float, timeout_s: float):
        import zmq
        from transformers import AutoModelForCausalLM

        from common.config import WeightsConfig
        from learner.weights import WeightPublisher

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
        from common.wire import decode_message

        if not self.router.poll(int(timeout_s * 1000)):
            return None
        identity, payload = self.router.recv_multipart()
        return identity.decode(), decode_message(payload)

    def wait_registered(self, ids: set[str]) -> None:
        from common.wire import Register

        seen: set[str] = set()
        end = time.monotonic() + TEST_TIMEOUT_S
        while seen != ids and time.monotonic() < end:
            got = self.recv(1.0)
            if got is not None and isinstance(got[1], Register):
                seen.add(got[0])
        assert seen == ids, f"registered {seen}, expected {ids}"

    def send(self, actor_id: str, msg) -> None:
        from common.wire import encode_message

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
        from common.wire import WeightAck

        sync = self.pub.prepare(self.pub.plan(self.model.named_parameters(), self.version), members)
        for actor_id, announce in zip(sync.members, sync.announcements):
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
    cmd = [sys.executable, str(Path(__file__).resolve()), "--endpoint", endpoint, "--actor-id", actor_id,
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


@pytest.fixture
def models(tmp_path):
    from treerpo.tinymodel import build_tiny_model

    # Same architecture, different init per process (~110K float32 parameters).
    return {k: build_tiny_model(tmp_path / k, seed=s, max_position_embeddings=64)
            for k, s in (("learner", 0), ("a0", 1), ("a1", 2))}


@pytest.mark.integration
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
        from common.wire import Shutdown

        for a in ("a0", "a1"):
            learner.send(a, Shutdown(reason="test done"))
        _end(procs)
        learner.close()
    assert [p.returncode for p in procs] == [0, 0]


@pytest.mark.integration
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
        from common.wire import Shutdown

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
def _hf_engine(model_dir: Path):
    from actor.engine import make_engine
    from common.config import ActorConfig, ModelConfig

    return make_engine(ModelConfig(path=str(model_dir), device="cpu"), ActorConfig())


def _publisher(**kw):
    from common.config import WeightsConfig
    from learner.weights import WeightPublisher

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


@pytest.mark.integration
def test_swap_install_bit_exact_zero_copy_ping_pong_and_tied(models):
    from transformers import AutoModelForCausalLM

    from actor.weights import WeightReceiver

    torch.set_num_threads(1)
    learner = AutoModelForCausalLM.from_pretrained(str(models["learner"]))
    engine = _hf_engine(models["a0"])
    pub, receiver = _publisher(), WeightReceiver()
    sets_seen = []
    for version in (1, 2, 3):
        _step(learner)
        expected = tensor_checksum(learner.named_parameters())
        before = tensor_checksum(engine.named_parameters_for_sync())
        seen = []
        # Mid-sync (after each bucket), the engine still holds exactly the previous version: a
        # sync never writes into the buffer set the engine adopted from the last one.
        receiver.on_bucket = lambda b, n: seen.append(tensor_checksum(engine.named_parameters_for_sync()))
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


@pytest.mark.integration
def test_swap_failed_sync_leaves_engine_untouched_then_recovers(models):
    from transformers import AutoModelForCausalLM

    from actor.weights import WeightReceiver

    torch.set_num_threads(1)
    learner = AutoModelForCausalLM.from_pretrained(str(models["learner"]))
    engine = _hf_engine(models["a0"])
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


def test_swap_in_validates_all_before_changing_anything(models):
    from actor.engine import EngineError

    torch.set_num_threads(1)
    engine = _hf_engine(models["a0"])
    held = _bits(engine.named_parameters_for_sync())
    named = [(n, torch.zeros_like(p)) for n, p in engine.named_parameters_for_sync()]
    cases = [named[:-1] + [("nope.weight", named[-1][1])],                      # unknown name
             named[:-1] + [(named[-1][0], named[-1][1][:1])],                   # wrong shape
             named + [("lm_head.weight", named[0][1])]]                         # tied alias sent twice
    assert named[0][0] == "model.embed_tokens.weight"
    for bad in cases:
        with pytest.raises(EngineError):
            engine.swap_in(bad, version=9)
    with pytest.raises(EngineError, match="strict"):
        engine.swap_in(named[1:], version=9, strict=True)
    # dtype differs: declined (False), nothing changed; load_weights would convert instead.
    assert engine.swap_in([(n, t.double()) for n, t in named], version=9) is False
    now = _bits(engine.named_parameters_for_sync())
    assert engine.version == 0 and all(torch.equal(now[n], held[n]) for n in held)
    # A receiver whose swap_fn declines falls back to load_fn (copy): covered by last_swapped.


@pytest.mark.integration
def test_swap_declined_falls_back_to_copy_and_swap_error_is_a_load_failure(models, tmp_path):
    from transformers import AutoModelForCausalLM

    from actor.engine import EngineError, make_engine
    from actor.weights import WeightReceiver
    from common.config import ActorConfig, ModelConfig

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
    engine32 = _hf_engine(models["a1"])
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


@pytest.mark.integration
def test_stream_across_swap_matches_stream_across_copy(models):
    """Two engines with the same init and seed run the same continuous-batching stream; between
    steps one installs new weights by swap (through a real sync), the other by load_weights
    (copy). Every sample must be identical: a swap between steps is a weight load like any other."""
    from transformers import AutoModelForCausalLM

    from actor.engine import GenerationRequest
    from actor.weights import WeightReceiver

    torch.set_num_threads(1)
    learner = AutoModelForCausalLM.from_pretrained(str(models["learner"]))
    _step(learner, 0.05)
    swapped, copied = _hf_engine(models["a0"]), _hf_engine(models["a0"])
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
    for x, y in zip(*outs):
        assert (x.tag, x.index, x.version, x.sample.finish) == (y.tag, y.index, y.version, y.sample.finish)
        assert np.array_equal(x.sample.token_ids, y.sample.token_ids)
        assert np.array_equal(x.sample.logprobs.view(np.int32), y.sample.logprobs.view(np.int32))
    assert {f.version for f in outs[0] if f.tag == "b"} == {1}
    # generate() after the swap also matches the copy-loaded engine.
    seeded = GenerationRequest(context=swapped.tokenizer.encode("7-5="), n=3, max_tokens=10, seed=5)
    a, b = swapped.generate([seeded])[0], copied.generate([seeded])[0]
    assert len(a) == len(b) == 3
    for x, y in zip(a, b):
        assert np.array_equal(x.token_ids, y.token_ids) and np.array_equal(x.logprobs, y.logprobs)


# ============================================================================================
# Actor subprocess
# ============================================================================================
def _actor_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--endpoint", required=True)
    ap.add_argument("--actor-id", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--stall-after", type=int, default=-1)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    import socket

    import zmq
    from transformers import AutoModelForCausalLM

    from actor.weights import WeightReceiver
    from common.weightsync import WeightSyncError
    from common.wire import Register, Shutdown, WeightAck, WeightAnnounce, decode_message, encode_message

    model = AutoModelForCausalLM.from_pretrained(args.model)
    out = Path(args.out)

    def on_bucket(b: int, n: int) -> None:
        if b == args.stall_after:
            (out / f"{args.actor_id}_stalled").touch()
            time.sleep(3600)  # stalled until the test SIGKILLs this process

    def load(named) -> None:  # the HF engine's in-place copy
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, t in named:
                params[name].data.copy_(t)

    receiver = WeightReceiver(on_bucket=on_bucket)
    ctx = zmq.Context()
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.IDENTITY, args.actor_id.encode())
    dealer.setsockopt(zmq.LINGER, 1000)
    dealer.connect(args.endpoint)
    dealer.send(encode_message(Register(actor_id=args.actor_id, incarnation_seen=-1, version=-1, pid=os.getpid(),
                                        hostname=socket.gethostname(), engine="hf",
                                        vocab_size=model.config.vocab_size, has_cuda=False)))
    while True:
        msg = decode_message(dealer.recv())
        if isinstance(msg, Shutdown):
            break
        if not isinstance(msg, WeightAnnounce):
            continue
        try:
            checksum, seconds = receiver.receive(msg, load, read_back=model.named_parameters)
            torch.save({n: p.detach().clone() for n, p in model.named_parameters()},
                       out / f"{args.actor_id}_v{msg.version}.pt")
            ack = WeightAck(actor_id=args.actor_id, sync_id=msg.sync_id, version=msg.version, ok=True,
                            checksum=checksum, load_seconds=seconds, error="")
        except WeightSyncError as e:
            ack = WeightAck(actor_id=args.actor_id, sync_id=msg.sync_id, version=msg.version, ok=False,
                            checksum="", load_seconds=0.0, error=str(e)[:4000])
        dealer.send(encode_message(ack))
    dealer.close()
    ctx.term()
    return 0


if __name__ == "__main__":
    sys.exit(_actor_main(sys.argv[1:]))


_EXIT_DURING_DROP = """
import sys, time
from common.weightsync import drop_group_later

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


def test_wait_group_drops_joins_and_reports_leftovers():
    release = threading.Event()
    done = []

    class Blocking:
        def __del__(self):
            release.wait(10)
            done.append(True)

    drop_group_later([Blocking()])
    assert wait_group_drops(0.2) is False  # still tearing down: reported, not waited on forever
    release.set()
    assert wait_group_drops(10) is True and done == [True]
