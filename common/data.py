"""Prompt sources: files, reasoning-gym or the synthetic task; sharded, endless, resumable.

Guarantees of ``PromptSource(cfg, tokenizer, shard_index, num_shards)``:

* Sharding is a static partition of the prompt pool: shard k holds pool indices i with
  ``i % num_shards == k``. Shards are pairwise disjoint and together cover the pool, so N actors
  with shards 0..N-1 never sample the same prompt.
* ``next_batch(n)`` never ends: each epoch visits every prompt of the shard exactly once, in an
  order shuffled by ``(seed, shard_index, epoch)`` (or pool order when ``shuffle`` is off).
* ``state_dict()`` / ``load_state_dict()`` resume at the same prompt: the sequence after a round
  trip equals the sequence without one.
* A bad row (invalid JSON, missing field, wrong type) raises ``DataError`` naming the file and
  line (row number for Parquet, Arrow and ``save_to_disk`` folders) before any prompt is served.
* Every prompt carries its ``entry``, a JSON-like dict for the reward: the file's whole row, the
  reasoning-gym entry, or the synthetic problem's id, problem and answer.
* reasoning-gym (``GymSpec``): the held-out set (``split: eval``) never shares a question text
  with the train stream. Seeded apart: reasoning-gym datasets draw item i from a generator
  seeded with ``seed + i``; the eval set is the first ``num_eval_problems`` distinct questions of items
  ``[seed, seed + 4 * num_eval_problems)``, the train pool items ``[seed + 2**24, seed + 2**24 +
  num_problems)``, so no draw is shared. Deduplicated: different draws can still pose the same
  question, so every train source builds the eval set too and replaces a train item whose
  question is in it by the next train item whose question is not. An item whose generator
  raises (some do on some seeds) is passed over the same way, and counted.

Files: ``.jsonl``/``.json`` (one object per line) and ``.parquet`` are read here; ``.arrow`` files
and ``save_to_disk`` folders through HF ``datasets``; fields by ``id_field``, ``problem_field``,
``answer_field``.

Prompt text: ``prompt_template`` with ``{problem}`` replaced (other braces are literal, so
``\\boxed{}`` in a template is fine); with ``chat_template`` on, that text becomes the user turn
of the tokenizer's chat template, rendered with ``add_generation_prompt=True``.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from common import tasks
from common.errors import ConfigError, DataError  # DataError: callers import it from here too

GYM_TRAIN_SEED_OFFSET = 2**24  # train's per-item seeds start this far above eval's
GYM_EVAL_DRAWS = 4  # the eval set: the first num_eval_problems distinct questions of this many times as many draws
GYM_MAX_SEED = 2**32  # some datasets seed numpy's legacy generator (< 2**32) with seed + index
GYM_MAX_WALK = 1000  # train items tried in a row to find one whose question is not in the eval set


@dataclass(frozen=True)
class Prompt:
    prompt_id: str
    text: str  # exactly what was tokenised (after template / chat template)
    answer: str
    token_ids: np.ndarray  # int32[P]
    meta: dict = field(default_factory=dict)  # problem, source, index, epoch, task
    entry: dict | None = None  # JSON-like row for the reward (module docstring)


@dataclass(frozen=True)
class Row:
    prompt_id: str
    problem: str
    answer: str
    where: str  # "file.jsonl:12" / "file.parquet row 7"
    entry: dict = field(default_factory=dict)  # the whole row, JSON-like


def jsonable(value: Any) -> Any:
    """`value` as JSON gives it back (tuples become lists; what JSON cannot hold, its str)."""
    return json.loads(json.dumps(value, default=str))


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


def _row(record: Any, cfg, where: str, entry: dict | None = None) -> Row:
    return Row(
        prompt_id=_field(record, cfg.id_field, (str, int), where),
        problem=_field(record, cfg.problem_field, (str,), where),
        answer=_field(record, cfg.answer_field, (str, int), where),
        where=where,
        entry=record if entry is None else entry,
    )


def _table_rows(path: Path, columns: list[str], records: list[dict], cfg) -> list[Row]:
    """Rows of a columnar file (Parquet, Arrow, a save_to_disk folder), numbered from 0."""
    missing = [n for n in (cfg.id_field, cfg.problem_field, cfg.answer_field) if n not in columns]
    if missing:
        raise DataError(
            f"{path}: missing column(s) {missing} (columns present: {columns}); "
            "set data.id_field / data.problem_field / data.answer_field to the right names"
        )
    return [_row(rec, cfg, f"{path} row {i}", jsonable(rec)) for i, rec in enumerate(records)]


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
    return _table_rows(path, table.column_names, table.to_pylist(), cfg)


def read_hf_dataset(path: str | Path, cfg) -> list[Row]:
    """An Arrow file (as `datasets` writes them) or a `Dataset.save_to_disk` folder, through `datasets`."""
    try:
        import datasets  # noqa: PLC0415 -- only Arrow files and save_to_disk folders need it (~1 s per process)
    except ImportError:
        raise DataError(f"prompt path {path}: Arrow files and save_to_disk folders need the datasets package: "
                        "pip install datasets") from None
    path = Path(path)
    if (path / "dataset_dict.json").exists():
        splits = sorted(p.name for p in path.iterdir() if p.is_dir())
        raise DataError(f"{path} holds a DatasetDict (splits {splits}): give one split's folder in data.paths, "
                        f"e.g. {path / (splits[0] if splits else 'train')}")
    what = "save_to_disk folder" if path.is_dir() else "Arrow file"
    try:
        ds = datasets.load_from_disk(str(path)) if path.is_dir() else datasets.Dataset.from_file(str(path))
    except Exception as e:  # noqa: BLE001 -- datasets and pyarrow raise many types for a bad file
        raise DataError(f"cannot read {what} {path}: {type(e).__name__}: {' '.join(str(e).split())[:300]}") from None
    if not isinstance(ds, datasets.Dataset):
        raise DataError(f"{path}: expected one Dataset, got a {type(ds).__name__}")
    return _table_rows(path, list(ds.column_names), ds.to_list(), cfg)


def read_rows(paths: list[str], cfg) -> list[Row]:
    """All rows of all files, in order; prompt ids must be unique across them."""
    rows: list[Row] = []
    for p in paths:
        suffix = Path(p).suffix.lower()
        if Path(p).is_dir() or suffix == ".arrow":
            rows.extend(read_hf_dataset(p, cfg))
        elif suffix in (".jsonl", ".json"):
            rows.extend(read_jsonl(p, cfg))
        elif suffix in (".parquet", ".pq"):
            rows.extend(read_parquet(p, cfg))
        elif not Path(p).exists():
            raise DataError(f"prompt path {p} does not exist: give .jsonl, .parquet or .arrow files or datasets "
                            "save_to_disk folders")
        else:
            raise DataError(f"prompt file {p}: unknown format {suffix!r}; use .jsonl, .parquet, .arrow or a datasets "
                            "save_to_disk folder")
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
# reasoning-gym
# --------------------------------------------------------------------------------------------
def check_reasoning_gym(dataset: str, args: dict) -> None:
    """ConfigError (one line) unless reasoning-gym is installed, knows `dataset` and accepts `args`.

    Builds the dataset's config only (its own checks run); generates nothing."""
    try:
        from reasoning_gym.factory import DATASETS  # noqa: PLC0415 -- optional (~1 s to import), reasoning_gym only
    except ImportError:
        raise ConfigError("data.source='reasoning_gym' needs the reasoning-gym package: pip install reasoning-gym") \
            from None
    if dataset not in DATASETS:
        close = difflib.get_close_matches(dataset, list(DATASETS), n=3, cutoff=0.6)
        hint = f"did you mean {', '.join(map(repr, close))}? " if close else ""
        raise ConfigError(f"data.dataset={dataset!r} is not a reasoning-gym dataset: {hint}(it has {len(DATASETS)}, "
                          "e.g. 'chain_sum', 'basic_arithmetic', 'gsm_symbolic'; all: python -c \"from "
                          "reasoning_gym.factory import DATASETS; print(sorted(DATASETS))\")")
    reserved = sorted({"seed", "size"} & set(args))
    if reserved:
        raise ConfigError(f"data.dataset_args sets {reserved}: treerpo sets them (data.seed, data.num_problems, "
                          "data.num_eval_problems); remove them")
    config_cls = DATASETS[dataset][1]
    try:
        config = config_cls(**args)
        if callable(getattr(config, "validate", None)):
            config.validate()
    except TypeError as e:
        fields = [f.name for f in dataclasses.fields(config_cls)] if dataclasses.is_dataclass(config_cls) else []
        raise ConfigError(f"data.dataset_args for {dataset!r}: {e}; its arguments: "
                          f"{[f for f in fields if f not in ('seed', 'size')]}") from None
    except Exception as e:  # noqa: BLE001 -- reasoning-gym checks with assert and ValueError
        raise ConfigError(f"data.dataset_args={args} for {dataset!r} fail its check: "
                          f"{' '.join(str(e).split()) or type(e).__name__}") from None


@dataclass(frozen=True)
class GymSpec:
    """One reasoning-gym source: which dataset, and where its eval and train items are drawn."""

    dataset: str
    args: dict
    eval_seed: int
    eval_draws: int  # items drawn to find num_eval distinct questions
    num_eval: int
    train_seed: int
    train_size: int

    @classmethod
    def from_config(cls, cfg) -> GymSpec:
        return cls(dataset=cfg.dataset, args=dict(cfg.dataset_args), eval_seed=cfg.seed,
                   eval_draws=GYM_EVAL_DRAWS * cfg.num_eval_problems, num_eval=cfg.num_eval_problems,
                   train_seed=cfg.seed + GYM_TRAIN_SEED_OFFSET, train_size=cfg.num_problems)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> GymSpec:
        return cls(**data)

    def create(self, split: str):
        """The reasoning-gym dataset object of `split` ('train' or 'eval')."""
        import reasoning_gym  # noqa: PLC0415 -- optional (~1 s to import), reasoning_gym only

        seed, size = (self.train_seed, self.train_size) if split == "train" else (self.eval_seed, self.eval_draws)
        return reasoning_gym.create_dataset(self.dataset, size=size, seed=seed, **self.args)


def _gym_item(ds, index: int) -> tuple[dict | None, str]:
    """(entry, "") or (None, why): some generators raise on some seeds (basic_arithmetic divides by 0)."""
    try:
        entry = ds[index]
        if not isinstance(entry.get("question"), str):
            raise TypeError(f"its question is a {type(entry.get('question')).__name__}, not a str")
        return entry, ""
    except Exception as e:  # noqa: BLE001 -- a generator's bug costs its item, not the source
        return None, f"item {index}: {type(e).__name__}: {' '.join(str(e).split())[:300]}"


def gym_eval_entries(spec: GymSpec) -> list[tuple[int, dict]]:
    """(dataset index, entry) of the held-out set: the first `num_eval` distinct questions of its draws
    (items whose generator raises are skipped)."""
    ds = spec.create("eval")
    seen: set[str] = set()
    out: list[tuple[int, dict]] = []
    failed, why = 0, ""
    for i in range(spec.eval_draws):
        entry, error = _gym_item(ds, i)
        if entry is None:
            failed, why = failed + 1, error
        elif entry["question"] not in seen:
            seen.add(entry["question"])
            out.append((i, entry))
            if len(out) == spec.num_eval:
                return out
    failures = f" ({failed} draws failed, the last {why})" if failed else ""
    raise DataError(f"reasoning-gym {spec.dataset!r} with dataset_args={spec.args} gave only {len(out)} distinct "
                    f"questions in {spec.eval_draws} draws{failures}, fewer than data.num_eval_problems="
                    f"{spec.num_eval}: lower it, or widen data.dataset_args")


class _GymPool:
    """reasoning-gym: the train pool (num_problems items) or the eval set, never sharing a question."""

    def __init__(self, cfg) -> None:
        check_reasoning_gym(cfg.dataset, cfg.dataset_args)
        self.spec = GymSpec.from_config(cfg)
        self.split = cfg.split
        self.eval = gym_eval_entries(self.spec)
        self.eval_questions = frozenset(e["question"] for _, e in self.eval)
        self.train = self.spec.create("train") if cfg.split == "train" else None
        self.size = self.spec.train_size if self.train is not None else len(self.eval)
        self.skipped_held_out = 0  # train draws passed over: their question is in the eval set
        self.skipped_failed = 0  # train draws passed over: their generator raised
        if self.train is not None:
            self.get(0)  # a generator that fails on every item fails now

    def __len__(self) -> int:
        return self.size

    def _train_item(self, i: int) -> tuple[int, dict]:
        """Pool index i's item, or the next one whose generator works and whose question is not held out."""
        held = failed = 0
        why = ""
        for step in range(min(GYM_MAX_WALK, self.size)):
            index = (i + step) % self.size
            entry, error = _gym_item(self.train, index)
            if entry is None:
                failed, why = failed + 1, error
            elif entry["question"] in self.eval_questions:
                held += 1
            else:
                self.skipped_held_out += held
                self.skipped_failed += failed
                return index, entry
        raise DataError(f"reasoning-gym {self.spec.dataset!r} with dataset_args={self.spec.args}: {held + failed} "
                        f"train items in a row from {i} are unusable ({held} pose held-out questions, {failed} failed"
                        f"{', the last ' + why if failed else ''}): widen data.dataset_args or lower "
                        f"data.num_eval_problems={self.spec.num_eval}")

    def get(self, i: int) -> tuple[str, str, str, dict, dict]:
        index, entry = self.eval[i] if self.train is None else self._train_item(i)
        meta = {"source": f"reasoning_gym:{self.spec.dataset}:{self.split}", "task": self.spec.dataset}
        return (f"{self.spec.dataset}:{self.split}:{index}", entry["question"], str(entry["answer"]), meta,
                jsonable(entry))


# --------------------------------------------------------------------------------------------
# pools: index -> (id, problem, answer, meta, entry)
# --------------------------------------------------------------------------------------------
class _FilePool:
    def __init__(self, cfg) -> None:
        self.rows = read_rows(cfg.paths, cfg)

    def __len__(self) -> int:
        return len(self.rows)

    def get(self, i: int) -> tuple[str, str, str, dict, dict]:
        r = self.rows[i]
        return r.prompt_id, r.problem, r.answer, {"source": r.where, "task": "files"}, r.entry


class _SyntheticPool:
    def __init__(self, cfg) -> None:
        self.spec = tasks.TaskSpec.from_config(cfg)
        self.split = cfg.split
        self.eval = tasks.eval_problems(self.spec, cfg.num_eval_problems) if cfg.split == "eval" else None
        self.size = len(self.eval) if self.eval is not None else cfg.num_problems

    def __len__(self) -> int:
        return self.size

    def get(self, i: int) -> tuple[str, str, str, dict, dict]:
        p = self.eval[i] if self.eval is not None else tasks.train_problem(self.spec, i)
        return (p.problem_id, p.prompt, p.answer, {"source": f"synthetic:{self.split}", "task": self.spec.shape},
                {"id": p.problem_id, "problem": p.prompt, "answer": p.answer})


POOLS = {"synthetic": _SyntheticPool, "files": _FilePool, "reasoning_gym": _GymPool}


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
        self._pool = POOLS[cfg.source](cfg)
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
        prompt_id, problem, answer, meta, entry = self._pool.get(int(index))
        text, ids = format_prompt(problem, self.cfg, self.tokenizer)
        meta = dict(meta, problem=problem, index=int(index), epoch=epoch)
        return Prompt(prompt_id=prompt_id, text=text, answer=answer, token_ids=ids, meta=meta, entry=entry)

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


# --------------------------------------------------------------------------------------------
# the held-out set of evaluation during training (learner.eval_every)
# --------------------------------------------------------------------------------------------
HELD_OUT_TRAIN_CHECK = 5000  # train problems drawn to check against the held-out set (synthetic, reasoning-gym)


def held_out_config(cfg):
    """The data config that serves the held-out set of `cfg` (a training data config), in pool order:
    files -> data.eval_paths; synthetic and reasoning-gym -> their eval split (same seed and
    num_eval_problems, so the very set their train streams exclude)."""
    update: dict[str, Any] = {"shuffle": False}
    if cfg.source == "files":
        if not cfg.eval_paths:
            raise DataError("no held-out set: data.source='files' needs data.eval_paths")
        update.update(paths=list(cfg.eval_paths), eval_paths=[])
    else:
        update["split"] = "eval"
    return cfg.model_copy(update=update)


def _normalise(text: str) -> str:
    return " ".join(text.split()).casefold()


def held_out_overlap(cfg, held_out: list[Prompt]) -> list[str]:
    """Ids of the `held_out` prompts that the training stream of `cfg` can also serve (should be none).

    files: a held-out problem whose text (whitespace and case folded) is a row of data.paths;
    synthetic: one outside the eval hash split, or equal to one of the first HELD_OUT_TRAIN_CHECK
    training problems; reasoning-gym: one the train stream does not exclude, or equal to one of
    its first HELD_OUT_TRAIN_CHECK items."""
    texts = {_normalise(p.meta["problem"]): p.prompt_id for p in held_out}
    bad: dict[str, str] = {}
    if cfg.source == "files":
        for row in read_rows(cfg.paths, cfg):
            if _normalise(row.problem) in texts:
                bad.setdefault(row.problem, texts[_normalise(row.problem)])
        return sorted(bad.values())
    train = POOLS[cfg.source](cfg.model_copy(update={"split": "train"}))
    if cfg.source == "synthetic":
        spec = train.spec
        bad.update((p.prompt_id, p.prompt_id) for p in held_out if not tasks.is_eval_prompt(p.meta["problem"], spec))
    else:
        excluded = {_normalise(q) for q in train.eval_questions}
        bad.update((i, i) for t, i in texts.items() if t not in excluded)
    for index in range(min(len(train), HELD_OUT_TRAIN_CHECK)):
        problem = _normalise(train.get(index)[1])
        if problem in texts:
            bad.setdefault(texts[problem], texts[problem])
    return sorted(bad.values())
