"""Custom rewards (`data.reward: module:function` / `file.py:function`): every way a user function
can fail scores its leaf 0 with a fixed reason and scoring goes on; a bad import path fails at
config load where it can be told without running the module, else when the reward starts.

Real worker processes throughout: the function runs in the same `_VerifierProcess` as math-verify.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from actor.sampler import TreeSampler
from common.config import ConfigError, DataConfig, TreeConfig
from common.data import PromptSource
from common.rewards import REWARD_REASONS, CustomReward, RewardResult, make_reward, parse_target
from tests.support.models import hf_engine

TIMEOUT_S = 1.0

USER_REWARD = '''
import math, os, sys, time

def score(completion, answer, entry):
    kind = completion.split(":")[0]
    if kind == "ok":
        return 1.0
    if kind == "half":
        return 0.5
    if kind == "true":
        return True
    if kind == "false":
        return False
    if kind == "int0":
        return 0
    if kind == "numpy":
        import numpy
        return numpy.float32(0.25)
    if kind == "entry":  # the row arrives as given, the gold answer beside it
        return 1.0 if entry == {"id": "p7", "gold": answer, "tags": [1, 2]} else 0.0
    if kind == "print":  # stdout is not the protocol's
        print("noise", flush=True)
        os.write(1, b"more noise\\n")
        return 1.0
    if kind == "stdin":  # stdin is not the protocol's either
        return 1.0 if sys.stdin.read() == "" else 0.0
    if kind == "cwd":  # the worker runs in the caller's working directory
        return 1.0 if os.path.exists("marker.txt") else 0.0
    if kind == "raise":
        raise RuntimeError("boom")
    if kind == "hang":
        time.sleep(3600)
    if kind == "nan":
        return math.nan
    if kind == "inf":
        return math.inf
    if kind == "none":
        return None
    if kind == "big":
        return 1.5
    if kind == "neg":
        return -0.25
    if kind == "str":
        return "1.0"
    if kind == "list":
        return [1.0]
    if kind == "exit":
        sys.exit(3)
    if kind == "crash":
        os._exit(7)
    raise AssertionError(kind)
'''

# completion kind -> (reward, reason) it must score
EXPECTED = {
    "ok": (1.0, "ok"), "half": (0.5, "wrong"), "true": (1.0, "ok"), "false": (0.0, "wrong"), "int0": (0.0, "wrong"),
    "numpy": (0.25, "wrong"), "entry": (1.0, "ok"), "print": (1.0, "ok"), "stdin": (1.0, "ok"), "cwd": (1.0, "ok"),
    "raise": (0.0, "error"), "hang": (0.0, "timeout"), "nan": (0.0, "bad_value"), "inf": (0.0, "bad_value"),
    "none": (0.0, "bad_value"), "big": (0.0, "bad_value"), "neg": (0.0, "bad_value"), "str": (0.0, "bad_value"),
    "list": (0.0, "bad_value"), "exit": (0.0, "error"), "crash": (0.0, "error"),
}


def _write(path: Path, source: str) -> Path:
    path.write_text(textwrap.dedent(source))
    return path


@pytest.fixture
def user_file(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "marker.txt").write_text("here")
    return _write(tmp_path / "my_reward.py", USER_REWARD)


def test_every_outcome_of_a_user_function_scores_with_its_reason(user_file):
    reward = make_reward("my_reward.py:score", TIMEOUT_S)  # relative to the working directory
    try:
        assert isinstance(reward, CustomReward) and reward.name == "my_reward.py:score"
        kinds = list(EXPECTED)
        # an 'ok' after every item: the worker is back (restarted where it had to be) for the next one
        completions = [c for kind in kinds for c in (f"{kind}:x", "ok:after")]
        entries = [{"id": "p7", "gold": "42", "tags": [1, 2]}] * len(completions)
        got = reward.score_many(completions, ["42"] * len(completions), entries)
        assert got[1::2] == [RewardResult(1.0, "ok")] * len(kinds)
        assert dict(zip(kinds, [(r.reward, r.reason) for r in got[0::2]], strict=True)) == EXPECTED
        # killed after the hang, died of os._exit; sys.exit is caught inside the worker
        assert reward.restarts == 2
    finally:
        reward.close()
    assert {reason for _, reason in EXPECTED.values()} <= set(REWARD_REASONS)


def test_entries_are_optional_and_a_module_target_imports_from_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))  # this process finds it as `python -m treerpo` would
    (tmp_path / "userpkg").mkdir()
    (tmp_path / "userpkg" / "__init__.py").write_text("")
    _write(tmp_path / "userpkg" / "scoring.py", """
        def exact(completion, answer, entry):
            return completion.strip() == answer and entry == {}
    """)
    assert DataConfig(reward="userpkg.scoring:exact").reward == "userpkg.scoring:exact"
    reward = make_reward("userpkg.scoring:exact", TIMEOUT_S)
    try:
        assert reward.score_many([" 12 ", "13"], ["12", "12"]) == [RewardResult(1.0, "ok"), RewardResult(0.0, "wrong")]
    finally:
        reward.close()


def test_a_hang_costs_one_timeout_not_the_caller(user_file):
    reward = make_reward(f"{user_file}:score", 0.5)
    try:
        got = reward.score_many(["hang:", "hang:", "ok:"], ["", "", ""])
        assert [r.reason for r in got] == ["timeout", "timeout", "ok"]
        assert reward.restarts == 2
    finally:
        reward.close()


# -- bad import paths: at config load where the source tells, else when the reward starts --------
@pytest.mark.parametrize(
    "files, target, message",
    [
        ({}, "missing.py:score", r"no file missing\.py"),
        ({}, "dir/missing.py:score", r"no file dir/missing\.py"),
        ({"r.py": "def score(c, a, e):\n    return 1.0\n"}, "r.py:scor", r"defines no 'scor'; did you mean 'score'"),
        ({"r.py": "def other(c, a, e):\n    return 1.0\n"}, "r.py:score",
         r"defines no 'score' \(its functions: \['other'\]\)"),
        ({"r.py": "score = 3\n"}, "r.py:score", r"score is bound to a constant literal, not a function"),
        ({"r.py": "async def score(c, a, e):\n    return 1.0\n"}, "r.py:score", r"async function"),
        ({"r.py": "def score(c, a, e)\n    return 1.0\n"}, "r.py:score", r"r\.py:1: syntax error"),
        ({}, "no_such_pkg_xyz.rewards:score", r"module 'no_such_pkg_xyz\.rewards' not found"),
        ({"upkg/__init__.py": "", "upkg/m.py": "def fn(c, a, e):\n    return 1\n"}, "upkg.m:score",
         r"upkg/m\.py defines no 'score'"),
        ({}, "score", r"unknown reward 'score': give a registered name \(math, arithmetic, dataset\) or a function"),
        ({}, "maths", r"unknown reward 'maths' \(did you mean 'math'\?\)"),
        ({}, "not a module:score", r"'not a module' is neither a dotted module name nor a \.py file"),
        ({}, "r.py:1score", r"give 'package\.module:function' or 'path/to/file\.py:function'"),
    ],
)
def test_bad_targets_fail_at_config_load_and_at_start(tmp_path, monkeypatch, files, target, message):
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    with pytest.raises(ValueError, match=message):  # pydantic's ValidationError is a ValueError
        DataConfig(reward=target)
    with pytest.raises(ConfigError, match=message):
        make_reward(target, TIMEOUT_S)


@pytest.mark.parametrize(
    "source, message",
    [
        ("score = int('3')\n", r"r\.py:score is a int, not a plain function"),
        ("raise RuntimeError('no GPU here')\ndef score(c, a, e):\n    return 1.0\n",
         r"importing .*r\.py failed: RuntimeError: no GPU here"),
        ("import sys\nsys.exit(2)\ndef score(c, a, e):\n    return 1.0\n", r"importing .*r\.py failed: SystemExit: 2"),
        ("import no_such_module_xyz\ndef score(c, a, e):\n    return 1.0\n",
         r"failed: ModuleNotFoundError: No module named 'no_such_module_xyz'"),
        ("def score(completion):\n    return 1.0\n", r"cannot be called as score\(completion, answer, entry\)"),
        ("def make():\n    return 3\nscore = make()\n", r"is a int, not a plain function"),
    ],
)
def test_what_only_running_the_module_tells_fails_when_the_reward_starts(tmp_path, monkeypatch, source, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "r.py").write_text(source)
    DataConfig(reward="r.py:score")  # the source alone looks fine
    with pytest.raises(ConfigError, match=message) as err:
        make_reward("r.py:score", TIMEOUT_S)
    assert "\n" not in str(err.value)  # one line


def test_parse_target():
    assert parse_target("pkg.mod:fn") == ("pkg.mod", "fn", False)
    assert parse_target("rewards/mine.py:score_it") == ("rewards/mine.py", "score_it", True)
    assert parse_target("/abs/c:/x.py:f") == ("/abs/c:/x.py", "f", True)  # the last colon splits
    with pytest.raises(ValueError):
        parse_target("pkg.mod")


ENTRY_CHECK = '''
def same_row(completion, answer, entry):
    # 1 iff the entry is this prompt's reasoning-gym row, its gold answer beside it
    meta = entry["metadata"]
    return entry["answer"] == answer and meta["source_dataset"] == "chain_sum" and isinstance(meta["source_index"], int)
'''


def test_the_sampler_hands_each_leaf_its_prompts_entry(tiny_model_dir, tmp_path):
    # a real tree sampler on the tiny model, reasoning-gym prompts, the entry checked in the worker
    pytest.importorskip("reasoning_gym")
    target = f"{_write(tmp_path / 'entry_check.py', ENTRY_CHECK)}:same_row"
    data = DataConfig(source="reasoning_gym", dataset="chain_sum", reward=target, num_problems=50,
                      num_eval_problems=10)
    engine = hf_engine(tiny_model_dir)
    prompts = PromptSource(data, engine.tokenizer).next_batch(3)
    reward = make_reward(data.reward, 10.0, data)
    try:
        trees = TreeSampler(engine, TreeConfig(depth=2, branching=[2, 2], segment_tokens=3, max_tokens=8), reward,
                            "a").sample(prompts)
    finally:
        reward.close()
    assert [t.prompt_id for t in trees] == [p.prompt_id for p in prompts]
    assert [t.meta["reward_reasons"] for t in trees] == [{"ok": 4}] * 3
    assert all(t.leaf_rewards().tolist() == [1.0] * 4 for t in trees)
