"""A shortened `treerpo demo` as real processes: warm-up, evals, learner + 2 actors, shutdown.

Everything is real: the warm-up and eval subprocesses, the learner (DeepSpeed on gloo), two actor
processes, ZeroMQ, weight sync, the metrics endpoints. Only the sizes shrink (a 1-layer model,
a few warm-up and RL steps, a handful of eval problems).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import torch
from transformers import AutoTokenizer

from learner.evals import read_records
from tests.support.paths import REPO
from treerpo.demo import parse_prometheus
from treerpo.warmup import MARKER, WarmupSettings, encode_examples, ensure_warm_model


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/status")
    try:  # a zombie has exited; only its parent's wait() is missing
        return "\nState:\tZ" not in status.read_text()
    except OSError:
        return False


def _scrape(url: str) -> dict[str, float] | None:
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/metrics", timeout=1.0) as resp:
            return parse_prometheus(resp.read().decode())
    except OSError:
        return None


def test_short_demo_end_to_end(tmp_path):
    run_dir = tmp_path / "run"
    argv = [sys.executable, "-m", "treerpo", "demo", "--run-dir", str(run_dir), "--steps", "3", "--seed", "1",
            "--actors", "2", "--eval-problems", "6", "-k", "2", "--eval-every", "2",
            "--cache-dir", str(tmp_path / "cache"),
            "--warmup-steps", "5", "--model-hidden", "32", "--model-layers", "1", "--no-live",
            "--set", "replay.batch_trees=2", "--set", "actor.prompts_per_batch=1", "--set", "learner.warmup_steps=0",
            # one tree in flight per actor: every batch of 2 holds one tree of each actor
            "--set", "replay.credits_per_actor=1"]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    log = open(tmp_path / "demo.out", "w")
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    seen_pids: set[int] = set()
    actor_scrapes: dict[str, dict[str, float]] = {}
    learner_scrapes = 0
    try:
        deadline = time.monotonic() + 600
        while proc.poll() is None and time.monotonic() < deadline:
            endpoints = run_dir / "endpoints.json"
            if endpoints.exists():
                info = json.loads(endpoints.read_text())
                seen_pids.add(int(info["pid"]))
                if _scrape(info["metrics"]) is not None:
                    learner_scrapes += 1
            for path in (run_dir / "actors").glob("*.json"):
                try:
                    info = json.loads(path.read_text())
                except (OSError, json.JSONDecodeError):
                    continue
                seen_pids.add(int(info["pid"]))
                got = _scrape(info["metrics"])
                if got is not None:
                    actor_scrapes[path.stem] = got
            time.sleep(0.3)
        code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    out = (tmp_path / "demo.out").read_text()
    assert code == 0, out[-4000:]

    summary = json.loads((run_dir / "summary.json").read_text())
    for key in ("accuracy_before", "accuracy_after", "eval_problems", "samples_per_problem", "steps",
                "wall_seconds", "mean_response_tokens_before", "mean_response_tokens_after"):
        assert key in summary, key
    assert 0.0 <= summary["accuracy_before"] <= 1.0 and 0.0 <= summary["accuracy_after"] <= 1.0
    assert summary["eval_problems"] == 6 and summary["samples_per_problem"] == 2 and summary["steps"] == 3
    assert summary["mean_response_tokens_before"] > 0 and summary["mean_response_tokens_after"] > 0

    # trees came from both actors (one of each in every batch of 2), and both loaded newer weights
    # than the first sync's (version 0); the figures are the actors' final ones, which each actor
    # writes on its way out (the 3 steps can pass between two of the demo's scrapes)
    assert len(summary["actors"]) == 2
    assert all(a["trees_sent"] >= 3 for a in summary["actors"].values()), summary["actors"]
    assert all(a["weight_version"] >= 1 for a in summary["actors"].values()), summary["actors"]
    assert summary["weight_syncs"] >= 4  # the first one(s) on registration, then one after each of the 3 steps
    # our own scrapes answered while the demo ran
    assert learner_scrapes >= 1
    assert actor_scrapes and all("treerpo_actor_weight_version" in m for m in actor_scrapes.values())

    # three finite losses, one line per optimizer step
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in rows)

    # the final checkpoint's HF export was evaluated; the plot exists
    after = json.loads((run_dir / "eval_after.json").read_text())
    assert "checkpoints/step-000000003/hf" in after["model"]
    assert (run_dir / "demo.png").stat().st_size > 1000
    # the held-out curve during training: step 0, the final step, step 2 unless the evaluator was busy
    held_out = summary["held_out"]
    assert [r["step"] for r in held_out][0] == 0 and held_out[-1]["step"] == 3
    assert all(r["num_problems"] == 6 and 0 <= r["pass_at_1"] <= 1 for r in held_out)
    assert held_out == [{k: r[k] for k in held_out[0]} for r in read_records(run_dir)]

    # clean shutdown: every child the demo started is gone
    pids = set(summary["pids"].values()) | seen_pids
    assert len(pids) >= 3
    assert [p for p in pids if _alive(p)] == []


def test_warmup_is_cached_by_settings(tmp_path):
    torch.set_num_threads(1)
    small = WarmupSettings(hidden_size=16, num_layers=1, intermediate_size=32, examples=50, steps=2, batch_size=4)
    path, info = ensure_warm_model(small, tmp_path)
    assert not info["cached"] and (path / MARKER).exists() and (path / "config.json").exists()
    again, info2 = ensure_warm_model(small, tmp_path)
    assert again == path and info2["cached"] and info2["final_loss"] == info["final_loss"]
    other, _ = ensure_warm_model(WarmupSettings(**{**small.__dict__, "steps": 3}), tmp_path)
    assert other != path  # another setting, another cache entry
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([path.name, other.name])  # no temp folders left

    # supervised rows: prompt ids as the actors make them, completion + EOS after them

    tok = AutoTokenizer.from_pretrained(str(path))
    ids, prompt_len = encode_examples(small, tok)[0]
    text = tok.decode(ids[:prompt_len])
    assert text.startswith("(") and text.endswith("=") and ids[-1] == tok.eos_token_id
    assert "#" in tok.decode(ids[prompt_len:-1])
