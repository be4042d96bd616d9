"""`treerpo eval`: the pass@k estimator, benchmark rows, and a real eval of a tiny model."""

from __future__ import annotations

import argparse
import json
import math

import pytest

from common.config import DataConfig, load_config
from common.data import read_rows
from common.errors import EngineError, ModelError
from common.tasks import TaskSpec, eval_problems
from treerpo.cli import build_parser
from treerpo.eval import eval_config, ks_to_report, pass_at_k, resolve_model_dir, run, split_fitting, summarise


def test_pass_at_k_hand_values():
    # n=4, c=1, k=2: P(no correct among 2 of 4) = C(3,2)/C(4,2) = 3/6 -> pass@2 = 0.5
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5, abs=1e-12)
    # n=5, c=2, k=1: pass@1 = c/n = 0.4
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4, abs=1e-12)
    # n=8, c=2, k=4: 1 - C(6,4)/C(8,4) = 1 - 15/70 = 11/14
    assert pass_at_k(8, 2, 4) == pytest.approx(11 / 14, abs=1e-12)
    # n - c < k: any k draws include a correct one
    assert pass_at_k(4, 3, 2) == 1.0
    assert pass_at_k(4, 0, 4) == 0.0


def test_pass_at_k_matches_combinations():
    for n in range(1, 9):
        for c in range(n + 1):
            for k in range(1, n + 1):
                exact = 1.0 - math.comb(n - c, k) / math.comb(n, k)
                assert pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-12)


def test_pass_at_k_rejects_bad_arguments():
    for n, c, k in [(4, 5, 1), (4, 1, 0), (4, 1, 5), (4, -1, 1)]:
        with pytest.raises(ValueError):
            pass_at_k(n, c, k)


def test_summarise_and_ks():
    assert ks_to_report(4) == [1, 2, 4]
    assert ks_to_report(6) == [1, 2, 4, 6]
    assert ks_to_report(1) == [1]

    class P:
        def __init__(self, i):
            self.prompt_id = f"p{i}"

    # problem 0: 1 of 4 correct, problem 1: 4 of 4 -> pass@1 = (0.25 + 1) / 2, pass@2 = (0.5 + 1) / 2
    rewards = [[0, 1, 0, 0], [1, 1, 1, 1]]
    lengths = [[10, 12, 14, 16], [20, 20, 20, 20]]
    pass_at, mean_len, rows = summarise([P(0), P(1)], rewards, lengths, 4)
    assert pass_at["1"] == pytest.approx(0.625)
    assert pass_at["2"] == pytest.approx(0.75)
    assert pass_at["4"] == pytest.approx(1.0)
    assert mean_len == pytest.approx(16.5)
    assert rows == [{"id": "p0", "correct": 1}, {"id": "p1", "correct": 4}]


def test_benchmark_rows_load(benchmarks_dir):
    paths = [str(benchmarks_dir / "math500.jsonl"), str(benchmarks_dir / "aime24.jsonl")]
    cfg = DataConfig(source="files", paths=paths, reward="math")
    rows = read_rows(cfg.paths, cfg)
    assert len(rows) == 530  # 500 + 30 lines
    assert all(r.problem and r.answer for r in rows)
    assert len({r.prompt_id for r in rows}) == 530


def _eval_args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["eval", *argv])


SMALL = {"hidden_size": 32, "num_layers": 1}  # the tiny model's variant used here


def test_eval_on_tiny_model_writes_a_report(make_tiny_model, tmp_path):
    tiny_model = make_tiny_model(**SMALL)
    out = tmp_path / "report.json"
    args = _eval_args("--model", str(tiny_model), "-k", "3", "--num-problems", "5", "--max-tokens", "12",
                      "--batch-prompts", "2", "--out", str(out), "--quiet", "--seed", "7")
    assert run(args) == 0
    report = json.loads(out.read_text())
    assert report["num_problems"] == 5 and report["samples_per_problem"] == 3
    assert set(report["pass_at"]) == {"1", "2", "3"}
    assert 0.0 <= report["pass_at"]["1"] <= report["pass_at"]["2"] <= report["pass_at"]["3"] <= 1.0
    assert sum(report["reasons"].values()) == 15  # one reason per sample
    assert 1.0 <= report["mean_response_tokens"] <= 12.0
    assert report["generated_tokens"] == pytest.approx(report["mean_response_tokens"] * 15)

    held_out = eval_problems(TaskSpec.from_config(load_config("demo").data), 5)  # the demo preset's task
    assert [p["id"] for p in report["per_problem"]] == [p.problem_id for p in held_out]
    # same seed, same samples
    out2 = tmp_path / "report2.json"
    args.out = str(out2)
    assert run(args) == 0
    assert json.loads(out2.read_text())["per_problem"] == report["per_problem"]
    assert json.loads(out2.read_text())["generated_tokens"] == report["generated_tokens"]


def test_eval_scores_benchmark_files_with_math_reward(make_tiny_model, tmp_path):
    tiny_model = make_tiny_model(**SMALL)
    data = tmp_path / "bench.jsonl"
    data.write_text("\n".join(json.dumps({"id": f"q{i}", "problem": f"What is {i}+1?", "answer": str(i + 1)})
                              for i in range(3)) + "\n")
    out = tmp_path / "report.json"
    args = _eval_args("--model", str(tiny_model), "--data", str(data), "-k", "2", "--max-tokens", "8",
                      "--out", str(out), "--quiet")
    assert run(args) == 0
    report = json.loads(out.read_text())
    assert report["reward"] == "math" and report["num_problems"] == 3
    assert [p["id"] for p in report["per_problem"]] == ["q0", "q1", "q2"]
    # an untrained 1-layer model writes no \boxed{} in 8 characters: every sample is 'no_answer'
    assert report["reasons"] == {"no_answer": 6}
    assert report["pass_at"]["1"] == 0.0


def test_resolve_model_dir_accepts_checkpoint_folders(make_tiny_model, tmp_path):
    tiny_model = make_tiny_model(**SMALL)
    assert resolve_model_dir(tiny_model) == tiny_model
    ckpt = tmp_path / "step-000000003"
    (ckpt / "hf").mkdir(parents=True)
    (ckpt / "hf" / "config.json").write_text("{}")
    assert resolve_model_dir(ckpt) == ckpt / "hf"
    with pytest.raises(ModelError, match="no config.json"):
        resolve_model_dir(tmp_path / "nowhere")


def test_split_fitting_keeps_prompts_within_the_positions():
    class P:
        def __init__(self, n):
            self.token_ids = [0] * n

    a, b, c = P(10), P(20), P(21)
    assert split_fitting([a, b, c], 60, 40) == ([a, b], [c])  # 20 + 40 = 60 fits, 21 + 40 does not
    assert split_fitting([a, c], None, 10**6) == ([a, c], [])  # no known limit: nothing skipped


def test_eval_skips_and_counts_problems_too_long_for_the_model(make_tiny_model, tmp_path):
    tiny_model = make_tiny_model(max_position_embeddings=96, **SMALL)
    data = tmp_path / "bench.jsonl"
    rows = [{"id": "short", "problem": "1+1?", "answer": "2"},
            {"id": "long", "problem": "Compute " + "1+" * 60 + "1.", "answer": "61"}]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "report.json"
    args = _eval_args("--model", str(tiny_model), "--data", str(data), "-k", "1", "--max-tokens", "8",
                      "--out", str(out), "--quiet")
    assert run(args) == 0
    report = json.loads(out.read_text())
    assert report["num_problems"] == 1 and [p["id"] for p in report["per_problem"]] == ["short"]
    assert report["skipped"] == 1 and report["skipped_ids"] == ["long"]

    data.write_text(json.dumps(rows[1]) + "\n")  # nothing fits: one line, the fix named
    with pytest.raises(EngineError, match="no problem fits.*96 positions.*lower --max-tokens"):
        run(args)


def test_eval_of_a_reasoning_gym_config_uses_its_held_out_set_and_verifier(make_tiny_model, tmp_path):
    pytest.importorskip("reasoning_gym")
    from common.data import PromptSource  # noqa: PLC0415 -- the held-out set compared against

    tiny_model = make_tiny_model(**SMALL)
    out = tmp_path / "report.json"
    gym = ["--set", "data.source=reasoning_gym", "--set", "data.dataset=chain_sum", "--set", "data.reward=dataset",
           "--set", "data.num_problems=100", "--set", "data.num_eval_problems=40"]
    args = _eval_args("--model", str(tiny_model), "-k", "2", "--num-problems", "4", "--max-tokens", "8",
                      "--out", str(out), "--quiet", *gym)
    assert run(args) == 0
    report = json.loads(out.read_text())
    assert report["task"] == "reasoning_gym:chain_sum" and report["reward"] == "dataset"
    cfg = load_config("demo", [*args.overrides, "data.split=eval"])
    held_out = PromptSource(cfg.data, None).all_prompts()[:4]  # the set the actors never train on, its first 4
    assert [p["id"] for p in report["per_problem"]] == [p.prompt_id for p in held_out]
    assert all(p.prompt_id.startswith("chain_sum:eval:") for p in held_out)
    # every sample was verified by reasoning-gym or had nothing to verify
    assert sum(report["reasons"].values()) == 8 and set(report["reasons"]) <= {"ok", "wrong", "no_answer"}
    # --task arithmetic still means the synthetic task
    args = _eval_args("--model", str(tiny_model), "--task", "arithmetic", "-k", "1", "--num-problems", "2",
                      "--max-tokens", "4", "--out", str(out), "--quiet", *gym[:4])
    assert run(args) == 0
    assert json.loads(out.read_text())["task"] == "arithmetic"


def test_eval_config_keeps_a_reward_set_on_the_command_line(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    data = tmp_path / "bench.jsonl"
    data.write_text(json.dumps({"id": "a", "problem": "1+1?", "answer": "2"}) + "\n")
    (tmp_path / "mine.py").write_text("def score(completion, answer, entry):\n    return 1.0\n")
    target = f"{tmp_path / 'mine.py'}:score"
    cfg = eval_config(_eval_args("--model", str(model), "--data", str(data), "--set", f"data.reward={target}"))
    assert (cfg.data.source, cfg.data.reward) == ("files", target)
    assert eval_config(_eval_args("--model", str(model), "--data", str(data))).data.reward == "math"
    assert eval_config(_eval_args("--model", str(model), "--reward", "arithmetic", "--data", str(data),
                                  "--set", f"data.reward={target}")).data.reward == "arithmetic"
    synthetic = eval_config(_eval_args("--model", str(model), "--set", f"data.reward={target}")).data
    assert (synthetic.source, synthetic.split, synthetic.reward) == ("synthetic", "eval", target)
