"""`treerpo up` supervision with real processes: a dead learner comes back, a child that can
never start stops the job with its reason, every exit is reported with its last error line."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from common.config import load_config
from common.rundir import read_json
from tests.support.system import SYSTEM_MODEL, System, pid_alive, wait_until
from treerpo.supervisor import EXIT_CHILD_FAILED, Child, JobFailed, Supervisor, last_error_line


def test_last_error_line_reads_the_latest_start_only(tmp_path):
    log = tmp_path / "actor-0.log"
    log.write_text(
        "\n=== start 10:00:00: treerpo actor\nValueError: from the first start\n"
        "\n=== start 10:00:05: treerpo actor\nloading model\nTraceback (most recent call last):\n"
        '  File "x.py", line 1, in <module>\nactor.engine.EngineError: the vLLM engine needs a CUDA GPU: '
        "set actor.engine=hf\n\nshutting down\n"
    )
    assert last_error_line(log) == "actor.engine.EngineError: the vLLM engine needs a CUDA GPU: set actor.engine=hf"
    log.write_text("\n=== start 10:00:00: treerpo actor\nall good\n")
    assert last_error_line(log) == "all good"
    assert last_error_line(tmp_path / "missing.log") == ""


def _never_ready_supervisor(tmp_path, start_failures: int) -> Supervisor:
    cfg = load_config("demo", [f"up.start_failures={start_failures}", "up.backoff_s=0.05", "up.max_backoff_s=0.1"])
    events: list[str] = []
    sup = Supervisor(cfg, tmp_path, 0, env=dict(os.environ), on_event=events.append)
    sup.events = events
    return sup


def test_a_child_that_never_becomes_ready_stops_the_job_with_its_reason(tmp_path):
    # a real process that fails the way a misconfigured actor does, before writing its ready file
    sup = _never_ready_supervisor(tmp_path, start_failures=3)
    code = "import sys; print('loading'); print('EngineError: needs a CUDA GPU; set actor.engine=hf'); sys.exit(1)"
    child = Child("actor-0", [sys.executable, "-c", code], tmp_path / "actor-0.log", restartable=True,
                  ready_file=tmp_path / "actors" / "actor-0.json")
    child.start(sup.env)
    sup.actors.append(child)
    with pytest.raises(JobFailed, match="actor-0 exited before it became ready 3 times in a row") as failed:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            sup.poll()
            time.sleep(0.02)
    assert "EngineError: needs a CUDA GPU; set actor.engine=hf" in str(failed.value)
    assert child.restarts == 2 and child.done
    exits = [e for e in sup.events if e.startswith("actor-0 exited with code 1: EngineError: needs a CUDA GPU")]
    assert len(exits) == 3  # every exit reported with its last error line


def test_a_child_that_was_ready_is_restarted_without_limit_on_start_failures(tmp_path):
    # ready (its pid in its ready file) and then crashed: a runtime crash, restarted each time
    sup = _never_ready_supervisor(tmp_path, start_failures=1)
    ready = tmp_path / "actors" / "actor-0.json"
    ready.parent.mkdir(parents=True)
    code = ("import json, os, sys; json.dump({'pid': os.getpid()}, open(sys.argv[1], 'w')); "
            "print('RuntimeError: crashed after start'); sys.exit(1)")
    child = Child("actor-0", [sys.executable, "-c", code, str(ready)], tmp_path / "actor-0.log", restartable=True,
                  ready_file=ready)
    child.start(sup.env)
    sup.actors.append(child)
    deadline = time.monotonic() + 60
    while child.restarts < 3 and time.monotonic() < deadline:
        assert sup.poll() is None
        time.sleep(0.02)
    assert child.restarts >= 3 and not child.done and child.start_failures == 0
    child.kill()


def test_up_stops_when_an_actor_can_never_start(tiny_model_dir, tmp_path):
    """`treerpo up` with an actor that fails at start (a bad reward name only actors use): the job
    stops with the actor's reason on stderr/stdout and EXIT_CHILD_FAILED, not 'restarting' forever."""
    argv = [sys.executable, "-m", "treerpo", "up", "--config", "demo", "--run-dir", str(tmp_path / "job"),
            "--num-actors", "1", "--set", f"model.path={tiny_model_dir}", "--set", "up.start_failures=2",
            "--set", "up.backoff_s=0.1", "--set", "transport.data_port=0", "--set", "transport.control_port=0",
            "--set", "weights.rendezvous_port=0", "--set", "metrics.learner_port=0", "--set", "metrics.actor_port=0",
            "--set", "data.source=files", "--set", f"data.paths=[{tmp_path / 'missing.jsonl'}]"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert proc.returncode == EXIT_CHILD_FAILED, proc.stdout + proc.stderr
    out = proc.stdout + proc.stderr
    assert "actor-0 exited before it became ready 2 times in a row" in out
    assert "missing.jsonl" in out  # the reason, from the actor's log, on the supervisor's output
    assert out.count("actor-0 exited with code") == 2


@pytest.mark.parametrize("checkpoint_every", [2, 0], ids=["from-checkpoint", "no-checkpoint-yet"])
def test_learner_sigkill_under_up_resumes_and_actors_stay(make_tiny_model, tmp_path, checkpoint_every):
    """SIGKILL the learner of a supervised job (ports chosen by the OS): `up` restarts it from its
    latest checkpoint (or afresh, when it died before its first one) as a new incarnation on the
    same ports; the actors stay up (same pids), re-register and train again; no tree is trained
    twice, and trees made for the dead incarnation are not trained."""
    overrides = [f"learner.checkpoint_every={checkpoint_every}", "transport.data_port=0",
                 "transport.control_port=0", "weights.rendezvous_port=0", "up.backoff_s=0.5"]
    system = System(tmp_path / "job", make_tiny_model(**SYSTEM_MODEL), overrides, num_actors=2)
    run_dir = system.run_dir
    try:
        system.start()
        first_endpoints = dict(system.sup.endpoints)
        has_checkpoint = (lambda: (run_dir / "checkpoints" / "latest").exists()) if checkpoint_every else (lambda: True)
        system.wait(lambda: has_checkpoint() and len(system.steps()) >= 3, 300, "3 steps (and a checkpoint)")
        actor_pids = [a.proc.pid for a in system.sup.actors]
        victim = system.sup.learner.proc.pid
        os.kill(victim, signal.SIGKILL)
        kill_time = time.time()
        steps_before = len(system.steps())

        def back() -> bool:
            trees = [t for t in system.trees() if t["time"] > kill_time and t["verdict"] == "accepted"]
            return (system.sup.learner.restarts == 1 and len(system.steps()) >= steps_before + 2
                    and {t["actor_id"] for t in trees} == {"actor-0", "actor-1"})

        system.wait(back, 300, "the restarted learner to train trees from both actors")
        assert not pid_alive(victim)
        assert [a.proc.pid for a in system.sup.actors] == actor_pids, "an actor was restarted"
        assert all(a.restarts == 0 for a in system.sup.actors)
        endpoints = read_json(run_dir / "endpoints.json")
        for key in ("data", "control", "rendezvous", "metrics"):
            assert endpoints[key] == first_endpoints[key], f"{key} moved across the restart"
        assert endpoints["incarnation"] > first_endpoints["incarnation"]
        after = [t for t in system.trees() if t["time"] > kill_time]
        assert all(t["incarnation"] == endpoints["incarnation"] for t in after if t["verdict"] == "accepted")
        assert all(t["verdict"] == "incarnation" for t in after if t["incarnation"] != endpoints["incarnation"])
        first_step_after = system.steps()[steps_before]
        if checkpoint_every:  # resumed right after a checkpointed step it had reached, not from scratch
            resumed_at = first_step_after["step"] - 1
            assert 2 <= resumed_at <= steps_before and resumed_at % checkpoint_every == 0
        else:  # no checkpoint yet: a fresh start
            assert first_step_after["step"] == 1
        assert system.stop() == 0
    finally:
        system.stop()
    steps = system.steps()
    trained = [tid for r in steps for tid in r["tree_ids"]]
    assert len(trained) == len(set(trained)), "a tree was trained twice"
    wait_until(system.all_exited, 30, "every process to exit")

