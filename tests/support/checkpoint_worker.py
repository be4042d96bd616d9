"""A real checkpoint writer to kill: `python -m tests.support.checkpoint_worker --model DIR`.

It builds a `Trainer` on a tiny model once, then serves JSON-line requests on stdin (one JSON
reply line each on stdout, after a {"pid": ...} line for a save):

* {"op": "save", "run": DIR, "step": N, "version": V, ...}: one optimizer step (so every save
  holds different weights), then the real `save_checkpoint` in a forked child, which the caller
  may SIGKILL at any time (it gets the child's pid first). `kill_at: E` makes the child SIGKILL
  itself just before its E-th file operation under DIR (a Python audit hook sees every open,
  rename/replace, mkdir, remove, rmdir and rmtree; torch's and safetensors' own writes happen
  between those), `events: true` lists those operations, `margin` replaces SPACE_MARGIN and
  `fsize` sets RLIMIT_FSIZE (a real EFBIG) in the child. The reply says how the child ended and
  what save_checkpoint returned or raised.
* {"op": "load", "run": DIR}: `recover_checkpoints`, `find_latest`, then the real
  `load_checkpoint` into the trainer, and whether the loaded weights are bit-equal to those the
  save of that version wrote.

Forking after the trainer is built keeps a kill cheap (no model load per kill point); the child
writes with the very objects a learner uses (one rank, gloo). Progress bars and tqdm's monitor
thread are off: a thread holding tqdm's lock at the fork would leave the child's save_pretrained
waiting on it forever; a child that still takes over CHILD_TIMEOUT_S is killed and reported as hung.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import os
import resource
import select
import signal
import sys
import time
import traceback

import numpy as np
import torch
import torch.distributed as dist
import tqdm
import transformers

import learner.checkpoint as ckpt
from common.config import JobConfig
from common.errors import CheckpointError
from learner.checkpoint import LearnerState, find_latest, load_checkpoint, recover_checkpoints, save_checkpoint
from learner.trainer import Trainer
from tests.support.treegen import random_tree

CHILD_TIMEOUT_S = 60.0
PR_SET_PDEATHSIG = 1
FILE_EVENTS = ("open", "os.rename", "os.mkdir", "os.remove", "os.rmdir", "shutil.rmtree")
REPLIES = os.fdopen(os.dup(1), "w")  # the protocol's own stdout: fd 1 goes to stderr (DeepSpeed prints there)
os.dup2(2, 1)
sys.stdout = sys.stderr


def reply_line(obj: dict) -> None:
    REPLIES.write(json.dumps(obj) + "\n")
    REPLIES.flush()


def params_digest(trainer: Trainer) -> str:
    h = hashlib.sha256()
    for name, p in sorted(trainer.module.named_parameters()):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _paths(event: str, args: tuple) -> list[str]:
    count = 2 if event == "os.rename" else 1
    out = []
    for a in args[:count]:
        if isinstance(a, (str, bytes, os.PathLike)):
            out.append(os.path.abspath(os.fsdecode(a)))
    return out


def install_hook(run: str, kill_at: int | None, events: list[str] | None) -> None:
    """Count file operations under `run`; SIGKILL this process just before the kill_at-th one."""
    root = os.path.abspath(run)
    seen = [0]

    def hook(event: str, args: tuple) -> None:
        if event not in FILE_EVENTS:
            return
        paths = _paths(event, args)
        if not any(p == root or p.startswith(root + os.sep) for p in paths):
            return
        seen[0] += 1
        if events is not None:
            events.append(f"{event} {' -> '.join(os.path.relpath(p, root) for p in paths)}")
        if kill_at is not None and seen[0] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    sys.addaudithook(hook)


def one_rank_collectives_inline() -> None:
    """In a forked child: the world has one rank, so a barrier is already met and an all-reduce is
    the identity; gloo's worker threads, which would run them, did not survive the fork."""
    dist.barrier = lambda *args, **kwargs: None
    dist.all_reduce = lambda tensor, *args, **kwargs: None


def save_in_child(trainer: Trainer, req: dict) -> dict:
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the writer: ends by os._exit, or by SIGKILL
        os.close(read_fd)
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # dies with the worker
        result: dict = {}
        try:
            one_rank_collectives_inline()
            if req.get("margin") is not None:
                ckpt.SPACE_MARGIN = float(req["margin"])
            if req.get("fsize") is not None:
                resource.setrlimit(resource.RLIMIT_FSIZE, (int(req["fsize"]), resource.RLIM_INFINITY))
            events: list[str] | None = [] if req.get("events") else None
            install_hook(req["run"], req.get("kill_at"), events)
            t0 = time.perf_counter()
            state = LearnerState(version=req["version"], step=req["step"], data={"version": req["version"]})
            path = save_checkpoint(trainer, req["run"], state, keep=req.get("keep", 2),
                                   export_hf=req.get("export_hf", True))
            result = {"ok": path.name, "seconds": time.perf_counter() - t0, "events": events}
        except CheckpointError as e:
            result = {"error": str(e), "reason": e.reason, "recoverable": e.recoverable}
        except BaseException:  # noqa: BLE001 - reported to the test, which fails on it
            result = {"crash": traceback.format_exc()}
        os.write(write_fd, json.dumps(result).encode())
        os.close(write_fd)
        os._exit(0)
    os.close(write_fd)
    reply_line({"pid": pid})
    chunks = []
    deadline = time.monotonic() + CHILD_TIMEOUT_S
    hung = False
    while True:
        ready, _, _ = select.select([read_fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            hung = True
            os.kill(pid, signal.SIGKILL)
            break
        chunk = os.read(read_fd, 1 << 20)
        if not chunk:
            break
        chunks.append(chunk)
    os.close(read_fd)
    _, status = os.waitpid(pid, 0)
    killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    reply = {"killed": killed, "exit": os.waitstatus_to_exitcode(status)}
    if hung:
        return {**reply, "crash": f"the writer did not finish within {CHILD_TIMEOUT_S:.0f} s (killed)"}
    if chunks:
        reply.update(json.loads(b"".join(chunks)))
    return reply


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--zero-stage", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(1)
    tqdm.tqdm.monitor_interval = 0  # no monitor thread (see the module docstring)
    transformers.utils.logging.disable_progress_bar()
    cfg = JobConfig.model_validate({"learner": {"lr": 1e-2, "micro_batch_tokens": 64, "zero_stage": args.zero_stage,
                                                "warmup_steps": 1}})
    trainer = Trainer(cfg, args.model)
    digests: dict[int, str] = {}  # version -> weights that version's save wrote
    reply_line({"ready": True})
    for line in sys.stdin:
        req = json.loads(line)
        if req["op"] == "save":
            rng = np.random.default_rng(req["version"])
            trees = [random_tree(rng, vocab_size=trainer.vocab_size, max_depth=2, max_branch=2) for _ in range(2)]
            trainer.train_step(trees, learner_version=0)  # the trees' versions are all 0
            digests[req["version"]] = params_digest(trainer)
            reply = save_in_child(trainer, req)
        elif req["op"] == "load":
            recovered = recover_checkpoints(req["run"])
            latest = find_latest(req["run"])
            reply = {"recovered": recovered, "name": None}
            if latest is not None:
                state = load_checkpoint(trainer, latest)
                reply.update(name=latest.name, version=state.version, step=state.step,
                             weights_match=params_digest(trainer) == digests.get(state.version))
        elif req["op"] == "quit":
            return 0
        else:
            reply = {"crash": f"unknown op {req['op']!r}"}
        reply_line(reply)
    return 0


if __name__ == "__main__":
    sys.exit(main())
