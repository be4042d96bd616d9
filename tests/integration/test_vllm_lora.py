"""LoRA on the vLLM engine (model.lora): a sync carries the adapter only, through the learner's real
publisher over gloo; each version is installed as a new vLLM adapter while generation goes on.

What runs for real: vLLM's LoRA layers (CPU backend here) against an HF recompute of the model
with the adapter merged (`common.lora.merged`), a request that spans a sync keeping its adapter
while the next one gets the new one, a fork after a sync, the refusal of a sync that is not
exactly the adapter, and old adapters removed once no request uses them. One LoRA engine serves
the module (the session's `vllm_engine` has LoRA off).
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from actor.engine import EngineError, GenerationRequest, Installed
from common.config import WeightsConfig
from common.lora import merged
from tests.support.sync import sync_weights
from tests.support.vllm import make_vllm_engine
from weightsync.errors import WeightSyncError
from weightsync.publisher import WeightPublisher

pytestmark = pytest.mark.vllm

LORA = {"rank": 4, "alpha": 8.0}  # as tests/integration/test_lora.py; vLLM runs it with max_lora_rank 8
SCALE = LORA["alpha"] / LORA["rank"]
FIDELITY_TOL = 1e-3  # |vLLM processed_logprobs - HF recompute|, float32 on both sides (test_vllm_engine.py)


@pytest.fixture(scope="module")
def engine(vllm_model_dir):
    engine = make_vllm_engine(vllm_model_dir, lora=LORA)
    yield engine
    engine.close()


@pytest.fixture
def pub():
    pub = WeightPublisher(WeightsConfig(rendezvous_port=0, timeout_s=30, bucket_mb=0.05), "127.0.0.1")
    yield pub
    pub.close()


# -- helpers -------------------------------------------------------------------------------------
def _adapter(engine, seed: int, scale: float = 0.1) -> dict[str, torch.Tensor]:
    """A random adapter of the engine's model (B non-zero: it changes the model)."""
    g = torch.Generator().manual_seed(seed)
    return {n: scale * torch.randn(shape, generator=g) for n, shape in engine.adapter_specs.items()}


def _hf_with(path, adapter: dict[str, torch.Tensor] | None) -> torch.nn.Module:
    """The HF model with `adapter` merged into its weights (W + scale * B @ A), the learner's policy."""
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    if adapter:
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, w in merged({n: p.detach() for n, p in params.items()}, adapter, SCALE).items():
                params[name].copy_(w)
    return model


def _ref_logprobs(model, context: np.ndarray, tokens: np.ndarray, temperature: float) -> np.ndarray:
    ids = torch.tensor(np.concatenate([context, tokens]), dtype=torch.long)[None]
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(context) - 1:-1].float() / temperature  # (L, V)
    return torch.log_softmax(logits, -1).gather(1, torch.tensor(tokens).long()[:, None]).squeeze(1).numpy()


def _gap(sample, model, context, temperature: float = 1.0) -> float:
    """max |vLLM's log-prob - the HF recompute| over the sample's tokens."""
    return float(np.abs(sample.logprobs - _ref_logprobs(model, context, sample.token_ids, temperature)).max())


def _context(engine, text: str = "12+34=") -> np.ndarray:
    return np.array(engine.tokenizer.encode(text), dtype=np.int32)


def _publish(engine, pub, adapter, version: int, **kw):
    return sync_weights(engine, pub, list(adapter.items()), version, **kw)


def _registered(engine) -> list[int]:
    (state,) = engine.collective_rpc("treerpo_lora_state")
    return state["registered"]


def _adapters(engine) -> tuple[dict[int, int], list[int]]:
    """(adapter id -> requests in flight carrying it, the ids registered in the worker), read together
    on the engine's loop: the engine sends an adapter's removal in the loop step that drops its last
    user, and the worker answers after whatever was sent before, so the two agree exactly."""
    async def read():
        users = dict(engine._lora_users)
        (state,) = await engine.llm.collective_rpc("treerpo_lora_state")
        return users, state["registered"]

    return engine._loop.run(read(), 60)


@pytest.fixture
def long_samples(engine, monkeypatch):
    """The engine's requests run to max_tokens (no EOS): long enough to span a sync."""
    params = engine.sampling_params

    def no_eos(req):
        p = params(req)
        p.ignore_eos, p.stop_token_ids = True, []
        return p

    monkeypatch.setattr(engine, "sampling_params", no_eos)


def _drain(stream) -> list:
    out = []
    while stream.busy():
        out += stream.step()
    return out


# -- tests ---------------------------------------------------------------------------------------
def test_an_adapter_sync_samples_what_hf_computes_with_the_adapter_merged(engine, vllm_model_dir, pub):
    assert engine.llm.vllm_config.lora_config.max_lora_rank == 8  # the smallest rank vLLM takes >= 4
    ctx = _context(engine)
    base = _hf_with(vllm_model_dir, None)
    if engine.version == 0:  # before any adapter sync: the base model
        for s in engine.generate([GenerationRequest(ctx, 2, 12, temperature=1.0, seed=1)])[0]:
            assert _gap(s, base, ctx) <= FIDELITY_TOL
    adapter = _adapter(engine, seed=1)
    prepared, result, ack = _publish(engine, pub, adapter, version=1)
    assert result.ok and len(prepared.plan.buckets) > 1, result.error
    assert isinstance(ack, Installed) and ack.checksum == result.checksum and ack.pause_s == 0.0, ack
    assert engine.version == 1
    policy = _hf_with(vllm_model_dir, adapter)
    gaps = []
    for temperature in (1.0, 0.7):
        for s in engine.generate([GenerationRequest(ctx, 3, 24, temperature=temperature, seed=5)])[0]:
            gaps.append(_gap(s, policy, ctx, temperature))
            assert gaps[-1] <= FIDELITY_TOL
            assert _gap(s, base, ctx, temperature) > 10 * FIDELITY_TOL  # the adapter is applied
    print(f"\nLoRA v1 on vLLM vs HF merged: max |log-prob gap| {max(gaps):.2e}")


def test_a_new_version_serves_new_requests_while_running_ones_keep_theirs(engine, vllm_model_dir, pub,
                                                                          long_samples):
    old, new = _adapter(engine, seed=2), _adapter(engine, seed=3)
    _, result, ack = _publish(engine, pub, old, version=2)
    assert result.ok and isinstance(ack, Installed), ack
    ctx = _context(engine)
    stream = engine.open_stream()
    stream.add(GenerationRequest(ctx, n=2, max_tokens=400, temperature=1.0, seed=21), "running")
    time.sleep(0.2)  # decoding when the sync lands
    _, result, ack = _publish(engine, pub, new, version=3)
    assert result.ok and isinstance(ack, Installed) and ack.checksum == result.checksum, ack
    assert ack.kept >= 1 and ack.pause_s == 0.0  # the running request went on, nothing paused
    assert engine.version == 3
    stream.add(GenerationRequest(ctx, n=2, max_tokens=24, temperature=1.0, seed=21), "after")
    got = {(r.tag, r.index): r for r in _drain(stream)}
    policy = {2: _hf_with(vllm_model_dir, old), 3: _hf_with(vllm_model_dir, new)}
    gaps = {}
    for (tag, i), r in got.items():
        assert r.version == (2 if tag == "running" else 3), (tag, r.version)
        gaps[tag, i] = _gap(r.sample, policy[r.version], ctx)
        assert gaps[tag, i] <= FIDELITY_TOL, (tag, i, gaps[tag, i])  # every token: its version's adapter
        assert _gap(r.sample, policy[5 - r.version], ctx) > 10 * FIDELITY_TOL  # not the other one
    assert len(got) == 4 and all(len(r.sample.token_ids) == 400 for (t, _), r in got.items() if t == "running")
    print(f"\nLoRA in flight: max |log-prob gap| running (v2) {max(gaps['running', 0], gaps['running', 1]):.2e}, "
          f"after (v3) {max(gaps['after', 0], gaps['after', 1]):.2e}")


def test_a_child_forked_after_a_sync_carries_the_new_adapter(engine, vllm_model_dir, pub):
    first, second = _adapter(engine, seed=4), _adapter(engine, seed=5)
    _publish(engine, pub, first, version=4)
    ctx = _context(engine)
    stream = engine.open_stream()
    stream.add(GenerationRequest(ctx, n=1, max_tokens=8, temperature=1.0, seed=6), "parent")
    (parent,) = _drain(stream)
    assert parent.version == 4
    _, result, ack = _publish(engine, pub, second, version=5)
    assert isinstance(ack, Installed), ack
    child_ctx = np.concatenate([ctx, parent.sample.token_ids])
    stream.add(GenerationRequest(child_ctx, n=2, max_tokens=12, temperature=1.0, seed=7), "child",
               parent=("parent", 0))
    children = _drain(stream)
    policy = _hf_with(vllm_model_dir, second)
    for r in children:  # vLLM's KV keys carry the adapter's name: no block of the parent's adapter is reused
        assert r.version == 5 and _gap(r.sample, policy, child_ctx) <= FIDELITY_TOL


def test_a_sync_that_is_not_exactly_the_adapter_changes_nothing(engine, vllm_model_dir, pub):
    adapter = _adapter(engine, seed=6)
    _, result, ack = _publish(engine, pub, adapter, version=6)
    assert isinstance(ack, Installed), ack
    current = engine._lora_request
    names = list(adapter)
    cases = {  # what the sync holds -> what the refusal says
        "not sent": {n: t for n, t in adapter.items() if n != names[-1]},
        "not of this model's adapter": {**_adapter(engine, seed=7), "model.norm.weight": torch.ones(128)},
        "of another shape": {n: torch.zeros((8, t.shape[1]) if ".lora_A." in n else (t.shape[0], 8))
                             for n, t in adapter.items()},  # rank 8
    }
    for what, named in cases.items():
        _, result, err = _publish(engine, pub, named, version=7, epoch=(what,))
        assert result.ok, what  # everything sent arrived: the engine refuses it
        assert isinstance(err, WeightSyncError) and err.reason == "load", (what, err)
        assert "is not this model's LoRA adapter" in str(err) and what in str(err), err
        assert engine.version == 6 and engine._lora_request is current, what
        assert max(_registered(engine)) == current.lora_int_id, what  # nothing newer was registered
    ctx = _context(engine)
    policy = _hf_with(vllm_model_dir, adapter)
    for s in engine.generate([GenerationRequest(ctx, 2, 12, temperature=1.0, seed=8)])[0]:
        assert _gap(s, policy, ctx) <= FIDELITY_TOL  # still version 6's adapter
    _, result, ack = _publish(engine, pub, _adapter(engine, seed=8), version=7, epoch="full")
    assert isinstance(ack, Installed) and ack.checksum == result.checksum and engine.version == 7


def test_an_adapter_is_removed_once_no_request_uses_it(engine, vllm_model_dir, pub, long_samples):
    _publish(engine, pub, _adapter(engine, seed=10), version=10)
    long = engine._lora_request.lora_int_id
    stream = engine.open_stream()
    stream.add(GenerationRequest(_context(engine), n=1, max_tokens=480, temperature=1.0, seed=9), "long")
    spanned = 0
    for version in range(11, 17):  # 6 versions while the request of version 10 runs
        _, result, ack = _publish(engine, pub, _adapter(engine, seed=version), version=version)
        assert isinstance(ack, Installed), ack
        users, registered = _adapters(engine)
        current = engine._lora_request.lora_int_id
        assert registered == sorted({current, *users}) and set(users) <= {long, current}, (users, registered)
        spanned += long in users
    assert spanned >= 1  # the old adapter outlived the syncs while its request ran
    (r,) = _drain(stream)
    assert r.version == 10 and len(r.sample.token_ids) == 480
    for _ in range(100):  # the request's end (reported) and its adapter's release (after it) are two steps
        users, registered = _adapters(engine)
        if not users:
            break
        time.sleep(0.05)
    assert users == {} and registered == [engine._lora_request.lora_int_id]  # removed with its last request


def test_a_stream_given_up_on_releases_its_adapter_and_the_engine_lives_on(engine, vllm_model_dir, pub,
                                                                           long_samples):
    """Aborted requests end in vLLM before their adapter is removed: a request vLLM still schedules
    with a removed in-memory adapter would kill the engine."""
    _publish(engine, pub, _adapter(engine, seed=20), version=20)
    old = engine._lora_request.lora_int_id
    stream = engine.open_stream()
    stream.add(GenerationRequest(_context(engine), n=2, max_tokens=480, temperature=1.0, seed=10), "dropped")
    adapter = _adapter(engine, seed=21)
    _, result, ack = _publish(engine, pub, adapter, version=21)
    assert isinstance(ack, Installed) and ack.kept >= 1, ack
    stream.close()
    for _ in range(100):
        users, registered = _adapters(engine)
        if not users:
            break
        time.sleep(0.05)
    assert users == {} and old not in registered and registered == [engine._lora_request.lora_int_id]
    ctx = _context(engine)
    policy = _hf_with(vllm_model_dir, adapter)
    for s in engine.generate([GenerationRequest(ctx, 2, 12, temperature=1.0, seed=11)])[0]:
        assert _gap(s, policy, ctx) <= FIDELITY_TOL


def test_load_adapter_installs_an_adapter_of_this_process(engine, vllm_model_dir):
    adapter = _adapter(engine, seed=30)
    assert engine.load_adapter(adapter.items(), version=30) >= 1 and engine.version == 30
    ctx = _context(engine)
    policy = _hf_with(vllm_model_dir, adapter)
    for s in engine.generate([GenerationRequest(ctx, 2, 12, temperature=0.9, seed=12)])[0]:
        assert _gap(s, policy, ctx, 0.9) <= FIDELITY_TOL
    with pytest.raises(EngineError, match="not sent"):
        engine.load_adapter(list(adapter.items())[1:], version=31)
    assert engine.version == 30
