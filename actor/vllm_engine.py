"""The Engine protocol on vLLM (CUDA), written against vLLM 0.33's public API.

Importing this module does not import vLLM; building a `VLLMEngine` does (`require_vllm` says
what is missing). Guarantees (on top of actor/engine.py's contract):

* requests go in as token ids (`TokensPrompt`), never text; siblings are one request with
  `SamplingParams(n=...)`, and `enable_prefix_caching` lets siblings and children share the
  prefilled context;
* log-probs are vLLM's `processed_logprobs`: of the temperature-scaled, top-k/top-p-truncated
  distribution the token was drawn from (`logprobs=0` returns the sampled token's only);
* stop strings are kept in the output (`include_stop_str_in_output=True`; the token completing
  the delimiter is the last token) and reported as finish "delimiter"; EOS or a stop token id
  as "stop" (the token is included), the budget as "length";
* weights are updated in place inside the workers by `WeightUpdateExtension` (named by qualified
  string, reached through `LLM.collective_rpc`), after which the prefix cache is reset so no
  KV computed with the old weights is reused. `receive_weights` runs the weight-sync receive
  inside the worker (NCCL straight onto its GPU) and loads with the model's `load_weights`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from actor.engine import EngineError, GenerationRequest, Sample, SampleFinish, collect_eos_ids
from actor.weights import WeightReceiver
from common.weightsync import WeightSyncError
from common.wire import WeightAnnounce

if TYPE_CHECKING:  # pragma: no cover
    from common.config import ActorConfig, ModelConfig

WORKER_EXTENSION = "actor.vllm_engine.WeightUpdateExtension"


def require_vllm() -> None:
    """Raise EngineError saying how to fix a missing vLLM or CUDA."""
    try:
        import vllm  # noqa: F401, PLC0415 -- vLLM is optional (treerpo[vllm])
    except ImportError as e:
        raise EngineError(
            "actor.engine='vllm' but vLLM is not installed: install it on a CUDA machine "
            "(pip install 'treerpo[vllm]') or set actor.engine=hf"
        ) from e

    if not torch.cuda.is_available():
        raise EngineError("actor.engine='vllm' needs a CUDA GPU and none is visible: set actor.engine=hf")


class WeightUpdateExtension:
    """Mixed into vLLM's GPU worker (`worker_extension_cls`); methods run in every worker.

    `self.model_runner.model` is the vLLM model; its `load_weights` takes HF-named tensors and
    handles vLLM's fused layouts (e.g. q/k/v -> qkv_proj), copying into the live parameters.
    """

    def load_named_tensors(self, named_tensors: list[tuple[str, torch.Tensor]]) -> int:
        """Copy HF-named tensors into the live weights; returns how many were given.

        The weight-sync receiver calls this with the tensors of one received bucket (already on
        this worker's device); over `collective_rpc` the tensors arrive pickled (small models).
        """
        device = next(self.model_runner.model.parameters()).device
        tensors = [(name, t.to(device, non_blocking=True)) for name, t in named_tensors]
        self.model_runner.model.load_weights(weights=tensors)
        return len(tensors)

    def receive_weights(self, announce_fields: dict[str, Any]) -> tuple[str, float]:
        """Join the learner's weight-sync group from inside this worker and load what arrives.

        The announcement travels as a plain dict (collective_rpc pickles its arguments); the
        tensors come over the sync group itself (NCCL when both sides have CUDA) straight onto
        this worker's GPU, are loaded with the model's own `load_weights` (fused layouts
        handled), and the checksum proves what arrived (vLLM's fused parameters cannot be read
        back under HF names). One worker per actor (tensor_parallel_size=1): the sync group
        gives each actor one rank.
        """
        if not hasattr(self, "_treerpo_receiver"):
            self._treerpo_receiver = WeightReceiver()
        model = self.model_runner.model
        return self._treerpo_receiver.receive(
            WeightAnnounce(**announce_fields), lambda named: model.load_weights(weights=named),
            checksum_received=True,
        )

    def parameter_specs(self) -> list[tuple[str, list[int], str]]:
        """(name, shape, dtype) of the worker's parameters in vLLM's layout (diagnostics)."""
        return [(n, list(p.shape), str(p.dtype).replace("torch.", ""))
                for n, p in self.model_runner.model.named_parameters()]


def _finish(completion: Any) -> SampleFinish:
    if completion.finish_reason == "length":
        return "length"
    if completion.finish_reason == "stop":
        return "delimiter" if isinstance(completion.stop_reason, str) else "stop"
    raise EngineError(f"vLLM finished a sample with reason {completion.finish_reason!r} ({completion.stop_reason!r})")


class VLLMEngine:
    """`vllm.LLM` behind the Engine protocol."""

    def __init__(self, model_cfg: ModelConfig, actor_cfg: ActorConfig, *, seed: int = 0) -> None:
        require_vllm()
        from vllm import LLM  # noqa: PLC0415 -- vLLM is optional (treerpo[vllm])

        dtype = "bfloat16" if model_cfg.dtype == "auto" else model_cfg.dtype
        self.llm = LLM(
            model=model_cfg.path,
            dtype=dtype,
            seed=seed,
            trust_remote_code=model_cfg.trust_remote_code,
            gpu_memory_utilization=actor_cfg.gpu_memory_utilization,
            max_model_len=actor_cfg.max_model_len,
            enforce_eager=actor_cfg.enforce_eager,
            enable_prefix_caching=True,
            logprobs_mode="processed_logprobs",
            worker_extension_cls=WORKER_EXTENSION,
        )
        self.tokenizer = self.llm.get_tokenizer()
        self.vocab_size = int(self.llm.llm_engine.model_config.get_vocab_size())
        self.eos_token_ids = self._find_eos_ids(model_cfg)
        self.version = 0

    def _find_eos_ids(self, model_cfg: ModelConfig) -> tuple[int, ...]:
        from transformers import GenerationConfig  # noqa: PLC0415 -- transformers loads with a model, not on import

        try:
            gen = GenerationConfig.from_pretrained(model_cfg.path).eos_token_id
        except OSError:  # no generation_config.json: the tokenizer's EOS is all there is
            gen = None
        return collect_eos_ids(self.tokenizer.eos_token_id, gen)

    def _params(self, req: GenerationRequest):
        from vllm import SamplingParams  # noqa: PLC0415 -- vLLM is optional (treerpo[vllm])

        return SamplingParams(
            n=req.n,
            max_tokens=req.max_tokens,
            logprobs=0,  # the sampled token's log-prob only
            temperature=req.temperature,
            top_p=req.top_p,
            top_k=req.top_k,
            seed=req.seed,
            stop=list(req.stop_strings) or None,
            stop_token_ids=sorted(set(self.eos_token_ids) | set(req.stop_token_ids)),
            include_stop_str_in_output=True,
        )

    def generate(self, requests: Sequence[GenerationRequest]) -> list[list[Sample]]:
        from vllm.inputs import TokensPrompt  # noqa: PLC0415 -- vLLM is optional (treerpo[vllm])

        for req in requests:
            req.check(self.vocab_size)
        prompts = [TokensPrompt(prompt_token_ids=req.context.tolist()) for req in requests]
        outputs = self.llm.generate(prompts, [self._params(r) for r in requests], use_tqdm=False)
        results = []
        for req, out in zip(requests, outputs, strict=True):
            samples = []
            for c in sorted(out.outputs, key=lambda c: c.index):
                ids = list(c.token_ids)
                if c.logprobs is None or len(c.logprobs) != len(ids):
                    raise EngineError("vLLM returned no per-token log-probs; is logprobs=0 honoured?")
                lps = [step[t].logprob for t, step in zip(ids, c.logprobs, strict=True)]
                samples.append(Sample(np.array(ids, dtype=np.int32), np.array(lps, dtype=np.float32), _finish(c)))
            if len(samples) != req.n:
                raise EngineError(f"vLLM returned {len(samples)} samples for a request with n={req.n}")
            results.append(samples)
        return results

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """Send HF-named tensors to every worker (in place), drop the stale prefix cache, set version."""
        tensors = [(name, t.detach().cpu()) for name, t in named_tensors]
        self.llm.collective_rpc("load_named_tensors", args=(tensors,))
        self.llm.reset_prefix_cache()
        self.version = int(version)

    def receive_weights(self, announce: Any) -> tuple[str, float]:
        """The weight sync for this engine: the worker joins the group and receives (see the
        extension); then the prefix cache is dropped and the version set. Returns (checksum, s)."""
        if self.llm.llm_engine.vllm_config.parallel_config.tensor_parallel_size != 1:
            raise EngineError("weight sync into vLLM needs tensor_parallel_size=1 (one sync rank per actor)")

        try:
            (checksum, seconds), = self.llm.collective_rpc("receive_weights", args=(dataclasses.asdict(announce),))
        except Exception as e:  # noqa: BLE001 - a worker-side failure arrives wrapped by the RPC layer
            raise WeightSyncError("error", f"vLLM worker weight receive failed: {e}") from e
        self.llm.reset_prefix_cache()
        self.version = int(announce.version)
        return checksum, seconds

    def named_parameters_for_sync(self) -> list[tuple[str, torch.Tensor]]:
        raise EngineError(
            "the vLLM engine's parameters live in its worker processes: receive weights through "
            "WeightUpdateExtension.load_named_tensors (collective_rpc), not in place here"
        )

    def collective_rpc(self, method: str, *args: Any, timeout: float | None = None) -> list[Any]:
        """Run a WeightUpdateExtension method in every worker (the weight-sync hook)."""
        return self.llm.collective_rpc(method, timeout=timeout, args=args)
