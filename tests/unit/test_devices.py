"""`treerpo up` hands each child its GPUs (CUDA_VISIBLE_DEVICES) and, on a shared GPU, its share of the
memory, tested without a GPU; what a shared GPU means for the weight sync's backend; CPU cores (up.cpus)."""

from __future__ import annotations

import logging
import os
import sys

import pytest

from common.config import ConfigError, WeightsConfig, load_config
from treerpo.placement import (
    CPU_BIND_ENV,
    MIN_VLLM_SHARE,
    format_plan,
    host_cpus,
    plan_cpu_binds,
    plan_devices,
    plan_placement,
    visible_gpus,
)
from treerpo.supervisor import Child, Supervisor, parse_cpus, plan_cpus
from weightsync.group import resolve_backend
from weightsync.publisher import WeightPublisher


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


VLLM = ["actor.engine=vllm", "model.device=auto"]  # the learner on a GPU too, when it sees one
SHARE = "actor.gpu_memory_utilization"


@pytest.mark.parametrize(("overrides", "visible", "num_actors", "learner", "actors"), [
    # 2 GPUs, 2 actors: the learner alone on GPU 0, both actors on GPU 1 split U = 0.85
    (VLLM, ["0", "1"], 2, "0", [("1", 0.425), ("1", 0.425)]),
    # 1 GPU: the learner keeps up.learner_memory_fraction (0.4), the actors split the rest: (0.85 - 0.4) / 2
    (VLLM, ["0"], 2, "0", [("0", 0.225), ("0", 0.225)]),
    (VLLM, ["0"], 1, "0", [("0", 0.45)]),
    (VLLM + ["up.learner_memory_fraction=0.25", f"{SHARE}=0.9"], ["0"], 3, "0", [("0", 0.216)] * 3),  # rounded down
    (VLLM, ["0", "1", "2"], 2, "0", [("1", None), ("2", None)]),  # each alone on its GPU: U, unchanged
    (["actor.engine=vllm", "model.device=cpu"], ["0"], 2, "0", [("0", 0.425)] * 2),  # learner on CPU: no reserve
    (["actor.engine=hf", "model.device=auto"], ["0"], 2, "0", [("0", None)] * 2),  # HF takes no share
    (VLLM, [], 2, None, [(None, None)] * 2),  # no GPU
    (VLLM + ["up.devices=inherit"], ["0", "1"], 2, None, [(None, 0.225)] * 2),  # all on the first visible GPU
    (VLLM + ["up.devices=['0', '1', '1', '2,3']"], [], 3, "0", [("1", 0.425), ("1", 0.425), ("2,3", None)]),
])
def test_plan_placement_splits_the_memory_of_a_shared_gpu(overrides, visible, num_actors, learner, actors):
    cfg = load_config("demo", overrides)
    got_learner, got_actors = plan_placement(cfg, visible, num_actors)
    assert got_learner.devices == learner and got_learner.overrides == ()
    assert [a.name for a in got_actors] == [f"actor-{i}" for i in range(num_actors)]
    assert [(a.devices, a.overrides) for a in got_actors] == [
        (d, (f"{SHARE}={share}",) if share is not None else ()) for d, share in actors]


@pytest.mark.parametrize("num_gpus", [1, 2, 3, 4])
@pytest.mark.parametrize("num_actors", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("utilization", [0.5, 0.85, 0.95])
def test_what_shares_a_gpu_plans_for_at_most_the_configured_utilization(num_gpus, num_actors, utilization):
    # sum over each GPU's processes: the learner's reserve (if there) + its vLLM actors' shares <= U
    cfg = load_config("demo", [*VLLM, f"{SHARE}={utilization}"])
    try:
        learner, actors = plan_placement(cfg, [str(g) for g in range(num_gpus)], num_actors)
    except ConfigError as e:
        assert f"under the {MIN_VLLM_SHARE}" in str(e)
        return
    for gpu in {a.gpu for a in actors}:
        here = [a for a in actors if a.gpu == gpu]
        shares = [float(a.overrides[0].split("=")[1]) if a.overrides else utilization for a in here]
        reserve = cfg.up.learner_memory_fraction if learner.gpu == gpu else 0.0
        assert sum(shares) + reserve <= utilization + 1e-9
        assert min(shares) >= MIN_VLLM_SHARE
        assert len(here) > 1 or learner.gpu == gpu or shares == [utilization]


def test_a_placement_that_cannot_fit_is_refused_with_the_fix():
    cfg = load_config("demo", VLLM)
    with pytest.raises(ConfigError, match=r"5 vLLM actors on GPU '0' would get 0\.090 of it each .* run fewer "
                                          r"actors.*lower up.learner_memory_fraction"):
        plan_placement(cfg, ["0"], 5)  # (0.85 - 0.4) / 5 = 0.09
    assert plan_placement(cfg, ["0", "1"], 8)[1][0].overrides == (f"{SHARE}=0.106",)  # 0.85 / 8 fits
    with pytest.raises(ConfigError, match="a vLLM instance needs"):
        plan_placement(load_config("demo", [*VLLM, "up.learner_memory_fraction=0.85"]), ["0"], 1)
    # NCCL refuses two ranks on one GPU ("Duplicate GPU detected"): an explicit nccl backend is refused at launch
    for engine in ("vllm", "hf"):
        cfg = load_config("demo", [f"actor.engine={engine}", "model.device=auto", "weights.backend=nccl"])
        with pytest.raises(ConfigError, match="weights.backend=nccl but actor-0, actor-1 share GPU '1'"):
            plan_placement(cfg, ["0", "1"], 2)
        assert plan_placement(cfg, ["0", "1", "2"], 2)[1][1].gpu == "2"


def test_up_passes_each_actor_its_share_and_refuses_before_starting_anything(tmp_path):
    cfg = load_config("demo", VLLM)
    sup = Supervisor(cfg, tmp_path, 2, env={"CUDA_VISIBLE_DEVICES": "0,1"}, on_event=lambda m: None)
    assert sup.child_env("learner")["CUDA_VISIBLE_DEVICES"] == "0"
    assert [sup.child_env(f"actor-{i}")["CUDA_VISIBLE_DEVICES"] for i in range(2)] == ["1", "1"]
    argv = sup.actor_argv(1)
    assert argv[argv.index(f"{SHARE}=0.425") - 1] == "--set"
    alone = Supervisor(cfg, tmp_path / "alone", 2, env={"CUDA_VISIBLE_DEVICES": "0,1,2"}, on_event=lambda m: None)
    assert not any(a.startswith(SHARE) for a in alone.actor_argv(1))
    crowded = Supervisor(cfg, tmp_path / "crowded", 5, env={"CUDA_VISIBLE_DEVICES": "0"}, on_event=lambda m: None)
    with pytest.raises(ConfigError, match="would get 0.090"):
        crowded.start()
    assert crowded.learner is None and crowded.actors == []


def test_the_plan_prints_one_line_per_child():
    cfg = load_config("demo", VLLM)
    assert format_plan(*plan_placement(cfg, ["0", "1"], 2)) == (
        "learner CUDA_VISIBLE_DEVICES=0\n"
        f"actor-0 CUDA_VISIBLE_DEVICES=1 {SHARE}=0.425\n"
        f"actor-1 CUDA_VISIBLE_DEVICES=1 {SHARE}=0.425\n")
    assert format_plan(*plan_placement(load_config("demo", ["up.devices=['', '0']"]), [], 1)) == (
        "learner CUDA_VISIBLE_DEVICES=\nactor-0 CUDA_VISIBLE_DEVICES=0\n")
    assert format_plan(*plan_placement(cfg, [], 1)) == "learner\nactor-0\n"  # no GPU: both inherit


@pytest.mark.parametrize(("num", "cpus", "binds"), [
    (2, [0, 1], ["nobind", "nobind"]),  # this machine: under 2 CPUs each, the OS schedules them
    (2, [0, 1, 2, 3], ["0", "2"]),  # a slice each, less its last CPU (the engine core's)
    (2, list(range(16)), ["0,1,2,3,4,5,6", "8,9,10,11,12,13,14"]),
    (3, [4, 5, 6, 7, 9, 11, 12], ["4", "6", "9"]),  # the allowed CPUs, in order; the spare one unused
    (4, list(range(7)), ["nobind"] * 4),
])
def test_vllm_cpu_actors_get_disjoint_cores(num, cpus, binds):
    assert plan_cpu_binds(num, cpus) == binds


def test_only_vllm_cpu_actors_beside_others_are_bound_and_never_against_the_operator(tmp_path):
    # vLLM's own `auto` pins every CPU worker of a host to the same first cores: two of them met on
    # core 0 and one starved the other's start-up for minutes (the 2-actor vLLM system test hung in CI)
    vllm = load_config("demo", ["actor.engine=vllm"])
    _, actors = plan_placement(vllm, [], 2, [0, 1, 2, 3])
    assert [a.env for a in actors] == [((CPU_BIND_ENV, "0"),), ((CPU_BIND_ENV, "2"),)]
    assert format_plan(*plan_placement(vllm, [], 2, [0, 1, 2, 3])) == (
        f"learner\nactor-0 {CPU_BIND_ENV}=0\nactor-1 {CPU_BIND_ENV}=2\n")
    assert plan_placement(vllm, [], 1, [0, 1, 2, 3])[1][0].env == ()  # alone: vLLM's auto is right
    assert all(a.env == () for a in plan_placement(vllm, ["0"], 2, [0, 1, 2, 3])[1])  # on a GPU
    assert all(a.env == () for a in plan_placement(vllm, [], 2, None)[1])  # the operator's binding
    assert all(a.env == () for a in plan_placement(load_config("demo", []), [], 2, [0, 1, 2, 3])[1])  # HF
    pinned = load_config("demo", ["actor.engine=vllm", "up.cpus=['0', '1', '2']"])
    assert all(a.env == () for a in plan_placement(pinned, [], 2, [0, 1, 2, 3])[1])  # vLLM binds inside up.cpus
    assert host_cpus({CPU_BIND_ENV: "0-3"}) is None
    assert host_cpus({}) == sorted(os.sched_getaffinity(0))

    sup = Supervisor(vllm, tmp_path, 2, env={"X": "1"}, on_event=lambda m: None)
    want = plan_cpu_binds(2, sorted(os.sched_getaffinity(0)))
    assert [sup.child_env(f"actor-{i}").get(CPU_BIND_ENV) for i in range(2)] == want
    assert CPU_BIND_ENV not in sup.child_env("learner")
    mine = Supervisor(vllm, tmp_path, 2, env={CPU_BIND_ENV: "nobind"}, on_event=lambda m: None)
    assert {mine.child_env(f"actor-{i}")[CPU_BIND_ENV] for i in range(2)} == {"nobind"}


A, B, C = (f"GPU-{n}2345678-1234-1234-1234-123456789abc" for n in "abc")


def test_the_sync_backend_is_gloo_when_two_processes_of_the_group_share_a_gpu():
    # gpus: [learner, member 1, ...] as the publisher passes them
    assert resolve_backend("auto", True, [A, B, C]) == "nccl"
    assert resolve_backend("auto", True, [A, B, B]) == "gloo"  # two actors on one GPU
    assert resolve_backend("auto", True, [A, A, B]) == "gloo"  # an actor on the learner's GPU
    assert resolve_backend("auto", True, [A, "", ""]) == "nccl"  # unknown (an older actor): never "shared"
    assert resolve_backend("auto", True) == "nccl"
    assert resolve_backend("auto", False, [A, B]) == "gloo"  # a member without CUDA
    assert resolve_backend("gloo", True, [A, B]) == "gloo"
    assert resolve_backend("nccl", True, [A, B]) == "nccl"
    with pytest.raises(ValueError, match=f"share GPU {B}"):
        resolve_backend("nccl", True, [A, B, B])
    with pytest.raises(ValueError, match="not every sync member has CUDA"):
        resolve_backend("nccl", False, [A, B])


def test_the_publisher_falls_back_to_gloo_for_a_shared_gpu_and_says_so_once(monkeypatch, caplog):
    import torch  # noqa: PLC0415

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the decision only: no group is built here
    pub = WeightPublisher(WeightsConfig(rendezvous_port=0), "127.0.0.1", gpu=A)
    try:
        plan = pub.plan([("w", (4,), "float32")], 1)
        with caplog.at_level(logging.WARNING, logger="weightsync.publisher"):
            assert pub.prepare(plan, ["a0", "a1"], True, [B, C]).backend == "nccl"
            assert not caplog.records
            for _ in range(2):
                sync = pub.prepare(plan, ["a0", "a1"], True, [B, A])
                assert sync.backend == "gloo" and {a.backend for a in sync.announcements} == {"gloo"}
        assert [r.getMessage() for r in caplog.records] == [
            f"weight sync over gloo, not NCCL: learner, a1 share a GPU ({A}), and NCCL refuses two ranks on one "
            "device; give each a GPU of its own for NCCL"]
        assert pub.prepare(plan, ["a0"], False, [A]).backend == "gloo"
        with pytest.raises(ValueError, match="1 GPU UUIDs for 2 sync members"):
            pub.prepare(plan, ["a0", "a1"], True, [B])
    finally:
        pub.close()


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
