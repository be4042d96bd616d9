"""Rewards: math-verify on the last \\boxed{} (gold solutions, corruptions, junk, timeouts), the
synthetic task's exact match, answers in free text, and reasoning-gym's own verifier (`dataset`)
on real entries. Custom functions: test_custom_rewards.py."""

from __future__ import annotations

import json
import random
import threading

import pytest

from common.config import DataConfig
from common.data import PromptSource
from common.rewards import (
    MAX_BOXED_DEPTH,
    REWARD_REASONS,
    MathReward,
    RewardResult,
    arithmetic_final_answer,
    brace_depth,
    extract_answer,
    graded,
    last_boxed,
    make_reward,
)


@pytest.fixture(scope="module")
def math_reward():
    reward = make_reward("math", timeout_s=5.0)
    yield reward
    reward.close()


@pytest.fixture(scope="module")
def math500(benchmarks_dir) -> list[dict]:
    path = benchmarks_dir / "math500.jsonl"
    if not path.exists():
        pytest.skip(f"needs {path}")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# -- extraction -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, expected",
    [
        (r"so \boxed{42}.", "42"),
        (r"\boxed{1} then \boxed{\frac{a}{b}}", r"\frac{a}{b}"),  # the last one wins
        (r"\boxed{\left\{ 1, 2 \right\}}", r"\left\{ 1, 2 \right\}"),  # escaped braces are text
        (r"\boxed{x^{2}+{y}}", "x^{2}+{y}"),  # nested groups
        (r"answer: \boxed 7 done", "7"),
        (r"answer: $\boxed5$", "5"),
        (r"\fbox{12}", "12"),
        (r"\boxed{3} and \boxed{4", None),  # the last box is unbalanced
        (r"\boxed{}", None),
        (r"no box at all 42", None),
        (r"\boxedx{3}", None),  # another macro, not \boxed
    ],
)
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected


def test_brace_depth():
    assert brace_depth(r"\frac{\sqrt{x^{2}}}{2}") == 3
    assert brace_depth(r"\{1\}") == 0


# -- math -------------------------------------------------------------------------------------
def test_math_scores_gold_solutions(math_reward, math500):
    rows = math500
    results = math_reward.score_many([r["solution"] for r in rows], [r["answer"] for r in rows])
    correct = sum(r.reward == 1.0 for r in results)
    fraction = correct / len(rows)
    print(f"\nmath reward on MATH500 gold solutions: {correct}/{len(rows)} = {fraction:.4f}")
    failures = [(row["id"], res.reason) for row, res in zip(rows, results, strict=True) if res.reward != 1.0]
    assert fraction >= 0.99, failures[:20]


def test_math_rejects_corrupted_answers(math_reward, math500):
    rows = [r for r in math500 if r["answer"].strip().lstrip("-").isdigit()][:60]
    assert len(rows) == 60
    plus_one = [f"The answer is \\boxed{{{int(r['answer']) + 1}}}." for r in rows]
    results = math_reward.score_many(plus_one, [r["answer"] for r in rows])
    assert [r.reward for r in results] == [0.0] * 60
    assert {r.reason for r in results} == {"wrong"}
    # right number, but an earlier box: only the last \boxed counts
    earlier = [f"\\boxed{{{r['answer']}}} no wait \\boxed{{{int(r['answer']) + 7}}}" for r in rows[:10]]
    assert all(r.reward == 0.0 for r in math_reward.score_many(earlier, [r["answer"] for r in rows[:10]]))
    # the last box right after a wrong one scores 1
    later = [f"\\boxed{{{int(r['answer']) + 7}}} no wait \\boxed{{{r['answer']}}}" for r in rows[:10]]
    assert all(r.reward == 1.0 for r in math_reward.score_many(later, [r["answer"] for r in rows[:10]]))


def test_math_reasons_for_malformed_output(math_reward):
    got = math_reward.score_many(
        ["I think it is 5", r"\boxed{5", r"\boxed{\frac{1}{2}}", r"$\boxed{0.5}$", r"\boxed{6}"],
        ["5", "5", "0.5", r"\frac12", "5"],
    )
    assert [(r.reward, r.reason) for r in got] == [
        (0.0, "no_answer"),
        (0.0, "parse_error"),
        (1.0, "ok"),
        (1.0, "ok"),
        (0.0, "wrong"),
    ]
    deep = "\\boxed{" + "{" * (MAX_BOXED_DEPTH + 1) + "4" + "}" * (MAX_BOXED_DEPTH + 1) + "}"
    assert math_reward.score_many([deep], ["4"]) == [RewardResult(0.0, "parse_error")]


def _junk(rng: random.Random) -> str:
    atoms = [
        "\\boxed{", "\\boxed ", "\\fbox{", "{", "}", "}}", "{{", "\\frac", "\\sqrt", "^", "_", "\\left(",
        "\\right)", "$", "$$", "\\\\", "\\", "\\text{", "\\infty", "\\pi", "=", ",", " ", "\n", "x", "y",
        "-", "+", "/", "(", ")", "[", "]", "\\{", "\\}", "%", "&", "\\begin{pmatrix}", "\\end{pmatrix}",
        "\\dfrac", "\\cdot", "!", "°", "é", "\x00", "\udc80",
    ]
    kind = rng.random()
    if kind < 0.05:  # huge numbers inside a box
        return "\\boxed{" + str(rng.randint(0, 9)) * rng.randint(50, 3000) + "}"
    if kind < 0.10:  # deep nesting
        depth = rng.randint(1, 300)
        return "\\boxed{" + "{" * depth + str(rng.randint(0, 99)) + "}" * rng.randint(0, depth + 2)
    if kind < 0.20:  # latex junk with a box in it
        return "\\boxed{" + "".join(rng.choice(atoms[3:]) for _ in range(rng.randint(0, 25))) + "}"
    if kind < 0.60:  # latex junk, box markers likely unbalanced
        return "".join(rng.choice(atoms) for _ in range(rng.randint(0, 40)))
    # plain random characters, any code point up to the BMP
    return "".join(chr(rng.randint(0, 0xFFFF)) for _ in range(rng.randint(0, 80)))


def test_math_never_raises_on_random_strings():
    # a 1 s bound keeps the occasional sympy blow-up short; timeouts are a legal outcome here
    reward = MathReward(timeout_s=1.0)
    rng = random.Random(1234)
    try:
        completions = [_junk(rng) for _ in range(10_000)]
        answers = [rng.choice(["5", r"\frac{1}{2}", "x+1", "", "{", r"\boxed{"]) for _ in completions]
        results = reward.score_many(completions, answers)
    finally:
        reward.close()
    assert len(results) == 10_000
    assert all(r.reason in REWARD_REASONS for r in results)
    assert all(r.reward in (0.0, 1.0) for r in results)
    assert all((r.reward == 1.0) == (r.reason == "ok") for r in results)
    counts = {reason: sum(r.reason == reason for r in results) for reason in REWARD_REASONS}
    print(f"\nreasons over 10,000 random strings: {counts}")
    assert counts["no_answer"] > 0 and counts["parse_error"] > 0


def test_math_pathological_input_is_bounded_by_timeout():
    # sympy expands 9^(9^(9^9)) for ever; the worker is killed after timeout_s and restarted
    reward = MathReward(timeout_s=1.0)
    try:
        hung = reward.score(r"\boxed{9^{9^{9^{9}}}}", "1")
        assert (hung.reward, hung.reason) == (0.0, "timeout")
        assert reward.restarts == 1
        after = reward.score(r"\boxed{2}", "2")  # a fresh worker answers the next call
        assert (after.reward, after.reason) == (1.0, "ok")
    finally:
        reward.close()


def test_score_many_length_mismatch_is_a_caller_error(math_reward):
    with pytest.raises(ValueError, match="one answer per completion"):
        math_reward.score_many(["a", "b"], ["a"])


def test_unknown_reward_name():
    with pytest.raises(ValueError, match="registered"):
        make_reward("nope")


# -- arithmetic -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "completion, answer, reward, reason",
    [
        ("12+34=46;46*25=1150;#1150", "1150", 1.0, "ok"),
        ("12+34=46;46*25=1150;#1150\n", "1150", 1.0, "ok"),
        ("#1150<eos>", "1150", 1.0, "ok"),
        ("#-12", "-12", 1.0, "ok"),
        ("12+34=46;46*25=1150;#1151", "1150", 0.0, "wrong"),
        ("#1150#1151", "1150", 0.0, "parse_error"),  # hedging with two answers is not an answer
        ("#1150;more", "1150", 0.0, "parse_error"),
        ("12+34=46;46*25=1150;", "1150", 0.0, "no_answer"),
        ("#", "1150", 0.0, "parse_error"),
        ("#" + "9" * 100, "1150", 0.0, "parse_error"),
    ],
)
def test_arithmetic_exact_match(completion, answer, reward, reason):
    scorer = make_reward("arithmetic")
    (got,) = scorer.score_many([completion], [answer])
    assert (got.reward, got.reason) == (reward, reason)
    scorer.close()


def test_arithmetic_final_answer_extraction():
    assert arithmetic_final_answer("1+2=3;#3") == ("3", "ok")
    assert arithmetic_final_answer("1+2=3;") == (None, "no_answer")


def test_arithmetic_never_raises_on_random_strings():
    scorer = make_reward("arithmetic")
    rng = random.Random(7)
    completions = ["".join(chr(rng.randint(0, 0x2FF)) for _ in range(rng.randint(0, 30))) + rng.choice(["", "#", "#12"])
                   for _ in range(10_000)]
    results = scorer.score_many(completions, ["12"] * len(completions))
    assert all(r.reason in REWARD_REASONS for r in results)
    assert all((r.reward == 1.0) == (r.reason == "ok") for r in results)


def test_math_works_from_a_non_main_thread(math_reward):
    # math-verify's own signal-based timeouts would raise here; the worker process avoids them

    out = []
    worker = threading.Thread(target=lambda: out.extend(math_reward.score_many([r"\boxed{\frac{2}{4}}"], ["1/2"])))
    worker.start()
    worker.join(timeout=60)
    assert out == [RewardResult(1.0, "ok")]


# -- answers in free text ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, expected",
    [
        ("<think>3+4=7, or 8?</think> <answer> 7 </answer>", "7"),  # the tag wins over numbers after it
        ("<answer>6</answer> no wait <answer>7</answer> then 9", "7"),  # the last tag
        ("<answer>apple, banana\ncherry</answer>", "apple, banana\ncherry"),  # tags span lines
        ("<answer>  </answer> 5", None),  # an empty last tag is no answer
        (r"so \boxed{\frac{1}{2}} and 3", r"\frac{1}{2}"),  # no tag: the last \boxed
        ("we get 12, then 1,234.5 apples.", "1234.5"),  # no box: the last number, commas dropped
        ("x = -17", "-17"),
        ("<answer>8", "8"),  # an unclosed tag is no tag: the last number
        ("first line\n  second line  \n\n", "second line"),  # no number: the last non-empty line
        ("", None),
        (" \n\t", None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize(
    "value, expected",
    [(True, [1.0, "ok"]), (False, [0.0, "wrong"]), (1, [1.0, "ok"]), (0.25, [0.25, "wrong"]),
     (float("nan"), [0.0, "bad_value"]), (float("inf"), [0.0, "bad_value"]), (-0.0001, [0.0, "bad_value"]),
     (1.0001, [0.0, "bad_value"]), (None, [0.0, "bad_value"]), ("1", [0.0, "bad_value"]), ([1], [0.0, "bad_value"])],
)
def test_graded(value, expected):
    assert graded(value) == expected


# -- dataset: reasoning-gym's own verifier ------------------------------------------------------
def _gym_config(dataset: str, **kw) -> DataConfig:
    pytest.importorskip("reasoning_gym")
    return DataConfig(source="reasoning_gym", dataset=dataset, reward="dataset", num_problems=200,
                      num_eval_problems=20, **kw)


@pytest.mark.parametrize("dataset", ["chain_sum", "basic_arithmetic", "gsm_symbolic", "word_sorting", "arc_agi"])
def test_dataset_reward_scores_real_entries(dataset):
    cfg = _gym_config(dataset)
    prompts = PromptSource(cfg, None).next_batch(6) + PromptSource(cfg.model_copy(update={"split": "eval"}),
                                                                   None).next_batch(2)
    reward = make_reward("dataset", 10.0, cfg)
    try:
        gold = [f"Let me think.\n<answer>{p.answer}</answer>" for p in prompts]
        # a wrong answer: another prompt's (each differs from its own), in the tag
        others = [f"<answer>{prompts[(i + 1) % len(prompts)].answer}</answer>" for i in range(len(prompts))]
        assert all(prompts[(i + 1) % len(prompts)].answer != p.answer for i, p in enumerate(prompts))
        entries = [p.entry for p in prompts]
        right = reward.score_many(gold, [p.answer for p in prompts], entries)
        wrong = reward.score_many(others, [p.answer for p in prompts], entries)
        blank = reward.score_many([""], [prompts[0].answer], entries[:1])
    finally:
        reward.close()
    assert right == [RewardResult(1.0, "ok")] * len(prompts)
    assert all(r.reason == "wrong" and r.reward < 1.0 for r in wrong)
    assert blank == [RewardResult(0.0, "no_answer")]


def test_dataset_reward_reads_free_text_and_boxes():
    cfg = _gym_config("chain_sum")
    (p,) = PromptSource(cfg, None).next_batch(1)
    reward = make_reward("dataset", 10.0, cfg)
    try:
        got = reward.score_many(
            [f"Adding up the terms gives {p.answer}.", f"So \\boxed{{{p.answer}}}, not 3.", f"{int(p.answer) + 1}"],
            [p.answer] * 3, [p.entry] * 3)
    finally:
        reward.close()
    assert got == [RewardResult(1.0, "ok"), RewardResult(1.0, "ok"), RewardResult(0.0, "wrong")]


def test_dataset_reward_needs_entries_and_a_source_with_a_verifier(tmp_path):
    cfg = _gym_config("chain_sum")
    reward = make_reward("dataset", 10.0, cfg)
    try:
        with pytest.raises(ValueError, match="pass entries="):
            reward.score_many(["<answer>1</answer>"], ["1"])
    finally:
        reward.close()
    synthetic = DataConfig(source="synthetic", reward="dataset")
    assert make_reward("dataset", 5.0, synthetic).score_many(["1+2=3;#3"], ["3"]) == [RewardResult(1.0, "ok")]
    with pytest.raises(ValueError, match="files have none"):
        DataConfig(source="files", paths=[str(tmp_path / "a.jsonl")], reward="dataset")
