"""`treerpo up`: start the learner and N actors as processes and supervise them.

Guarantees:
* each child runs in its own session with its own log file under RUN_DIR/logs/, and is told by
  the kernel to exit if the supervisor dies (PR_SET_PDEATHSIG), so no process outlives `up`;
* a crashed actor (non-zero exit) is restarted with exponential backoff; an actor that exits 0
  was told to stop and stays stopped;
* when the learner exits, every actor is stopped and `up` exits with the learner's code;
* SIGINT/SIGTERM stop the learner first (it writes a final checkpoint), then the actors:
  SIGTERM, a grace period, then SIGKILL -- always by pid, never by name.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from common.config import JobConfig, dump_config
from common.rundir import ENDPOINTS, logs_dir, wait_for_json

PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


# A torch.distributed world inherited from the parent (a launcher, or a process that initialised
# one in-process) must not leak into the learner/actors `up` starts: they form their own worlds.
DIST_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
            "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")


def child_env(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k not in DIST_ENV}


def treerpo_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "treerpo", *args]


@dataclass
class Child:
    name: str
    argv: list[str]
    log_path: Path
    restartable: bool
    proc: subprocess.Popen | None = None
    restarts: int = 0
    next_start: float = 0.0
    done: bool = False  # exited 0 or given up on

    def start(self, env: dict[str, str]) -> None:
        env = child_env(env)
        log = open(self.log_path, "ab", buffering=0)
        log.write(f"\n=== start {time.strftime('%H:%M:%S')}: {' '.join(self.argv)}\n".encode())
        self.proc = subprocess.Popen(
            self.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=env, start_new_session=True, preexec_fn=_die_with_parent,
        )
        log.close()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def terminate(self) -> None:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        if self.alive():
            self.proc.kill()


@dataclass
class Supervisor:
    """Runs one learner and `num_actors` actors for a resolved config written to run_dir."""

    cfg: JobConfig
    run_dir: Path
    num_actors: int
    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))
    backoff_s: float = 1.0
    max_backoff_s: float = 30.0
    grace_s: float = 60.0
    learner: Child | None = None
    actors: list[Child] = field(default_factory=list)
    endpoints: dict | None = None
    on_event: Callable[[str], None] = lambda msg: print(f"[up] {msg}", flush=True)

    def __post_init__(self) -> None:
        self.run_dir = Path(self.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.config_path = self.run_dir / "config.yaml"
        dump_config(self.cfg, self.config_path)
        self.env.setdefault("PYTHONUNBUFFERED", "1")
        root = str(Path(__file__).resolve().parents[1])
        self.env["PYTHONPATH"] = root + (os.pathsep + self.env["PYTHONPATH"] if self.env.get("PYTHONPATH") else "")

    def start(self, startup_timeout_s: float = 600.0) -> dict:
        logs = logs_dir(self.run_dir)
        (self.run_dir / ENDPOINTS).unlink(missing_ok=True)
        self.learner = Child(
            "learner", treerpo_command("learner", "--config", str(self.config_path), "--run-dir", str(self.run_dir)),
            logs / "learner.log", restartable=False,
        )
        self.learner.start(self.env)
        self.on_event(f"learner pid {self.learner.proc.pid}, log {self.learner.log_path}")
        self.endpoints = wait_for_json(self.run_dir / ENDPOINTS, startup_timeout_s, alive=self.learner.alive)
        for _ in range(self.num_actors):
            self.add_actor()
        self.on_event(f"learner metrics: {self.endpoints.get('metrics')}/metrics")
        return self.endpoints

    def add_actor(self, env: dict[str, str] | None = None) -> Child:
        """Start actor-<next index> (also later: a late joiner gets the current weights first)."""
        i = len(self.actors)
        shards = max(self.num_actors, i + 1)
        argv = treerpo_command(
            "actor", "--config", str(self.config_path), "--run-dir", str(self.run_dir),
            "--actor-id", f"actor-{i}", "--actor-index", str(i), "--num-actors", str(shards),
        )
        if self.cfg.metrics.actor_port:  # actor i serves metrics on actor_port + i (deploy/prometheus)
            argv += ["--set", f"metrics.actor_port={self.cfg.metrics.actor_port + i}"]
        child = Child(f"actor-{i}", argv, logs_dir(self.run_dir) / f"actor-{i}.log", restartable=True)
        child.start({**self.env, **(env or {})})
        self.actors.append(child)
        self.on_event(f"{child.name} pid {child.proc.pid}, log {child.log_path}")
        return child

    def poll(self) -> int | None:
        """One supervision pass; returns the learner's exit code once it has exited."""
        now = time.monotonic()
        for child in self.actors:
            if child.done or child.alive():
                continue
            code = child.proc.returncode if child.proc else None
            if code == 0:
                child.done = True
                self.on_event(f"{child.name} exited cleanly")
                continue
            if child.next_start == 0.0:
                delay = min(self.max_backoff_s, self.backoff_s * 2 ** child.restarts)
                child.next_start = now + delay
                self.on_event(f"{child.name} exited with {code}; restarting in {delay:.0f} s")
            elif now >= child.next_start:
                child.restarts += 1
                child.next_start = 0.0
                child.start(self.env)
                self.on_event(f"{child.name} restarted (#{child.restarts}), pid {child.proc.pid}")
        if self.learner and not self.learner.alive():
            return self.learner.proc.returncode
        return None

    def stop(self) -> int | None:
        """Learner first (final checkpoint), then actors; SIGKILL whatever outlives the grace."""
        code = None
        if self.learner and self.learner.alive():
            self.learner.terminate()
            code = _wait(self.learner, self.grace_s)
        elif self.learner and self.learner.proc:
            code = self.learner.proc.returncode
        for child in self.actors:
            child.terminate()
        for child in self.actors:
            _wait(child, max(5.0, self.grace_s / 4))
        return code

    def children(self) -> list[Child]:
        return ([self.learner] if self.learner else []) + self.actors


def _wait(child: Child, timeout_s: float) -> int | None:
    try:
        return child.proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        child.kill()
        return child.proc.wait()


def run_up(args) -> int:
    from common.config import load_config

    cfg = load_config(args.config or ["demo"], args.overrides)
    run_dir = Path(args.run_dir or cfg.run_dir)
    cfg.run_dir = str(run_dir)
    sup = Supervisor(cfg, run_dir, args.num_actors or cfg.actor.num_actors)
    stopping = {"signal": None}

    def on_signal(signum, _frame):
        stopping["signal"] = signum

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        sup.start()
        while stopping["signal"] is None:
            code = sup.poll()
            if code is not None:
                sup.on_event(f"learner exited with {code}; stopping actors")
                sup.stop()
                return code
            time.sleep(0.5)
        sup.on_event(f"signal {stopping['signal']}: stopping (learner writes a final checkpoint)")
        code = sup.stop()
        return 0 if code in (0, -signal.SIGTERM) else int(code or 1)
    except (TimeoutError, RuntimeError) as e:
        sup.on_event(f"startup failed: {e}; see {run_dir / 'logs'}")
        sup.stop()
        return 1
