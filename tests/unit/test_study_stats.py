"""bench/study.py's statistics: hand-derived numbers for the end point and the difference interval."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest

from tests.support.paths import REPO


def load_study():
    spec = importlib.util.spec_from_file_location("treerpo_bench_study", REPO / "bench" / "study.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


study = load_study()


def test_mean_std_is_the_sample_std():
    assert study.mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)  # squares 1 + 0 + 1 over n - 1 = 2
    assert study.mean_std([0.5]) == (0.5, 0.0)


def test_final_is_the_mean_of_the_last_two_checkpoints():
    run = {"points": [{"pass_at_1": 0.1, "val_pass_at_1": 0.2}, {"pass_at_1": 0.3, "val_pass_at_1": 0.4},
                      {"pass_at_1": 0.5, "val_pass_at_1": 0.6}, {"pass_at_1": 0.7, "val_pass_at_1": 0.9}]}
    assert study.final_of(run) == pytest.approx(0.6)
    assert study.final_of(run, "val_pass_at_1") == pytest.approx(0.75)
    # the start (step 0) never counts; one checkpoint alone is the end point
    assert study.final_of({"points": run["points"][:2]}) == pytest.approx(0.3)
    assert study.final_of({"points": [{"pass_at_1": 0.3}, {"pass_at_1": 0.5}]}, "val_pass_at_1") is None


def test_welch_interval_by_hand():
    # xs: mean 2, var 1 -> se^2 = 1/3; ys: no spread. df = (1/3)^2 / ((1/3)^2 / 2) = 2, t(.975, 2) = 4.303
    d = study.diff_interval([1.0, 2.0, 3.0], [0.0, 0.0, 0.0])
    assert d["diff"] == 2.0 and d["df"] == pytest.approx(2.0)
    half = 4.303 * math.sqrt(1 / 3)
    assert (d["low"], d["high"]) == (pytest.approx(2.0 - half), pytest.approx(2.0 + half))
    # equal spreads and sizes: df = 2 (n - 1) = 8, t = 2.306, se = sqrt(2 * 2.5 / 5) = 1
    d = study.diff_interval([1.0, 2.0, 3.0, 4.0, 5.0], [0.0, 1.0, 2.0, 3.0, 4.0])
    assert d["diff"] == 1.0 and d["df"] == pytest.approx(8.0)
    assert (d["low"], d["high"]) == (pytest.approx(1.0 - 2.306), pytest.approx(1.0 + 2.306))
    assert study.diff_interval([1.0], [0.0, 1.0]) is None  # one seed has no spread to speak of


@pytest.mark.parametrize("task", sorted(study.TASKS))
def test_every_method_and_variant_makes_a_valid_job_on_every_task(task):
    for name in study.ALL:
        cfg = study.load_config(["demo"], [*study.job_overrides(name, task), "model.path=/nonexistent"])
        assert cfg.tree.depth == len(cfg.tree.branching) and study.tokens_per_tree(cfg, task) > 0
    settings = study.WarmupSettings(**study.TASKS[task][1])
    assert (settings.task == "chain") == task.startswith("chain")


def test_length_bias_by_hand(tmp_path):
    # 8 trees with paths 10..80 tokens; 4 groups of 2. The two longest arrive 2 versions stale and
    # one of them is dropped as stale in the buffer; one short one is dropped as 'capacity'.
    events = []
    for i in range(8):
        events.append({"event": "received", "tree_id": f"t{i}", "mean_path_tokens": 10.0 * (i + 1),
                       "staleness": 2 if i >= 6 else 0})
    fates = {"t0": ("dropped", "capacity"), "t7": ("dropped", "stale")}
    for i in range(8):
        kind, reason = fates.get(f"t{i}", ("trained", None))
        events.append({"event": kind, "tree_id": f"t{i}", "reason": reason, "staleness": 3 if i == 6 else 1})
    log = tmp_path / "trees.jsonl"
    log.write_text("\n".join(json.dumps(e) for e in events[::-1]) + "\n")  # order does not matter
    bins = study.length_bias(log)
    assert [b["trees"] for b in bins] == [2, 2, 2, 2]
    assert [b["path_tokens"] for b in bins] == [15.0, 35.0, 55.0, 75.0]
    assert [b["staleness_arrival"] for b in bins] == [0.0, 0.0, 0.0, 2.0]
    assert [b["dropped_stale"] for b in bins] == [0.0, 0.0, 0.0, 0.5]
    assert [b["staleness_trained"] for b in bins] == [1.0, 1.0, 1.0, 3.0]
    # 6 trained of 8: a full group's share is (2/6) / (2/8) = 4/3, a group with one trained 2/3
    assert [b["trained_share"] for b in bins] == [pytest.approx(x) for x in (2 / 3, 4 / 3, 4 / 3, 2 / 3)]
    table = study.bias_table([{"name": "treerpo", "lr": 3e-4, "length_bias": bins}] * 2)
    assert "| treerpo | 0.0003 | 2 | 4 of 4 | 75.0 | 2.00 | 3.00 | 0.500 | 0.67 |" in table
    assert study.length_bias(tmp_path / "missing.jsonl") == []
