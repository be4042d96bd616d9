"""The synthetic arithmetic task: format, determinism, held-out split, warm-up mixture."""

from __future__ import annotations

from collections import Counter

import pytest

from common.rewards import make_reward
from common.tasks import (
    STEP_DELIMITER,
    TaskSpec,
    chain_solution,
    eval_problems,
    is_eval_problem,
    make_problem,
    plan_solution,
    train_problem,
    warmup_examples,
)
from treerpo.tinymodel import ALPHABET


def test_hand_checked_add_mul():
    # (12+34)*25: 12+34 = 46, 46*25 = 1150
    p = make_problem((12, 34, 25), ("+", "*"))
    assert p.prompt == "(12+34)*25="
    assert p.solution == "12+34=46;46*25=1150;#1150"
    assert p.answer == "1150"
    assert p.problem_id == "arith:(12+34)*25"


def test_hand_checked_chain():
    # ((12+34)*25)-17: 46, 1150, 1133; then -2000 -> -867 (negative answers keep their sign)
    p = make_problem((12, 34, 25, 17, 2000), ("+", "*", "-", "-"))
    assert p.prompt == "(((12+34)*25)-17)-2000="
    assert p.solution == "12+34=46;46*25=1150;1150-17=1133;1133-2000=-867;#-867"
    assert p.answer == "-867"


def test_wrong_plans_hand_checked():
    # a=12, b=34, c=25: right (12+34)*25 = 1150; mul_first 34*25 = 850, 12+850 = 862;
    # distribute 12*25 = 300, 300+34 = 334
    assert plan_solution(12, 34, 25, "right") == ("12+34=46;46*25=1150;#1150", 1150)
    assert plan_solution(12, 34, 25, "mul_first") == ("34*25=850;12+850=862;#862", 862)
    assert plan_solution(12, 34, 25, "distribute") == ("12*25=300;300+34=334;#334", 334)


def test_solutions_score_one_and_use_the_char_alphabet():
    spec = TaskSpec(shape="chain", steps=4, operand_min=0, operand_max=99)
    reward = make_reward("arithmetic")
    problems = [train_problem(spec, i) for i in range(300)] + [train_problem(TaskSpec(), i) for i in range(300)]
    results = reward.score_many([p.solution for p in problems], [p.answer for p in problems])
    assert all(r.reward == 1.0 for r in results)
    alphabet = set(ALPHABET)
    assert all(set(p.prompt + p.solution) <= alphabet for p in problems)
    for p in problems:  # evaluating the prompt's expression gives the answer
        assert eval(p.prompt.rstrip("=")) == int(p.answer)


def test_operand_range_respected():
    spec = TaskSpec(operand_min=10, operand_max=39)
    operands = [x for i in range(500) for x in train_problem(spec, i).operands]
    assert min(operands) == 10 and max(operands) == 39


def test_deterministic_by_seed_and_index():
    spec = TaskSpec(seed=3)
    first = [train_problem(spec, i) for i in range(50)]
    assert first == [train_problem(TaskSpec(seed=3), i) for i in range(50)]
    # index i does not depend on what was generated before it
    assert train_problem(spec, 37) == first[37]
    other = [train_problem(TaskSpec(seed=4), i) for i in range(50)]
    assert first != other
    assert eval_problems(spec, 40) == eval_problems(TaskSpec(seed=3), 40)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_heldout_is_disjoint_from_training(seed):
    spec = TaskSpec(seed=seed, operand_min=10, operand_max=39)  # 27,000 problems: room for 500 held out
    held = eval_problems(spec, 500)
    assert len(held) == 500 and len({p.prompt for p in held}) == 500
    train = {train_problem(spec, i).prompt for i in range(5000)}
    assert train.isdisjoint({p.prompt for p in held})
    assert all(is_eval_problem(p, spec) for p in held)
    assert not any(is_eval_problem(train_problem(spec, i), spec) for i in range(200))


def test_heldout_fraction_close_to_config():
    # 27,000 (a, b, c) problems in 10..39; the keyed hash should hold out about 10% of them
    spec = TaskSpec(eval_fraction=0.1)
    held = sum(
        is_eval_problem(make_problem((a, b, c), ("+", "*")), spec)
        for a in range(10, 40)
        for b in range(10, 40)
        for c in range(10, 40)
    )
    assert 0.09 < held / 27_000 < 0.11


def test_warmup_mixture_exact_fractions():
    spec = TaskSpec()
    examples = warmup_examples(spec, 1000, right_fraction=0.3, seed=5)
    counts = Counter(e.plan for e in examples)
    assert counts == {"right": 300, "mul_first": 350, "distribute": 350}
    # every example is a training problem, and each plan's arithmetic is right step by step
    held = {p.prompt for p in eval_problems(spec, 500)}
    reward = make_reward("arithmetic")
    for e in examples:
        assert e.prompt not in held and not is_eval_problem(make_problem(_operands(e.prompt), ("+", "*")), spec)
        a, b, c = _operands(e.prompt)
        assert (e.completion, int(e.answer)) == plan_solution(a, b, c, e.plan)
        truth = str((a + b) * c)
        scored = reward.score_many([e.completion], [truth])[0].reward
        assert scored == (1.0 if e.plan == "right" else 0.0)
    # the plans are mixed, not blocked
    assert len({e.plan for e in examples[:30]}) == 3
    assert warmup_examples(spec, 1000, 0.3, seed=5) == examples
    assert warmup_examples(spec, 1000, 0.3, seed=6) != examples


def test_warmup_odd_counts():
    counts = Counter(e.plan for e in warmup_examples(TaskSpec(), 7, right_fraction=0.3))
    # round(2.1) = 2 right; 5 wrong split 3 / 2
    assert counts == {"right": 2, "mul_first": 3, "distribute": 2}


def test_bad_specs_rejected():
    with pytest.raises(ValueError, match="unknown task shape"):
        TaskSpec(shape="div")
    with pytest.raises(ValueError, match="operand range"):
        TaskSpec(operand_min=5, operand_max=4)
    with pytest.raises(ValueError, match="chain warm-up"):
        warmup_examples(TaskSpec(), 4, slip_step=1)
    with pytest.raises(ValueError, match="slip_step=4"):
        warmup_examples(TaskSpec(shape="chain", steps=3), 4, slip_step=4)


def test_chain_solution_by_hand():
    operands, ops = (3, 4, 5, 6), ("+", "*", "-")
    assert make_problem(operands, ops).prompt == "((3+4)*5)-6="
    assert chain_solution(operands, ops) == ("3+4=7;7*5=35;35-6=29;#29", 29)
    # a slip at step 2 computes 7+5 but writes '*'; step 3 goes on right from 12
    assert chain_solution(operands, ops, slip=2) == ("3+4=7;7*5=12;12-6=6;#6", 6)
    assert chain_solution(operands, ops, slip=1) == ("3+4=-1;-1*5=-5;-5-6=-11;#-11", -11)  # + slips to -
    assert chain_solution(operands, ops, slip=3) == ("3+4=7;7*5=35;35-6=41;#41", 41)  # - slips to +
    assert chain_solution((2, 2, 3), ("*", "+"), slip=1) == ("2*2=0;0+3=3;#3", 3)  # 2+2 = 2*2: slips to 2-2
    assert chain_solution(operands, ops, filler_after=1) == ("3+4=7;7*1=7;7*5=35;35-6=29;#29", 29)
    assert make_problem(operands, ops).solution == chain_solution(operands, ops)[0]


@pytest.mark.parametrize("slip_step", [1, 2, 3, 0])
def test_chain_warmup_slips_at_the_chosen_step(slip_step):
    spec = TaskSpec(shape="chain", steps=3)
    examples = warmup_examples(spec, 400, right_fraction=0.25, seed=1, slip_step=slip_step, filler=0.5)
    plans = Counter(e.plan for e in examples)
    assert plans["right"] == 100 and sum(plans.values()) == 400
    want = {f"slip{slip_step}"} if slip_step else {"slip1", "slip2", "slip3"}
    assert set(plans) - {"right"} == want
    reward = make_reward("arithmetic")
    held = {p.prompt for p in eval_problems(spec, 300)}
    fillers = 0
    for e in examples:
        assert e.prompt not in held
        steps = e.completion.split("#")[0].split(STEP_DELIMITER)[:-1]
        useless = [s for s in steps if "*1=" in s and s.split("*1=")[0] == s.split("*1=")[1]]
        fillers += bool(useless)
        right_steps = [s for s in steps if s not in useless]
        truth = make_problem(*_chain_of(e.prompt)).solution.split("#")[0].split(STEP_DELIMITER)[:-1]
        slip = int(e.plan[4:]) if e.plan != "right" else 0
        if slip:  # the steps before the slip are right, the slipped one is not
            assert right_steps[:slip - 1] == truth[:slip - 1] and right_steps[slip - 1] != truth[slip - 1]
        else:
            assert right_steps == truth
        scored = reward.score_many([e.completion], [make_problem(*_chain_of(e.prompt)).answer])[0].reward
        assert scored == (1.0 if e.answer == make_problem(*_chain_of(e.prompt)).answer else 0.0)
        assert scored == (0.0 if slip else 1.0)  # a slip changes the value, and + - * by >= 2 keep it changed
    assert 150 < fillers < 250  # filler 0.5 of 400
    assert warmup_examples(spec, 400, 0.25, seed=1, slip_step=slip_step, filler=0.5) == examples


def _chain_of(prompt: str) -> tuple[tuple[int, ...], tuple[str, ...]]:
    # "((3+4)*5)-6=" -> ((3, 4, 5, 6), ("+", "*", "-"))
    text = prompt.rstrip("=").replace("(", "").replace(")", "")
    nums, ops, cur = [], [], ""
    for ch in text:
        if ch in "+-*" and cur:
            nums.append(int(cur))
            ops.append(ch)
            cur = ""
        else:
            cur += ch
    nums.append(int(cur))
    return tuple(nums), tuple(ops)


def _operands(prompt: str) -> tuple[int, int, int]:
    # "(a+b)*c=" -> (a, b, c)
    inner, rest = prompt[1:].split(")*")
    a, b = inner.split("+")
    return int(a), int(b), int(rest.rstrip("="))
