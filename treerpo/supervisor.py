"""`treerpo up`: start the learner and N actors as processes and supervise them.

Guarantees:
* each child runs in its own session with its own log file under RUN_DIR/logs/, and is told by
  the kernel to exit if the supervisor dies (PR_SET_PDEATHSIG), so no process outlives `up`;
* a child is *ready* once it has written its own pid into its ready file (the learner:
  RUN_DIR/endpoints.json; an actor: RUN_DIR/actors/<id>.json);
* every exit of a child is reported with its code and the last error line of its log;
* a crashed actor (non-zero exit) is restarted with exponential backoff; an actor that exits 0
  was told to stop and stays stopped;
* a learner that dies (a signal, a crash, an OOM kill) is restarted with `--resume auto` from its
  latest checkpoint, as a new incarnation, on the ports it bound first (so the actors, which stay
  up, reconnect and re-register), at most `up.learner_restarts` times; a learner that exits 0
  finished its run, and `up` then stops the actors and exits 0;
* a child that exits before it became ready `up.start_failures` times in a row can never start
  (bad config, missing model, an engine this machine cannot run): the job stops with that
  child's last error line and exit code EXIT_CHILD_FAILED; so does a learner whose first start
  fails (the actors need its endpoints);
* with `learner.eval_every`, an evaluator (`treerpo evaluator`) runs beside the learner, supervised
  like an actor (restarted when it crashes; one that can never start, e.g. a held-out set that
  overlaps the training prompts, stops the job);
* SIGINT/SIGTERM stop the learner first (it writes a final checkpoint), then the actors and the evaluator:
  SIGTERM, a grace period, then SIGKILL -- always by pid, never by name;
* each child runs on its own CPU cores when `up.cpus` names them (`plan_cpus`, set between fork
  and exec so every thread inherits it);
* each child sees its own GPUs (`up.devices`, as CUDA_VISIBLE_DEVICES; treerpo.placement): by
  default the learner gets the first visible GPU and the actors the others round-robin, so a
  vLLM actor never lands on the learner's GPU while another is free; vLLM actors that share a
  GPU split its memory (`actor.gpu_memory_utilization` on their command line), and a placement
  that cannot fit is refused before anything starts (ConfigError, design §1.5).
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from common.config import JobConfig, dump_config, load_config
from common.errors import EXIT_CHILD_FAILED
from common.rundir import ENDPOINTS, actor_info_path, logs_dir, read_json, wait_for_json
from learner.evals import HEARTBEAT, evals_dir
from treerpo.placement import Placement, format_plan, plan_for

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


def parse_cpus(spec: str) -> frozenset[int]:
    """'0-3,8' -> {0, 1, 2, 3, 8} (the taskset list format)."""
    out: set[int] = set()
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    return frozenset(out)


def plan_cpus(cpus: list[str] | None, num_actors: int) -> tuple[frozenset[int] | None, list[frozenset[int] | None]]:
    """(learner, [actor i]) CPU sets from `up.cpus` ([learner, actors...], actors cycling); None = no pinning."""
    if cpus is None:
        return None, [None] * num_actors
    actors = [parse_cpus(c) for c in cpus[1:]]
    return parse_cpus(cpus[0]), [actors[i % len(actors)] for i in range(num_actors)]


def treerpo_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "treerpo", *args]


_ERROR_WORDS = ("Error", "error:", "Exception", "Traceback", "SystemExit", "Killed", "refused", "cannot", "failed")


def last_error_line(log_path: Path, max_bytes: int = 65536) -> str:
    """The child's one-line known failure (`treerpo <command>: ...`, treerpo.cli) of its latest start,
    else the last line that reads like an error, else its last line."""
    try:
        with open(log_path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - max_bytes))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    text = text.rsplit("\n=== start ", 1)[-1]
    lines = [line.strip() for line in text.splitlines()[1:] if line.strip()]
    for line in reversed(lines):
        if line.startswith("treerpo ") and ": " in line:
            return line
    for line in reversed(lines):
        if any(word in line for word in _ERROR_WORDS):
            return line
    return lines[-1] if lines else ""


def describe_exit(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"code {code}"


@dataclass
class Child:
    name: str
    argv: list[str]
    log_path: Path
    restartable: bool
    ready_file: Path | None = None  # the child writes its pid here once it is ready
    proc: subprocess.Popen | None = None
    restarts: int = 0
    next_start: float = 0.0
    done: bool = False  # exited 0 or given up on
    start_failures: int = 0  # exits before becoming ready, in a row
    cpus: frozenset[int] | None = None  # pinned to these cores (up.cpus), every thread of it

    def start(self, env: dict[str, str], argv: list[str] | None = None) -> None:
        env = child_env(env)
        argv = argv or self.argv
        log = open(self.log_path, "ab", buffering=0)
        log.write(f"\n=== start {time.strftime('%H:%M:%S')}: {' '.join(argv)}\n".encode())
        cpus = self.cpus

        def in_child() -> None:  # between fork and exec: the threads it starts inherit the mask
            _die_with_parent()
            if cpus is not None:
                os.sched_setaffinity(0, cpus)

        self.proc = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=env, start_new_session=True, preexec_fn=in_child,
        )
        log.close()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def ready(self) -> bool:
        """This process (not an earlier one) has written its pid into its ready file."""
        if self.ready_file is None or self.proc is None:
            return self.proc is not None
        try:
            return read_json(self.ready_file).get("pid") == self.proc.pid
        except (OSError, ValueError):
            return False

    def terminate(self) -> None:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        if self.alive():
            self.proc.kill()


class JobFailed(RuntimeError):
    """The job cannot go on: a child can never start, or the learner ran out of restarts."""


@dataclass
class Supervisor:
    """Runs one learner and `num_actors` actors for a resolved config written to run_dir."""

    cfg: JobConfig
    run_dir: Path
    num_actors: int
    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))
    backoff_s: float | None = None  # None: cfg.up.backoff_s
    max_backoff_s: float | None = None
    grace_s: float | None = None
    learner: Child | None = None
    actors: list[Child] = field(default_factory=list)
    evaluator: Child | None = None  # learner.eval_every: scores the learner's exports (treerpo/evaluator.py)
    endpoints: dict | None = None
    on_event: Callable[[str], None] = lambda msg: print(f"[up] {msg}", flush=True)

    def __post_init__(self) -> None:
        up = self.cfg.up
        self.backoff_s = up.backoff_s if self.backoff_s is None else self.backoff_s
        self.max_backoff_s = up.max_backoff_s if self.max_backoff_s is None else self.max_backoff_s
        self.grace_s = up.grace_s if self.grace_s is None else self.grace_s
        self.run_dir = Path(self.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.config_path = self.run_dir / "config.yaml"
        dump_config(self.cfg, self.config_path)
        self.env.setdefault("PYTHONUNBUFFERED", "1")
        root = str(Path(__file__).resolve().parents[1])
        self.env["PYTHONPATH"] = root + (os.pathsep + self.env["PYTHONPATH"] if self.env.get("PYTHONPATH") else "")

    def placement(self, name: str) -> Placement:
        """Where a child runs (treerpo.placement), planned for every actor started so far or due."""
        index = 0 if name == "learner" else int(name.rsplit("-", 1)[-1]) + 1
        learner, actors = self.plan(max(self.num_actors, len(self.actors), index))
        return learner if name == "learner" else actors[index - 1]

    def plan(self, num_actors: int) -> tuple[Placement, list[Placement]]:
        return plan_for(self.cfg, self.env, num_actors)

    def child_env(self, name: str) -> dict[str, str]:
        """The environment a child starts with: `up`'s, with the child's GPUs (and, for a vLLM CPU
        actor beside others, its cores)."""
        env = dict(self.env)
        placement = self.placement(name)
        if placement.devices is not None:
            env["CUDA_VISIBLE_DEVICES"] = placement.devices
        env.update(placement.env)
        return env

    def start(self, startup_timeout_s: float = 600.0) -> dict:
        logs = logs_dir(self.run_dir)
        learner, actors = self.plan(self.num_actors)  # refused: nothing starts
        if learner.devices is not None or any(a.overrides or a.env for a in actors):
            self.on_event("placement: " + "; ".join(format_plan(learner, actors).splitlines()))
        (self.run_dir / ENDPOINTS).unlink(missing_ok=True)
        learner_cpus, actor_cpus = plan_cpus(self.cfg.up.cpus, self.num_actors)
        if learner_cpus is not None:
            self.on_event(f"CPUs: learner {sorted(learner_cpus)}, "
                          + ", ".join(f"actor-{i} {sorted(c)}" for i, c in enumerate(actor_cpus)))
        self.learner = Child(
            "learner", treerpo_command("learner", "--config", str(self.config_path), "--run-dir", str(self.run_dir)),
            logs / "learner.log", restartable=self.cfg.up.learner_restarts > 0, ready_file=self.run_dir / ENDPOINTS,
            cpus=learner_cpus,
        )
        self.learner.start(self.child_env("learner"))
        self.on_event(f"learner pid {self.learner.proc.pid}, log {self.learner.log_path}")
        try:
            self.endpoints = wait_for_json(self.run_dir / ENDPOINTS, startup_timeout_s, alive=self.learner.alive)
        except RuntimeError as e:
            raise JobFailed(f"learner did not start ({e}): {last_error_line(self.learner.log_path)}") from None
        for _ in range(self.num_actors):
            self.add_actor()
        if self.cfg.learner.eval_every:
            self.evaluator = Child(
                "evaluator", treerpo_command("evaluator", "--config", str(self.config_path), "--run-dir",
                                             str(self.run_dir)),
                logs / "evaluator.log", restartable=True, ready_file=evals_dir(self.run_dir) / HEARTBEAT,
                cpus=learner_cpus)
            self.evaluator.start(self.child_env("learner"))  # beside the learner, on its devices
            self.on_event(f"evaluator pid {self.evaluator.proc.pid}, log {self.evaluator.log_path}")
        self.on_event(f"learner metrics: {self.endpoints.get('metrics')}/metrics")
        return self.endpoints

    def actor_argv(self, i: int) -> list[str]:
        """The command line of actor-i."""
        actor_id = f"actor-{i}"
        argv = treerpo_command(
            "actor", "--config", str(self.config_path), "--run-dir", str(self.run_dir),
            "--actor-id", actor_id, "--actor-index", str(i), "--num-actors", str(max(self.num_actors, i + 1)),
        )
        if self.cfg.metrics.actor_port:  # actor i serves metrics on actor_port + i (deploy/prometheus)
            argv += ["--set", f"metrics.actor_port={self.cfg.metrics.actor_port + i}"]
        for override in self.placement(actor_id).overrides:  # its share of a shared GPU (design §1.5)
            argv += ["--set", override]
        return argv

    def add_actor(self, env: dict[str, str] | None = None) -> Child:
        """Start actor-<next index> (also later: a late joiner gets the current weights first)."""
        i = len(self.actors)
        actor_id = f"actor-{i}"
        argv = self.actor_argv(i)
        child = Child(actor_id, argv, logs_dir(self.run_dir) / f"{actor_id}.log", restartable=True,
                      ready_file=actor_info_path(self.run_dir, actor_id),
                      cpus=plan_cpus(self.cfg.up.cpus, i + 1)[1][i])
        child.start({**self.child_env(actor_id), **(env or {})})
        self.actors.append(child)
        self.on_event(f"{child.name} pid {child.proc.pid}, log {child.log_path}")
        return child

    def learner_restart_argv(self) -> list[str]:
        """Resume from the latest checkpoint on the ports the first learner bound (actors keep dialling them)."""
        argv = [*self.learner.argv, "--resume", "auto"]
        pins = {
            "transport.data_port": _port(self.endpoints.get("data")),
            "transport.control_port": _port(self.endpoints.get("control")),
            "weights.rendezvous_port": _port(self.endpoints.get("rendezvous")),
            "metrics.learner_port": _port(self.endpoints.get("metrics")),
        }
        for key, port in pins.items():
            if port:
                argv += ["--set", f"{key}={port}"]
        return argv

    def poll(self) -> int | None:
        """One supervision pass; the job's exit code once it must end (JobFailed if a child cannot start)."""
        now = time.monotonic()
        for child in self.actors + ([self.evaluator] if self.evaluator else []):
            self._supervise(child, now)
        if self.learner is None:
            return None
        if not self.learner.done:
            self._supervise(self.learner, now)
        if self.learner.done:
            return self.learner.proc.returncode
        return None

    def wait(self, timeout_s: float, tick_s: float = 0.5) -> int | None:
        """Supervise (`poll`) until the job ends -- the learner's exit code -- or timeout_s passes (None)."""
        deadline = time.monotonic() + timeout_s
        while True:
            code = self.poll()
            if code is not None or time.monotonic() >= deadline:
                return code
            time.sleep(tick_s)

    def _supervise(self, child: Child, now: float) -> None:
        if child.done or child.alive() or child.proc is None:
            return
        if child.next_start == 0.0:  # a new exit
            code = child.proc.returncode
            was_ready = child.ready()
            line = last_error_line(child.log_path)
            self.on_event(f"{child.name} exited with {describe_exit(code)}" + (f": {line}" if line and code else ""))
            if code == 0 or not child.restartable:
                child.done = True
                return
            child.start_failures = 0 if was_ready else child.start_failures + 1
            if child.start_failures >= self.cfg.up.start_failures:
                child.done = True
                raise JobFailed(f"{child.name} exited before it became ready {child.start_failures} times in a row "
                                f"(last: {describe_exit(code)}): {line or 'see ' + str(child.log_path)}")
            if child is self.learner and child.restarts >= self.cfg.up.learner_restarts:
                child.done = True
                raise JobFailed(f"learner died {child.restarts + 1} times (up.learner_restarts = "
                                f"{self.cfg.up.learner_restarts}): {line or 'see ' + str(child.log_path)}")
            delay = min(self.max_backoff_s, self.backoff_s * 2 ** child.restarts)
            child.next_start = now + delay
            self.on_event(f"{child.name}: restarting in {delay:.0f} s")
        elif now >= child.next_start:
            child.restarts += 1
            child.next_start = 0.0
            if child is self.learner:
                child.start(self.child_env("learner"), self.learner_restart_argv())
                self.on_event(f"learner restarted (#{child.restarts}, --resume auto), pid {child.proc.pid}")
            elif child is self.evaluator:
                child.start(self.child_env("learner"))
                self.on_event(f"evaluator restarted (#{child.restarts}), pid {child.proc.pid}")
            else:
                child.start(self.child_env(child.name))
                self.on_event(f"{child.name} restarted (#{child.restarts}), pid {child.proc.pid}")

    def stop(self) -> int | None:
        """Learner first (final checkpoint), then actors; SIGKILL whatever outlives the grace."""
        code = None
        if self.learner and self.learner.alive():
            self.learner.terminate()
            code = _wait(self.learner, self.grace_s)
        elif self.learner and self.learner.proc:
            code = self.learner.proc.returncode
        rest = self.actors + ([self.evaluator] if self.evaluator else [])
        for child in rest:
            child.terminate()
        for child in rest:
            _wait(child, max(5.0, self.grace_s / 4))
        return code

    def children(self) -> list[Child]:
        return ([self.learner] if self.learner else []) + self.actors + ([self.evaluator] if self.evaluator else [])


def _port(address: str | None) -> int | None:
    if not address:
        return None
    tail = address.rstrip("/").rsplit(":", 1)[-1]
    return int(tail) if tail.isdigit() else None


def _wait(child: Child, timeout_s: float) -> int | None:
    if child.proc is None:
        return None
    try:
        return child.proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        child.kill()
        return child.proc.wait()


def run_up(args) -> int:
    cfg = load_config(args.config or ["demo"], args.overrides)
    if args.plan:  # where each child would run; nothing starts
        num_actors = args.num_actors or cfg.actor.num_actors
        sys.stdout.write(format_plan(*plan_for(cfg, os.environ, num_actors)))
        return 0
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
    except (JobFailed, TimeoutError) as e:
        sup.on_event(f"stopping the job: {e}")
        sup.stop()
        return EXIT_CHILD_FAILED
