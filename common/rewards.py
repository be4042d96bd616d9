"""Verifiable rewards: ``make_reward(name, timeout_s, data) -> Reward``.

``name`` is a registry name (``math``, ``arithmetic``, ``dataset``) or a custom function,
``package.module:function`` or ``path/to/file.py:function`` (``data.reward``).

Guarantees:

* ``Reward.score_many(completions, answers, entries=None)`` returns one ``RewardResult(reward,
  reason)`` per completion, reward in [0, 1], and never raises on what a completion, an entry or
  a verifier does: a failure scores 0.0 with a reason from ``REWARD_REASONS`` (a fixed tuple, a
  metric label). ``entries`` are the prompts' JSON-like rows (``common.data.Prompt.entry``).
* Verifiers that run third-party code (``math``, ``dataset``, custom) run in a worker subprocess,
  one item at a time, each bounded by ``timeout_s``: on expiry the worker is killed and restarted
  on the next call and the item scores ``timeout``; a worker that dies (``sys.exit``, a crash)
  costs its item ``error`` and is restarted; a restart that fails costs the item ``error`` too.
  A custom function or dataset that cannot be loaded fails ``make_reward`` with one ConfigError.
* ``math``: 1.0 iff the *last* ``\\boxed{...}`` (or ``\\fbox{...}``, ``\\boxed x``) is equivalent
  to the gold answer under math-verify (in the worker: its ``signal.alarm`` timeouts need a main
  thread). ``arithmetic``: exact match of the synthetic task's final answer (after the first ``#``).
* ``dataset``: the data source's own verifier. reasoning-gym: ``score_answer(extract_answer(
  completion), entry)`` of the dataset, with the entry regenerated from its seed when it is the
  source's (JSON loses tuples); the synthetic task: ``arithmetic``; files have none (ConfigError).
* ``extract_answer`` (the ``dataset`` reward's rule for free text): the content of the last
  ``<answer>...</answer>``, else of the last ``\\boxed{}``, else the last number, else the last
  non-empty line; None (``no_answer``) for blank text.

Custom reward contract: ``function(completion: str, answer: str, entry: dict) -> float | bool``,
called once per leaf with the decoded root-to-leaf text (free text: no extraction), the gold
answer string and the prompt's row (files: the whole row; reasoning-gym: the dataset entry;
synthetic: id, problem, answer). Return a float in [0, 1] or a bool (True = 1.0). The module is
imported once per worker, the worker's cwd is the caller's; anything it prints goes to stderr.
Whatever the function does -- raises, hangs past ``timeout_s``, returns NaN, None, inf, a value
outside [0, 1] or another type, calls ``sys.exit``, kills its process -- that leaf scores 0.0
with a reason (``error``, ``timeout``, ``bad_value``) and scoring goes on.

Reasons: ``ok`` (reward 1), ``wrong`` (verified, reward < 1), ``no_answer`` (nothing to verify),
``parse_error`` (an answer marker with unparsable content, bad gold), ``timeout`` (over
``timeout_s``), ``error`` (the verifier raised or its worker died), ``bad_value`` (a custom
function or dataset scorer returned something that is not a number in [0, 1] or a bool).
"""

from __future__ import annotations

import ast
import ctypes
import difflib
import functools
import importlib
import importlib.util
import inspect
import json
import logging
import numbers
import os
import re
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from common.data import GymSpec, check_reasoning_gym
from common.errors import ConfigError

log = logging.getLogger("treerpo.rewards")

REWARD_REASONS: tuple[str, ...] = ("ok", "wrong", "no_answer", "parse_error", "timeout", "error", "bad_value")
REWARD_NAMES: tuple[str, ...] = ("math", "arithmetic", "dataset")
MAX_BOXED_CHARS = 2000  # longer \boxed contents are junk, not answers: parse_error, no verifier call
# math-verify's time grows steeply with brace nesting (about 2 s at depth 8, 20 s at 13 on a busy
# CPU); gold answers of the shipped benchmarks nest at most 3 deep
MAX_BOXED_DEPTH = 8
WORKER_START_TIMEOUT_S = 120.0  # importing sympy in a fresh process can take seconds on a busy host
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


@dataclass(frozen=True)
class RewardResult:
    reward: float
    reason: str  # one of REWARD_REASONS


class Reward(Protocol):
    name: str

    def score_many(self, completions: list[str], answers: list[str],
                   entries: list[dict | None] | None = None) -> list[RewardResult]: ...

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
# answers in free text (the `dataset` reward)
# --------------------------------------------------------------------------------------------
_ANSWER_TAG_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_NUMBER_RE = re.compile(r"[-+]?\d+(?:,\d{3})*(?:\.\d+)?")


def extract_answer(text: str) -> str | None:
    """The answer a chat model gave in free text, by the first rule that applies:

    1. the content of the last ``<answer>...</answer>`` (stripped; empty -> None);
    2. the content of the last ``\\boxed{...}`` (``last_boxed``);
    3. the last number (optional sign, thousands commas dropped, optional decimals);
    4. the last non-empty line, stripped.

    None when the text is blank (or its last answer tag is empty).
    """
    tags = _ANSWER_TAG_RE.findall(text)
    if tags:
        return tags[-1].strip() or None
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    numbers_found = _NUMBER_RE.findall(text)
    if numbers_found:
        return numbers_found[-1].replace(",", "")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else None


# --------------------------------------------------------------------------------------------
# the worker process: one judge, JSON lines each way
# --------------------------------------------------------------------------------------------
def graded(value: Any) -> list:
    """A verifier's return value -> [reward, reason]: a bool or a real number in [0, 1], else bad_value."""
    if isinstance(value, bool):
        return [float(value), "ok" if value else "wrong"]
    if not isinstance(value, numbers.Real):
        return [0.0, "bad_value"]
    reward = float(value)
    if not 0.0 <= reward <= 1.0:  # NaN fails both comparisons
        return [0.0, "bad_value"]
    return [reward, "ok" if reward == 1.0 else "wrong"]


def _math_judge(spec: dict) -> Callable[[list], list]:
    import math_verify  # noqa: F401, PLC0415 -- math-verify loads in the verifier worker only

    logging.getLogger("math_verify").setLevel(logging.ERROR)

    def judge(item: list) -> list:
        verdict = _verify_pair(*item)
        return [1.0 if verdict == "ok" else 0.0, verdict]

    return judge


def _verify_pair(pred_latex: str, gold: str) -> str:
    """'ok' | 'wrong' | 'parse_error'. Exceptions propagate to the caller."""
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


def _gym_judge(spec: dict) -> Callable[[list], list]:
    gym = GymSpec.from_json(spec["gym"])
    datasets = {split: gym.create(split) for split in ("train", "eval")}
    score_answer = datasets["train"].score_answer

    @functools.lru_cache(maxsize=4096)
    def regenerate(split: str, index: int) -> dict:
        return datasets[split][index]

    def canonical(entry: dict) -> dict:
        """The dataset's own entry (tuples and all) when `entry` is one of the source's, else `entry`."""
        index = (entry.get("metadata") or {}).get("source_index")
        if isinstance(index, int) and not isinstance(index, bool) and index >= 0:
            for split in ("train", "eval"):
                if index < len(datasets[split]):
                    own = regenerate(split, index)
                    if own.get("question") == entry.get("question"):
                        return own
        return entry

    def judge(item: list) -> list:
        answer, entry = item
        return graded(score_answer(answer, canonical(entry) if isinstance(entry, dict) else entry))

    return judge


def _custom_judge(spec: dict) -> Callable[[list], list]:
    fn = load_reward_function(spec["target"])

    def judge(item: list) -> list:
        completion, answer, entry = item
        return graded(fn(completion, answer, entry))

    return judge


_JUDGES: dict[str, Callable[[dict], Callable[[list], list]]] = {
    "math": _math_judge, "reasoning_gym": _gym_judge, "custom": _custom_judge,
}


def _worker_main() -> None:
    """Worker loop: spec (JSON) in argv[1]; then one JSON line per item in, one [reward, reason] out.

    The first line out is "ready", or {"startup_error": "<one line>"} when the judge cannot be built.
    """
    spec = json.loads(sys.argv[1])
    _die_with(spec["parent"])
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it ends this worker
    # the protocol gets private copies of fds 0 and 1; a verifier that prints writes to stderr,
    # one that reads stdin reads nothing
    out = os.fdopen(os.dup(1), "w")
    inp = os.fdopen(os.dup(0), "r")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    sys.stdin = open(os.devnull)  # lives as long as the worker
    if spec.get("cwd"):
        os.chdir(spec["cwd"])
    try:
        judge = _JUDGES[spec["kind"]](spec)
    except BaseException as e:  # noqa: BLE001 -- whatever loading did, the caller gets one line
        out.write(json.dumps({"startup_error": _one_line(e)}) + "\n")
        out.flush()
        return
    out.write('"ready"\n')
    out.flush()
    for line in inp:
        try:
            verdict = judge(json.loads(line))
        except BaseException:  # noqa: BLE001 -- a verifier that raises or calls sys.exit costs its item only
            verdict = [0.0, "error"]
        out.write(json.dumps(verdict) + "\n")
        out.flush()


def _die_with(parent: int) -> None:
    """Linux: this worker is killed when its parent dies, even inside a verifier that hangs."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:  # not Linux: the closed pipe ends the worker at its next read
        return
    if os.getppid() != parent:  # the parent died before prctl
        os._exit(0)


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) if isinstance(e, ConfigError) else f"{type(e).__name__}: {' '.join(str(e).split())}"
    return text[:1000]


_WORKER_CMD = "from common.rewards import _worker_main; _worker_main()"
_TIMEOUT, _EOF = object(), object()  # what _read_line returns instead of a line


def _result(verdict: Any) -> RewardResult:
    """A worker's answer -> RewardResult; anything but [reward in [0, 1], known reason] is 'error'."""
    if (isinstance(verdict, list) and len(verdict) == 2 and isinstance(verdict[0], (int, float))
            and not isinstance(verdict[0], bool) and 0.0 <= verdict[0] <= 1.0 and verdict[1] in REWARD_REASONS):
        return RewardResult(float(verdict[0]), verdict[1])
    return RewardResult(0.0, "error")


class _VerifierProcess:
    """A persistent worker subprocess, killed and lazily restarted after a timeout or death.

    A plain subprocess (not multiprocessing) so that it never re-imports the parent's
    ``__main__``; it talks JSON lines over pipes and this side bounds every read with select.
    """

    def __init__(self, spec: dict) -> None:
        self._spec = dict(spec, cwd=os.getcwd(), parent=os.getpid())
        self._proc: subprocess.Popen | None = None
        self._buf = b""
        self._started = False  # a first start succeeded: later start failures cost an item, not the caller
        self.restarts = 0

    def start(self) -> None:
        """Start the worker now (make_reward: a verifier that cannot load fails at start)."""
        if self._proc is None:
            self._start()

    def _start(self) -> None:
        root = str(Path(__file__).resolve().parent.parent)
        env = dict(os.environ)
        # treerpo first, then the caller's working directory (a custom `package.module` there)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, self._spec["cwd"], env.get("PYTHONPATH")) if p)
        proc = subprocess.Popen(
            [sys.executable, "-u", "-c", _WORKER_CMD, json.dumps(self._spec)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            cwd=root,
        )
        self._proc, self._buf = proc, b""
        first = self._read_line(WORKER_START_TIMEOUT_S)
        if first == "ready":
            self._started = True
            return
        self.stop()
        if isinstance(first, dict) and "startup_error" in first:
            raise ConfigError(f"reward {self.describe()}: {first['startup_error']}")
        how = "exited before it was ready" if first is _EOF else f"did not start within {WORKER_START_TIMEOUT_S:.0f} s"
        raise RuntimeError(f"reward worker ({self.describe()}) {how}: check that its verifier imports "
                           "(python -c 'import math_verify' for math); its stderr is in this process's log")

    def describe(self) -> str:
        return self._spec.get("target") or self._spec["kind"]

    def _read_line(self, timeout_s: float):
        """The next JSON line from the worker; _TIMEOUT, or _EOF when the worker closed its end (died)."""
        assert self._proc is not None and self._proc.stdout is not None
        fd = self._proc.stdout.fileno()
        deadline = time.monotonic() + timeout_s
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return _TIMEOUT
            chunk = os.read(fd, 65536)
            if not chunk:
                return _EOF
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        try:
            return json.loads(line)
        except ValueError:
            return "error"  # not a verdict: _result makes it 'error'

    def call(self, item: list, timeout_s: float) -> RewardResult:
        """The worker's verdict on `item`, or 'timeout' (worker killed) / 'error' (worker died)."""
        if self._proc is not None and self._proc.poll() is not None:
            self.stop()
            self.restarts += 1
        if self._proc is None:
            try:
                self._start()
            except (ConfigError, RuntimeError) as e:
                if not self._started:
                    raise
                log.warning("reward worker restart failed, the item scores 0 (error): %s", e)
                return RewardResult(0.0, "error")
        assert self._proc is not None and self._proc.stdin is not None
        try:
            self._proc.stdin.write((json.dumps(item) + "\n").encode())
            self._proc.stdin.flush()
        except (BrokenPipeError, OSError):
            self.stop()
            self.restarts += 1
            return RewardResult(0.0, "error")
        verdict = self._read_line(timeout_s)
        if verdict is _TIMEOUT or verdict is _EOF:
            self.stop()
            self.restarts += 1
            return RewardResult(0.0, "timeout" if verdict is _TIMEOUT else "error")
        return _result(verdict)

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


class _WorkerReward:
    """A reward whose verifier runs in a `_VerifierProcess`, one item at a time, each time-bounded."""

    name = ""

    def __init__(self, spec: dict, timeout_s: float, start: bool) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s={timeout_s}: give a positive time bound in seconds")
        self.timeout_s = float(timeout_s)
        self._worker = _VerifierProcess(spec)
        self._lock = threading.Lock()  # one request in flight on the pipe
        if start:
            self._worker.start()

    def _call(self, item: list) -> RewardResult:
        with self._lock:
            return self._worker.call(item, self.timeout_s)

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
# math, dataset, custom
# --------------------------------------------------------------------------------------------
class MathReward(_WorkerReward):
    """math-verify on the last \\boxed{...} against the gold answer, each call time-bounded."""

    name = "math"

    def __init__(self, timeout_s: float = 5.0) -> None:
        super().__init__({"kind": "math"}, timeout_s, start=False)  # sympy loads on first use

    def score(self, completion: str, answer: str) -> RewardResult:
        if not isinstance(completion, str) or not isinstance(answer, str):
            return RewardResult(0.0, "parse_error")
        pred = last_boxed(completion)
        if pred is None:
            return RewardResult(0.0, "parse_error" if has_box_marker(completion) else "no_answer")
        if len(pred) > MAX_BOXED_CHARS or brace_depth(pred) > MAX_BOXED_DEPTH:
            return RewardResult(0.0, "parse_error")
        return self._call([pred, answer])

    def score_many(self, completions: list[str], answers: list[str],
                   entries: list[dict | None] | None = None) -> list[RewardResult]:
        _check_lengths(completions, answers, entries)
        return [self.score(c, a) for c, a in zip(completions, answers, strict=True)]


class GymReward(_WorkerReward):
    """reasoning-gym's own `score_answer(extract_answer(completion), entry)`, in a worker."""

    name = "dataset"

    def __init__(self, gym: GymSpec, timeout_s: float = 5.0) -> None:
        super().__init__({"kind": "reasoning_gym", "gym": gym.to_json()}, timeout_s, start=True)

    def score_many(self, completions: list[str], answers: list[str],
                   entries: list[dict | None] | None = None) -> list[RewardResult]:
        _check_lengths(completions, answers, entries)
        if entries is None:
            raise ValueError("the dataset reward scores against each prompt's entry: pass entries= (Prompt.entry)")
        out = []
        for completion, entry in zip(completions, entries, strict=True):
            pred = extract_answer(completion) if isinstance(completion, str) else None
            out.append(RewardResult(0.0, "no_answer") if pred is None else self._call([pred, entry]))
        return out


class CustomReward(_WorkerReward):
    """`function(completion, answer, entry)` named by `package.module:function` or `file.py:function`."""

    def __init__(self, target: str, timeout_s: float = 5.0) -> None:
        self.name = target
        super().__init__({"kind": "custom", "target": _absolute_target(target)}, timeout_s, start=True)

    def score_many(self, completions: list[str], answers: list[str],
                   entries: list[dict | None] | None = None) -> list[RewardResult]:
        _check_lengths(completions, answers, entries)
        rows = entries if entries is not None else [None] * len(completions)
        return [self._call([c, a, {} if e is None else e]) for c, a, e in zip(completions, answers, rows, strict=True)]


# --------------------------------------------------------------------------------------------
# custom reward targets: `package.module:function` / `path/to/file.py:function`
# --------------------------------------------------------------------------------------------
_IDENT_RE = re.compile(r"[A-Za-z_]\w*")


def parse_target(target: str) -> tuple[str, str, bool]:
    """'pkg.mod:fn' -> ('pkg.mod', 'fn', False); 'dir/f.py:fn' -> ('dir/f.py', 'fn', True). ValueError if neither."""
    where, sep, fn = target.rpartition(":")
    how = "give 'package.module:function' or 'path/to/file.py:function'"
    if not sep or not where or not _IDENT_RE.fullmatch(fn):
        raise ValueError(f"reward {target!r}: {how}")
    is_file = where.endswith(".py") or "/" in where or os.sep in where
    if not is_file and not all(_IDENT_RE.fullmatch(part) for part in where.split(".")):
        raise ValueError(f"reward {target!r}: {where!r} is neither a dotted module name nor a .py file; {how}")
    return where, fn, is_file


def _absolute_target(target: str) -> str:
    where, fn, is_file = parse_target(target)
    return f"{Path(where).resolve()}:{fn}" if is_file else target


def _top_level_bindings(tree: ast.Module) -> dict[str, ast.AST] | None:
    """Names a module binds at its top level (-> the binding statement), or None when it cannot
    be told without running it (`from x import *`, a module `__getattr__`, `globals()` writes)."""
    out: dict[str, ast.AST] = {}

    def visit(body: list[ast.stmt]) -> bool:
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                out[node.name] = node
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                for alias in node.names:
                    if alias.name == "*":
                        return False
                    out[alias.asname or alias.name.split(".")[0]] = node
            elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for t in targets:
                    for name in ast.walk(t):
                        if isinstance(name, ast.Name):
                            out[name.id] = node
            elif isinstance(node, (ast.If, ast.Try, ast.With, ast.For, ast.While)):
                for field in ("body", "orelse", "finalbody"):
                    if not visit(getattr(node, field, [])):
                        return False
                for handler in getattr(node, "handlers", []):
                    if not visit(handler.body):
                        return False
        return True

    if not visit(tree.body) or "__getattr__" in out:
        return None
    if any(isinstance(n, ast.Name) and n.id in ("globals", "setattr") for n in ast.walk(tree)):
        return None
    return out


def _check_source(path: Path, fn: str, target: str) -> None:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"reward {target!r}: cannot read {path}: {e}") from None
    except SyntaxError as e:
        raise ConfigError(f"reward {target!r}: {path}:{e.lineno}: syntax error ({e.msg})") from None
    names = _top_level_bindings(tree)
    if names is None:
        return
    if fn not in names:
        defs = sorted(n for n, node in names.items() if isinstance(node, (ast.FunctionDef, ast.ClassDef)))
        close = difflib.get_close_matches(fn, defs, n=3)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else f" (its functions: {defs})"
        raise ConfigError(f"reward {target!r}: {path} defines no {fn!r}{hint}")
    node = names[fn]
    if isinstance(node, ast.AsyncFunctionDef):
        raise ConfigError(f"reward {target!r}: {fn} is an async function; give a plain function")
    literal = (ast.Constant, ast.List, ast.Dict, ast.Tuple, ast.Set)
    if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.value, literal):
        raise ConfigError(f"reward {target!r}: {fn} is bound to a {type(node.value).__name__.lower()} literal, "
                          "not a function")


def check_reward_target(target: str) -> None:
    """Fail (ConfigError, one line) if `target` names no function, without running the user's code.

    Checks: the form, the file (relative to the working directory) or module exists, and its
    source binds the name at top level (not to a literal or an async function). Importing the
    module's parent packages (`find_spec`) is the one thing that runs code. What only running the
    module can tell (import errors, a name bound at run time that is not callable, the signature)
    is checked when the reward starts (`make_reward`).
    """
    try:
        where, fn, is_file = parse_target(target)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if is_file:
        path = Path(where)
        if not path.is_file():
            raise ConfigError(f"reward {target!r}: no file {where} (relative paths start at the working directory "
                              f"{os.getcwd()})")
        _check_source(path, fn, target)
        return
    try:
        spec = importlib.util.find_spec(where)
    except (ImportError, ValueError) as e:
        raise ConfigError(f"reward {target!r}: module {where!r} not found ({e})") from None
    except Exception as e:  # noqa: BLE001 -- a parent package that fails to import
        raise ConfigError(f"reward {target!r}: importing the parent of {where!r} failed: {_one_line(e)}") from None
    if spec is None:
        raise ConfigError(f"reward {target!r}: module {where!r} not found (is its folder on PYTHONPATH or the "
                          f"working directory {os.getcwd()}?)")
    if spec.origin and spec.origin.endswith(".py"):
        _check_source(Path(spec.origin), fn, target)


def load_reward_function(target: str) -> Callable[[str, str, dict], Any]:
    """Import `target` and return its function (in the worker); ConfigError, one line, if it cannot."""
    where, fn_name, is_file = parse_target(target)
    try:
        if is_file:
            path = Path(where)
            if not path.is_file():
                raise ConfigError(f"no file {where}")
            spec = importlib.util.spec_from_file_location(f"treerpo_reward_{path.stem}", path)
            if spec is None or spec.loader is None:
                raise ConfigError(f"cannot import {where} as a module")
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module  # dataclasses and pickling look their module up
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
    except ConfigError:
        raise
    except BaseException as e:  # noqa: BLE001 -- whatever the import did (SystemExit too), one line
        raise ConfigError(f"importing {where} failed: {_one_line(e)}") from None
    fn = getattr(module, fn_name, None)
    if fn is None:
        raise ConfigError(f"{where} has no attribute {fn_name!r}")
    if not callable(fn) or inspect.iscoroutinefunction(fn):
        raise ConfigError(f"{where}:{fn_name} is a {type(fn).__name__}, not a plain function")
    try:
        inspect.signature(fn).bind("completion", "answer", {})
    except TypeError as e:
        raise ConfigError(f"{fn_name} cannot be called as {fn_name}(completion, answer, entry): {e}") from None
    except ValueError:  # a builtin without a signature: its first call will tell
        pass
    return fn


def check_reward_name(name: str) -> str:
    """`name` if it is a registry name or a checkable custom target; else ConfigError saying what to give."""
    if name in REWARD_NAMES:
        return name
    if ":" not in name:
        close = difflib.get_close_matches(name, REWARD_NAMES, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"unknown reward {name!r}{hint}: give a registered name ({', '.join(REWARD_NAMES)}) or a "
                          "function, 'package.module:function' or 'path/to/file.py:function'")
    check_reward_target(name)
    return name


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

    def score_many(self, completions: list[str], answers: list[str],
                   entries: list[dict | None] | None = None) -> list[RewardResult]:
        _check_lengths(completions, answers, entries)
        return [self.score(c, a) for c, a in zip(completions, answers, strict=True)]

    def close(self) -> None:
        pass


# --------------------------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------------------------
def _dataset_reward(timeout_s: float, data: Any) -> Reward:
    source = getattr(data, "source", None)
    if source == "reasoning_gym":
        check_reasoning_gym(data.dataset, data.dataset_args)
        return GymReward(GymSpec.from_config(data), timeout_s)
    if source == "synthetic":
        return ArithmeticReward(timeout_s)  # the synthetic task's own verifier
    raise ConfigError(f"reward 'dataset' is the data source's own verifier, and data.source={source!r} has none: "
                      "use data.source='reasoning_gym', or a reward such as 'math' or 'package.module:function'")


REWARDS: dict[str, Callable[[float, Any], Reward]] = {
    "math": lambda timeout_s, data: MathReward(timeout_s),
    "arithmetic": lambda timeout_s, data: ArithmeticReward(timeout_s),
    "dataset": _dataset_reward,
}


def make_reward(name: str, timeout_s: float = 5.0, data: Any = None) -> Reward:
    """The reward `name` (a REWARDS name or a custom target); `data` (DataConfig) for 'dataset'.

    The caller owns it and calls close(). ConfigError (one line) when it cannot start: an unknown
    name, a custom function that does not load, a dataset that cannot be built."""
    factory = REWARDS.get(name)
    if factory is not None:
        return factory(timeout_s, data)
    check_reward_name(name)
    return CustomReward(name, timeout_s)


def _check_lengths(completions: list[str], answers: list[str], entries: list | None = None) -> None:
    if len(completions) != len(answers):
        raise ValueError(
            f"score_many got {len(completions)} completions but {len(answers)} answers: pass one answer per completion"
        )
    if entries is not None and len(entries) != len(completions):
        raise ValueError(f"score_many got {len(completions)} completions but {len(entries)} entries: pass one entry "
                         "per completion (or none)")
