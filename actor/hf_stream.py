"""Continuous batching on an `HFEngine` (`engine.open_stream(seed)`, an `EngineStream` of
actor/engine.py): rows join and leave the running batch between decode steps.

One running batch (a DynamicCache, left-padded, explicit positions). The stream drives the
engine through its public decoding surface (`lock`, `generator`, `check`, `new_cache`,
`prefill`, `forward`, `stop_ids`, `sampling_params`, `sample_rows`), the calls
`HFEngine.generate` makes, so both draw and record tokens with one implementation
(actor/decoding.py). Every step holds the engine's lock. A step:

1. admits queued requests: a request whose `parent` finished in the previous step forks that
   row (its KV cache row repeated `n` times; the parent's last token is the children's first
   input, so a child needs no prefill). A child whose context is the parent's context plus only
   the first p of its L tokens (`tree.branch_at: entropy`) forks the row cropped: its last L - p
   KV columns dropped, token p - 1 as the first input. Any other request is prefilled (once for
   its n rows) and merged in, while the batch holds fewer than `max_batch_rows` rows (forks
   always go in);
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

import time
from collections.abc import Hashable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from actor.decoding import DecodeRow
from actor.engine import EngineError, GenerationRequest, StreamResult

if TYPE_CHECKING:  # pragma: no cover
    from actor.hf_engine import HFEngine


@dataclass(eq=False, kw_only=True)
class _Row(DecodeRow):
    """One sequence of the running batch: sample `index` of the request added with `tag`."""

    tag: Hashable
    index: int
    version: int  # engine.version read at the start of the step that admitted the request


@dataclass
class _Parked:
    """A finished row's state kept out of the batch until its children fit in."""

    keys: list  # per layer (1, H, w, D)
    values: list
    mask: torch.Tensor  # (1, w), all ones
    pos: torch.Tensor  # (1,)
    tok: torch.Tensor  # (1,) the row's last sampled token, not yet fed
    context: np.ndarray  # the row's request context
    tokens: list[int]  # the row's sampled tokens


class HFStream:
    """Continuous batching on an `HFEngine`: rows join and leave between decode steps."""

    def __init__(self, engine: HFEngine, seed: int | None) -> None:
        self.engine = engine
        self.generator = (engine.generator if seed is None
                          else torch.Generator(device=engine.device).manual_seed(int(seed)))
        self._queue: list[tuple[GenerationRequest, Hashable, tuple[Hashable, int] | None]] = []
        self.rows: list[_Row] = []  # batch position -> row (done rows linger until compaction)
        self.cache = None  # DynamicCache over the batch, (B, H, W, D) per layer
        self.mask = None  # (B, W) long, 1 = real token (each row's tokens are the last columns)
        self.pos = None  # (B,) long, position of the next input token
        self.tok = None  # (B,) long, the next input token (the last sampled one)
        self.params = None  # (temperature (B,), top_k (B,), top_p (B,))
        self._forkable: dict[tuple[Hashable, int], int] = {}  # finished last step -> position
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

    def close(self) -> None:
        """Drop every queued and running request and the batch's cache (the caller stopped early)."""
        self._queue.clear()
        self.rows = []
        self.cache = self.mask = self.pos = self.tok = self.params = None
        self._forkable.clear()
        self._parked.clear()

    def step(self) -> list[StreamResult]:
        with self.engine.lock, torch.inference_mode():
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
        """(forks of rows in the batch, forks of parked rows, fresh requests) that fit this step;
        a fork is (request, tag, parent, the parent's last tokens its context leaves out).

        Forks go first (they complete trees), FIFO; fresh requests only once no fork waits. A
        request goes in while running rows + its n <= max_batch_rows (or the batch is empty). A
        fork that must wait has its parent's state parked, so it never needs a prefill.
        """
        cap = self.engine.max_batch_rows
        rows = self.running()
        forks, unpark, fresh, taken = [], [], [], set()
        waiting = False
        crops = {k: self._crop(req, parent) for k, (req, _tag, parent) in enumerate(self._queue)}
        forking = {k for k, drop in crops.items() if drop is not None}
        for k, (req, tag, parent) in enumerate(self._queue):
            if k not in forking:
                continue
            if not waiting and (rows == 0 or rows + req.n <= cap):
                (forks if parent in self._forkable else unpark).append((req, tag, parent, crops[k]))
                rows += req.n
                taken.add(k)
            else:
                waiting = True
                if parent in self._forkable:
                    self._park(parent)
        for k, (req, _tag, parent) in enumerate(self._queue):
            if k in taken or (k in forking and parent in self._parked):
                continue
            if not waiting and (rows == 0 or rows + req.n <= cap):
                fresh.append(self._queue[k])
                rows += req.n
                taken.add(k)
            else:
                waiting = True  # FIFO: nothing overtakes a waiting request
        self._queue = [item for k, item in enumerate(self._queue) if k not in taken]
        return forks, unpark, fresh

    def _crop(self, req: GenerationRequest, parent: tuple[Hashable, int] | None) -> int | None:
        """How many of the parent's last tokens the child's context leaves out (0: all kept), or
        None if the child cannot fork the parent's row (no such parent here, or its context is not
        the parent's context plus 1 .. L of its L tokens)."""
        if parent is None:
            return None
        if parent in self._parked:
            st = self._parked[parent]
            context, tokens = st.context, st.tokens
        elif parent in self._forkable:
            row = self.rows[self._forkable[parent]]
            context, tokens = row.req.context, row.tokens
        else:
            return None
        p = len(req.context) - len(context)
        if not 1 <= p <= len(tokens) or not (np.array_equal(req.context[:len(context)], context)
                                             and np.array_equal(req.context[len(context):], tokens[:p])):
            return None
        return len(tokens) - p

    def _park(self, parent: tuple[Hashable, int]) -> None:
        """Copy a finished row's KV, mask, position and last token out of the batch."""
        if parent in self._parked:  # another child of it parked it already
            return
        b = self._forkable[parent]
        width = int(self.mask[b].sum())
        self._parked[parent] = _Parked(
            keys=[layer.keys[b:b + 1, :, -width:].clone() for layer in self._layers()],
            values=[layer.values[b:b + 1, :, -width:].clone() for layer in self._layers()],
            mask=self.mask[b:b + 1, -width:].clone(), pos=self.pos[b:b + 1].clone(), tok=self.tok[b:b + 1].clone(),
            context=self.rows[b].req.context, tokens=list(self.rows[b].tokens))

    def _regroup(self, forks: list, version: int, force: bool) -> None:
        """Select the running rows plus each fork's parent row repeated n times; trim padding."""
        dead = sum(r.done for r in self.rows)
        self._forkable, forkable = {}, self._forkable
        if not forks and not (dead and (force or 4 * dead >= len(self.rows))):
            return
        index = [b for b, r in enumerate(self.rows) if not r.done]
        rows = [self.rows[b] for b in index]
        crops = []  # (first batch row, rows, columns to drop, first input token)
        for req, tag, parent, drop in forks:
            if drop:
                crops.append((len(index), req.n, drop, self.rows[forkable[parent]].tokens[-drop - 1]))
            index += [forkable[parent]] * req.n
            rows += self._new_rows(req, tag, version)
        self.rows = rows
        if not rows:
            self.cache = self.mask = self.pos = self.tok = self.params = None
            return
        idx = torch.tensor(index, device=self.engine.device)
        self.cache.batch_select_indices(idx)
        self.mask, self.pos, self.tok = self.mask[idx], self.pos[idx], self.tok[idx]
        for start, n, drop, tok in crops:  # the rows stay right-aligned: shift their columns right
            rs = slice(start, start + n)
            for layer in self._layers():
                for t in (layer.keys, layer.values):
                    t[rs, :, drop:] = t[rs, :, :-drop].clone()
                    t[rs, :, :drop] = 0
            self.mask[rs, drop:] = self.mask[rs, :-drop].clone()
            self.mask[rs, :drop] = 0
            self.pos[rs] -= drop
            self.tok[rs] = tok
        self.params = self.engine.sampling_params(rows)
        first = int(self.mask.any(0).int().argmax())  # leading columns no row uses
        if first > 0:
            self.mask = self.mask[:, first:]
            for layer in self._layers():
                layer.keys, layer.values = layer.keys[:, :, first:], layer.values[:, :, first:]

    def _unpark(self, items: list, version: int) -> None:
        """Put parked parents back, each repeated n times, as running rows (their token still to feed)."""
        for req, tag, parent, drop in items:
            st = self._parked[parent]
            rep = lambda x, n=req.n: x.expand(n, *x.shape[1:])  # noqa: E731 - n sibling rows of one state
            keep = st.mask.shape[1] - drop  # the child's context: the parent's columns less the last `drop`
            tok = st.tok if not drop else torch.full_like(st.tok, st.tokens[-drop - 1])
            self._merge([rep(k[:, :, :keep]) for k in st.keys], [rep(v[:, :, :keep]) for v in st.values],
                        rep(st.mask[:, :keep]), rep(st.pos - drop), rep(tok), self._new_rows(req, tag, version))
        waiting = {parent for _, _, parent in self._queue}
        for parent in [p for p in self._parked if p not in waiting]:  # no child of it left to admit
            del self._parked[parent]

    def _join(self, fresh: list, logits, version: int):
        """Prefill fresh requests (once per request), repeat for n siblings, merge into the batch."""
        cache = self.engine.new_cache()
        new_logits, mask, lengths = self.engine.prefill([req.context for req, _, _ in fresh], cache)
        expand = torch.tensor([k for k, (req, _, _) in enumerate(fresh) for _ in range(req.n)],
                              device=self.engine.device)  # (R,)
        layers = self._layers(cache)
        rows = [row for req, tag, _ in fresh for row in self._new_rows(req, tag, version)]
        self._merge([layer.keys[expand] for layer in layers], [layer.values[expand] for layer in layers],
                    mask[expand], lengths[expand], torch.zeros_like(lengths[expand]), rows)
        new_logits = new_logits[expand]
        return new_logits if logits is None else torch.cat([logits, new_logits], dim=0)

    def _merge(self, keys: list, values: list, mask, pos, tok, rows: list[_Row]) -> None:
        """Append rows (per-layer KV (R, H, w, D), mask (R, w), pos, tok (R,)) left-padded to one width."""
        if not self.rows:
            self.cache = self.engine.new_cache()
            for i, (k, v) in enumerate(zip(keys, values, strict=True)):
                self.cache.update(k.contiguous(), v.contiguous(), i)
            self.mask, self.pos, self.tok, self.rows = mask, pos, tok, list(rows)
        else:
            width = max(self.mask.shape[1], mask.shape[1])
            self.mask = torch.cat([_pad_left(self.mask, width, 1), _pad_left(mask, width, 1)], dim=0)
            for layer, k, v in zip(self._layers(), keys, values, strict=True):
                layer.keys = torch.cat([_pad_left(layer.keys, width, 2), _pad_left(k, width, 2)], dim=0)
                layer.values = torch.cat([_pad_left(layer.values, width, 2), _pad_left(v, width, 2)], dim=0)
            self.pos, self.tok = torch.cat([self.pos, pos]), torch.cat([self.tok, tok])
            self.rows = self.rows + list(rows)
        self.params = self.engine.sampling_params(self.rows)

    # -- decoding ----------------------------------------------------------------------------
    def _decode(self):
        """One forward of every batch row's pending token; (B, V) logits or None if empty."""
        if not self.rows:
            return None

        self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], dim=1)  # (B, W + 1)
        logits = self.engine.forward(self.tok.unsqueeze(1), self.mask, self.pos.unsqueeze(1), self.cache)
        self.pos = self.pos + 1
        return logits

    def _sample(self, logits) -> list[StreamResult]:
        """Draw one token per row; report the rows that finish (non-EOS ones stay forkable a step)."""
        self.tok, ended = self.engine.sample_rows(logits, self.params, self.rows, self.generator)  # (B,)
        out = []
        for b in ended:
            row = self.rows[b]
            out.append(StreamResult(row.tag, row.index, row.to_sample(), row.version))
            self._forkable[(row.tag, row.index)] = b  # for one step: children fork its KV row
        return out

    # -- helpers -----------------------------------------------------------------------------
    def _new_rows(self, req: GenerationRequest, tag: Hashable, version: int) -> list[_Row]:
        """The request's n sibling rows, admitted at `version`."""
        stop_ids = self.engine.stop_ids(req)
        return [_Row(req=req, stop_ids=stop_ids, tag=tag, index=j, version=version) for j in range(req.n)]

    def _layers(self, cache=None):
        layers = (cache if cache is not None else self.cache).layers
        for layer in layers:
            if getattr(layer, "is_sliding", False) or not hasattr(layer, "keys"):
                raise EngineError(f"HFStream needs plain DynamicCache layers, got {type(layer).__name__}: "
                                  "use engine.generate (or vLLM) for sliding-window models")
        return layers


def _pad_left(x: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """Zero-pad `x` on the left along `dim` to `width` (padding is masked out by the attention mask)."""
    missing = width - x.shape[dim]
    if missing <= 0:
        return x
    shape = list(x.shape)
    shape[dim] = missing
    return torch.cat([x.new_zeros(shape), x], dim=dim)
