"""bench/study.py end to end on a random tiny model: two methods through `treerpo up` at one token
budget, checkpoints evaluated along the way, and the report built from the result files."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.support.paths import REPO

STUDY = REPO / "bench" / "study.py"
SMALL = ["--tiny", "--budget", "9000", "--points", "2", "--seeds", "0", "--lrs", "1e-4",
         "--eval-problems", "6", "--val-problems", "4", "-k", "2"]


def test_study_runs_both_methods_to_the_same_budget_and_reports(tmp_path):
    out, docs = tmp_path / "study", tmp_path / "docs"
    proc = subprocess.run([sys.executable, str(STUDY), "sweep", "--out", str(out), *SMALL],
                          capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    results = {p.parent.name: json.loads(p.read_text()) for p in (out / "runs").glob("*/result.json")}
    assert set(results) == {"treerpo-lr0.0001-s0", "grpo-lr0.0001-s0"}
    for r in results.values():
        tokens = [p["tokens"] for p in r["points"]]
        assert tokens[0] == 0 and tokens == sorted(tokens) and len(tokens) >= 3  # start, a checkpoint, the end
        assert tokens[-1] >= 9000 > tokens[-2]  # stopped at the first step that reached the budget
        assert all(0.0 <= p["pass_at_1"] <= 1.0 and 0.0 <= p["val_pass_at_1"] <= 1.0 for p in r["points"])
        # the three budgets, cumulative: every step is one update here (k = 1) and trains 16 trees
        steps = [p["step"] for p in r["points"]]
        assert [p["updates"] for p in r["points"]] == steps
        assert [p["prompts"] for p in r["points"]] == [16 * s for s in steps]
        assert r["points"][0]["pass_at_1"] == results["grpo-lr0.0001-s0"]["points"][0]["pass_at_1"]  # same start
        assert not any((out / "runs" / r["run"] / "checkpoints").glob("step-*"))  # evaluated, then removed
        # the trees log covers every tree: the length groups hold all received trees, trained ones among them
        received = [e for e in map(json.loads, (out / "runs" / r["run"] / "trees.jsonl").read_text().splitlines())
                    if e["event"] == "received"]
        assert sum(b["trees"] for b in r["length_bias"]) == len(received) >= 16 * steps[-1]
    # a second sweep finds every result and runs nothing
    again = subprocess.run([sys.executable, str(STUDY), "sweep", "--out", str(out), *SMALL],
                           capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert again.returncode == 0 and "[study]" not in again.stdout
    rep = subprocess.run([sys.executable, str(STUDY), "report", "--out", str(out), "--docs", str(docs)],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert rep.returncode == 0, rep.stderr[-3000:]
    assert "| treerpo | 0.0001 | 1 |" in rep.stdout and "| grpo | 0.0001 | 1 |" in rep.stdout
    bias = subprocess.run([sys.executable, str(STUDY), "bias", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert bias.returncode == 0 and "| treerpo | 0.0001 | 1 | 1 of 4 |" in bias.stdout, bias.stdout + bias.stderr
    rows = json.loads((docs / "study_results.json").read_text())
    assert {r["name"] for r in rows} == {"treerpo", "grpo"}
