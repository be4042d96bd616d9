"""Every bench/NAME.py runs from a checkout and keeps design §10's output contract.

Each bench runs at a tiny size in a fresh process from a foreign working directory; the test
checks the exit status and the last stdout line: one JSON object whose `ratio` and `target` are
finite numbers. Nothing here looks at how fast anything was (timings belong in bench/).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.paths import REPO

BENCH = REPO / "bench"

SMALL_ARGS = {
    "wire": ["--iters", "20", "--repeats", "2", "--batch", "4"],
    "wire_floor": ["--iters", "50", "--repeats", "2"],
    "sampler": ["--prompts", "2", "--branching", "2,2", "--segment-tokens", "4", "--max-tokens", "12",
                "--window-trees", "2", "--repeats", "1", "--hidden", "32", "--threads", "1"],
    "packing": ["--trees", "2", "--prompt-tokens", "16", "--segment-tokens", "8", "--branching", "2,2",
                "--hidden-size", "32", "--layers", "1", "--reps", "1", "--threads", "1"],
    "weights": ["--vocab", "512", "--hidden", "64", "--layers", "1", "--ffn", "128", "--reps", "1",
                "--warmup", "1"],
    "load": ["--tiny"],  # a real learner + 1 synthetic actor over CURVE, a 4 s window (~25 s)
    "async": ["--tiny"],  # `treerpo up` in sync then async mode, 8 steps each on a random tiny model (~75 s)
    "transport": ["--tiny"],  # the learner's ingest path + 1 actor process over CURVE, 300 trees (~15 s)
    "lora": ["--model", "tiny", "--rank", "4", "--reps", "1", "--tree-tokens", "64"],  # full vs LoRA (~40 s)
    "trl": ["--tiny"],  # TRL's GRPOTrainer, then `treerpo up` flat and as a tree, a random tiny chat model (~40 s)
}


# not benchmarks with a same-run ratio, each with its own test
CHECKS = {"gpu_check": "tests/integration/test_gpu_check.py", "study": "tests/integration/test_study.py"}


def test_every_bench_script_is_covered():
    assert sorted(p.stem for p in BENCH.glob("*.py") if p.stem not in CHECKS) == sorted(SMALL_ARGS)


def run_bench(name: str, tmp_path: Path) -> dict:
    proc = subprocess.run([sys.executable, str(BENCH / f"{name}.py"), "--json", *SMALL_ARGS[name]],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"bench/{name}.py exited {proc.returncode}:\n{proc.stderr[-3000:]}"
    assert "terminate called" not in proc.stderr, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("ratio", "target"):
        assert isinstance(out[key], (int, float)) and math.isfinite(out[key]), (key, out)
    return out


@pytest.mark.parametrize("name", sorted(SMALL_ARGS))
def test_bench_prints_design_json(name, tmp_path):
    out = run_bench(name, tmp_path)
    if name == "wire_floor":
        # the bound is the larger of the Python and (where it compiled) the C floor
        ratios = [out["py_max_ratio"]] + ([out["c_max_ratio"]] if out["c_max_ratio"] is not None else [])
        assert out["ratio"] == max(ratios)
        assert out["c_max_ratio"] is not None or out["c_unavailable"]
    if name == "wire":
        assert out["nodes"] == 14 and out["tokens"] == 512 + 14 * 384
    if name == "async":  # sync mode trains every tree on the weights that made it
        assert out["sync_staleness_mean"] == 0.0 and out["sync_trees_per_s"] > 0 and out["async_trees_per_s"] > 0
    if name == "load":  # the accounting is a correctness property, not a timing: it must hold exactly
        level = out["levels"][0]
        assert level["sent"] > 0 and level["exact"] and out["all_exact"], level
    if name == "lora":  # a LoRA sync sends only the adapter; only it trains
        assert out["sync"]["lora"]["bytes"] < out["sync"]["full"]["bytes"] / 4
        assert out["learner"]["lora"]["trainable_params"] < out["learner"]["full"]["trainable_params"] / 4
    if name == "trl":  # each run went to the token budget; only the tree's samples share prefixes
        runs = out["runs"]
        assert sorted(runs) == ["grpo", "tree", "trl"]
        assert all(r["generated_tokens"] >= out["tokens"] for r in runs.values())
        assert runs["trl"]["path_tokens"] == runs["trl"]["generated_tokens"]
        assert runs["grpo"]["path_tokens"] == runs["grpo"]["generated_tokens"]
        assert runs["tree"]["path_tokens"] > runs["tree"]["generated_tokens"]
    if name == "transport":  # every tree queued was accepted into the buffer, none dropped
        assert out["sent"] >= out["measured_trees"] >= 300 and out["exact"], out
        # the loop alone admitted each of its 300 trees once (it raises otherwise), in both passes
        calls = out["alone_ingest_us_by_call"]
        assert out["alone_trees"] == 300 and calls["decode_tree"] > 0 and calls["buffer.add"] > 0
        assert out["alone_ratio"] == pytest.approx(out["codec_cpu_us_per_tree"] / out["alone_gil_us_per_tree"])
