"""bench/gpu_check.py: without a GPU it fails at once, saying so; with one (and vLLM) it runs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tests.support.paths import REPO

SCRIPT = REPO / "bench" / "gpu_check.py"


def _run(timeout_s: float) -> tuple[subprocess.CompletedProcess, dict]:
    out = subprocess.run([sys.executable, str(SCRIPT)], cwd=str(REPO), capture_output=True, text=True,
                         timeout=timeout_s)
    return out, json.loads(out.stdout.strip().splitlines()[-1])


def test_gpu_check_fails_fast_and_clearly_without_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is here: test_gpu_check_on_a_gpu runs the check itself")
    out, line = _run(120)
    assert out.returncode == 2 and line["ok"] is False and "needs a CUDA GPU" in line["error"], out.stderr[-2000:]


@pytest.mark.gpu
@pytest.mark.vllm
def test_gpu_check_on_a_gpu():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    pytest.importorskip("vllm", reason="needs vLLM with CUDA: pip install -e '.[vllm]'")
    out, line = _run(8 * 60 + 60)
    assert out.returncode == 0 and line["ok"] and not line["failed"], (line, out.stderr[-4000:])
    assert set(line["checks"]) == {"placement", "backend", "bf16_step", "fidelity", "sync_streaming", "installed",
                                   "second_sync", "seed", "nccl"}
    assert all(c["guards"] for c in line["checks"].values())
    assert line["seconds"] <= 8 * 60 and line["vllm_tok_s"] > 0 and line["learner_tok_s"] > 0
