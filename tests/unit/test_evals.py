"""Evaluation during training (learner.eval_every): the held-out set and its check against the
training prompts, and the learner's end of the export / evals.jsonl exchange (learner/evals.py)."""

from __future__ import annotations

import json
import threading
import time

import pytest
from transformers import AutoTokenizer

from common.config import load_config
from common.data import PromptSource, held_out_config, held_out_overlap
from learner.evals import (
    EvalRequests,
    eval_point,
    evals_dir,
    evaluator_alive,
    mark_finished,
    pending_exports,
    run_finished,
)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def held_out(cfg, tokenizer, n):
    return PromptSource(held_out_config(cfg.data), tokenizer).all_prompts()[:n]


# -- the held-out set ------------------------------------------------------------------------------
def test_files_held_out_set_that_repeats_a_training_problem_is_found(tiny_model_dir, tmp_path):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    train = write_jsonl(tmp_path / "train.jsonl", [{"id": f"t{i}", "problem": f"{i}+{i}=", "answer": str(2 * i)}
                                                   for i in range(20)])
    # e1 repeats t3 up to whitespace and case; e0 and e2 are new
    held = write_jsonl(tmp_path / "eval.jsonl", [{"id": "e0", "problem": "100+1=", "answer": "101"},
                                                 {"id": "e1", "problem": "  3+3= ", "answer": "6"},
                                                 {"id": "e2", "problem": "7*7=", "answer": "49"}])
    cfg = load_config("demo", ["data.source=files", f"data.paths=[{train}]", f"data.eval_paths=[{held}]",
                               "learner.eval_every=5"])
    prompts = held_out(cfg, tok, 10)
    assert [p.prompt_id for p in prompts] == ["e0", "e1", "e2"]
    assert held_out_overlap(cfg.data, prompts) == ["e1"]
    assert held_out_overlap(cfg.data, [prompts[0], prompts[2]]) == []


@pytest.mark.parametrize("task", ["add_mul", "chain"])
def test_synthetic_held_out_set_is_disjoint_and_a_training_problem_is_found(tiny_model_dir, task):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    cfg = load_config("demo", [f"data.task={task}", "learner.eval_every=5", "learner.eval_problems=50"])
    prompts = held_out(cfg, tok, 50)
    assert len(prompts) == 50 and held_out_overlap(cfg.data, prompts) == []
    # the training stream's own prompts, offered as held-out: every one is found
    source = PromptSource(cfg.data, tok)
    train = [source.prompt_at(i) for i in range(5)]
    assert held_out_overlap(cfg.data, train) == sorted(p.prompt_id for p in train)


def test_eval_every_needs_a_held_out_set(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"id": "a", "problem": "1+1=", "answer": "2"}])
    with pytest.raises(ValueError, match="data.eval_paths"):
        load_config("demo", ["data.source=files", f"data.paths=[{path}]", "learner.eval_every=10"])
    with pytest.raises(ValueError, match="exceeds the held-out set"):
        load_config("demo", ["learner.eval_every=10", "learner.eval_problems=600", "data.num_eval_problems=500"])
    with pytest.raises(ValueError, match="data.eval_paths are for data.source='files'"):
        load_config("demo", [f"data.eval_paths=[{path}]"])
    load_config("demo", ["data.source=files", f"data.paths=[{path}]", f"data.eval_paths=[{path}]"])  # not checked
    # here: eval_every is off; the evaluator checks the overlap itself


# -- the exchange --------------------------------------------------------------------------------
def fake_export(folder):
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")


def test_an_export_waits_for_the_evaluator_and_the_next_is_skipped(tmp_path):
    evals = EvalRequests(tmp_path, 10, fake_export)
    assert evals.due(0) and not evals.due(5) and evals.due(10)
    assert evals.request(0, version=0, generated_tokens=0)
    (step0,) = pending_exports(tmp_path)
    assert step0.name == "step-000000000" and (step0 / "config.json").exists()
    assert json.loads((step0 / "request.json").read_text())["step"] == 0
    assert not evals.request(10, version=10, generated_tokens=123)  # step 0 still waits: skipped
    assert evals.skipped == {10} and evals.requested == {0} and not evals.due(10)
    assert [p.name for p in pending_exports(tmp_path)] == ["step-000000000"]
    step0.rename(tmp_path / "taken")  # the evaluator took it
    assert evals.request(20, version=20, generated_tokens=456)
    assert json.loads((evals_dir(tmp_path) / "step-000000020" / "request.json").read_text())["generated_tokens"] == 456
    assert not list(evals_dir(tmp_path).glob(".tmp-*"))


def test_a_failed_export_leaves_nothing_behind(tmp_path):
    def broken(folder):
        folder.mkdir(parents=True)
        raise OSError("disk full")

    evals = EvalRequests(tmp_path, 10, broken)
    with pytest.raises(OSError, match="disk full"):
        evals.request(0, 0, 0)
    assert list(evals_dir(tmp_path).iterdir()) == [] and evals.requested == set()


def test_records_are_read_once_and_whole_lines_only(tmp_path):
    evals = EvalRequests(tmp_path, 10, fake_export)
    assert evals.poll() == []
    record = {"step": 0, "k": 4, "pass_at_1": 0.25, "pass_at_k": 0.5, "mean_response_tokens": 12.0,
              "num_problems": 8}
    path = tmp_path / "evals.jsonl"
    path.write_text(json.dumps(record) + "\n" + json.dumps({**record, "step": 10})[:20])  # a torn second line
    assert evals.poll() == [record] and evals.poll() == []
    with open(path, "a") as f:
        f.write(json.dumps({**record, "step": 10})[20:] + "\n")
    assert [r["step"] for r in evals.poll()] == [10] and evals.latest["step"] == 10
    assert evals.evaluated_steps() == {0, 10}
    assert eval_point(record) == {"eval/pass_at_1": 0.25, "eval/pass_at_4": 0.5, "eval/mean_response_tokens": 12.0,
                                  "eval/problems": 8.0}


def test_finish_without_an_evaluator_returns_at_once_and_a_new_learner_clears_the_mark(tmp_path):
    evals = EvalRequests(tmp_path, 10, fake_export)
    assert not evaluator_alive(tmp_path)
    assert not evals.finish(7, 7, 100, timeout_s=600, on_records=lambda r: None, tick_s=0.01)  # no waiting
    assert [p.name for p in pending_exports(tmp_path)] == ["step-000000007"]  # requested anyway
    mark_finished(tmp_path, 7)
    assert run_finished(tmp_path)
    EvalRequests(tmp_path, 10, fake_export)  # a learner starting on this run dir
    assert not run_finished(tmp_path)


def test_finish_waits_for_the_final_record_while_an_evaluator_heartbeats(tmp_path):
    evals = EvalRequests(tmp_path, 10, fake_export)
    (evals_dir(tmp_path) / "evaluator.json").write_text(json.dumps({"pid": 1, "time": time.time()}))
    record = {"step": 7, "k": 2, "pass_at_1": 0.5, "pass_at_k": 0.75, "mean_response_tokens": 3.0,
              "num_problems": 2}

    def evaluator():  # answers the export once it is there
        while not pending_exports(tmp_path):
            time.sleep(0.01)
        (tmp_path / "evals.jsonl").write_text(json.dumps(record) + "\n")

    thread = threading.Thread(target=evaluator)
    thread.start()
    seen = []
    assert evals.finish(7, 7, 100, timeout_s=120, on_records=seen.extend, tick_s=0.01)
    thread.join()
    assert seen == [record]
