"""`learner.mode: sync` (the on-policy loop) and the token budget `learner.max_generated_tokens`,
each through a real `treerpo up` job (learner + 2 HF actors, ZeroMQ, gloo syncs)."""

from __future__ import annotations

from tests.support.system import SYSTEM_MODEL, System, wait_until


def test_sync_mode_trains_every_tree_on_the_weights_that_made_it(make_tiny_model, tmp_path):
    # async (the default) lets actors run ahead: with 2 actors x 4 credits and batches of 4 trees,
    # trees made by older weights reach most steps; in sync mode none may
    system = System(tmp_path / "job", make_tiny_model(**SYSTEM_MODEL), ["learner.mode=sync"], num_actors=2)
    try:
        system.start()
        system.wait(lambda: len(system.steps()) >= 8, 300, "8 steps")
    finally:
        system.stop()
    steps = system.steps()
    trees = {t["tree_id"]: t for t in system.trees() if t["verdict"] == "accepted"}
    actors = set()
    for record in steps:
        assert len(record["tree_ids"]) == 4  # one full round per step
        for tid in record["tree_ids"]:
            tree = trees[tid]
            actors.add(tree["actor_id"])
            # made entirely by the weights the step trains at: staleness exactly 0
            assert tree["min_version"] == tree["max_version"] == record["version"], (tree, record["version"])
        assert record["staleness_mean"] == 0.0
    assert actors == {"actor-0", "actor-1"}
    assert [r["version"] for r in steps] == list(range(len(steps)))
    # no tree was made beyond a round: nothing trained twice, nothing stale, nothing uncredited
    assert all(t["verdict"] == "accepted" for t in system.trees() if t["learner_version"] < len(steps) - 1)
    wait_until(system.all_exited, 30, "every process to exit")


def test_token_budget_stops_the_job_at_the_first_step_that_reaches_it(make_tiny_model, tmp_path):
    budget = 1500
    system = System(tmp_path / "job", make_tiny_model(**SYSTEM_MODEL),
                    [f"learner.max_generated_tokens={budget}", "learner.max_steps=0"], num_actors=2)
    try:
        system.start()
        system.wait(lambda: system.sup.poll() is not None, 300, "the learner to stop at its token budget")
        assert system.sup.learner.proc.returncode == 0
    finally:
        system.stop()
    steps = system.steps()
    per_step = [r["generated_tokens"] for r in steps]
    assert all(n > 0 and n == int(n) for n in per_step)
    assert sum(per_step) >= budget > sum(per_step[:-1])  # stopped at the first step that reached it
    wait_until(system.all_exited, 30, "every process (the actors were told to shut down)")
