"""Experiment trackers (learner/tracking.py), read back with each library's own reader: TensorBoard's
event accumulator, MLflow's client, W&B's offline run file (its datastore and protobuf records).

A `treerpo up` run feeds all three; what they hold equals what the run directory recorded
(metrics.jsonl, syncs.jsonl, evals.jsonl); the resolved config is each run's parameters; a second learner on the
same run directory continues the same runs; a tracker that fails costs a counted warning, never a
step.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from common.config import load_config
from learner.tracking import Trackers
from tests.support.system import SYSTEM_MODEL, System, metric_value, read_jsonl, scrape
from tests.support.tools import require_module


@pytest.fixture(autouse=True)
def trackers_installed() -> None:
    """Per test, not at import: a run that deselects these tests (the vLLM environment's) never needs them."""
    for module in ("tensorboard", "mlflow", "wandb"):
        require_module(module, "pip install -e '.[tracking]'")


# -- each library's own reader ---------------------------------------------------------------------
def tensorboard_scalars(root: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: PLC0415

    acc = EventAccumulator(str(root / "tracking" / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    out: dict[str, dict[int, float]] = {}
    for tag in acc.Tags()["scalars"]:
        out[tag] = {e.step: e.value for e in acc.Scalars(tag)}
    return out


def mlflow_run(root: Path):
    from mlflow.tracking import MlflowClient  # noqa: PLC0415

    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3's file store is behind this opt-in
    client = MlflowClient(tracking_uri=(root / "tracking" / "mlruns").resolve().as_uri())
    run_id = json.loads((root / "tracking" / "runs.json").read_text())["mlflow"]
    return client, client.get_run(run_id)


def mlflow_history(client, run, key: str) -> dict[int, float]:
    return {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}


def wandb_history(root: Path) -> tuple[dict, list[dict[str, float]]]:
    """(config, history rows) of the run's offline file(s), as W&B's own reader of its transaction
    log prints them (`wandb leet inspect --json`: one record per line)."""
    run_id = json.loads((root / "tracking" / "runs.json").read_text())["wandb"]
    # one folder per start of the run: offline-run-<second>-<id>, "-1", "-2", ... when two start in one second
    files = sorted((root / "tracking" / "wandb").glob(f"wandb/offline-run-*-{run_id}*/run-{run_id}.wandb"))
    assert files, f"no offline W&B file for run {run_id}"
    config, rows = {}, []
    for path in files:
        out = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(path)],
                             capture_output=True, text=True, timeout=120, check=True).stdout
        for line in out.splitlines():
            record = json.loads(line)
            if record["type"] == "history":
                rows.append(record["history"]["item"])
            elif record["type"] == "run":
                config.update(record["run"].get("config", {}).get("update", {}))
    return config, rows


# -- a `treerpo up` run ----------------------------------------------------------------------------------
def test_a_run_reaches_every_tracker_and_each_reads_back_what_the_run_directory_recorded(make_tiny_model, tmp_path):
    overrides = ["tracking.backends=[tensorboard,wandb,mlflow]", "tracking.run_name=t1", "learner.max_steps=4",
                 "weights.bucket_mb=0.05", "learner.eval_every=2", "learner.eval_problems=4", "learner.eval_k=2"]
    system = System(tmp_path / "job", make_tiny_model(**SYSTEM_MODEL), overrides, num_actors=1)
    try:
        system.start()
        system.wait(lambda: system.all_exited(), 600, "the run to reach learner.max_steps and end")
    finally:
        system.stop()
    root = tmp_path / "job"
    steps, syncs = read_jsonl(root / "metrics.jsonl"), read_jsonl(root / "syncs.jsonl")
    assert [r["step"] for r in steps] == [1, 2, 3, 4] and syncs
    evals = {r["step"]: r for r in read_jsonl(root / "evals.jsonl")}  # evaluation during training
    assert 0 in evals and 4 in evals
    cfg = load_config([root / "config.yaml"])

    tb = tensorboard_scalars(root)  # float32 in the event file
    for key in ("loss", "grad_norm", "leaf_reward_mean", "staleness_mean"):
        assert tb[key] == {r["step"]: pytest.approx(r[key], rel=1e-6, abs=1e-12) for r in steps}, key
    assert tb["sync/seconds"] and all(any(v == pytest.approx(s["seconds"], rel=1e-6) for s in syncs)
                                      for v in tb["sync/seconds"].values())
    assert set(tb["sync/confirmed"].values()) == {1.0}
    assert tb["eval/pass_at_1"] == {s: pytest.approx(r["pass_at_1"], rel=1e-6) for s, r in evals.items()}
    assert tb["eval/pass_at_2"] == {s: pytest.approx(r["pass_at_k"], rel=1e-6) for s, r in evals.items()}

    client, run = mlflow_run(root)  # doubles: exact
    assert run.info.run_name == "t1" and run.info.status == "FINISHED"
    for key in ("loss", "grad_norm", "accuracy", "version"):
        assert mlflow_history(client, run, key) == {r["step"]: r[key] for r in steps}, key
    assert run.data.params["loss.clip_low"] == str(cfg.loss.clip_low)
    assert run.data.params["tree.branching"] == str(cfg.tree.branching)
    assert mlflow_history(client, run, "sync/bytes")  # every sync, at the step it followed
    assert {v for v in mlflow_history(client, run, "sync/bytes").values()} == {float(syncs[-1]["bytes"])}
    assert mlflow_history(client, run, "eval/pass_at_1") == {s: r["pass_at_1"] for s, r in evals.items()}
    assert mlflow_history(client, run, "eval/mean_response_tokens") == {s: r["mean_response_tokens"]
                                                                        for s, r in evals.items()}

    config, rows = wandb_history(root)
    trained = {int(r["step"]): r for r in rows if "loss" in r}
    assert {s: r["loss"] for s, r in trained.items()} == {r["step"]: r["loss"] for r in steps}
    assert config["learner.max_steps"] == 4 and config["tree.branching"] == cfg.tree.branching
    assert any("sync/seconds" in r for r in rows)
    assert {int(r["step"]): r["eval/pass_at_1"] for r in rows if "eval/pass_at_1" in r} == {
        s: r["pass_at_1"] for s, r in evals.items()}


def test_a_failing_tracker_is_a_counted_warning_and_training_goes_on(make_tiny_model, tmp_path):
    # TensorBoard cannot create its directory (a file stands where it goes: what a full or read-only
    # disk does to it); MLflow beside it gets every point
    root = tmp_path / "job"
    (root / "tracking").mkdir(parents=True)
    (root / "tracking" / "tensorboard").write_text("in the way")
    overrides = ["tracking.backends=[tensorboard,mlflow]", "learner.max_steps=3", "weights.bucket_mb=0.05",
                 "metrics.learner_port=0"]
    system = System(root, make_tiny_model(**SYSTEM_MODEL), overrides, num_actors=1)
    try:
        system.start()
        system.wait(lambda: len(system.steps()) >= 2, 600, "two steps")
        text = scrape(system.learner_metrics_url())
        system.wait(lambda: system.all_exited(), 600, "the run to end")
    finally:
        system.stop()
    assert [r["step"] for r in read_jsonl(root / "metrics.jsonl")] == [1, 2, 3]
    assert metric_value(text, "treerpo_learner_tracker_errors_total", backend="tensorboard") >= 1
    assert metric_value(text, "treerpo_learner_tracker_errors_total", backend="mlflow") == 0
    assert "tracker tensorboard: start failed" in system.log_tail("learner", 400)
    client, run = mlflow_run(root)
    assert sorted(mlflow_history(client, run, "loss")) == [1, 2, 3]


# -- the Trackers object directly --------------------------------------------------------------------
def test_a_resumed_learner_continues_the_same_tracker_runs(tmp_path):
    cfg = load_config("demo", ["tracking.backends=[tensorboard,wandb,mlflow]"])
    first = Trackers(cfg, tmp_path)
    for step in (1, 2):
        first.log({"loss": 1.0 / step}, step)
    first.close()
    runs = json.loads((tmp_path / "tracking" / "runs.json").read_text())
    assert set(runs) == {"tensorboard", "wandb", "mlflow"} and first.errors == {b: 0 for b in runs}

    second = Trackers(cfg, tmp_path)  # the learner restarted from its checkpoint at step 2
    for step in (2, 3):
        second.log({"loss": 1.0 / step + 0.5}, step)
    second.close()
    assert json.loads((tmp_path / "tracking" / "runs.json").read_text()) == runs and second.errors == first.errors

    client, run = mlflow_run(tmp_path)
    history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss"))
    assert history == [(1, 1.0), (2, 0.5), (2, 1.0), (3, 1.0 / 3 + 0.5)]
    assert len(client.search_runs([run.info.experiment_id])) == 1
    assert tensorboard_scalars(tmp_path)["loss"][3] == pytest.approx(1.0 / 3 + 0.5, rel=1e-6)
    _, rows = wandb_history(tmp_path)
    assert [(int(r["step"]), r["loss"]) for r in rows if "loss" in r] == [(1, 1.0), (2, 0.5), (2, 1.0),
                                                                          (3, 1.0 / 3 + 0.5)]


def test_points_that_are_not_finite_numbers_are_left_out():
    from learner.tracking import numeric  # noqa: PLC0415

    got = numeric({"step": 3, "time": 1.5, "loss": 0.25, "ok": True, "ids": [1], "nan": math.nan, "n": 2})
    assert got == {"loss": 0.25, "n": 2.0}
