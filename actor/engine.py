"""The inference-engine contract shared by the HF and vLLM engines.

An engine turns `GenerationRequest`s (a token-id context, a number of siblings `n`, a budget
and stop rules) into `Sample`s. Guarantees every engine gives:

* `Sample.token_ids` are the sampled tokens (a stop token that ended the sample is included;
  a stop string is kept: the token completing it is the last one), `len >= 1`;
* `Sample.logprobs[t]` is the log-probability of `token_ids[t]` under the distribution the
  token was actually drawn from:

      z = logits / temperature
      z' = z with every token outside top-k, then outside the top-p nucleus, set to -inf
      logprob = log_softmax(z')[token]

  (common/sampling.py `processed_logprobs`, the one definition the learner recomputes too; the
  same semantics as vLLM's sampler);
* `Sample.entropy[t]`, for a request with `entropy=True` (None otherwise), is the entropy of that
  same distribution at step t (`common.sampling.entropy_of`): exact on the HF engine, from the
  top `ENTROPY_TOP_K` log-probs on vLLM (the tail left out: a lower bound that ranks the steps);
* `Sample.finish` (`SampleFinish`: why the ENGINE stopped) is "stop" (EOS or a stop token id),
  "delimiter" (a stop string) or "length" (the request's `max_tokens` reached), checked in that
  order after each token. It is not a tree node's finish (common/tree.py `Finish`: "segment",
  "stop", "length"); the sampler maps one to the other in one place (actor/sampler.py
  `node_finish`);
* `engine.version` is the weight version the engine holds; `load_weights` bumps it.

Weight sync (design §6). `receive_weights(announce)` is the whole of an engine's part in a sync
(the actor only routes announcements and acks): join the announced group, receive, check the
seal, install, set `version`, and return `Installed` (the checksum of what the engine holds, or
of what arrived where it cannot read its weights back, and the generation pause, where the engine
generates through the install); on any failure `WeightSyncError`, with weights and version as
they were (vLLM: the version as it was). The HF engine receives in the calling thread into
staging buffers with `weightsync.receiver.WeightReceiver` and adopts them under its lock; the vLLM
engine receives in its worker while generation goes on and pauses only to install
(actor/vllm_engine.py). `reset_weight_transfer()` forgets the group and store kept between syncs
(a new registration may mean a new learner); `close()` releases the engine.

Streaming (continuous batching). `open_stream(engine, seed)` returns an `EngineStream`: requests
are `add`ed at any time and `step()` advances generation, reporting each sample as soon as it
finishes (a `StreamResult`) with the engine version read when its request was admitted. A
request may name a `parent` sample (reported by the latest step) whose context + its first p
tokens (1 <= p <= all of them) are the request's context: an engine may continue that sample's
state instead of prefilling (the HF engine forks the row's KV cache, cut after token p).
Both engines have native streams (HF: actor/hf_stream.py; vLLM: `VLLMStream` over AsyncLLM, which
caps a child's version at its parent's since it may reuse the parent's KV blocks; with LoRA a child
carries the adapter in force and records its version, its KV being keyed by the adapter). An engine
without one gets `GenerateStream`: each `step()` is one
`generate` call over every request queued so far.

This module imports no concrete engine: `actor.engines.make_engine` builds the engine named by
`ActorConfig.engine` (vLLM is imported only then).
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np
import torch

from common.errors import EngineError  # defined with its exit code there; engines import it from here

SampleFinish = Literal["stop", "length", "delimiter"]  # why an engine ended a sample (module docstring)
ENTROPY_TOP_K = 20  # log-probs per step vLLM reports for an entropy request (its default max_logprobs)


@dataclass
class GenerationRequest:
    """`n` independent continuations of one context (siblings share the prefilled context)."""

    context: np.ndarray  # int32[P] token ids
    n: int
    max_tokens: int
    stop_token_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    entropy: bool = False  # also report each token's sampling entropy (Sample.entropy)

    def __post_init__(self) -> None:
        self.context = np.asarray(self.context, dtype=np.int32)

    def check(self, vocab_size: int) -> None:
        """Raise EngineError naming the bad field."""
        if self.context.ndim != 1 or self.context.shape[0] < 1:
            raise EngineError("GenerationRequest.context must be a 1-D array of at least one token id")
        if self.context.min() < 0 or self.context.max() >= vocab_size:
            raise EngineError(f"GenerationRequest.context holds ids outside [0, {vocab_size})")
        if self.n < 1:
            raise EngineError(f"GenerationRequest.n = {self.n}: must be >= 1")
        if self.max_tokens < 1:
            raise EngineError(f"GenerationRequest.max_tokens = {self.max_tokens}: must be >= 1")
        if not self.temperature > 0.0:
            raise EngineError(f"GenerationRequest.temperature = {self.temperature}: must be > 0 (no greedy mode)")
        if not 0.0 < self.top_p <= 1.0:
            raise EngineError(f"GenerationRequest.top_p = {self.top_p}: must lie in (0, 1]")
        if self.top_k < 0:
            raise EngineError(f"GenerationRequest.top_k = {self.top_k}: must be >= 0 (0 = off)")
        if any(not s for s in self.stop_strings):
            raise EngineError("GenerationRequest.stop_strings must not hold an empty string")


@dataclass
class Sample:
    token_ids: np.ndarray  # int32[L]
    logprobs: np.ndarray  # float32[L]
    finish: SampleFinish
    entropy: np.ndarray | None = None  # float32[L], when the request asked for it

    def __post_init__(self) -> None:
        self.token_ids = np.asarray(self.token_ids, dtype=np.int32)
        self.logprobs = np.asarray(self.logprobs, dtype=np.float32)
        if self.entropy is not None:
            self.entropy = np.asarray(self.entropy, dtype=np.float32)
            if self.entropy.shape != self.logprobs.shape:
                raise EngineError(f"Sample.entropy has {self.entropy.shape[0]} entries for {self.logprobs.shape[0]} "
                                  "tokens")


@dataclass(frozen=True)
class Installed:
    """A weight sync an engine received and installed (`Engine.receive_weights`)."""

    checksum: str  # weightsync.seal.tensor_checksum of what the engine holds (vLLM: of what arrived)
    seconds: float  # this side's whole sync: rendezvous, receive, install
    pause_s: float | None = None  # generation paused for the install; None: not measured (HF: between steps)
    kept: int = 0  # requests that stayed in flight through the pause


@runtime_checkable
class Engine(Protocol):
    version: int
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    tokenizer: Any
    device: torch.device

    def generate(self, requests: Sequence[GenerationRequest]) -> list[list[Sample]]:
        """One list of `request.n` samples per request, in request order."""
        ...

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> Any:
        """Install tensors held in this process (tests, tools), then set `self.version = version`."""
        ...

    def receive_weights(self, announce: Any) -> Installed:
        """Take part in the announced sync (a common.wire.WeightAnnounce): receive, check, install,
        set the version; WeightSyncError otherwise (module docstring)."""
        ...

    def reset_weight_transfer(self) -> None:
        """Forget the sync group and store kept between syncs (a new registration)."""
        ...

    def close(self) -> None:
        """Release what the engine holds (vLLM: its engine-core and worker processes)."""
        ...


@dataclass
class StreamResult:
    """What `EngineStream.step()` reports: finished sample `index` of the request added with `tag`."""

    tag: Hashable
    index: int
    sample: Sample
    version: int  # engine.version read when the request was admitted (its generation started)


class EngineStream(Protocol):
    def add(self, request: GenerationRequest, tag: Hashable, parent: tuple[Hashable, int] | None = None) -> None:
        """Queue a request. `parent = (tag, index)` of a sample reported by the latest `step()`
        says `request.context == parent's context + the parent sample's first p tokens`, p >= 1."""
        ...

    def step(self) -> list[StreamResult]:
        """Advance generation; return the samples that finished, in a deterministic order."""
        ...

    def busy(self) -> bool:
        """True while any request is queued or running."""
        ...

    def free_rows(self) -> int | None:
        """Sample rows the engine could start now without queueing (None: no limit known)."""
        ...

    def close(self) -> None:
        """Drop the requests still in flight (the caller stopped early)."""
        ...


class GenerateStream:
    """`EngineStream` over any engine's `generate`: a step is one call over all queued requests.

    Requests queued while a call runs join the next call, so the levels of different trees share
    calls; a call still waits for its slowest request. `parent` is ignored (vLLM's prefix cache
    reuses the context anyway).
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._queue: list[tuple[GenerationRequest, Hashable]] = []

    def add(self, request: GenerationRequest, tag: Hashable, parent: tuple[Hashable, int] | None = None) -> None:
        self._queue.append((request, tag))

    def busy(self) -> bool:
        return bool(self._queue)

    def free_rows(self) -> int | None:
        return None  # each step is one generate call over whatever is queued

    def close(self) -> None:
        self._queue = []

    def step(self) -> list[StreamResult]:
        queued, self._queue = self._queue, []
        if not queued:
            return []
        version = int(self.engine.version)
        results = self.engine.generate([req for req, _ in queued])
        return [StreamResult(tag, j, sample, version) for (_, tag), samples in zip(queued, results, strict=True)
                for j, sample in enumerate(samples)]


def open_stream(engine: Engine, seed: int | None = None) -> EngineStream:
    """The engine's native stream (`engine.open_stream(seed)`) if it has one, else `GenerateStream`.

    `seed` seeds a native stream's random draws (None: the engine's own generator); the generate
    fallback uses the requests' own seeds.
    """
    native = getattr(engine, "open_stream", None)
    if callable(native):
        return native(seed)
    return GenerateStream(engine)


def collect_eos_ids(*sources) -> tuple[int, ...]:
    """EOS ids named by config/tokenizer fields (each None, an int or a list), first seen first."""
    ids: list[int] = []
    for src in sources:
        for i in src if isinstance(src, (list, tuple)) else [src]:
            if i is not None and int(i) not in ids:
                ids.append(int(i))
    if not ids:
        raise EngineError("the model and tokenizer name no EOS token: set eos_token_id in its config")
    return tuple(ids)

