"""Harness for tests that run the real system: a learner and actors as processes on a tiny model.

Everything is real: `python -m treerpo.cli learner/actor` processes, ZeroMQ on loopback, gloo
weight sync, DeepSpeed on CPU. The harness only reads what the processes write (RUN_DIR/*.jsonl,
endpoints, logs) and what they serve (/metrics), and ends the processes it started, by pid.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from common.config import load_config
from common.rundir import logs_dir
from tests.support.paths import REPO
from treerpo.supervisor import Child, Supervisor, treerpo_command

# the tiny model of the system tests: small enough that a learner and 2 actors share 2 cores
SYSTEM_MODEL = {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "num_kv_heads": 1, "max_position_embeddings": 256}

BASE_OVERRIDES = [
    "tree.depth=2", "tree.branching=[2,2]", "tree.split=step", "tree.segment_tokens=8", "tree.max_tokens=24",
    "replay.batch_trees=4", "replay.credits_per_actor=4", "replay.max_staleness=4",
    "learner.lr=1e-4", "learner.max_steps=0", "learner.log_trees=true", "learner.micro_batch_tokens=512",
    "actor.prompts_per_batch=2", "actor.max_batch_rows=64",
    "weights.timeout_s=20", "transport.heartbeat_interval_s=0.5", "transport.peer_timeout_s=6",
    "metrics.learner_port=0", "metrics.actor_port=0",
]


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A free port below Linux's ephemeral range (32768+), never handed out twice: a port the
    kernel assigns later (a process binding port 0, e.g. the learner's own torch.distributed
    store) cannot take it between this choice and the bind."""
    rng = random.Random()
    for _ in range(1000):
        port = rng.randrange(20000, 32000)
        if port in _HANDED_OUT:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    raise RuntimeError("no free port in 20000-32000")


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        if line.strip():
            out.append(json.loads(line))
    return out


def received_trees(run_dir: Path) -> list[dict]:
    """trees.jsonl's 'received' records (learner.log_trees): one per tree that reached the learner."""
    return [t for t in read_jsonl(run_dir / "trees.jsonl") if t["event"] == "received"]


def scrape(url: str, timeout_s: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout_s) as r:
        return r.read().decode()


def metric_value(text: str, name: str, **labels: str) -> float | None:
    """Sum of the samples of `name` whose labels include `labels` (None if none)."""
    total, found = 0.0, False
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        metric, _, rest = head.partition("{")
        if metric != name:
            continue
        if all(f'{k}="{v}"' in rest for k, v in labels.items()):
            total += float(value)
            found = True
    return total if found else None


def wait_until(cond: Callable[[], bool], timeout_s: float, what: str, *, tick: Callable[[], None] = lambda: None,
               logs: Path | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        tick()
        if cond():
            return
        time.sleep(0.25)
    tail = ""
    if logs is not None:
        for log in sorted(Path(logs).glob("*.log")):
            tail += f"\n--- {log.name}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-25:])
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}{tail}")


class System:
    """A Supervisor-run job in run_dir plus readers for what its processes write."""

    def __init__(self, run_dir: Path, model: Path, overrides: list[str], num_actors: int = 2,
                 env: dict[str, str] | None = None) -> None:
        cfg = load_config("demo", [*BASE_OVERRIDES, f"model.path={model}", f"run_dir={run_dir}", *overrides])
        environ = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
        self.run_dir = Path(run_dir)
        self.sup = Supervisor(cfg, self.run_dir, num_actors, env=environ, backoff_s=0.5, grace_s=60.0,
                              on_event=lambda msg: None)
        self.cfg = cfg
        self.pids: list[int] = []

    def start(self) -> System:
        try:
            self.sup.start(startup_timeout_s=300)
        except (RuntimeError, TimeoutError) as e:
            raise AssertionError(f"{e}\n--- learner log:\n{self.log_tail('learner')}") from None
        self.pids += [c.proc.pid for c in self.sup.children()]
        return self

    def add_actor(self) -> Child:
        child = self.sup.add_actor()
        self.pids.append(child.proc.pid)
        return child

    def tick(self) -> None:
        code = self.sup.poll()
        for c in self.sup.children():
            if c.proc is not None and c.proc.pid not in self.pids:
                self.pids.append(c.proc.pid)
        if code is not None and code != 0:
            raise AssertionError(f"learner exited with {code}:\n{self.log_tail('learner')}")

    def wait(self, cond: Callable[[], bool], timeout_s: float, what: str) -> None:
        wait_until(cond, timeout_s, what, tick=self.tick, logs=logs_dir(self.run_dir))

    def steps(self) -> list[dict]:
        return read_jsonl(self.run_dir / "metrics.jsonl")

    def syncs(self) -> list[dict]:
        return read_jsonl(self.run_dir / "syncs.jsonl")

    def trees(self) -> list[dict]:
        return received_trees(self.run_dir)

    def learner_metrics_url(self) -> str:
        return self.sup.endpoints["metrics"] + "/metrics"

    def actor_metrics_url(self, actor_id: str) -> str:
        info = json.loads((self.run_dir / "actors" / f"{actor_id}.json").read_text())
        return info["metrics"] + "/metrics"

    def log_tail(self, name: str, n: int = 40) -> str:
        path = logs_dir(self.run_dir) / f"{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:]) if path.exists() else ""

    def stop(self) -> int | None:
        return self.sup.stop()

    def all_exited(self) -> bool:
        return all(not pid_alive(pid) for pid in self.pids)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (exited, not yet reaped) counts as gone
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


def start_process(argv_tail: list[str], log: Path, env: dict[str, str] | None = None) -> Child:
    child = Child(log.stem, treerpo_command(*argv_tail), log, restartable=False)
    child.start({**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO), **(env or {})})
    return child


def sigkill(child: Child) -> None:
    child.proc.send_signal(signal.SIGKILL)
    child.proc.wait(timeout=30)
