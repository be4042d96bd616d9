"""Token-by-token decoding shared by `HFEngine.generate` and `HFStream`: one implementation.

A `DecodeRow` is one sample in progress. `sample_rows` draws one token for every row of a batch
from the distribution of actor/engine.py's contract (common/sampling.py `processed_logprobs`), records the token and
its log-prob under that distribution (and, for a request with `entropy`, the distribution's
entropy) on every row still running, and sets the row's `finish`
by `finish_reason`: a stop token id is "stop", a stop string ending inside the new token's text
is "delimiter", the request's `max_tokens` reached is "length" (checked in that order). A row
that finished earlier still gets a draw (the batch is sampled whole, so the random stream
advances by the batch size) and ignores it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from actor.engine import GenerationRequest, Sample, SampleFinish
from common.sampling import entropy_of, processed_logprobs

Decode = Callable[[list[int]], str]  # token ids -> text (the tokenizer's decode)


@dataclass(eq=False)
class DecodeRow:
    """One sample being generated for `req`: its tokens and log-probs so far, `finish` once done."""

    req: GenerationRequest
    stop_ids: frozenset[int]  # EOS ids and the request's stop token ids
    tokens: list[int] = field(default_factory=list)
    logps: list[float] = field(default_factory=list)
    ents: list[float] = field(default_factory=list)  # sampling entropies, when req.entropy
    finish: SampleFinish | None = None

    @property
    def done(self) -> bool:
        return self.finish is not None

    def to_sample(self) -> Sample:
        return Sample(np.array(self.tokens, dtype=np.int32), np.array(self.logps, dtype=np.float32), self.finish,
                      np.array(self.ents, dtype=np.float32) if self.req.entropy else None)


def sample_rows(logits: torch.Tensor, params: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                rows: Sequence[DecodeRow], generator: torch.Generator,
                decode: Decode) -> tuple[torch.Tensor, list[int]]:
    """Draw one token per batch row and record it on the rows still running.

    logits (B, V), one row per `rows[b]`; params = (temperature, top_k, top_p), each (B,).
    Returns (the drawn tokens (B,), the batch positions whose row finished with this token).
    """
    lp = processed_logprobs(logits, *params)  # (B, V)
    tok = torch.multinomial(lp.exp(), 1, generator=generator)  # (B, 1)
    tok_lp = lp.gather(1, tok).squeeze(1)  # (B,)
    tok = tok.squeeze(1)  # (B,)
    want = [b for b, row in enumerate(rows) if row.req.entropy and not row.done]
    ents = dict(zip(want, entropy_of(lp[want]).tolist(), strict=True)) if want else {}
    ended = []
    for b, (t, logp) in enumerate(zip(tok.tolist(), tok_lp.tolist(), strict=True)):
        row = rows[b]
        if row.done:
            continue
        row.tokens.append(t)
        row.logps.append(logp)
        if b in ents:
            row.ents.append(ents[b])
        row.finish = finish_reason(row, decode)
        if row.done:
            ended.append(b)
    return tok, ended


def finish_reason(row: DecodeRow, decode: Decode) -> SampleFinish | None:
    """Why the row ends after its newest token, or None if it goes on (module docstring)."""
    if row.tokens[-1] in row.stop_ids:
        return "stop"
    if row.req.stop_strings and ends_with_stop(row.tokens, row.req.stop_strings, decode):
        return "delimiter"
    if len(row.tokens) >= row.req.max_tokens:
        return "length"
    return None


def ends_with_stop(tokens: list[int], stops: tuple[str, ...], decode: Decode) -> bool:
    """True if a stop string ends inside the text of the newest token (decode the tail only)."""
    k = max(len(s) for s in stops) + 1
    new = decode(tokens[-k:])
    old = decode(tokens[-k:-1]) if len(tokens) > 1 else ""
    for s in stops:
        at = new.rfind(s)
        if at >= 0 and at + len(s) > len(old):
            return True
    return False
