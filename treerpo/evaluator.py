"""`treerpo evaluator`: evaluation during training (learner.eval_every; design §8.5).

Scores the weights the learner exports under RUN_DIR/evals/step-N (learner/evals.py) on the
held-out set, oldest first, and appends one record per export to RUN_DIR/evals.jsonl:
{step, version, generated_tokens, time, k, pass_at_1, pass_at_k, pass_at, mean_response_tokens,
num_problems, reasons, seconds, eval_tokens}. `treerpo up` runs it beside the learner when
`learner.eval_every` is set; elsewhere run it where it sees the run directory
(deploy/scripts/launch_evaluator.sh: launch_local.sh, and the learner pod's sidecar in Kubernetes).
With `learner.eval_every` 0 it idles until stopped.

Guarantees:
* the held-out set is the first `learner.eval_problems` problems of the data source's held-out
  split (`common.data.held_out_config`), the same every evaluation, sampled with the same seed
  (so two evaluations differ by the weights, not by the draw); prompts are built as the actors
  build them, and scored as `treerpo eval` scores them (`treerpo.eval.evaluate`);
* before the first evaluation the set is checked against the training prompts
  (`common.data.held_out_overlap`): a held-out problem the training stream can serve ends the
  evaluator with DataError (one line, exit 4), naming the problems;
* it runs at nice 10 with `learner.eval_threads` torch threads, so actors and learner keep the
  CPU; it heartbeats RUN_DIR/evals/evaluator.json while it lives (its ready file);
* an export is deleted only after its record is in evals.jsonl; SIGTERM/SIGINT end it after the
  evaluation in progress, exit 0; so does a learner that reached its end (evals/finished.json) once
  no export waits.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any

import torch

from actor.engines import make_engine
from common.config import JobConfig, load_config
from common.data import PromptSource, held_out_config, held_out_overlap
from common.errors import DataError
from common.rewards import make_reward
from common.rundir import read_json, require_model_path, setup_logging, write_json_atomic
from learner.evals import EVALS_FILE, HEARTBEAT, HEARTBEAT_S, REQUEST, evals_dir, pending_exports, run_finished
from treerpo.eval import evaluate, split_fitting, summarise

log = logging.getLogger("treerpo.evaluator")
POLL_S = 0.5


def held_out_prompts(cfg: JobConfig, tokenizer) -> list:
    """The evaluation set: the first learner.eval_problems held-out prompts, checked against training."""
    held = held_out_config(cfg.data)
    prompts = PromptSource(held, tokenizer).all_prompts()[:cfg.learner.eval_problems]
    overlap = held_out_overlap(cfg.data, prompts)
    if overlap:
        raise DataError(f"the held-out set shares {len(overlap)} of its {len(prompts)} problems with the training "
                        f"prompts (e.g. {', '.join(overlap[:3])}): give data.eval_paths problems that are not in "
                        "data.paths")
    return prompts


class Evaluator:
    def __init__(self, cfg: JobConfig, run_dir: Path) -> None:
        from transformers import AutoTokenizer  # noqa: PLC0415

        self.cfg, self.run_dir = cfg, run_dir
        self.stop = threading.Event()
        lc = cfg.learner
        self.k = lc.eval_k
        self.temperature = cfg.tree.temperature if lc.eval_temperature is None else lc.eval_temperature
        self.max_tokens = cfg.tree.max_tokens
        tokenizer = AutoTokenizer.from_pretrained(require_model_path(cfg),
                                                  trust_remote_code=cfg.model.trust_remote_code)
        self.prompts = held_out_prompts(cfg, tokenizer)
        self.reward = make_reward(cfg.data.reward, cfg.data.reward_timeout_s, cfg.data)
        evals_dir(run_dir).mkdir(parents=True, exist_ok=True)
        log.info("held-out set: %d problems x %d samples (temperature %.2f, max_tokens %d), checked disjoint "
                 "from the training prompts", len(self.prompts), self.k, self.temperature, self.max_tokens)

    def heartbeat(self) -> None:
        write_json_atomic(evals_dir(self.run_dir) / HEARTBEAT, {"pid": os.getpid(), "time": time.time()})

    def _beat(self) -> None:
        while not self.stop.wait(HEARTBEAT_S):
            self.heartbeat()

    def run(self) -> int:
        self.heartbeat()
        threading.Thread(target=self._beat, name="heartbeat", daemon=True).start()
        try:
            while not self.stop.is_set():
                waiting = pending_exports(self.run_dir)
                if not waiting:
                    if run_finished(self.run_dir):
                        log.info("the learner reached its end and every export is evaluated: exiting")
                        break
                    self.stop.wait(POLL_S)
                    continue
                self.evaluate_export(waiting[0])
        finally:
            self.stop.set()
            self.reward.close()
        return 0

    def evaluate_export(self, folder: Path) -> dict[str, Any]:
        request = read_json(folder / REQUEST)
        model_cfg = self.cfg.model.model_copy(update={"path": str(folder)})
        actor_cfg = self.cfg.actor.model_copy(update={
            "engine": "hf", "max_batch_rows": max(self.cfg.actor.max_batch_rows, 16 * self.k)})
        engine = make_engine(model_cfg, actor_cfg, seed=self.cfg.learner.seed)
        try:
            prompts, too_long = split_fitting(self.prompts, getattr(engine, "max_positions", None), self.max_tokens)
            started = time.perf_counter()
            rewards, lengths, reasons = evaluate(engine, prompts, self.reward, k=self.k, temperature=self.temperature,
                                                 max_tokens=self.max_tokens, top_p=self.cfg.tree.top_p,
                                                 batch_prompts=16, seed=self.cfg.learner.seed)
            seconds = time.perf_counter() - started
        finally:
            engine.close()
        pass_at, mean_len, _ = summarise(prompts, rewards, lengths, self.k)
        record = {"step": int(request["step"]), "version": int(request["version"]),
                  "generated_tokens": int(request["generated_tokens"]), "time": time.time(), "k": self.k,
                  "pass_at_1": pass_at["1"], "pass_at_k": pass_at[str(self.k)], "pass_at": pass_at,
                  "mean_response_tokens": mean_len, "num_problems": len(prompts), "skipped": len(too_long),
                  "reasons": dict(reasons), "seconds": seconds,
                  "eval_tokens": int(sum(sum(row) for row in lengths))}
        with open(self.run_dir / EVALS_FILE, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        shutil.rmtree(folder, ignore_errors=True)
        log.info("step %d: held-out pass@1 %.4f, pass@%d %.4f, %.1f tokens per response (%d problems, %.1f s)",
                 record["step"], record["pass_at_1"], self.k, record["pass_at_k"], mean_len, len(prompts), seconds)
        return record


def idle(why: str) -> int:
    """Nothing to evaluate: wait for SIGTERM/SIGINT (a sidecar that exited would be restarted), exit 0."""
    log.info("%s: nothing to evaluate; idle until stopped", why)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    while not stop.wait(3600):
        pass
    return 0


def run(args) -> int:
    setup_logging("evaluator")
    cfg = load_config(args.config, args.overrides)
    run_dir = Path(args.run_dir or cfg.run_dir)
    if not cfg.learner.eval_every:
        return idle("learner.eval_every is 0")
    try:
        os.nice(10)
    except OSError:
        pass
    torch.set_num_threads(cfg.learner.eval_threads)
    evaluator = Evaluator(cfg, run_dir)
    signal.signal(signal.SIGTERM, lambda *_: evaluator.stop.set())
    signal.signal(signal.SIGINT, lambda *_: evaluator.stop.set())
    return evaluator.run()
