"""Prompt sources: JSONL/Parquet files or the synthetic task, sharded, endless, resumable.

Guarantees of ``PromptSource(cfg, tokenizer, shard_index, num_shards)``:

* Sharding is a static partition of the prompt pool: shard k holds pool indices i with
  ``i % num_shards == k``. Shards are pairwise disjoint and together cover the pool, so N actors
  with shards 0..N-1 never sample the same prompt.
* ``next_batch(n)`` never ends: each epoch visits every prompt of the shard exactly once, in an
  order shuffled by ``(seed, shard_index, epoch)`` (or pool order when ``shuffle`` is off).
* ``state_dict()`` / ``load_state_dict()`` resume at the same prompt: the sequence after a round
  trip equals the sequence without one.
* A bad row (invalid JSON, missing field, wrong type) raises ``DataError`` naming the file and
  line (row number for Parquet) before any prompt is served.

Prompt text: ``prompt_template`` with ``{problem}`` replaced (other braces are literal, so
``\\boxed{}`` in a template is fine); with ``chat_template`` on, that text becomes the user turn
of the tokenizer's chat template, rendered with ``add_generation_prompt=True``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from common import tasks
from common.errors import DataError  # defined with its exit code there; callers import it from here too


@dataclass(frozen=True)
class Prompt:
    prompt_id: str
    text: str  # exactly what was tokenised (after template / chat template)
    answer: str
    token_ids: np.ndarray  # int32[P]
    meta: dict = field(default_factory=dict)  # problem, source, index, epoch, task


@dataclass(frozen=True)
class Row:
    prompt_id: str
    problem: str
    answer: str
    where: str  # "file.jsonl:12" / "file.parquet row 7"


# --------------------------------------------------------------------------------------------
# reading rows
# --------------------------------------------------------------------------------------------
def _field(record: Any, name: str, kinds: tuple[type, ...], where: str) -> str:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected an object with fields, got {type(record).__name__}")
    if name not in record:
        raise DataError(
            f"{where}: missing field {name!r} (fields present: {sorted(record)}); "
            "set data.id_field / data.problem_field / data.answer_field to the right names"
        )
    value = record[name]
    if isinstance(value, bool) or not isinstance(value, kinds):
        wanted = " or ".join(k.__name__ for k in kinds)
        raise DataError(f"{where}: field {name!r} must be {wanted}, got {type(value).__name__} {value!r:.60}")
    return str(value)


def _row(record: Any, cfg, where: str) -> Row:
    return Row(
        prompt_id=_field(record, cfg.id_field, (str, int), where),
        problem=_field(record, cfg.problem_field, (str,), where),
        answer=_field(record, cfg.answer_field, (str, int), where),
        where=where,
    )


def read_jsonl(path: str | Path, cfg) -> list[Row]:
    rows = []
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read prompt file {path}: {e}") from None
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
        rows.append(_row(record, cfg, where))
    return rows


def read_parquet(path: str | Path, cfg) -> list[Row]:
    import pyarrow.parquet as pq  # noqa: PLC0415 -- only Parquet files need pyarrow (~0.4 s per process)

    path = Path(path)
    try:
        table = pq.read_table(path)
    except (OSError, ValueError) as e:  # pyarrow raises ArrowInvalid (a ValueError) on bad files
        raise DataError(f"cannot read Parquet file {path}: {e}") from None
    names = [cfg.id_field, cfg.problem_field, cfg.answer_field]
    missing = [n for n in names if n not in table.column_names]
    if missing:
        raise DataError(
            f"{path}: missing column(s) {missing} (columns present: {table.column_names}); "
            "set data.id_field / data.problem_field / data.answer_field to the right names"
        )
    records = table.select(names).to_pylist()
    return [_row(rec, cfg, f"{path} row {i}") for i, rec in enumerate(records)]


def read_rows(paths: list[str], cfg) -> list[Row]:
    """All rows of all files, in order; prompt ids must be unique across them."""
    rows: list[Row] = []
    for p in paths:
        suffix = Path(p).suffix.lower()
        if suffix in (".jsonl", ".json"):
            rows.extend(read_jsonl(p, cfg))
        elif suffix in (".parquet", ".pq"):
            rows.extend(read_parquet(p, cfg))
        else:
            raise DataError(f"prompt file {p}: unknown format {suffix!r}; use .jsonl or .parquet")
    seen: dict[str, str] = {}
    for row in rows:
        if row.prompt_id in seen:
            raise DataError(
                f"{row.where}: prompt id {row.prompt_id!r} already used at {seen[row.prompt_id]}; "
                "prompt ids must be unique across data.paths"
            )
        seen[row.prompt_id] = row.where
    if not rows:
        raise DataError(f"no prompts in {paths}")
    return rows


# --------------------------------------------------------------------------------------------
# formatting and tokenising
# --------------------------------------------------------------------------------------------
def format_prompt(problem: str, cfg, tokenizer) -> tuple[str, np.ndarray]:
    """(text, int32 ids): template applied, then the chat template if cfg.chat_template."""
    text = cfg.prompt_template.replace("{problem}", problem)
    if cfg.chat_template:
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise DataError(
                "data.chat_template is true but the tokenizer has no chat template: "
                "turn data.chat_template off or use a model whose tokenizer defines one"
            )
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
        )
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]  # the template holds its own specials
    elif tokenizer is None:
        ids = []
    else:
        ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    return text, np.asarray(ids, dtype=np.int32)


# --------------------------------------------------------------------------------------------
# pools: index -> (id, problem, answer)
# --------------------------------------------------------------------------------------------
class _FilePool:
    def __init__(self, cfg) -> None:
        self.rows = read_rows(cfg.paths, cfg)

    def __len__(self) -> int:
        return len(self.rows)

    def get(self, i: int) -> tuple[str, str, str, dict]:
        r = self.rows[i]
        return r.prompt_id, r.problem, r.answer, {"source": r.where, "task": "files"}


class _SyntheticPool:
    def __init__(self, cfg) -> None:
        self.spec = tasks.TaskSpec.from_config(cfg)
        self.split = cfg.split
        self.eval = tasks.eval_problems(self.spec, cfg.num_eval_problems) if cfg.split == "eval" else None
        self.size = len(self.eval) if self.eval is not None else cfg.num_problems

    def __len__(self) -> int:
        return self.size

    def get(self, i: int) -> tuple[str, str, str, dict]:
        p = self.eval[i] if self.eval is not None else tasks.train_problem(self.spec, i)
        return p.problem_id, p.prompt, p.answer, {"source": f"synthetic:{self.split}", "task": self.spec.shape}


# --------------------------------------------------------------------------------------------
# the source
# --------------------------------------------------------------------------------------------
class PromptSource:
    """Endless, sharded, resumable prompts for one actor (see module docstring)."""

    def __init__(self, cfg, tokenizer, shard_index: int = 0, num_shards: int = 1) -> None:
        if num_shards < 1 or not 0 <= shard_index < num_shards:
            raise ValueError(f"shard_index={shard_index}, num_shards={num_shards}: need 0 <= shard_index < num_shards")
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.shard_index = shard_index
        self.num_shards = num_shards
        self._pool = _SyntheticPool(cfg) if cfg.source == "synthetic" else _FilePool(cfg)
        self._indices = np.arange(shard_index, len(self._pool), num_shards, dtype=np.int64)
        if self._indices.size == 0:
            raise DataError(
                f"shard {shard_index} of {num_shards} holds no prompts: the pool has only {len(self._pool)}; "
                "use fewer actors or more prompts"
            )
        self._epoch = 0
        self._position = 0
        self._order = self._epoch_order(0)

    def __len__(self) -> int:
        """Prompts in this shard (one epoch)."""
        return int(self._indices.size)

    @property
    def pool_size(self) -> int:
        return len(self._pool)

    @property
    def epoch(self) -> int:
        return self._epoch

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if not self.cfg.shuffle:
            return self._indices
        rng = np.random.default_rng([self.cfg.seed, self.shard_index, epoch])
        return rng.permutation(self._indices)

    def prompt_at(self, index: int, epoch: int = 0) -> Prompt:
        """The prompt at pool index `index` (any shard)."""
        prompt_id, problem, answer, meta = self._pool.get(int(index))
        text, ids = format_prompt(problem, self.cfg, self.tokenizer)
        meta = dict(meta, problem=problem, index=int(index), epoch=epoch)
        return Prompt(prompt_id=prompt_id, text=text, answer=answer, token_ids=ids, meta=meta)

    def next_batch(self, n: int) -> list[Prompt]:
        """The next `n` prompts of the shard, crossing epoch boundaries as needed."""
        if n < 0:
            raise ValueError(f"next_batch(n={n}): n must be >= 0")
        out = []
        for _ in range(n):
            if self._position >= self._order.size:
                self._epoch += 1
                self._position = 0
                self._order = self._epoch_order(self._epoch)
            out.append(self.prompt_at(self._order[self._position], self._epoch))
            self._position += 1
        return out

    def all_prompts(self) -> list[Prompt]:
        """Every prompt of the shard once, in pool order (for evaluation); the cursor is untouched."""
        return [self.prompt_at(i) for i in self._indices]

    def state_dict(self) -> dict[str, int]:
        return {
            "epoch": self._epoch,
            "position": self._position,
            "shard_index": self.shard_index,
            "num_shards": self.num_shards,
            "pool_size": len(self._pool),
            "seed": self.cfg.seed,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        mine = self.state_dict()
        for key in ("shard_index", "num_shards", "pool_size", "seed"):
            if state.get(key) != mine[key]:
                raise DataError(
                    f"prompt source state has {key}={state.get(key)!r} but this source has {mine[key]!r}: "
                    "resume with the same data, seed and number of actors, or start the data fresh"
                )
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position <= len(self):
            raise DataError(f"prompt source state epoch={epoch}, position={position} is out of range")
        self._epoch, self._position = epoch, position
        self._order = self._epoch_order(epoch)
