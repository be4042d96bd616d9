"""`treerpo up` with vLLM actors on vLLM's CPU backend: a learner and two vLLM actors as processes.

Trees from both actors are trained; every sync is acknowledged with the learner's checksum and
versions advance; each sync lands in flight (generation paused, running requests kept) and the
pause is reported per sync; SIGTERM stops everything, vLLM's engine-core and worker processes
included. Skips without vLLM, naming it.
"""

from __future__ import annotations

import re
import statistics
from pathlib import Path

import pytest

from tests.support.system import System, metric_value, pid_alive, scrape, wait_until
from tests.support.vllm import VLLM_ENV, VLLM_OVERRIDES, require_vllm_here

PAUSE_LINE = re.compile(r"weights v(\d+) landed in flight: generation paused ([\d.]+) ms, (\d+) requests kept running")


def _descendants(pids: list[int]) -> set[int]:
    """Every live process below `pids` (vLLM's engine core and its worker under each actor)."""
    parent: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(") ", 1)[1].split()
        except OSError:
            continue
        parent[int(stat.parent.name)] = int(fields[1])
    found, frontier = set(), set(pids)
    while frontier:
        frontier = {p for p, pp in parent.items() if pp in frontier} - found
        found |= frontier
    return found


@pytest.mark.vllm
def test_up_with_vllm_actors_trains_syncs_in_flight_and_stops_clean(vllm_model_dir, tmp_path):
    require_vllm_here()
    overrides = [*VLLM_OVERRIDES, "actor.max_model_len=256", "transport.data_port=0", "transport.control_port=0",
                 "weights.rendezvous_port=0", "weights.timeout_s=30", "transport.peer_timeout_s=20"]
    system = System(tmp_path / "job", vllm_model_dir, overrides, num_actors=2, env=VLLM_ENV)
    actors = ("actor-0", "actor-1")

    def confirmed_by_both() -> list[dict]:
        return [s for s in system.syncs() if set(s["confirmed"]) == set(actors)]

    def trained_from_both() -> bool:
        accepted = {t["actor_id"] for t in system.trees() if t["verdict"] == "accepted"}
        return accepted == set(actors)

    try:
        system.start()
        system.wait(lambda: len(confirmed_by_both()) >= 5 and trained_from_both(), 600,
                    "5 syncs confirmed by both vLLM actors and trees from both trained")
        engine_procs = _descendants([a.proc.pid for a in system.sup.actors])
        assert engine_procs, "no vLLM engine processes under the actors"
        texts = {a: scrape(system.actor_metrics_url(a)) for a in actors}
        assert system.stop() == 0
    finally:
        system.stop()

    syncs = confirmed_by_both()
    for s in syncs:  # every ack carries the learner's checksum of what it sent
        assert s["checksum"] and all(ack["problem"] is None and ack["checksum"] == s["checksum"]
                                     for ack in s["acks"].values()), s
    versions = [s["version"] for s in syncs]
    assert versions == sorted(versions) and len(set(versions)) == len(versions) >= 5
    steps = system.steps()
    assert len(steps) >= 4
    trained = [tid for r in steps for tid in r["tree_ids"]]
    assert len(trained) == len(set(trained))

    pauses, kept = [], []
    for actor_id in actors:
        lines = PAUSE_LINE.findall(system.log_tail(actor_id, 100_000))
        assert len(lines) >= 5, f"{actor_id}: {len(lines)} in-flight syncs logged"
        pauses += [float(ms) for _, ms, _ in lines]
        kept += [int(k) for _, _, k in lines]
        count = metric_value(texts[actor_id], "treerpo_actor_weight_pause_seconds_count", actor_id=actor_id)
        assert count and count >= 5
        assert (metric_value(texts[actor_id], "vllm:generation_tokens_total") or 0) > 0  # vLLM's own metrics
    assert max(kept) >= 1, "no sync landed while requests were running"
    print(f"\nvLLM actors: {len(syncs)} syncs confirmed by both; generation paused per sync: median "
          f"{statistics.median(pauses):.0f} ms, max {max(pauses):.0f} ms over {len(pauses)} syncs; "
          f"requests kept running through a sync: up to {max(kept)}")
    wait_until(system.all_exited, 60, "the learner and the actors to exit")
    wait_until(lambda: not any(pid_alive(p) for p in engine_procs), 60, "vLLM's engine processes to exit")


@pytest.mark.vllm
def test_up_with_vllm_actors_and_lora_syncs_only_the_adapter(vllm_model_dir, tmp_path):
    # model.lora through `treerpo up`: the learner trains the adapter, every sync carries only it and
    # every vLLM actor acks the learner's checksum of it; the run ends at max_steps with the adapter saved
    require_vllm_here()
    overrides = [*VLLM_OVERRIDES, "actor.max_model_len=256", "transport.data_port=0", "transport.control_port=0",
                 "weights.rendezvous_port=0", "weights.timeout_s=30", "transport.peer_timeout_s=20",
                 "model.lora.rank=4", "model.lora.alpha=8", "learner.max_steps=4"]
    system = System(tmp_path / "job", vllm_model_dir, overrides, num_actors=1, env=VLLM_ENV)
    try:
        system.start()
        system.wait(lambda: system.all_exited(), 600, "the LoRA run to reach learner.max_steps and end")
    finally:
        system.stop()
    from transformers import AutoModelForCausalLM  # noqa: PLC0415

    from common.config import LORA_TARGETS_DEFAULT  # noqa: PLC0415
    from common.lora import adapter_specs, find_targets  # noqa: PLC0415

    base = AutoModelForCausalLM.from_pretrained(str(vllm_model_dir))
    specs = adapter_specs(find_targets(((n, p.shape) for n, p in base.named_parameters()), LORA_TARGETS_DEFAULT), 4)
    adapter_bytes = 4 * sum(a * b for _, (a, b) in specs)  # float32
    syncs = [s for s in system.syncs() if s["confirmed"]]
    assert len(syncs) >= 4 and all(s["bytes"] == adapter_bytes for s in system.syncs())
    for s in syncs:
        assert all(ack["problem"] is None and ack["checksum"] == s["checksum"] for ack in s["acks"].values()), s
    assert [r["step"] for r in system.steps()] == [1, 2, 3, 4]
    assert (tmp_path / "job" / "checkpoints" / "step-000000004" / "adapter" / "adapter_config.json").exists()
