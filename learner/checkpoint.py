"""Learner checkpoints (design §7): DeepSpeed state + learner state, written atomically, last K kept.

Layout under `<run_dir>/checkpoints/`:

    step-000000120/
        deepspeed/                weights, optimizer, LR scheduler (DeepSpeed's save_checkpoint, every rank)
        hf/                       save_pretrained + tokenizer (learner.checkpoint_hf), for eval / vLLM
        learner_state.json        version, incarnation, step, trainer counters, data/buffer state, RNG
        learner_state.safetensors the arrays of the above (RNG states, any arrays in data/buffer state)
        config.yaml               the resolved job config
    latest                        name of the newest complete checkpoint (written last)
    .tmp-step-...-<nonce>/        a save in progress (never read; removed by the next save)

Guarantees
* Atomic: a checkpoint is built in a `.tmp-` sibling, every file and folder fsync'ed, then renamed
  into place; only then is `latest` replaced (temp file, fsync, os.replace). A crash at any point
  leaves either the previous checkpoints untouched or the new one complete; `find_latest` never
  returns a partial one.
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
    """Write checkpoint `step-<state.step>` atomically, point `latest` at it, prune to `keep`. Rank 0."""
    lc = trainer.cfg.learner
    keep = lc.keep_checkpoints if keep is None else keep
    export_hf = lc.checkpoint_hf if export_hf is None else export_hf
    if keep < 1:
        raise ValueError(f"keep={keep}: keep at least the checkpoint just written")
    root = checkpoint_root(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(root)
    name = f"step-{state.step:09d}"
    tmp = root / f".tmp-{name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    trainer.save_deepspeed_state(tmp)
    if export_hf:
        trainer.export_hf(tmp / "hf")

    dump_config(trainer.cfg, tmp / "config.yaml")
    state.trainer = trainer.state_dict()
    _write_state(tmp, state, trainer)
    _fsync_tree(tmp)

    final = root / name
    trash = None
    if final.exists():  # a second save at the same step (e.g. on stop): the newer one wins
        trash = root / f".trash-{name}-{uuid.uuid4().hex[:8]}"
        os.rename(final, trash)
    os.rename(tmp, final)
    _fsync_dir(root)
    _write_pointer(root, name)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)
    prune_checkpoints(run_dir, keep)
    return final


def prune_checkpoints(run_dir: str | Path, keep: int) -> list[Path]:
    """Delete complete checkpoints beyond the newest `keep` (never the one `latest` names)."""
    latest = find_latest(run_dir)
    found = list_checkpoints(run_dir)
    removed = []
    for path in found[: max(0, len(found) - keep)]:
        if latest is not None and path.name == latest.name:
            continue
        shutil.rmtree(path)
        removed.append(path)
    return removed


def _remove_leftovers(root: Path) -> None:
    """Partial saves of a crashed learner (one learner writes a run directory at a time)."""
    for p in root.iterdir():
        if p.name.startswith((".tmp-", ".trash-")) and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)


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
        raise RuntimeError(f"{path} is not a complete treerpo checkpoint ({STATE_JSON}: {e})") from e
    if doc.get("format") != FORMAT:
        raise RuntimeError(f"{path}: checkpoint format {doc.get('format')!r}, this learner reads {FORMAT}")
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
        raise RuntimeError(
            f"{path} holds ZeRO-{header['zero_stage']} state of {header['world_size']} ranks; this learner has "
            f"{trainer.world_size}: resume with the same number of ranks, or start from its hf/ export"
        )
    trainer.load_deepspeed_state(path)
    trainer.load_state_dict(state.trainer)
    set_rng_state(rng)
    return state
