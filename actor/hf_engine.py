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
* stop strings are found by decoding only the last `len(stop) + 1` generated tokens.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Iterable, Sequence

import numpy as np

from actor.engine import EngineError, GenerationRequest, Sample, processed_logprobs

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from common.config import ActorConfig, ModelConfig

_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def resolve_device_dtype(model_cfg: "ModelConfig") -> tuple["torch.device", "torch.dtype"]:
    """auto device = cuda when available; auto dtype = bfloat16 on CUDA, float32 on CPU."""
    import torch

    if model_cfg.device == "cuda" and not torch.cuda.is_available():
        raise EngineError("model.device='cuda' but CUDA is not available: set model.device=cpu or auto")
    use_cuda = model_cfg.device == "cuda" or (model_cfg.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if use_cuda else "cpu")
    if model_cfg.dtype == "auto":
        dtype = torch.bfloat16 if use_cuda else torch.float32
    else:
        dtype = getattr(torch, _DTYPES[model_cfg.dtype])
    return device, dtype


class HFEngine:
    """A transformers `AutoModelForCausalLM` in eval mode behind the Engine protocol."""

    def __init__(self, model_cfg: "ModelConfig", actor_cfg: "ActorConfig", *, seed: int = 0) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.device, self.dtype = resolve_device_dtype(model_cfg)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(model_cfg.path, trust_remote_code=model_cfg.trust_remote_code)
            self.model = AutoModelForCausalLM.from_pretrained(
                model_cfg.path,
                dtype=self.dtype,
                attn_implementation=model_cfg.attn_implementation,
                trust_remote_code=model_cfg.trust_remote_code,
            )
        except OSError as e:
            raise EngineError(f"cannot load model.path={model_cfg.path!r}: {e}") from e
        self.model.to(self.device).eval()
        self.model.requires_grad_(False)
        self.max_batch_rows = actor_cfg.max_batch_rows
        self.version = 0
        self.vocab_size = int(self.model.get_input_embeddings().weight.shape[0])
        self.eos_token_ids = self._find_eos_ids()
        pad = self.tokenizer.pad_token_id
        self.pad_token_id = int(pad if pad is not None else self.eos_token_ids[0])
        self.max_positions = getattr(self.model.config, "max_position_embeddings", None)
        self._generator = torch.Generator(device=self.device).manual_seed(seed)
        self.stats = {"prefill_tokens": 0, "generated_tokens": 0, "forward_calls": 0, "seconds": 0.0}

    def _find_eos_ids(self) -> tuple[int, ...]:
        ids: list[int] = []
        sources = [getattr(self.model.generation_config, "eos_token_id", None),
                   getattr(self.model.config, "eos_token_id", None), self.tokenizer.eos_token_id]
        for src in sources:
            for i in src if isinstance(src, (list, tuple)) else [src]:
                if i is not None and int(i) not in ids:
                    ids.append(int(i))
        if not ids:
            raise EngineError("the model and tokenizer name no EOS token: set eos_token_id in its config")
        return tuple(ids)

    # -- weights -----------------------------------------------------------------------------
    def named_parameters_for_sync(self) -> list[tuple[str, "torch.Tensor"]]:
        """The live parameters (tied weights once), to receive into in place."""
        return list(self.model.named_parameters())

    def load_weights(self, named_tensors: Iterable[tuple[str, "torch.Tensor"]], version: int, *,
                     strict: bool = False) -> int:
        """Copy each tensor into the parameter of that name (`param.data.copy_`), then set version.

        Names may also be aliases of tied parameters (e.g. lm_head.weight). With `strict`, every
        parameter must be covered. Returns the number of tensors loaded.
        """
        import torch

        params = dict(self.model.named_parameters(remove_duplicate=False))
        covered: set[int] = set()
        count = 0
        with torch.no_grad():
            for name, tensor in named_tensors:
                param = params.get(name)
                if param is None:
                    raise EngineError(f"load_weights: the model has no parameter {name!r} "
                                      f"(first names: {list(params)[:4]})")
                if tuple(param.shape) != tuple(tensor.shape):
                    raise EngineError(f"load_weights: {name!r} has shape {tuple(tensor.shape)}, "
                                      f"the model expects {tuple(param.shape)}")
                param.data.copy_(tensor)
                covered.add(id(param))
                count += 1
        if strict:
            missing = [n for n, p in self.model.named_parameters() if id(p) not in covered]
            if missing:
                raise EngineError(f"load_weights(strict=True): {len(missing)} parameters not sent, e.g. {missing[:3]}")
        self.version = int(version)
        return count

    # -- generation --------------------------------------------------------------------------
    def generate(self, requests: Sequence[GenerationRequest]) -> list[list[Sample]]:
        import torch

        for req in requests:
            req.check(self.vocab_size)
            if self.max_positions and len(req.context) + req.max_tokens > self.max_positions:
                raise EngineError(f"context {len(req.context)} + max_tokens {req.max_tokens} exceeds the model's "
                                  f"{self.max_positions} positions: shorten the prompt or lower tree.max_tokens")
        generator = self._call_generator(requests)
        out: list[list[Sample | None]] = [[None] * r.n for r in requests]
        started = time.perf_counter()
        with torch.inference_mode():
            for chunk in self._chunks(requests):
                for (ri, j), sample in zip(chunk, self._generate_rows(requests, chunk, generator)):
                    out[ri][j] = sample
        self.stats["seconds"] += time.perf_counter() - started
        return out  # type: ignore[return-value]

    def _call_generator(self, requests: Sequence[GenerationRequest]) -> "torch.Generator":
        import torch

        seeds = [r.seed for r in requests]
        if not seeds or any(s is None for s in seeds):
            return self._generator
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

    def _forward(self, input_ids, attention_mask, position_ids, cache) -> "torch.Tensor":
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            cache=cache, use_cache=True, logits_to_keep=1).logits
        self.stats["forward_calls"] += 1
        return logits[:, -1, :].float()  # (B, V)

    def _prefill(self, contexts: list[np.ndarray], cache) -> tuple["torch.Tensor", "torch.Tensor", "torch.Tensor"]:
        """Left-padded prefill of unique contexts; returns (last logits (R,V), mask (R,L), next pos (R,))."""
        import torch

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
        logits = self._forward(ids_t, mask_t, pos_t, cache)
        self.stats["prefill_tokens"] += sum(lengths)
        return logits, mask_t, torch.tensor(lengths, device=self.device)

    def _generate_rows(self, requests: Sequence[GenerationRequest], rows: list[tuple[int, int]],
                       generator: "torch.Generator") -> list[Sample]:
        import torch
        from transformers import DynamicCache

        uniq = sorted({ri for ri, _ in rows})
        slot = {ri: k for k, ri in enumerate(uniq)}
        cache = DynamicCache(config=self.model.config)
        logits, mask, next_pos = self._prefill([requests[ri].context for ri in uniq], cache)
        expand = torch.tensor([slot[ri] for ri, _ in rows], device=self.device)  # (B,)
        cache.batch_select_indices(expand)  # prefix reuse: one prefill, n sibling rows
        logits, mask, next_pos = logits[expand], mask[expand], next_pos[expand]

        reqs = [requests[ri] for ri, _ in rows]
        temperature = torch.tensor([r.temperature for r in reqs], device=self.device)
        top_k = torch.tensor([r.top_k for r in reqs], device=self.device)
        top_p = torch.tensor([r.top_p for r in reqs], device=self.device)
        stop_ids = [set(self.eos_token_ids) | set(r.stop_token_ids) for r in reqs]
        tokens: list[list[int]] = [[] for _ in reqs]
        logps: list[list[float]] = [[] for _ in reqs]
        finish: list[str | None] = [None] * len(reqs)
        live = list(range(len(reqs)))  # batch position -> row
        while True:
            lp = processed_logprobs(logits, temperature, top_k, top_p)  # (b, V)
            tok = torch.multinomial(lp.exp(), 1, generator=generator)  # (b, 1)
            tok_lp = lp.gather(1, tok).squeeze(1)  # (b,)
            for pos, (t, l) in enumerate(zip(tok.squeeze(1).tolist(), tok_lp.tolist())):
                row = live[pos]
                if finish[row] is not None:
                    continue
                tokens[row].append(t)
                logps[row].append(l)
                finish[row] = self._finish(reqs[row], tokens[row], t, stop_ids[row])
                self.stats["generated_tokens"] += 1
            running = [pos for pos, row in enumerate(live) if finish[row] is None]
            if not running:
                break
            if 4 * (len(live) - len(running)) >= len(live):  # compact once a quarter is done
                keep = torch.tensor(running, device=self.device)
                cache.batch_select_indices(keep)
                tok, mask, next_pos = tok[keep], mask[keep], next_pos[keep]
                temperature, top_k, top_p = temperature[keep], top_k[keep], top_p[keep]
                live = [live[pos] for pos in running]
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)  # (b, L + t)
            logits = self._forward(tok, mask, next_pos.unsqueeze(1), cache)
            next_pos = next_pos + 1
        return [Sample(np.array(tokens[r], dtype=np.int32), np.array(logps[r], dtype=np.float32), finish[r])
                for r in range(len(reqs))]

    def _finish(self, req: GenerationRequest, tokens: list[int], last: int, stop_ids: set[int]) -> str | None:
        if last in stop_ids:
            return "stop"
        if req.stop_strings and self._ends_with_stop(tokens, req.stop_strings):
            return "delimiter"
        if len(tokens) >= req.max_tokens:
            return "length"
        return None

    def _ends_with_stop(self, tokens: list[int], stops: tuple[str, ...]) -> bool:
        """True if a stop string ends inside the text of the newest token (decode the tail only)."""
        k = max(len(s) for s in stops) + 1
        new = self.tokenizer.decode(tokens[-k:])
        old = self.tokenizer.decode(tokens[-k:-1]) if len(tokens) > 1 else ""
        for s in stops:
            at = new.rfind(s)
            if at >= 0 and at + len(s) > len(old):
                return True
        return False
