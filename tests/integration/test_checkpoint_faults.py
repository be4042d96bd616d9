"""Checkpoint faults with real writers (design §7.1): SIGKILL anywhere in a save, a full disk.

A writer process (tests/support/checkpoint_worker.py) holds a real Trainer (tiny model, ZeRO-2,
one rank) and runs the real `save_checkpoint` in a forked child per save, so a kill costs no
model load. Kill points: before every file operation of a save (an audit hook in the child
SIGKILLs it, so each boundary between operations is hit exactly once) for a new step and for a
second save of the same step, and at random moments (SIGKILL from here) that land inside torch's
and safetensors' own writes too. After each kill: every checkpoint `find_latest` or
`list_checkpoints` shows is complete (the same files as a clean save), and after
`recover_checkpoints` the real `load_checkpoint` loads the one expected (the previous, or the
new one once `latest` named it) with bit-equal weights, leaving no leftovers.

The full disk is a real one: a small tmpfs (mounted here when we may mount), else a real EFBIG
from RLIMIT_FSIZE in the writer. The learner's own handling (counted, training goes on, the final
one fails with exit code 9, leftovers cleaned on resume) runs the real `Learner` on that tmpfs.

TREERPO_CHECKPOINT_KILLS=N raises the number of random kills (default 12) for a longer soak.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import select
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from common.config import JobConfig
from common.errors import CheckpointError
from common.metrics import CHECKPOINT_FAILURE_REASONS
from learner.checkpoint import LATEST, checkpoint_root, find_latest, list_checkpoints, read_learner_state
from tests.support.paths import REPO
from tests.support.treegen import random_tree
from treerpo.supervisor import _die_with_parent, child_env

RANDOM_KILLS = int(os.environ.get("TREERPO_CHECKPOINT_KILLS", "12"))


class Worker:
    """The checkpoint_worker process: save (in a killable child) and load requests, JSON lines."""

    def __init__(self, model: Path, log: Path) -> None:
        self._log = open(log, "w")  # noqa: SIM115 - closed in close()
        self.log_path = log
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.support.checkpoint_worker", "--model", str(model)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True, cwd=REPO,
            preexec_fn=_die_with_parent,  # never outlives the test process
            # child_env: not the torch.distributed world of this process (in-process trainers set RANK & co.)
            env={**child_env(dict(os.environ)), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)},
        )
        assert self._read(300) == {"ready": True}
        self.version = 0

    def _read(self, timeout_s: float) -> dict:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout_s)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            raise AssertionError(f"checkpoint worker gave no answer:\n{self.log_path.read_text()[-4000:]}")
        return json.loads(line)

    def _send(self, req: dict) -> None:
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()

    def save(self, run: Path, step: int, *, kill_after_s: float | None = None, **opts) -> dict:
        """One save of a new version (one optimizer step first): how it ended, and the version."""
        self.version += 1
        self._send({"op": "save", "run": str(run), "step": step, "version": self.version, **opts})
        pid = self._read(60)["pid"]
        if kill_after_s is not None:
            select.select([], [], [], kill_after_s)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        reply = self._read(120)
        assert "crash" not in reply, reply["crash"]
        return {**reply, "version": self.version}

    def load(self, run: Path) -> dict:
        """recover_checkpoints + find_latest + load_checkpoint in the worker's trainer."""
        self._send({"op": "load", "run": str(run)})
        return self._read(120)

    def close(self) -> None:
        if self.proc.poll() is None:
            self._send({"op": "quit"})
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


@pytest.fixture(scope="module")
def worker(tiny_model_dir, tmp_path_factory) -> Iterator[Worker]:
    w = Worker(tiny_model_dir, tmp_path_factory.mktemp("worker") / "worker.log")
    try:
        yield w
    finally:
        w.close()


def files_of(path: Path) -> set[str]:
    return {str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()}


def restore(snapshot: Path, run: Path) -> None:
    shutil.rmtree(run, ignore_errors=True)
    shutil.copytree(snapshot, run)


def assert_only_complete(run: Path, layout: set[str]) -> Path:
    """What a reader sees without recovery: complete checkpoints only; -> the latest."""
    latest = find_latest(run)
    assert latest is not None and not latest.name.startswith(".")
    for path in list_checkpoints(run):
        assert files_of(path) == layout, f"{path.name} is incomplete: {sorted(layout ^ files_of(path))}"
        read_learner_state(path)
    return latest


def assert_clean(run: Path) -> None:
    names = {p.name for p in checkpoint_root(run).iterdir()}
    leftovers = {n for n in names if n != LATEST and not n.startswith("step-")}
    assert not leftovers, f"leftovers after recovery: {sorted(leftovers)}"


def event_index(events: list[str], prefix: str, suffix: str = "") -> int:
    """1-based number of the first file operation starting with `prefix` (and ending with `suffix`)."""
    return next(i for i, e in enumerate(events, 1) if e.startswith(prefix) and e.endswith(suffix))


@pytest.fixture
def two_checkpoints(worker, tmp_path) -> tuple[Path, Path, dict]:
    """(run dir, its pristine copy, {step name: version}) holding step-1 and step-2 (latest)."""
    run = tmp_path / "run"
    versions = {}
    for step in (1, 2):
        done = worker.save(run, step)
        assert done["ok"] == f"step-{step:09d}"
        versions[done["ok"]] = done["version"]
    snapshot = tmp_path / "pristine"
    shutil.copytree(run, snapshot)
    return run, snapshot, versions


def test_sigkill_before_every_file_operation_of_a_save(worker, two_checkpoints):
    run, snapshot, versions = two_checkpoints
    layout = files_of(run / "checkpoints" / "step-000000002")
    kills = 0
    for step, same in ((3, False), (2, True)):  # a new step; then a second save of step 2 (the final one on stop)
        restore(snapshot, run)
        ref = worker.save(run, step, events=True)
        events = ref["events"]
        pointer = event_index(events, "os.rename checkpoints/.latest.", "-> checkpoints/latest")
        swapped = event_index(events, "os.rename checkpoints/.tmp-", f"-> checkpoints/step-{step:09d}")
        first = event_index(events, "os.rename checkpoints/step-") if same else 1  # from moving the old aside
        for kill_at in range(first, len(events) + 1):
            restore(snapshot, run)
            done = worker.save(run, step, kill_at=kill_at)
            assert done["killed"], f"kill point {kill_at} ({events[kill_at - 1]}) was not reached"
            kills += 1
            seen = assert_only_complete(run, layout)
            # before the pointer moved (new step) / before the new folder took the name (same step): the old one
            new = kill_at > (swapped if same else pointer)
            expected = (f"step-{step:09d}", done["version"]) if new else ("step-000000002", versions["step-000000002"])
            if not same:
                assert seen.name == expected[0], f"kill before {events[kill_at - 1]}"
            loaded = worker.load(run)
            assert (loaded["name"], loaded["version"]) == expected, f"kill before {events[kill_at - 1]}"
            assert loaded["weights_match"], f"kill before {events[kill_at - 1]}: weights differ from that save's"
            assert_clean(run)
    assert kills >= 20


def test_sigkill_at_random_moments_of_a_save(worker, two_checkpoints):
    run, snapshot, versions = two_checkpoints
    layout = files_of(run / "checkpoints" / "step-000000002")
    seconds = min(worker.save(run, 3)["seconds"] for _ in range(3))  # a clean save's duration
    rng = random.Random(0)
    landed = {"inside the write": 0, "after the write": 0, "finished first": 0}
    for i in range(RANDOM_KILLS):
        restore(snapshot, run)
        step = 2 if i % 3 == 2 else 3
        done = worker.save(run, step, kill_after_s=rng.uniform(0.0, 0.9 * seconds))
        partial = [p for p in checkpoint_root(run).iterdir() if p.name.startswith(".tmp-")]
        landed["finished first" if not done["killed"] else "inside the write" if partial else "after the write"] += 1
        assert_only_complete(run, layout)
        loaded = worker.load(run)
        old = ("step-000000002", versions["step-000000002"])
        new = (f"step-{step:09d}", done["version"])
        assert (loaded["name"], loaded["version"]) in ({new} if not done["killed"] else {old, new}), done
        assert loaded["weights_match"]
        assert_clean(run)
    print(f"random kills: {landed}")
    assert landed["inside the write"] >= 1, landed


# ----------------------------------------------------------------------------------------------
# A full disk
# ----------------------------------------------------------------------------------------------
@contextlib.contextmanager
def tmpfs(path: Path, size: int) -> Iterator[bool]:
    """A tmpfs of `size` bytes mounted at `path` (True), or False where mounting is refused."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                             capture_output=True).returncode == 0
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


def resize(path: Path, size: int) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(path)], check=True, capture_output=True)


def used_bytes(path: Path) -> int:
    usage = shutil.disk_usage(path)
    return usage.total - usage.free


def test_full_disk_fails_the_save_cleanly_and_keeps_the_last_good_checkpoint(worker, tmp_path):
    disk = tmp_path / "disk"
    with tmpfs(disk, 256 * 2**20) as mounted:
        run = disk / "run"
        first = worker.save(run, 1)
        assert first["ok"] == "step-000000001"
        good = run / "checkpoints" / "step-000000001"
        layout = files_of(good)
        if mounted:
            # room for half a checkpoint more: the next save cannot fit
            resize(disk, used_bytes(disk) + (used_bytes(disk) // 2 // 4096) * 4096)
            skipped = worker.save(run, 2)  # refused before anything is written
            assert skipped["reason"] == "no_space" and "skipped" in skipped["error"], skipped
            full = worker.save(run, 3, margin=0.0)  # no pre-check: torch/safetensors hit the real ENOSPC
            assert full["reason"] == "no_space" and full["recoverable"] and "not written" in full["error"], full
        else:  # no mount here: a real EFBIG (RLIMIT_FSIZE) in the writer, below DeepSpeed's state file
            full = worker.save(run, 3, margin=0.0, fsize=64 * 2**10)
            assert full["reason"] in CHECKPOINT_FAILURE_REASONS and full["recoverable"], full
        assert not full["killed"] and full["exit"] == 0
        assert sorted(p.name for p in checkpoint_root(run).iterdir()) == [LATEST, good.name]  # nothing half-written
        assert assert_only_complete(run, layout) == good
        loaded = worker.load(run)
        assert (loaded["name"], loaded["version"], loaded["weights_match"]) == (good.name, first["version"], True)
        if mounted:
            resize(disk, 256 * 2**20)  # space freed: the next save goes through
        again = worker.save(run, 4)
        assert again["ok"] == "step-000000004"
        assert worker.load(run)["name"] == "step-000000004"


def test_learner_counts_a_failed_checkpoint_trains_on_and_fails_the_final_one(worker, tiny_model_dir, tmp_path):
    from learner.main import Learner  # noqa: PLC0415 -- the learner process's class, run in this one

    disk = tmp_path / "disk"
    with tmpfs(disk, 256 * 2**20) as mounted:
        if not mounted:
            pytest.skip("needs a tmpfs (mount) for a full disk under an in-process learner")
        run = disk / "run"
        assert worker.save(run, 1)["ok"] == "step-000000001"
        killed = worker.save(run, 2, kill_at=20)  # a crash mid-save leaves a partial .tmp- folder
        assert killed["killed"] and any(p.name.startswith(".tmp-") for p in checkpoint_root(run).iterdir())

        cfg = JobConfig.model_validate({
            "model": {"path": str(tiny_model_dir)}, "run_dir": str(run),
            "transport": {"data_port": 0, "control_port": 0}, "weights": {"rendezvous_port": 0},
            "metrics": {"learner_port": 0},
            "learner": {"lr": 1e-3, "micro_batch_tokens": 64, "zero_stage": 2, "keep_checkpoints": 1},
        })
        torch.set_num_threads(1)
        learner = Learner(cfg, run, "auto")
        try:
            assert (learner.state.step, learner.state.incarnation) == (1, 1)  # resumed from step 1
            assert_clean(run)  # the killed save's leftovers went at start

            def failures(reason: str = "no_space") -> float:
                return learner.registry.get_sample_value("treerpo_learner_checkpoint_failures_total",
                                                         {"reason": reason})

            def train() -> None:
                rng = np.random.default_rng(learner.state.step)
                learner.train_one([random_tree(rng, vocab_size=learner.trainer.vocab_size, max_depth=2,
                                               max_branch=2) for _ in range(2)])

            train()
            learner.checkpoint()
            assert find_latest(run).name == "step-000000002"
            assert learner.registry.get_sample_value("treerpo_learner_checkpoints_total") == 1

            resize(disk, used_bytes(disk) + 64 * 1024)  # the disk fills up
            train()
            learner.checkpoint()  # fails, counted, not fatal
            assert failures() == 1 and find_latest(run).name == "step-000000002"
            assert_clean(run)
            train()  # training goes on
            assert learner.state.step == 4

            with pytest.raises(CheckpointError, match="final checkpoint at step 4 failed") as err:
                learner.checkpoint(final=True)
            assert err.value.exit_code == 9 and err.value.reason == "no_space"
            assert failures() == 2 and find_latest(run).name == "step-000000002"
            assert_clean(run)
        finally:
            learner.close()
