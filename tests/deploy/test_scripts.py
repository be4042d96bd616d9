"""The launch scripts: bash syntax, shellcheck clean, and the commands they run (dry run).

Tools: bash, shellcheck (Debian `shellcheck`); a test needing a missing one skips (fails under CI=true).
"""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.support.monitoring import DEPLOY, REPO
from tests.support.tools import require_tool, run
from treerpo.placement import plan_cpu_binds

SCRIPTS = sorted((DEPLOY / "scripts").glob("*.sh"))


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_syntax_and_shellcheck(script):
    text = script.read_text()
    assert text.startswith("#!/usr/bin/env bash\n") and "set -euo pipefail" in text
    assert os.access(script, os.X_OK)
    out = run([require_tool("bash"), "-n", str(script)])
    assert out.returncode == 0, out.stderr
    shellcheck = require_tool("shellcheck")
    out = run([shellcheck, "-S", "style", str(script)])
    assert out.returncode == 0, out.stdout


def launch(script: str, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    full = {"PATH": os.environ["PATH"], "TREERPO_DRY_RUN": "1", **env}
    return run([require_tool("bash"), str(DEPLOY / "scripts" / script), *args], env=full)


def test_launch_learner_commands():
    base = {"TREERPO_CONFIG": "/etc/treerpo/config.yaml /etc/treerpo/overlay.yaml",
            "TREERPO_SET": "tree.depth=1 tree.branching=[8]"}
    single = launch("launch_learner.sh", base, "--extra")
    assert single.returncode == 0, single.stderr
    assert single.stdout.split() == ["treerpo", "learner", "--config", "/etc/treerpo/config.yaml", "--config",
                                     "/etc/treerpo/overlay.yaml", "--set", "tree.depth=1", "--set",
                                     "tree.branching=\\[8\\]", "--extra"]
    multi = launch("launch_learner.sh", {**base, "NNODES": "2", "NODE_RANK": "1", "GPUS_PER_NODE": "8",
                                         "MASTER_ADDR": "treerpo-learner-0.treerpo-learner", "MASTER_PORT": "29500"})
    assert multi.returncode == 0, multi.stderr
    words = multi.stdout.split()
    assert words[:words.index("treerpo")] == [
        "torchrun", "--nnodes", "2", "--node-rank", "1", "--nproc-per-node", "8", "--master-addr",
        "treerpo-learner-0.treerpo-learner", "--master-port", "29500", "--no-python"]
    assert words[words.index("treerpo"):][:2] == ["treerpo", "learner"]
    ds = launch("launch_learner.sh", {**base, "GPUS_PER_NODE": "4", "TREERPO_LAUNCHER": "deepspeed"})
    assert ds.returncode == 0 and ds.stdout.split()[:2] == ["deepspeed", "--no_ssh"] and "--num_gpus" in ds.stdout
    # refused configurations say what is wrong
    no_addr = launch("launch_learner.sh", {**base, "NNODES": "2"})
    assert no_addr.returncode != 0 and "MASTER_ADDR" in no_addr.stderr
    bad_rank = launch("launch_learner.sh", {**base, "NNODES": "2", "NODE_RANK": "2", "MASTER_ADDR": "h"})
    assert bad_rank.returncode == 2 and "NODE_RANK" in bad_rank.stderr
    assert "TREERPO_CONFIG" in launch("launch_learner.sh", {}).stderr


def test_launch_actor_command():
    out = launch("launch_actor.sh", {"TREERPO_CONFIG": "a.yaml", "ACTOR_ID": "treerpo-actor-2",
                                     "TREERPO_SET": "transport.learner_host=10.1.2.3"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["treerpo", "actor", "--actor-id", "treerpo-actor-2", "--config", "a.yaml",
                                  "--set", "transport.learner_host=10.1.2.3"]


def test_launch_local_places_each_process_as_up_does(tmp_path):
    # `treerpo up --plan` gives the placement (design §1.5): on 2 GPUs the learner gets GPU 0 and both vLLM
    # actors GPU 1, splitting its memory; the plan runs from this checkout (PYTHONPATH), the children dry
    require_tool("treerpo")
    env = {"PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": "0,1", "NUM_ACTORS": "2", "RUN_DIR": str(tmp_path / "run"),
           "TREERPO_SET": "actor.engine=vllm model.device=auto"}
    out = launch("launch_local.sh", env)
    assert out.returncode == 0, out.stderr
    lines = dict(line.split(": ", 1) for line in out.stdout.splitlines())
    assert list(lines) == ["learner", "actor-0", "actor-1", "evaluator"]
    assert lines["evaluator"].split()[:3] == ["CUDA_VISIBLE_DEVICES=0", "treerpo", "evaluator"]  # the learner's GPU
    assert lines["learner"].split()[:3] == ["CUDA_VISIBLE_DEVICES=0", "treerpo", "learner"]
    assert "gpu_memory_utilization" not in lines["learner"]
    for i in range(2):
        words = lines[f"actor-{i}"].split()
        assert words[:5] == ["CUDA_VISIBLE_DEVICES=1", "treerpo", "actor", "--actor-id", f"actor-{i}"]
        assert words[-2:] == ["--set", "actor.gpu_memory_utilization=0.425"]  # last: it wins over TREERPO_SET
    # one GPU shared by the learner and 5 vLLM actors cannot fit: refused before anything starts, with
    # `up`'s one-line error and exit code
    crowded = launch("launch_local.sh", {**env, "CUDA_VISIBLE_DEVICES": "0", "NUM_ACTORS": "5"})
    assert crowded.returncode == 2 and not crowded.stdout
    assert "treerpo up: 5 vLLM actors on GPU '0' would get 0.090 of it each" in crowded.stderr
    assert not (tmp_path / "run").exists()
    # vLLM on its CPU backend: each actor starts with the cores `up` gives it (treerpo.placement.plan_cpu_binds)
    cpu_env = {k: v for k, v in env.items() if k != "CUDA_VISIBLE_DEVICES"}
    out = launch("launch_local.sh", {**cpu_env, "TREERPO_SET": "actor.engine=vllm"})
    assert out.returncode == 0, out.stderr
    lines = dict(line.split(": ", 1) for line in out.stdout.splitlines())
    binds = plan_cpu_binds(2, sorted(os.sched_getaffinity(0)))
    assert [lines[f"actor-{i}"].split()[0] for i in range(2)] == [f"VLLM_CPU_OMP_THREADS_BIND={b}" for b in binds]
    assert "VLLM_CPU_OMP_THREADS_BIND" not in lines["learner"]
