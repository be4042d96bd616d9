"""`treerpo up` hands each child its GPUs (CUDA_VISIBLE_DEVICES), tested without a GPU, and its CPU cores (up.cpus)."""

from __future__ import annotations

import os
import sys

import pytest

from common.config import ConfigError, load_config
from treerpo.supervisor import Child, Supervisor, parse_cpus, plan_cpus, plan_devices, visible_gpus


def test_visible_gpus_from_cuda_visible_devices_or_the_driver(tmp_path):
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "0,1"}) == ["0", "1"]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "GPU-a1,GPU-b2"}) == ["GPU-a1", "GPU-b2"]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": ""}) == []
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "2,-1,3"}) == ["2"]  # CUDA stops at an invalid entry
    driver = tmp_path / "gpus"
    for bus in ("0000:01:00.0", "0000:02:00.0", "0000:03:00.0"):
        (driver / bus).mkdir(parents=True)
    assert visible_gpus({}, proc_root=driver) == ["0", "1", "2"]
    assert visible_gpus({}, proc_root=tmp_path / "no-driver") == []


@pytest.mark.parametrize(("devices", "visible", "learner", "actors"), [
    ("auto", [], None, [None, None]),  # no GPU: children inherit (CPU)
    ("auto", ["0"], "0", ["0", "0"]),  # one GPU: shared (vLLM's gpu_memory_utilization must leave room)
    ("auto", ["0", "1"], "0", ["1", "1"]),
    ("auto", ["4", "5", "6"], "4", ["5", "6", "5", "6"]),  # learner first, actors round-robin over the rest
    ("inherit", ["0", "1"], None, [None, None]),
    (["0", "1", "2,3"], ["0", "1", "2", "3"], "0", ["1", "2,3", "1"]),  # explicit: actors cycle
    (["", "0"], [], "", ["0", "0"]),  # CPU learner, GPU actors
])
def test_plan_devices(devices, visible, learner, actors):
    assert plan_devices(devices, visible, len(actors)) == (learner, actors)


def test_each_child_starts_with_its_own_gpus(tmp_path):
    cfg = load_config("demo", [])
    sup = Supervisor(cfg, tmp_path, 2, env={"CUDA_VISIBLE_DEVICES": "4,5,6", "X": "1"}, on_event=lambda m: None)
    assert sup.child_env("learner")["CUDA_VISIBLE_DEVICES"] == "4"
    assert [sup.child_env(f"actor-{i}")["CUDA_VISIBLE_DEVICES"] for i in range(3)] == ["5", "6", "5"]  # + late joiner
    assert sup.child_env("actor-0")["X"] == "1"
    cfg = load_config("demo", ["up.devices=inherit"])
    sup = Supervisor(cfg, tmp_path, 2, env={"CUDA_VISIBLE_DEVICES": "4,5,6"}, on_event=lambda m: None)
    assert {sup.child_env(n)["CUDA_VISIBLE_DEVICES"] for n in ("learner", "actor-0", "actor-1")} == {"4,5,6"}


def test_devices_config_is_checked():
    with pytest.raises(ConfigError, match="learner's entry and at least one actor's"):
        load_config("demo", ["up.devices=['0']"])
    with pytest.raises(ConfigError, match="not CUDA_VISIBLE_DEVICES values"):
        load_config("demo", ["up.devices=['0', '1 2']"])


def test_cpu_plan_and_its_config_checks():
    assert plan_cpus(None, 2) == (None, [None, None])
    learner, actors = plan_cpus(["0", "1-2,5"], 3)
    assert learner == {0} and actors == [{1, 2, 5}] * 3  # actors cycle over their entries
    assert parse_cpus("0-3,8") == {0, 1, 2, 3, 8}
    with pytest.raises(ConfigError, match="at least one actor"):
        load_config("demo", ["up.cpus=['0']"])
    with pytest.raises(ConfigError, match="not CPU lists"):
        load_config("demo", ["up.cpus=['0', 'one']"])


def test_a_pinned_child_and_every_thread_it_starts_run_on_its_cores(tmp_path):
    # a real process: its main thread and a thread started after exec report the mask
    script = ("import os, threading; out = []; "
              "t = threading.Thread(target=lambda: out.append(os.sched_getaffinity(0))); t.start(); t.join(); "
              "print(sorted(os.sched_getaffinity(0)), sorted(out[0]))")
    child = Child("probe", [sys.executable, "-c", script], tmp_path / "probe.log", restartable=False,
                  cpus=frozenset({0}))
    child.start(dict(os.environ))
    assert child.proc.wait(30) == 0
    assert (tmp_path / "probe.log").read_text().strip().splitlines()[-1] == "[0] [0]"
