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
* `generate`, `load_weights`, `swap_in` and every stream step hold the engine's own lock, so
  weights never change inside a forward.

Continuous batching (`open_stream(seed)` -> `HFStream`, the `EngineStream` of actor/engine.py).
One running batch (a DynamicCache, left-padded, explicit positions) that rows join and leave
between decode steps. A step:

1. admits queued requests: a request whose `parent` finished in the previous step forks that
   row (its KV cache row repeated `n` times; the parent's last token is the children's first
   input, so a child needs no prefill); any other request is prefilled (once for its n rows) and
   merged in, while the batch holds fewer than `max_batch_rows` rows (forks always go in);
2. drops finished rows (at once when it regroups anyway, else once a quarter is dead) and trims
   padding columns no row uses;
3. decodes one token for every running row and the first token of every new row, from one
   random stream (`torch.Generator` seeded by the stream's seed): a run of steps with the same
   adds returns the same samples;
4. reports each finished sample with the version read at the start of the step that admitted it.
A weight load between steps applies from the next step on; a row running across it keeps the
version of its admission (the older one: staleness is never under-estimated) and its earlier
KV entries.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Hashable, Iterable, Sequence

import numpy as np

from actor.engine import EngineError, Finished, GenerationRequest, Sample, processed_logprobs

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
        self._lock = threading.RLock()  # generate / stream step vs load_weights

    def _find_eos_ids(self) -> tuple[int, ...]:
        from actor.engine import collect_eos_ids

        return collect_eos_ids(getattr(self.model.generation_config, "eos_token_id", None),
                               getattr(self.model.config, "eos_token_id", None), self.tokenizer.eos_token_id)

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
        with self._lock, torch.no_grad():
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

    def swap_in(self, named_tensors: Iterable[tuple[str, "torch.Tensor"]], version: int, *,
                strict: bool = False) -> bool:
        """Adopt the tensors AS the parameters (`param.data = tensor`, no copy), then set version.

        All or nothing: every name, shape and duplicate is checked first (EngineError, nothing
        changed); if any tensor's dtype or device differs from its parameter's, or it needs grad,
        nothing changes and it returns False (copy with `load_weights` instead). Otherwise every
        parameter is rebound under the engine lock, between forwards, and it returns True. Tied
        parameters stay tied (a tie is one Parameter object; send it under one of its names).
        The caller must never write the adopted tensors again while the engine holds them.
        """
        import torch

        params = dict(self.model.named_parameters(remove_duplicate=False))
        pairs: list[tuple["torch.nn.Parameter", "torch.Tensor"]] = []
        covered: dict[int, str] = {}
        for name, tensor in named_tensors:
            param = params.get(name)
            if param is None:
                raise EngineError(f"swap_in: the model has no parameter {name!r} (first names: {list(params)[:4]})")
            if tuple(param.shape) != tuple(tensor.shape):
                raise EngineError(f"swap_in: {name!r} has shape {tuple(tensor.shape)}, "
                                  f"the model expects {tuple(param.shape)}")
            if id(param) in covered:
                raise EngineError(f"swap_in: {name!r} and {covered[id(param)]!r} are one tied parameter; send it once")
            covered[id(param)] = name
            pairs.append((param, tensor))
        if strict:
            missing = [n for n, p in self.model.named_parameters() if id(p) not in covered]
            if missing:
                raise EngineError(f"swap_in(strict=True): {len(missing)} parameters not sent, e.g. {missing[:3]}")
        if any(t.dtype != p.dtype or t.device != p.device or t.requires_grad for p, t in pairs):
            return False
        with self._lock, torch.no_grad():
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

    def open_stream(self, seed: int | None = None) -> "HFStream":
        """A continuous-batching stream on this engine (module docstring)."""
        return HFStream(self, seed)

    def generate(self, requests: Sequence[GenerationRequest]) -> list[list[Sample]]:
        import torch

        for req in requests:
            self.check(req)
        generator = self._call_generator(requests)
        out: list[list[Sample | None]] = [[None] * r.n for r in requests]
        started = time.perf_counter()
        with self._lock, torch.inference_mode():
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


@dataclass
class _Row:
    """One sequence of the running batch: sample `index` of the request added with `tag`."""

    tag: Hashable
    index: int
    req: GenerationRequest
    stop_ids: frozenset[int]
    version: int
    tokens: list[int] = field(default_factory=list)
    logps: list[float] = field(default_factory=list)
    done: bool = False


@dataclass
class _Parked:
    """A finished row's state kept out of the batch until its children fit in."""

    keys: list  # per layer (1, H, w, D)
    values: list
    mask: "torch.Tensor"  # (1, w), all ones
    pos: "torch.Tensor"  # (1,)
    tok: "torch.Tensor"  # (1,) the row's last sampled token, not yet fed


class HFStream:
    """Continuous batching on an `HFEngine`: rows join and leave between decode steps."""

    def __init__(self, engine: HFEngine, seed: int | None) -> None:
        import torch

        self.engine = engine
        self.generator = (engine._generator if seed is None
                          else torch.Generator(device=engine.device).manual_seed(int(seed)))
        self._queue: list[tuple[GenerationRequest, Hashable, tuple[Hashable, int] | None]] = []
        self.rows: list[_Row] = []  # batch position -> row (done rows linger until compaction)
        self.cache = None  # DynamicCache over the batch, (B, H, W, D) per layer
        self.mask = None  # (B, W) long, 1 = real token (each row's tokens are the last columns)
        self.pos = None  # (B,) long, position of the next input token
        self.tok = None  # (B,) long, the next input token (the last sampled one)
        self.params = None  # (temperature (B,), top_k (B,), top_p (B,))
        self._forkable: dict[tuple[Hashable, int], int] = {}  # finished last step, not EOS -> position
        self._parked: dict[tuple[Hashable, int], _Parked] = {}  # parents of forks waiting for room

    # -- EngineStream ------------------------------------------------------------------------
    def add(self, request: GenerationRequest, tag: Hashable, parent: tuple[Hashable, int] | None = None) -> None:
        self.engine.check(request)
        self._queue.append((request, tag, parent))

    def busy(self) -> bool:
        return bool(self._queue) or any(not r.done for r in self.rows)

    def running(self) -> int:
        """Rows still generating."""
        return sum(not r.done for r in self.rows)

    def free_rows(self) -> int:
        """Rows the batch can still take: max_batch_rows - running - queued (>= 0)."""
        queued = sum(req.n for req, _, _ in self._queue)
        return max(0, self.engine.max_batch_rows - self.running() - queued)

    def step(self) -> list[Finished]:
        import torch

        with self.engine._lock, torch.inference_mode():
            started = time.perf_counter()
            version = int(self.engine.version)
            forks, unpark, fresh = self._admit()
            self._regroup(forks, version, force=bool(fresh or unpark))
            if unpark:
                self._unpark(unpark, version)
            logits = self._decode()  # (B, V) or None
            if fresh:
                logits = self._join(fresh, logits, version)
            out = self._sample(logits) if logits is not None else []
            self.engine.stats["seconds"] += time.perf_counter() - started
        return out

    # -- admission ---------------------------------------------------------------------------
    def _admit(self) -> tuple[list, list, list]:
        """(forks of rows in the batch, forks of parked rows, fresh requests) that fit this step.

        Forks go first (they complete trees), FIFO; fresh requests only once no fork waits. A
        request goes in while running rows + its n <= max_batch_rows (or the batch is empty). A
        fork that must wait has its parent's state parked, so it never needs a prefill.
        """
        cap = self.engine.max_batch_rows
        rows = self.running()
        forks, unpark, fresh, taken = [], [], [], set()
        waiting = False
        for k, (req, tag, parent) in enumerate(self._queue):
            if parent is None or (parent not in self._forkable and parent not in self._parked):
                continue
            if not waiting and (rows == 0 or rows + req.n <= cap):
                (forks if parent in self._forkable else unpark).append(self._queue[k])
                rows += req.n
                taken.add(k)
            else:
                waiting = True
                if parent in self._forkable:
                    self._park(parent)
        for k, (req, tag, parent) in enumerate(self._queue):
            if k in taken or (parent is not None and parent in self._parked):
                continue
            if not waiting and (rows == 0 or rows + req.n <= cap):
                fresh.append(self._queue[k])
                rows += req.n
                taken.add(k)
            else:
                waiting = True  # FIFO: nothing overtakes a waiting request
        self._queue = [item for k, item in enumerate(self._queue) if k not in taken]
        return forks, unpark, fresh

    def _park(self, parent: tuple[Hashable, int]) -> None:
        """Copy a finished row's KV, mask, position and last token out of the batch."""
        b = self._forkable[parent]
        width = int(self.mask[b].sum())
        self._parked[parent] = _Parked(
            keys=[layer.keys[b:b + 1, :, -width:].clone() for layer in self._layers()],
            values=[layer.values[b:b + 1, :, -width:].clone() for layer in self._layers()],
            mask=self.mask[b:b + 1, -width:].clone(), pos=self.pos[b:b + 1].clone(), tok=self.tok[b:b + 1].clone())

    def _regroup(self, forks: list, version: int, force: bool) -> None:
        """Select the running rows plus each fork's parent row repeated n times; trim padding."""
        import torch

        dead = sum(r.done for r in self.rows)
        self._forkable, forkable = {}, self._forkable
        if not forks and not (dead and (force or 4 * dead >= len(self.rows))):
            return
        index = [b for b, r in enumerate(self.rows) if not r.done]
        rows = [self.rows[b] for b in index]
        for req, tag, parent in forks:
            index += [forkable[parent]] * req.n
            rows += [_Row(tag, j, req, self._stop_ids(req), version) for j in range(req.n)]
        self.rows = rows
        if not rows:
            self.cache = self.mask = self.pos = self.tok = self.params = None
            return
        idx = torch.tensor(index, device=self.engine.device)
        self.cache.batch_select_indices(idx)
        self.mask, self.pos, self.tok = self.mask[idx], self.pos[idx], self.tok[idx]
        self.params = self._params(rows)
        first = int(self.mask.any(0).int().argmax())  # leading columns no row uses
        if first > 0:
            self.mask = self.mask[:, first:]
            for layer in self._layers():
                layer.keys, layer.values = layer.keys[:, :, first:], layer.values[:, :, first:]

    def _unpark(self, items: list, version: int) -> None:
        """Put parked parents back, each repeated n times, as running rows (their token still to feed)."""
        for req, tag, parent in items:
            st = self._parked.pop(parent)
            rep = lambda x: x.expand(req.n, *x.shape[1:])  # noqa: E731 - n sibling rows of one state
            self._merge([rep(k) for k in st.keys], [rep(v) for v in st.values], rep(st.mask), rep(st.pos),
                        rep(st.tok), [_Row(tag, j, req, self._stop_ids(req), version) for j in range(req.n)])

    def _join(self, fresh: list, logits, version: int):
        """Prefill fresh requests (once per request), repeat for n siblings, merge into the batch."""
        import torch
        from transformers import DynamicCache

        cache = DynamicCache(config=self.engine.model.config)
        new_logits, mask, lengths = self.engine._prefill([req.context for req, _, _ in fresh], cache)
        expand = torch.tensor([k for k, (req, _, _) in enumerate(fresh) for _ in range(req.n)],
                              device=self.engine.device)  # (R,)
        layers = self._layers(cache)
        rows = [_Row(tag, j, req, self._stop_ids(req), version) for req, tag, _ in fresh for j in range(req.n)]
        self._merge([layer.keys[expand] for layer in layers], [layer.values[expand] for layer in layers],
                    mask[expand], lengths[expand], torch.zeros_like(lengths[expand]), rows)
        new_logits = new_logits[expand]
        return new_logits if logits is None else torch.cat([logits, new_logits], dim=0)

    def _merge(self, keys: list, values: list, mask, pos, tok, rows: list[_Row]) -> None:
        """Append rows (per-layer KV (R, H, w, D), mask (R, w), pos, tok (R,)) left-padded to one width."""
        import torch
        from transformers import DynamicCache

        if not self.rows:
            self.cache = DynamicCache(config=self.engine.model.config)
            for i, (k, v) in enumerate(zip(keys, values)):
                self.cache.update(k.contiguous(), v.contiguous(), i)
            self.mask, self.pos, self.tok, self.rows = mask, pos, tok, list(rows)
        else:
            width = max(self.mask.shape[1], mask.shape[1])
            self.mask = torch.cat([_pad_left(self.mask, width, 1), _pad_left(mask, width, 1)], dim=0)
            for layer, k, v in zip(self._layers(), keys, values):
                layer.keys = torch.cat([_pad_left(layer.keys, width, 2), _pad_left(k, width, 2)], dim=0)
                layer.values = torch.cat([_pad_left(layer.values, width, 2), _pad_left(v, width, 2)], dim=0)
            self.pos, self.tok = torch.cat([self.pos, pos]), torch.cat([self.tok, tok])
            self.rows = self.rows + list(rows)
        self.params = self._params(self.rows)

    # -- decoding ----------------------------------------------------------------------------
    def _decode(self):
        """One forward of every batch row's pending token; (B, V) logits or None if empty."""
        if not self.rows:
            return None
        import torch

        self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], dim=1)  # (B, W + 1)
        logits = self.engine._forward(self.tok.unsqueeze(1), self.mask, self.pos.unsqueeze(1), self.cache)
        self.pos = self.pos + 1
        return logits

    def _sample(self, logits) -> list[Finished]:
        """Draw one token per row; report the rows that finish (non-EOS ones stay forkable a step)."""
        import torch

        lp = processed_logprobs(logits, *self.params)  # (B, V)
        tok = torch.multinomial(lp.exp(), 1, generator=self.generator)  # (B, 1)
        tok_lp = lp.gather(1, tok).squeeze(1)  # (B,)
        self.tok = tok.squeeze(1)
        out = []
        for b, (t, l) in enumerate(zip(self.tok.tolist(), tok_lp.tolist())):
            row = self.rows[b]
            if row.done:
                continue
            row.tokens.append(t)
            row.logps.append(l)
            self.engine.stats["generated_tokens"] += 1
            finish = self.engine._finish(row.req, row.tokens, t, row.stop_ids)
            if finish is None:
                continue
            row.done = True
            sample = Sample(np.array(row.tokens, dtype=np.int32), np.array(row.logps, dtype=np.float32), finish)
            out.append(Finished(row.tag, row.index, sample, row.version))
            if finish != "stop":
                self._forkable[(row.tag, row.index)] = b
        return out

    # -- helpers -----------------------------------------------------------------------------
    def _stop_ids(self, req: GenerationRequest) -> frozenset[int]:
        return frozenset(self.engine.eos_token_ids) | frozenset(req.stop_token_ids)

    def _params(self, rows: list[_Row]):
        import torch

        dev = self.engine.device
        return (torch.tensor([r.req.temperature for r in rows], device=dev),
                torch.tensor([r.req.top_k for r in rows], device=dev),
                torch.tensor([r.req.top_p for r in rows], device=dev))

    def _layers(self, cache=None):
        layers = (cache if cache is not None else self.cache).layers
        for layer in layers:
            if getattr(layer, "is_sliding", False) or not hasattr(layer, "keys"):
                raise EngineError(f"HFStream needs plain DynamicCache layers, got {type(layer).__name__}: "
                                  "use engine.generate (or vLLM) for sliding-window models")
        return layers


def _pad_left(x: "torch.Tensor", width: int, dim: int) -> "torch.Tensor":
    """Zero-pad `x` on the left along `dim` to `width` (padding is masked out by the attention mask)."""
    import torch

    missing = width - x.shape[dim]
    if missing <= 0:
        return x
    shape = list(x.shape)
    shape[dim] = missing
    return torch.cat([x.new_zeros(shape), x], dim=dim)
