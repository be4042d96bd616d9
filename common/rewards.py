"""Verifiable rewards, by registry name: ``make_reward(name, timeout_s) -> Reward``.

Guarantees:

* ``Reward.score_many(completions, answers)`` returns one ``RewardResult(reward, reason)`` per
  completion and never raises on the completion's content: malformed output scores 0.0 with a
  reason from ``REWARD_REASONS`` (a fixed tuple, usable as a metric label).
* ``math`` scores 1.0 iff the *last* ``\\boxed{...}`` (or ``\\fbox{...}``, or ``\\boxed x``) of
  the completion is equivalent to the gold answer under math-verify. Verification runs in a
  separate worker subprocess because math-verify's own timeouts use
  ``signal.alarm``, which fails outside a main thread; each evaluation is bounded by
  ``timeout_s`` here: on expiry the worker is killed, restarted on the next call, and the
  completion scores 0.0 with reason ``timeout``.
* ``arithmetic`` scores the synthetic task of ``common.tasks`` by exact match of the final
  answer (the integer after the first ``#``, see ``common.tasks``).

Reasons: ``ok`` (reward 1), ``wrong`` (parsed, not equal), ``no_answer`` (no final answer
marker), ``parse_error`` (a marker with unparsable content, unbalanced braces, bad gold),
``timeout`` (verification exceeded ``timeout_s``), ``error`` (the verifier itself failed).
"""

from __future__ import annotations

import json
import logging
import os
import re
import select
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

REWARD_REASONS: tuple[str, ...] = ("ok", "wrong", "no_answer", "parse_error", "timeout", "error")
MAX_BOXED_CHARS = 2000  # longer \boxed contents are junk, not answers: parse_error, no verifier call
# math-verify's time grows steeply with brace nesting (about 2 s at depth 8, 20 s at 13 on a busy
# CPU); gold answers of the shipped benchmarks nest at most 3 deep
MAX_BOXED_DEPTH = 8
WORKER_START_TIMEOUT_S = 120.0  # importing sympy in a fresh process can take seconds on a busy host


@dataclass(frozen=True)
class RewardResult:
    reward: float
    reason: str  # one of REWARD_REASONS


class Reward(Protocol):
    name: str

    def score_many(self, completions: list[str], answers: list[str]) -> list[RewardResult]: ...

    def close(self) -> None: ...


# --------------------------------------------------------------------------------------------
# \boxed extraction
# --------------------------------------------------------------------------------------------
_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}``/``\\fbox{...}`` (brace-balanced) or ``\\boxed x``.

    Returns None when there is no marker or the last one is unbalanced or empty.
    """
    starts = [m.end() for m in _BOX_RE.finditer(text)]
    if not starts:
        return None
    i = starts[-1]
    n = len(text)
    while i < n and text[i] in " \t":
        i += 1
    if i >= n:
        return None
    if text[i] != "{":
        # "\boxed 5" / "\boxed5": the token up to whitespace or '$' (as models write it)
        j = i
        while j < n and not text[j].isspace() and text[j] != "$":
            j += 1
        return text[i:j] or None
    depth = 0
    j = i
    while j < n:
        c = text[j]
        if c == "\\":
            j += 2  # "\{", "\}" and "\\" are text, not grouping
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j].strip() or None
        j += 1
    return None


def brace_depth(text: str) -> int:
    """Deepest nesting of unescaped braces."""
    depth = deepest = 0
    j = 0
    while j < len(text):
        c = text[j]
        if c == "\\":
            j += 2
            continue
        if c == "{":
            depth += 1
            deepest = max(deepest, depth)
        elif c == "}":
            depth -= 1
        j += 1
    return deepest


def has_box_marker(text: str) -> bool:
    return _BOX_RE.search(text) is not None


# --------------------------------------------------------------------------------------------
# math: verification in a worker process
# --------------------------------------------------------------------------------------------
def _verify_pair(pred_latex: str, gold: str) -> str:
    """Runs in the worker: 'ok' | 'wrong' | 'parse_error'. Exceptions propagate to the caller."""
    from math_verify import parse, verify  # noqa: PLC0415 -- math-verify loads in the verifier worker only

    gold_parsed = parse("\\boxed{" + gold + "}", parsing_timeout=None)
    if not gold_parsed:
        gold_parsed = parse("$" + gold + "$", parsing_timeout=None)
    if not gold_parsed:
        return "parse_error"
    pred_parsed = parse("\\boxed{" + pred_latex + "}", parsing_timeout=None)
    if not pred_parsed:
        return "parse_error"
    return "ok" if verify(gold_parsed, pred_parsed, timeout_seconds=None) else "wrong"


def _worker_main() -> None:
    """Worker loop over stdin/stdout, one JSON line each way: [pred, gold] -> verdict string."""
    # the protocol gets a private copy of fd 1; anything a library prints goes to stderr
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    import math_verify  # noqa: F401, PLC0415 -- after the fd swap, before announcing readiness

    out.write('"ready"\n')
    out.flush()
    for line in sys.stdin:
        pred, gold = json.loads(line)
        try:
            verdict = _verify_pair(pred, gold)
        except Exception:  # a verifier bug on one input must not end the worker
            verdict = "error"
        out.write(json.dumps(verdict) + "\n")
        out.flush()


_WORKER_CMD = "from common.rewards import _worker_main; _worker_main()"


class _VerifierProcess:
    """A persistent worker subprocess, killed and lazily restarted after a timeout.

    A plain subprocess (not multiprocessing) so that it never re-imports the parent's
    ``__main__``; it talks JSON lines over pipes and this side bounds every read with select.
    """

    def __init__(self, command: str = _WORKER_CMD) -> None:
        self._command = command
        self._proc: subprocess.Popen | None = None
        self._buf = b""
        self.restarts = 0

    def _start(self) -> None:
        root = str(Path(__file__).resolve().parent.parent)
        env = dict(os.environ)
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        proc = subprocess.Popen(
            [sys.executable, "-u", "-c", self._command],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            cwd=root,
        )
        self._proc, self._buf = proc, b""
        if self._read_line(WORKER_START_TIMEOUT_S) != "ready":
            self.stop()
            raise RuntimeError(
                f"reward worker did not start within {WORKER_START_TIMEOUT_S:.0f} s: "
                "check that math-verify imports (python -c 'import math_verify')"
            )

    def _read_line(self, timeout_s: float):
        """The next JSON line from the worker, or None on timeout / end of stream."""
        assert self._proc is not None and self._proc.stdout is not None
        fd = self._proc.stdout.fileno()
        deadline = time.monotonic() + timeout_s
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                return None
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        try:
            return json.loads(line)
        except ValueError:
            return "error"  # not a verdict; call() maps anything outside REWARD_REASONS to 'error'

    def call(self, item: tuple[str, str], timeout_s: float) -> str:
        """The worker's verdict, or 'timeout' (worker killed) / 'error' (worker died)."""
        if self._proc is not None and self._proc.poll() is not None:
            self.stop()
            self.restarts += 1
        if self._proc is None:
            self._start()
        assert self._proc is not None and self._proc.stdin is not None
        try:
            self._proc.stdin.write((json.dumps(list(item)) + "\n").encode())
            self._proc.stdin.flush()
        except (BrokenPipeError, OSError):
            self.stop()
            return "error"
        verdict = self._read_line(timeout_s)
        if verdict is None:
            died = self._proc.poll() is not None
            self.stop()
            self.restarts += 1
            return "error" if died else "timeout"
        return verdict if verdict in REWARD_REASONS else "error"

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        for stream in (proc.stdin, proc.stdout):
            try:
                stream.close()
            except OSError:
                pass


class MathReward:
    """math-verify on the last \\boxed{...} against the gold answer, each call time-bounded."""

    name = "math"

    def __init__(self, timeout_s: float = 5.0, _worker_command: str = _WORKER_CMD) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s={timeout_s}: give a positive time bound in seconds")
        self.timeout_s = float(timeout_s)
        self._worker = _VerifierProcess(_worker_command)
        self._lock = threading.Lock()  # one request in flight on the pipe

    def score(self, completion: str, answer: str) -> RewardResult:
        if not isinstance(completion, str) or not isinstance(answer, str):
            return RewardResult(0.0, "parse_error")
        pred = last_boxed(completion)
        if pred is None:
            return RewardResult(0.0, "parse_error" if has_box_marker(completion) else "no_answer")
        if len(pred) > MAX_BOXED_CHARS or brace_depth(pred) > MAX_BOXED_DEPTH:
            return RewardResult(0.0, "parse_error")
        with self._lock:
            verdict = self._worker.call((pred, answer), self.timeout_s)
        return RewardResult(1.0 if verdict == "ok" else 0.0, verdict)

    def score_many(self, completions: list[str], answers: list[str]) -> list[RewardResult]:
        _check_lengths(completions, answers)
        return [self.score(c, a) for c, a in zip(completions, answers, strict=True)]

    @property
    def restarts(self) -> int:
        return self._worker.restarts

    def close(self) -> None:
        with self._lock:
            self._worker.stop()

    def __del__(self) -> None:  # best effort; close() is the contract
        try:
            self._worker.stop()
        except Exception:
            pass


# --------------------------------------------------------------------------------------------
# arithmetic: the synthetic task
# --------------------------------------------------------------------------------------------
_INT_RE = re.compile(r"\s*(-?\d{1,64})\s*")
_SPECIALS_RE = re.compile(r"<(?:eos|pad|bos)>")


def arithmetic_final_answer(completion: str) -> tuple[str | None, str]:
    """(answer, reason): the integer after the first '#', or (None, 'no_answer'/'parse_error')."""
    head, sep, tail = completion.partition("#")
    if not sep:
        return None, "no_answer"
    match = _INT_RE.fullmatch(_SPECIALS_RE.sub("", tail))
    if match is None:
        return None, "parse_error"
    return match.group(1), "ok"


class ArithmeticReward:
    """1.0 iff the completion's final answer ('#<int>' then only whitespace) equals the gold integer."""

    name = "arithmetic"

    def __init__(self, timeout_s: float = 5.0) -> None:
        self.timeout_s = float(timeout_s)  # exact match is O(len): nothing to bound

    def score(self, completion: str, answer: str) -> RewardResult:
        if not isinstance(completion, str) or not isinstance(answer, str):
            return RewardResult(0.0, "parse_error")
        got, reason = arithmetic_final_answer(completion)
        if got is None:
            return RewardResult(0.0, reason)
        try:
            ok = int(got) == int(answer.strip())
        except ValueError:
            return RewardResult(0.0, "error")  # the gold answer is not an integer: a data bug
        return RewardResult(1.0, "ok") if ok else RewardResult(0.0, "wrong")

    def score_many(self, completions: list[str], answers: list[str]) -> list[RewardResult]:
        _check_lengths(completions, answers)
        return [self.score(c, a) for c, a in zip(completions, answers, strict=True)]

    def close(self) -> None:
        pass


# --------------------------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------------------------
REWARDS: dict[str, Callable[[float], Reward]] = {
    "math": lambda timeout_s: MathReward(timeout_s),
    "arithmetic": lambda timeout_s: ArithmeticReward(timeout_s),
}


def make_reward(name: str, timeout_s: float = 5.0) -> Reward:
    """The reward registered as `name` (see REWARDS); the caller owns it and calls close()."""
    try:
        factory = REWARDS[name]
    except KeyError:
        raise ValueError(f"unknown reward {name!r}; registered: {sorted(REWARDS)}") from None
    return factory(timeout_s)


def _check_lengths(completions: list[str], answers: list[str]) -> None:
    if len(completions) != len(answers):
        raise ValueError(
            f"score_many got {len(completions)} completions but {len(answers)} answers: pass one answer per completion"
        )
