"""The engine factory: `make_engine` builds the engine `ActorConfig.engine` names.

The contract (actor/engine.py) knows no concrete engine; this module is the one place that
maps a name to one ('hf' -> `HFEngine`, 'vllm' -> `VLLMEngine`). Importing it imports torch but
neither transformers nor vLLM: building an HF engine imports transformers, building a vLLM engine
imports vLLM (after `require_vllm` has checked that it can run here: CUDA, or vLLM's CPU backend).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from actor.engine import Engine, EngineError
from actor.hf_engine import HFEngine
from actor.vllm_engine import VLLMEngine, require_vllm
from common.config import JobConfig, ModelConfig

if TYPE_CHECKING:  # pragma: no cover
    from common.config import ActorConfig


def make_engine(cfg: JobConfig | ModelConfig, actor: ActorConfig | None = None, *,
                seed: int | None = None) -> Engine:
    """Build the engine named by `actor.engine` ('hf' or 'vllm') for the model in `cfg`.

    `cfg` is a JobConfig (its `model` and `actor` sections are used) or a ModelConfig together
    with `actor`. `seed` defaults to `actor.seed`.
    """
    if isinstance(cfg, tuple):
        cfg, actor = cfg
    checksum = True
    if isinstance(cfg, JobConfig):
        model_cfg, actor, checksum = cfg.model, actor or cfg.actor, cfg.weights.checksum
    elif isinstance(cfg, ModelConfig):
        model_cfg = cfg
        if actor is None:
            raise EngineError("make_engine(ModelConfig, ActorConfig): the ActorConfig is missing")
    else:
        raise EngineError(f"make_engine takes a JobConfig or a ModelConfig, got {type(cfg).__name__}")
    if not model_cfg.path:
        raise EngineError(
            "model.path is empty: build the demo model with treerpo.tinymodel.build_tiny_model(DIR) "
            "and set model.path=DIR (or point it at an HF model folder)"
        )
    seed = actor.seed if seed is None else seed
    if actor.engine == "hf":
        return HFEngine(model_cfg, actor, seed=seed, checksum=checksum)
    if actor.engine == "vllm":
        require_vllm()
        return VLLMEngine(model_cfg, actor, seed=seed, checksum=checksum)
    raise EngineError(f"actor.engine = {actor.engine!r}: must be 'hf' or 'vllm'")
