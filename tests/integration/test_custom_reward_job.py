"""A real `treerpo up` job whose custom reward misbehaves: it raises, hangs past
`data.reward_timeout_s`, returns NaN or kills its worker on some completions (by a hash of the
text). Prompts come from reasoning-gym. The job must keep training, the actors must count every
failure by reason, and no reward worker may outlive its actor. A reward that cannot load stops
the actor at start with one line.

Everything is real (tests/support/system.py): learner and actor processes, ZeroMQ, gloo, the
tiny model, the reward's worker processes. Waits are on observable state, with deadlines.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from common.errors import ConfigError
from tests.support.paths import REPO
from tests.support.system import SYSTEM_MODEL, System, metric_value, scrape, wait_until

pytest.importorskip("reasoning_gym")

MISBEHAVING_REWARD = '''
import hashlib, os, time

def score(completion, answer, entry):
    k = int(hashlib.sha256(completion.encode()).hexdigest(), 16) % 8
    if k == 0:
        raise ValueError("a bug in the user's reward")
    if k == 1:
        time.sleep(3600)  # far past data.reward_timeout_s
    if k == 2:
        return float("nan")
    if k == 3:
        os._exit(1)  # the worker dies
    return 1.0 if k in (4, 5) else 0.0
'''

ERRORS = "treerpo_actor_reward_errors_total"
ACTORS = ("actor-0", "actor-1")


def reward_workers() -> dict[int, int]:
    """pid -> parent pid named in its spec, of every reward worker process on this machine."""
    out = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if len(argv) > 4 and b"_worker_main" in argv[3]:
            try:
                out[int(proc.name)] = json.loads(argv[4])["parent"]
            except (ValueError, KeyError):
                continue
    return out


def reasons(text: str) -> dict[str, float]:
    return {r: metric_value(text, ERRORS, reason=r) or 0.0 for r in ("error", "timeout", "bad_value")}


def test_a_misbehaving_custom_reward_is_counted_and_the_job_trains_on(make_tiny_model, tmp_path):
    reward_py = tmp_path / "misbehaving.py"
    reward_py.write_text(MISBEHAVING_REWARD)
    system = System(tmp_path / "job", make_tiny_model(**SYSTEM_MODEL), [
        "data.source=reasoning_gym", "data.dataset=chain_sum", "data.num_problems=2000", "data.num_eval_problems=50",
        f"data.reward={reward_py}:score", "data.reward_timeout_s=1.0", "tree.max_tokens=16", "tree.segment_tokens=6",
    ])
    totals: dict[str, dict[str, float]] = {}

    def scraped() -> dict[str, dict[str, float]]:
        return {a: reasons(scrape(system.actor_metrics_url(a))) for a in ACTORS}

    def counted_and_trained() -> bool:
        nonlocal totals
        if len(system.steps()) < 4 or not all((system.run_dir / "actors" / f"{a}.json").exists() for a in ACTORS):
            return False
        totals = scraped()
        return all(sum(t[r] for t in totals.values()) >= 1 for r in ("error", "timeout", "bad_value"))

    try:
        system.start()
        system.wait(counted_and_trained, 420, "4 steps and every failure reason counted by the actors")
        children = system.sup.children()
        actor_pids = {c.proc.pid for c in children if c.name.startswith("actor")}
        assert len(actor_pids) == 2 and all(c.alive() and c.restarts == 0 for c in children)  # nobody stopped
        # each actor scores through its own worker (other jobs on this machine may run workers too)
        assert actor_pids <= set(reward_workers().values())
        steps = system.steps()
        assert [r["step"] for r in steps] == list(range(1, len(steps) + 1))
        assert all(math.isfinite(r["leaf_reward_mean"]) and 0.0 <= r["leaf_reward_mean"] <= 1.0 for r in steps)
        # timeouts cost the actors a second each, but the trees keep coming: training goes on
        system.wait(lambda: len(system.steps()) >= len(steps) + 2, 240, "2 more steps")
    finally:
        exit_code = system.stop()
    assert exit_code == 0
    wait_until(system.all_exited, 30, "every process of the job to exit")
    wait_until(lambda: not set(reward_workers().values()) & actor_pids, 30, "the reward workers to exit")
    # the actors' last expositions count at least what was scraped while they ran
    for actor_id in ACTORS:
        final = json.loads((system.run_dir / "actors" / f"{actor_id}.json").read_text())["final_metrics"]
        for reason, n in totals[actor_id].items():
            assert reasons(final)[reason] >= n, (actor_id, reason)
    print(f"\nreward errors by actor: {totals}; steps {len(system.steps())}")


def test_a_reward_that_cannot_load_stops_the_actor_at_start_with_one_line(make_tiny_model, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    broken = tmp_path / "broken.py"
    broken.write_text("import no_such_module_xyz\n\ndef score(completion, answer, entry):\n    return 1.0\n")
    base = ["--set", f"model.path={make_tiny_model(**SYSTEM_MODEL)}", "--set", "metrics.enabled=false",
            "--run-dir", str(tmp_path / "run")]
    for target, problem, when in [
        (f"{tmp_path}/missing.py:score", "no file", "config"),  # the config load tells
        (f"{broken}:scor", "defines no 'scor'; did you mean 'score'?", "config"),
        (f"{broken}:score", "failed: ModuleNotFoundError: No module named 'no_such_module_xyz'", "start"),  # running it
    ]:
        result = subprocess.run([sys.executable, "-m", "treerpo", "actor", *base, "--set", f"data.reward={target}"],
                                capture_output=True, text=True, env=env, cwd=REPO, timeout=240)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.returncode == ConfigError.exit_code, result.stderr[-3000:]
        assert "Traceback" not in result.stderr and lines[-1].startswith("treerpo actor: "), result.stderr[-3000:]
        assert problem in lines[-1], (when, lines[-1])
        if when == "config":
            assert len(lines) == 1  # before anything else ran
