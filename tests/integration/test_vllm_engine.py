"""vLLM engine: import hygiene and a clear error here; generation and weight updates on CUDA + vLLM."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from actor.engine import EngineError, GenerationRequest, processed_logprobs
from actor.engines import make_engine
from common.config import ActorConfig, ModelConfig
from tests.support.paths import REPO

HAS_VLLM = importlib.util.find_spec("vllm") is not None


def test_module_imports_without_vllm_and_factory_says_how_to_fix(tmp_path):
    # A fresh interpreter: importing the engines and the sampler must not import vllm.
    code = ("import sys, actor.engine, actor.engines, actor.vllm_engine, actor.hf_engine, actor.hf_stream, "
            "actor.sampler; print('vllm' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=str(REPO))
    assert out.stdout.strip() == "False"
    if HAS_VLLM:
        pytest.skip("vllm is installed here: the missing-vllm error cannot be observed")
    with pytest.raises(EngineError, match="vLLM is not installed.*actor.engine=hf"):
        make_engine(ModelConfig(path=str(tmp_path)), ActorConfig(engine="vllm"))


def _cuda() -> bool:
    return torch.cuda.is_available()


@pytest.mark.vllm
@pytest.mark.gpu
def test_vllm_generation_and_weight_update(tiny_model_dir, make_tiny_model):
    pytest.importorskip("vllm")
    if not _cuda():
        pytest.skip("needs CUDA")

    path = tiny_model_dir
    eng = make_engine(ModelConfig(path=str(path)), ActorConfig(engine="vllm", gpu_memory_utilization=0.3,
                                                               enforce_eager=True))
    ctx = np.array(eng.tokenizer.encode("12+34="), dtype=np.int32)
    reqs = [GenerationRequest(ctx, 4, 16, temperature=0.8, top_k=20, seed=1, stop_strings=(";",))]
    out = eng.generate(reqs)
    assert len(out[0]) == 4
    ref = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.bfloat16).cuda().eval()

    for s in out[0]:
        assert s.finish in ("stop", "length", "delimiter") and len(s.token_ids) >= 1
        if s.finish == "delimiter":
            assert eng.tokenizer.decode(s.token_ids).endswith(";")
        ids = torch.tensor(np.concatenate([ctx, s.token_ids]), device="cuda")[None].long()
        with torch.no_grad():
            rows = ref(input_ids=ids).logits[0, len(ctx) - 1:-1].float()  # (L, V)
        L = len(s.token_ids)
        lp = processed_logprobs(rows, torch.full((L,), 0.8, device="cuda"), torch.full((L,), 20, device="cuda"),
                                torch.ones(L, device="cuda"))
        ref_lp = lp.gather(1, torch.tensor(s.token_ids, device="cuda").long()[:, None]).squeeze(1).cpu().numpy()
        np.testing.assert_allclose(s.logprobs, ref_lp, atol=0.05)  # bf16 kernels differ from HF's
    # weights of another tiny model, in place: the outputs follow the new weights
    other = AutoModelForCausalLM.from_pretrained(str(make_tiny_model(seed=1)))
    eng.load_weights(other.named_parameters(), version=3)
    assert eng.version == 3
    again = eng.generate(reqs)
    assert [s.token_ids.tolist() for s in again[0]] != [s.token_ids.tolist() for s in out[0]]
