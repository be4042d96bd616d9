"""Staleness is counted in optimizer steps, also when weights go out only every sync_every steps."""

from __future__ import annotations

import pytest

from tests.support.system import SYSTEM_MODEL, System, wait_until


def test_version_counts_optimizer_steps_with_sync_every_3(make_tiny_model, tmp_path):
    # with sync_every = 3 a version that counted publications would read 0,0,0,1,1,1,2 over seven
    # steps and under-state every tree's lag by up to 2 steps (design §4.3)
    system = System(tmp_path / "job", make_tiny_model(**SYSTEM_MODEL),
                    ["weights.sync_every=3", "replay.max_staleness=8"], num_actors=2)
    try:
        system.start()
        system.wait(lambda: len(system.steps()) >= 7, 300, "7 steps")
    finally:
        system.stop()
    steps = system.steps()
    assert [r["version"] for r in steps] == list(range(len(steps)))  # the version in force at step k is k - 1
    published = {s["version"] for s in system.syncs() if s.get("confirmed")}
    assert {3, 6} <= published  # the periodic syncs, each at the step count it publishes
    trees = {t["tree_id"]: t for t in system.trees() if t["verdict"] == "accepted"}
    for record in steps:
        lags = [record["version"] - trees[tid]["min_version"] for tid in record["tree_ids"]]
        assert min(lags) >= 0
        assert record["staleness_mean"] == pytest.approx(sum(lags) / len(lags), abs=1e-12)
    wait_until(system.all_exited, 30, "every process to exit")
