"""Learner checkpoints (design §7): DeepSpeed state + learner state, written atomically, last K kept.

Layout under `<run_dir>/checkpoints/`:

    step-000000120/
        deepspeed/                weights, optimizer, LR scheduler (DeepSpeed's save_checkpoint, every rank)
        hf/                       save_pretrained + tokenizer (learner.checkpoint_hf), for eval / vLLM
        adapter/                  model.lora: the adapter as PEFT saves it (hf/ holds the merged model)
        learner_state.json        version, incarnation, step, trainer counters, data/buffer state, RNG
        learner_state.safetensors the arrays of the above (RNG states, any arrays in data/buffer state)
        config.yaml               the resolved job config
    latest                        name of the newest complete checkpoint (written last)
    .tmp-step-...-<nonce>/        a save in progress (never read; removed by the next save or start)
    .trash-step-...-<nonce>/      the previous save of the same step, moved aside while the new one is renamed in
    .del-step-...-<nonce>/        an old checkpoint being pruned

Guarantees
* Atomic: a checkpoint is built in a `.tmp-` sibling, every file and folder fsync'ed, then renamed
  into place; only then is `latest` replaced (temp file, fsync, os.replace). A crash at any point
  (SIGKILL included: tests/integration/test_checkpoint_faults.py kills writers at every file
  boundary) leaves either the previous checkpoints untouched or the new one complete;
  `find_latest` never returns a partial one, and `recover_checkpoints` (run by every save and by
  the learner on start) removes the leftovers and puts back a same-step checkpoint moved aside.
* Failures are errors, not crashes (design §7.1): a save that cannot complete (a full disk, an
  OS error) raises `CheckpointError` with a reason from `common.metrics.CHECKPOINT_FAILURE_REASONS`,
  after removing its partial files; the previous checkpoints and `latest` stay as they were. A save
  that would not fit (free space < the latest checkpoint's size x SPACE_MARGIN) is refused before
  anything is written, so a full disk never reaches DeepSpeed's collective save. The error is
  `recoverable` unless it struck inside that collective save with several ranks.
* The learner state is JSON + safetensors: nothing written here is pickled (DeepSpeed's own files
  are DeepSpeed's format).
* Keep-last-K: after a successful save, complete checkpoints beyond the newest K (by step) are
  deleted; the one `latest` names is never deleted.
* Resume: `load_checkpoint` restores weights, optimizer, LR scheduler, trainer counters and RNG
  (python, numpy, torch) and returns the learner state; the caller starts a new incarnation
  (state.incarnation + 1).
Multi-rank: rank 0 calls these; the other ranks take part through `Trainer.follow()`. The run
directory must be shared by the ranks (one node, or a shared volume).
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors.numpy import load_file, save_file

from common.config import dump_config
from common.errors import CheckpointError, one_line
from common.metrics import CHECKPOINT_FAILURE_REASONS

if TYPE_CHECKING:  # pragma: no cover
    from learner.trainer import Trainer

FORMAT = 1
CHECKPOINTS = "checkpoints"
LATEST = "latest"
STATE_JSON = "learner_state.json"
STATE_ARRAYS = "learner_state.safetensors"
_NAME = re.compile(r"^step-(\d{9,})$")


@dataclass
class LearnerState:
    """What the learner needs besides the weights to continue where it stopped."""

    version: int = 0  # published weight version
    incarnation: int = 0  # learner incarnation that wrote the checkpoint
    step: int = 0  # optimizer steps done
    generated_tokens: int = 0  # generated (non-prompt) tokens of every tree trained (learner.max_generated_tokens)
    data: dict[str, Any] = field(default_factory=dict)  # data-source state (JSON-like; arrays allowed)
    buffer: dict[str, Any] = field(default_factory=dict)  # replay-buffer state (JSON-like; arrays allowed)
    trainer: dict[str, Any] = field(default_factory=dict)  # Trainer.state_dict(), filled on save


# ----------------------------------------------------------------------------------------------
# Finding checkpoints
# ----------------------------------------------------------------------------------------------
def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


def checkpoint_due(step: int, every: int) -> bool:
    """Periodic save after optimizer step `step` (every = learner.checkpoint_every; 0 = only on stop)."""
    return every > 0 and step > 0 and step % every == 0


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest step first."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := _NAME.match(p.name)) and (p / STATE_JSON).is_file()]
    return [p for _, p in sorted(found)]


def find_latest(run_dir: str | Path) -> Path | None:
    """The checkpoint `latest` names, else the complete one with the highest step, else None."""
    root = checkpoint_root(run_dir)
    pointer = root / LATEST
    if pointer.is_file():
        name = pointer.read_text().strip()
        if _NAME.match(name) and (root / name / STATE_JSON).is_file():
            return root / name
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


# ----------------------------------------------------------------------------------------------
# Save
# ----------------------------------------------------------------------------------------------
def save_checkpoint(
    trainer: Trainer,
    run_dir: str | Path,
    state: LearnerState,
    *,
    keep: int | None = None,
    export_hf: bool | None = None,
) -> Path:
    """Write checkpoint `step-<state.step>` atomically, point `latest` at it, prune to `keep`. Rank 0.

    A save that cannot complete raises `CheckpointError` (reason: CHECKPOINT_FAILURE_REASONS) and
    leaves the previous checkpoints and `latest` as they were, its own partial files removed.
    """
    lc = trainer.cfg.learner
    keep = lc.keep_checkpoints if keep is None else keep
    export_hf = lc.checkpoint_hf if export_hf is None else export_hf
    if keep < 1:
        raise ValueError(f"keep={keep}: keep at least the checkpoint just written")
    root = checkpoint_root(run_dir)
    name = f"step-{state.step:09d}"
    tmp = root / f".tmp-{name}-{uuid.uuid4().hex[:8]}"
    collective = False  # inside DeepSpeed's save, which every rank takes part in
    try:
        root.mkdir(parents=True, exist_ok=True)
        recover_checkpoints(run_dir)
        _check_free_space(root, name)  # before any rank writes: a full disk stays a skipped save
        tmp.mkdir()
        collective = trainer.world_size > 1
        trainer.save_deepspeed_state(tmp)
        collective = False
        if export_hf:
            trainer.export_hf(tmp / "hf")
        if trainer.lora is not None:  # the adapter alone, as PEFT saves it (its weights are also in deepspeed/)
            trainer.save_adapter(tmp / "adapter")
        dump_config(trainer.cfg, tmp / "config.yaml")
        state.trainer = trainer.state_dict()
        _write_state(tmp, state, trainer)
        _fsync_tree(tmp)
    except CheckpointError:
        raise
    except Exception as e:
        reason = failure_reason(e, root)  # before the cleanup frees the space
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"checkpoint {name} not written ({one_line(e)}); {_ADVICE[reason]}", reason,
                              recoverable=not collective) from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    final = _commit(root, tmp, name)
    prune_checkpoints(run_dir, keep)
    return final


def _commit(root: Path, tmp: Path, name: str) -> Path:
    """Rename the finished `tmp` to `name`, then point `latest` at it."""
    final = root / name
    trash = None
    try:
        if final.exists():  # a second save at the same step (e.g. on stop): the newer one wins
            trash = root / f".trash-{name}-{uuid.uuid4().hex[:8]}"  # put back by recover_checkpoints after a crash
            os.rename(final, trash)
        os.rename(tmp, final)
        _fsync_dir(root)
        _write_pointer(root, name)
    except OSError as e:
        reason = failure_reason(e, root)
        if trash is not None and not final.exists():
            os.rename(trash, final)
            trash = None
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"checkpoint {name} not committed ({one_line(e)}); {_ADVICE[reason]}", reason) from e
    finally:
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
    return final


_ADVICE = {
    "no_space": "the filesystem is full: free space or lower learner.keep_checkpoints; the previous checkpoint "
                "stays the latest",
    "io_error": "check the run directory's filesystem and permissions; the previous checkpoint stays the latest",
    "error": "the previous checkpoint stays the latest",
}
assert tuple(_ADVICE) == CHECKPOINT_FAILURE_REASONS, "one advice per common.metrics.CHECKPOINT_FAILURE_REASONS value"
SPACE_MARGIN = 1.1  # a save needs the previous checkpoint's size, and this much more, free
LOW_SPACE_BYTES = 2**20  # a write that failed with less than this free failed for space


def checkpoint_bytes(path: Path) -> int:
    """Bytes of the files under `path`."""
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def _check_free_space(root: Path, name: str) -> None:
    """CheckpointError('no_space') if the filesystem lacks room for a checkpoint the size of the latest."""
    latest = find_latest(root.parent)
    if latest is None:
        return  # the first save: nothing to measure, the write itself will tell
    need = int(checkpoint_bytes(latest) * SPACE_MARGIN)
    free = shutil.disk_usage(root).free
    if free < need:
        raise CheckpointError(
            f"checkpoint {name} skipped: {free / 2**20:.1f} MiB free under {root}, a checkpoint takes about "
            f"{need / 2**20:.1f} MiB; {_ADVICE['no_space']}", "no_space")


def _exception_chain(error: BaseException) -> list[BaseException]:
    chain, seen = [], set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        chain.append(error)
        error = error.__cause__ or error.__context__
    return chain


def failure_reason(error: BaseException, root: Path) -> str:
    """The CHECKPOINT_FAILURE_REASONS value of a failed write (torch reports ENOSPC without an errno,
    so a filesystem left with under LOW_SPACE_BYTES free counts as full too)."""
    chain = _exception_chain(error)
    for e in chain:
        if (isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)) or "No space left" in str(e) \
                or "os error 28" in str(e):
            return "no_space"
    try:
        if shutil.disk_usage(root).free < LOW_SPACE_BYTES:
            return "no_space"
    except OSError:
        pass
    return "io_error" if any(isinstance(e, OSError) for e in chain) else "error"


def prune_checkpoints(run_dir: str | Path, keep: int) -> list[Path]:
    """Delete complete checkpoints beyond the newest `keep` (never the one `latest` names).

    Each is first renamed to a `.del-` name (atomic), so a crash mid-delete never leaves a
    half-deleted folder under a checkpoint's name."""
    latest = find_latest(run_dir)
    found = list_checkpoints(run_dir)
    removed = []
    for path in found[: max(0, len(found) - keep)]:
        if latest is not None and path.name == latest.name:
            continue
        doomed = path.with_name(f".del-{path.name}-{uuid.uuid4().hex[:8]}")
        os.rename(path, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
        removed.append(path)
    return removed


_TRASH = re.compile(r"^\.trash-(step-\d{9,})-[0-9a-f]+$")


def recover_checkpoints(run_dir: str | Path) -> list[str]:
    """Undo what a crashed save left (one learner writes a run directory at a time); -> what it did.

    Removes partial saves (`.tmp-`), half-deleted old checkpoints (`.del-`) and stray `latest`
    temp files; a `.trash-` copy (the previous save of a step, moved aside while the newer one was
    renamed in) goes back under its name if that name is missing, else is removed. Called before
    every save and when a learner starts."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    done = []
    for p in sorted(root.iterdir()):
        if (m := _TRASH.match(p.name)) and not (root / m.group(1)).exists() and (p / STATE_JSON).is_file():
            os.rename(p, root / m.group(1))
            done.append(f"restored {m.group(1)} from {p.name}")
        elif p.name.startswith((".tmp-", ".del-", ".trash-")) and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
            done.append(f"removed {p.name}")
        elif p.name.startswith(f".{LATEST}.") and p.is_file():
            p.unlink(missing_ok=True)
            done.append(f"removed {p.name}")
    return done


def _write_pointer(root: Path, name: str) -> None:
    tmp = root / f".{LATEST}.{uuid.uuid4().hex[:8]}"
    with open(tmp, "w") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root / LATEST)
    _fsync_dir(root)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(top: Path) -> None:
    for dirpath, _, filenames in os.walk(top):
        for fname in filenames:
            with open(os.path.join(dirpath, fname), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(dirpath))


# ----------------------------------------------------------------------------------------------
# Learner state <-> JSON + safetensors
# ----------------------------------------------------------------------------------------------
def _split_arrays(obj: Any, key: str, arrays: dict[str, np.ndarray]) -> Any:
    """JSON-able copy of obj with each array replaced by {"__array__": key}."""
    if isinstance(obj, dict):
        if not all(isinstance(k, str) for k in obj):
            raise TypeError(f"learner state at {key!r}: dict keys must be strings for JSON")
        return {k: _split_arrays(v, f"{key}/{k}", arrays) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_split_arrays(v, f"{key}/{i}", arrays) for i, v in enumerate(obj)]
    if hasattr(obj, "detach") and hasattr(obj, "cpu"):  # a torch tensor
        obj = obj.detach().cpu().numpy()
    if isinstance(obj, np.ndarray):
        arrays[key] = np.ascontiguousarray(obj)
        return {"__array__": key}
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"learner state at {key!r} holds a {type(obj).__name__}: use JSON types or arrays")


def _join_arrays(obj: Any, arrays: dict[str, np.ndarray]) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {"__array__"}:
            return arrays[obj["__array__"]]
        return {k: _join_arrays(v, arrays) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_join_arrays(v, arrays) for v in obj]
    return obj


def rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    out = {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": {"kind": kind, "keys": keys, "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state().numpy(),
    }
    if torch.cuda.is_available():
        out["cuda"] = [s.numpy() for s in torch.cuda.get_rng_state_all()]
    return out


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], np.asarray(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(torch.from_numpy(np.asarray(state["torch"], dtype=np.uint8).copy()))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.from_numpy(np.asarray(s, dtype=np.uint8).copy()) for s in state["cuda"]])


def _write_state(directory: Path, state: LearnerState, trainer: Trainer) -> None:
    arrays: dict[str, np.ndarray] = {}
    doc = {
        "format": FORMAT,
        "saved_at": time.time(),
        "world_size": trainer.world_size,
        "zero_stage": trainer.cfg.learner.zero_stage,
        "state": _split_arrays(asdict(state), "state", arrays),
        "rng": _split_arrays(rng_state(), "rng", arrays),
    }
    save_file(arrays, str(directory / STATE_ARRAYS))
    (directory / STATE_JSON).write_text(json.dumps(doc, indent=1))  # written last


def read_learner_state(path: str | Path) -> tuple[LearnerState, dict[str, Any], dict[str, Any]]:
    """(learner state, rng state, header: format/world_size/zero_stage/saved_at) of a checkpoint."""
    path = Path(path)
    try:
        doc = json.loads((path / STATE_JSON).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a complete treerpo checkpoint ({STATE_JSON}: {e}): give a "
                              "step-N folder that `latest` names or that holds learner_state.json") from e
    if doc.get("format") != FORMAT:
        raise CheckpointError(f"{path}: checkpoint format {doc.get('format')!r}, this learner reads {FORMAT}: "
                              "resume with the treerpo version that wrote it")
    arrays = load_file(str(path / STATE_ARRAYS))
    state = LearnerState(**_join_arrays(doc["state"], arrays))
    header = {k: doc[k] for k in ("format", "saved_at", "world_size", "zero_stage")}
    return state, _join_arrays(doc["rng"], arrays), header


# ----------------------------------------------------------------------------------------------
# Load
# ----------------------------------------------------------------------------------------------
def load_checkpoint(trainer: Trainer, path: str | Path) -> LearnerState:
    """Restore weights, optimizer, scheduler, trainer counters and RNG from `path`. Rank 0.

    The caller continues with version = state.version, step = state.step and a new incarnation.
    """
    path = Path(path)
    state, rng, header = read_learner_state(path)
    if header["zero_stage"] > 0 and header["world_size"] != trainer.world_size:
        raise CheckpointError(
            f"{path} holds ZeRO-{header['zero_stage']} state of {header['world_size']} ranks; this learner has "
            f"{trainer.world_size}: resume with the same number of ranks, or start from its hf/ export"
        )
    trainer.load_deepspeed_state(path)
    trainer.load_state_dict(state.trainer)
    set_rng_state(rng)
    return state
