"""The synthetic multi-step arithmetic task of the CPU demo (pure python, no torch).

Format (every character is in the tiny char tokenizer's alphabet, treerpo/tinymodel.py):

    prompt:    "(12+34)*25="
    solution:  "12+34=46;46*25=1150;#1150"

One step is ``<left><op><right>=<result>;`` -- ``;`` is the step delimiter (``tree.step_delimiter``
for ``split: step``) -- and ``#`` introduces the final answer, an integer with an optional minus
sign; the model then ends with EOS. ``common.rewards.ArithmeticReward`` scores exactly this.

Shapes (``DataConfig.task``):

* ``add_mul``: ``(a+b)*c`` (the demo's task; two steps).
* ``chain``: ``task_steps`` left-to-right steps over ``task_steps + 1`` operands with operators
  drawn from ``+ - *``, parenthesised so the written order is the evaluation order, e.g.
  ``((12+34)*25)-17=``.

Held-out split: a problem belongs to the eval split iff a keyed hash of its text falls below
``eval_fraction`` (``is_eval_problem``); the training generator rejects eval problems and the
eval generator keeps only them, so the two sets are disjoint for every seed and size.

Warm-up data (``warmup_examples``): supervised (prompt, completion) pairs for ``add_mul`` that mix
the right plan with two plausible wrong plans whose arithmetic is carried out correctly:

    right        (a+b)*c  : "a+b=s;s*c=r;#r"
    mul_first    a+(b*c)  : "b*c=p;a+p=r;#r"     (precedence slip: multiplies first)
    distribute   (a*c)+b  : "a*c=p;p+b=r;#r"     (distributes c over a only)

so a warmed-up model holds several strategies and RL has one to select.

For ``chain`` the warm-up instead makes the model slip at a chosen step, so that a *later* step
decides the answer (``slip_step`` d in 1..task_steps; 0 = any step, drawn uniformly):

    right      every step right                         "3+4=7;7*5=35;35-6=29;#29"
    slip<d>    step d's result is that of the wrong     "3+4=7;7*5=12;12-6=6;#6"     (d = 2: 7+5)
               operator (+ -> -, - -> +, * -> +; the
               next one where that gives the same
               value, as 2*2 = 2+2), the steps after
               it right from that value

Steps before d are always right, so the first d - 1 steps carry no signal and the choice at
step d (depth d of a tree that splits one step per level) decides the reward. ``filler``: the
share of examples that also carry one useless step ``v*1=v;`` after a random step (the answer
unchanged): responses then vary in length, and a method that favours short correct answers
can show it.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

STEP_DELIMITER = ";"
ANSWER_MARK = "#"
TASK_SHAPES: tuple[str, ...] = ("add_mul", "chain")
WARMUP_PLANS: tuple[str, ...] = ("right", "mul_first", "distribute")
_OPS = ("+", "-", "*")
# a chain warm-up slip computes the first of these operators whose result differs from the right one
SLIP_OPS = {"+": ("-", "*"), "-": ("+", "*"), "*": ("+", "-")}


@dataclass(frozen=True)
class Problem:
    prompt: str  # "(12+34)*25="
    solution: str  # "12+34=46;46*25=1150;#1150"
    answer: str  # "1150"
    operands: tuple[int, ...]
    ops: tuple[str, ...]

    @property
    def problem_id(self) -> str:
        return "arith:" + self.prompt.rstrip("=")


@dataclass(frozen=True)
class TaskSpec:
    """Difficulty knobs of the generator (mirrors the task fields of DataConfig)."""

    shape: str = "add_mul"
    operand_min: int = 2
    operand_max: int = 14
    steps: int = 2  # chain only
    eval_fraction: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.shape not in TASK_SHAPES:
            raise ValueError(f"unknown task shape {self.shape!r}; choose one of {TASK_SHAPES}")
        if not 0 <= self.operand_min <= self.operand_max:
            raise ValueError(f"operand range [{self.operand_min}, {self.operand_max}] is empty or negative")
        if self.steps < 1:
            raise ValueError(f"steps={self.steps}: a problem needs at least one step")
        if not 0.0 < self.eval_fraction < 1.0:
            raise ValueError(f"eval_fraction={self.eval_fraction} must lie strictly between 0 and 1")

    @classmethod
    def from_config(cls, cfg) -> TaskSpec:
        """From a common.config.DataConfig."""
        return cls(
            shape=cfg.task,
            operand_min=cfg.operand_min,
            operand_max=cfg.operand_max,
            steps=cfg.task_steps,
            eval_fraction=cfg.eval_fraction,
            seed=cfg.seed,
        )


# --------------------------------------------------------------------------------------------
# building problems
# --------------------------------------------------------------------------------------------
def _apply(op: str, x: int, y: int) -> int:
    return x + y if op == "+" else x - y if op == "-" else x * y


def _step(x: int, op: str, y: int) -> tuple[str, int]:
    r = _apply(op, x, y)
    return f"{x}{op}{y}={r}{STEP_DELIMITER}", r


def make_problem(operands: tuple[int, ...], ops: tuple[str, ...]) -> Problem:
    """A left-to-right chain: ((o0 op0 o1) op1 o2) ...; outermost parentheses dropped."""
    if len(operands) != len(ops) + 1 or not ops:
        raise ValueError(f"need len(ops)+1 operands and at least one op, got {operands}, {ops}")
    expr = str(operands[0])
    acc = operands[0]
    steps = []
    for k, (op, y) in enumerate(zip(ops, operands[1:], strict=True)):
        expr = f"{expr}{op}{y}" if k == 0 else f"({expr}){op}{y}"
        text, acc = _step(acc, op, y)
        steps.append(text)
    solution = "".join(steps) + f"{ANSWER_MARK}{acc}"
    return Problem(prompt=expr + "=", solution=solution, answer=str(acc), operands=tuple(operands), ops=tuple(ops))


def _draw(spec: TaskSpec, rng: random.Random) -> Problem:
    lo, hi = spec.operand_min, spec.operand_max
    if spec.shape == "add_mul":
        return make_problem((rng.randint(lo, hi), rng.randint(lo, hi), rng.randint(lo, hi)), ("+", "*"))
    operands = tuple(rng.randint(lo, hi) for _ in range(spec.steps + 1))
    return make_problem(operands, tuple(rng.choice(_OPS) for _ in range(spec.steps)))


def is_eval_problem(problem: Problem, spec: TaskSpec) -> bool:
    """Held-out membership of a problem (`is_eval_prompt` of its prompt)."""
    return is_eval_prompt(problem.prompt, spec)


def is_eval_prompt(prompt: str, spec: TaskSpec) -> bool:
    """Held-out membership: a keyed hash of the prompt, uniform in [0, 1), below eval_fraction."""
    digest = hashlib.blake2b(f"{spec.seed}|{prompt}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < spec.eval_fraction


_MAX_DRAWS = 10_000


def _problem_at(spec: TaskSpec, split: str, index: int, stream: str = "") -> Problem:
    # one rng per (seed, stream, index): problem i never depends on how many came before it
    rng = random.Random(f"treerpo-arith|{spec.seed}|{stream or split}|{index}")
    want_eval = split == "eval"
    for _ in range(_MAX_DRAWS):
        problem = _draw(spec, rng)
        if is_eval_problem(problem, spec) == want_eval:
            return problem
    raise ValueError(f"no {split} problem found in {_MAX_DRAWS} draws: widen the operand range")


def train_problem(spec: TaskSpec, index: int) -> Problem:
    """Training problem number `index` (deterministic; never an eval problem)."""
    return _problem_at(spec, "train", index)


def eval_problems(spec: TaskSpec, n: int) -> list[Problem]:
    """`n` distinct held-out problems (deterministic); fewer if the held-out set is smaller."""
    out: dict[str, Problem] = {}
    index = 0
    while len(out) < n and index < 50 * n + 1000:
        problem = _problem_at(spec, "eval", index)
        out.setdefault(problem.prompt, problem)
        index += 1
    return list(out.values())


# --------------------------------------------------------------------------------------------
# warm-up (supervised) data
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class WarmupExample:
    prompt: str
    completion: str  # the plan's steps and final answer; append EOS when tokenising
    plan: str  # one of WARMUP_PLANS
    answer: str  # the plan's own final answer (the right one only for plan 'right')


def plan_solution(a: int, b: int, c: int, plan: str) -> tuple[str, int]:
    """Steps and final answer of (a+b)*c worked by `plan`, each step's arithmetic correct."""
    if plan == "right":
        s1, x = _step(a, "+", b)
        s2, r = _step(x, "*", c)
    elif plan == "mul_first":
        s1, x = _step(b, "*", c)
        s2, r = _step(a, "+", x)
    elif plan == "distribute":
        s1, x = _step(a, "*", c)
        s2, r = _step(x, "+", b)
    else:
        raise ValueError(f"unknown plan {plan!r}; choose one of {WARMUP_PLANS}")
    return s1 + s2 + f"{ANSWER_MARK}{r}", r


def chain_solution(operands: tuple[int, ...], ops: tuple[str, ...], slip: int = 0,
                   filler_after: int = 0) -> tuple[str, int]:
    """Steps and final answer of a left-to-right chain; step `slip` (1-based; 0 = none) computes
    another operator (SLIP_OPS: the first whose result differs) but writes its own, later steps go
    on right from that value; a useless step `v*1=v;` follows step `filler_after` (1-based; 0 = none)."""
    acc, steps = operands[0], []
    for k, (op, y) in enumerate(zip(ops, operands[1:], strict=True), 1):
        r = _apply(op, acc, y)
        if k == slip:
            r = next((v for v in (_apply(alt, acc, y) for alt in SLIP_OPS[op]) if v != r), r)
        steps.append(f"{acc}{op}{y}={r}{STEP_DELIMITER}")
        acc = r
        if k == filler_after:
            steps.append(f"{acc}*1={acc}{STEP_DELIMITER}")
    return "".join(steps) + f"{ANSWER_MARK}{acc}", acc


def _chain_examples(spec: TaskSpec, n: int, right_fraction: float, seed: int, slip_step: int,
                    filler: float) -> list[WarmupExample]:
    if not 0 <= slip_step <= spec.steps:
        raise ValueError(f"slip_step={slip_step} must lie in [0, {spec.steps}] (0 = any step)")
    if not 0.0 <= filler <= 1.0:
        raise ValueError(f"filler={filler} must lie in [0, 1]")
    n_right = round(n * right_fraction)
    rng = random.Random(f"treerpo-warmup-chain|{spec.seed}|{seed}|{slip_step}")
    slips = [0] * n_right + [slip_step or rng.randint(1, spec.steps) for _ in range(n - n_right)]
    rng.shuffle(slips)
    out = []
    for i, slip in enumerate(slips):
        problem = _problem_at(spec, "train", i, stream=f"warmup-{seed}")
        after = rng.randint(1, spec.steps) if rng.random() < filler else 0
        completion, result = chain_solution(problem.operands, problem.ops, slip, after)
        out.append(WarmupExample(prompt=problem.prompt, completion=completion,
                                 plan="right" if slip == 0 else f"slip{slip}", answer=str(result)))
    return out


def warmup_examples(spec: TaskSpec, n: int, right_fraction: float = 0.3, seed: int = 0, *, slip_step: int = 0,
                    filler: float = 0.0) -> list[WarmupExample]:
    """`n` training-split examples in a seeded random order, round(n * right_fraction) right.
    add_mul: the rest split evenly between the two wrong plans (exact counts). chain: the rest slip
    at step `slip_step` (0 = a uniform step), a `filler` share with one useless step (module docstring)."""
    if not 0.0 <= right_fraction <= 1.0:
        raise ValueError(f"right_fraction={right_fraction} must lie in [0, 1]")
    if spec.shape == "chain":
        return _chain_examples(spec, n, right_fraction, seed, slip_step, filler)
    if slip_step or filler:
        raise ValueError("slip_step and filler are chain warm-up options; the add_mul warm-up mixes plans")
    n_right = round(n * right_fraction)
    n_wrong = n - n_right
    plans = ["right"] * n_right + ["mul_first"] * ((n_wrong + 1) // 2) + ["distribute"] * (n_wrong // 2)
    rng = random.Random(f"treerpo-warmup|{spec.seed}|{seed}")
    rng.shuffle(plans)
    out = []
    for i, plan in enumerate(plans):
        # training split (never an eval problem), its own random stream per warm-up seed
        problem = _problem_at(spec, "train", i, stream=f"warmup-{seed}")
        a, b, c = problem.operands
        completion, result = plan_solution(a, b, c, plan)
        out.append(WarmupExample(prompt=problem.prompt, completion=completion, plan=plan, answer=str(result)))
    return out
