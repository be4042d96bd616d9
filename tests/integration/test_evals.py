"""Evaluation during training as real processes: `treerpo up` with learner.eval_every runs the
evaluator beside the learner; the held-out curve lands in evals.jsonl and Prometheus; the evaluator
scores exactly as `treerpo eval` does; a held-out set that overlaps training is refused."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest

from common.config import load_config
from tests.support.paths import REPO
from tests.support.system import SYSTEM_MODEL, System, metric_value, read_jsonl, scrape
from treerpo.eval import run_eval
from treerpo.evaluator import Evaluator


def test_up_evaluates_during_training_without_waiting_and_ends_with_the_final_weights(make_tiny_model, tmp_path):
    overrides = ["learner.max_steps=6", "learner.eval_every=2", "learner.eval_problems=4", "learner.eval_k=2",
                 "weights.bucket_mb=0.05"]
    system = System(tmp_path / "job", make_tiny_model(**SYSTEM_MODEL), overrides, num_actors=1)
    root = tmp_path / "job"
    try:
        system.start()
        assert system.sup.evaluator is not None
        # a record the learner has read back: its gauges hold that record's figures
        seen = {}

        def scraped_a_record() -> bool:
            text = scrape(system.learner_metrics_url())
            if not metric_value(text, "treerpo_learner_evals_total"):
                return False
            seen.update(text=text)
            return True

        system.wait(scraped_a_record, 600, "the learner to read back an evaluation")
        system.wait(lambda: system.all_exited(), 600, "the run, the evaluator included, to end")
    finally:
        system.stop()
    records = read_jsonl(root / "evals.jsonl")
    steps = [r["step"] for r in records]
    # step 0 and the final step always; the others unless the evaluator was still busy (then counted skipped)
    assert steps[0] == 0 and steps[-1] == 6 and steps == sorted(set(steps)) and set(steps) <= {0, 2, 4, 6}
    for r in records:
        assert r["num_problems"] == 4 and r["k"] == 2 and 0 <= r["pass_at_1"] <= r["pass_at_k"] <= 1
        assert r["mean_response_tokens"] > 0 and r["pass_at"]["1"] == r["pass_at_1"]
    by_step = {r["step"]: r for r in records}
    text = seen["text"]
    step = int(metric_value(text, "treerpo_learner_eval_step"))
    assert metric_value(text, "treerpo_learner_eval_pass_at_1") == pytest.approx(by_step[step]["pass_at_1"])
    assert metric_value(text, "treerpo_learner_eval_pass_at_k") == pytest.approx(by_step[step]["pass_at_k"])
    # a record per step trained at: versions and token counts are the learner's at that step
    metrics = {r["step"]: r for r in read_jsonl(root / "metrics.jsonl")}
    for s, r in by_step.items():
        if s:
            assert r["version"] == metrics[s]["version"] + 1
            assert r["generated_tokens"] == sum(m["generated_tokens"] for k, m in metrics.items() if k <= s)
    assert not list((root / "evals").glob("step-*")) and not list((root / "evals").glob(".tmp-*"))
    log = (root / "logs" / "evaluator.log").read_text()
    assert "checked disjoint from the training prompts" in log and "exiting" in log
    assert system.sup.evaluator.proc.returncode == 0


def test_the_evaluator_scores_an_export_exactly_as_treerpo_eval_does(make_tiny_model, tmp_path):
    model = make_tiny_model(**SYSTEM_MODEL)
    cfg = load_config("demo", [f"model.path={model}", "learner.eval_every=1", "learner.eval_problems=6",
                               "learner.eval_k=3", "learner.seed=5", "actor.max_batch_rows=64"])
    export = tmp_path / "evals" / "step-000000003"
    shutil.copytree(model, export)
    (export / "request.json").write_text(json.dumps({"step": 3, "version": 3, "generated_tokens": 99}))
    evaluator = Evaluator(cfg, tmp_path)
    try:
        record = evaluator.evaluate_export(export)
    finally:
        evaluator.reward.close()
    assert not export.exists() and read_jsonl(tmp_path / "evals.jsonl") == [record]
    report = run_eval(SimpleNamespace(
        model=str(model), config=["demo"], overrides=[f"model.path={model}"], data=None,
        task=None, reward=None, k=3, num_problems=6, engine="hf", temperature=None, top_p=None, max_tokens=None,
        batch_prompts=16, seed=5, threads=0))
    assert record["pass_at"] == report.pass_at and record["num_problems"] == report.num_problems == 6
    assert record["mean_response_tokens"] == report.mean_response_tokens
    assert (record["step"], record["version"], record["generated_tokens"]) == (3, 3, 99)


def test_the_evaluator_refuses_a_held_out_set_that_overlaps_training(tiny_model_dir, tmp_path):
    rows = [{"id": f"p{i}", "problem": f"({i}+1)*2=", "answer": str((i + 1) * 2)} for i in range(10)]
    train, held = tmp_path / "train.jsonl", tmp_path / "held.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    held.write_text("".join(json.dumps({**r, "id": "h" + r["id"]}) + "\n" for r in rows[7:]) +
                    json.dumps({"id": "new", "problem": "(99+1)*2=", "answer": "200"}) + "\n")
    argv = [sys.executable, "-m", "treerpo", "evaluator", "--run-dir", str(tmp_path / "run"),
            "--set", f"model.path={tiny_model_dir}", "--set", "data.source=files", "--set", f"data.paths=[{train}]",
            "--set", f"data.eval_paths=[{held}]", "--set", "learner.eval_every=5"]
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 5, proc.stderr[-2000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("treerpo evaluator: the held-out set shares 3 of its 4 problems with the training prompts")
    assert "hp7, hp8, hp9" in line
