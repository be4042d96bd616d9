"""Evaluation during training, the learner's side (learner.eval_every; design §8.5).

The learner never generates: at step 0, every `learner.eval_every` steps and at its end it exports
the current weights as an HF folder, and an evaluator process (`treerpo evaluator`, which `treerpo
up` runs beside it) scores them on the held-out set and appends one record per evaluation to
RUN_DIR/evals.jsonl. The learner reads those records back into Prometheus and the trackers.

The exchange, all under RUN_DIR/evals/:

* `step-<N>/`: an export (save_pretrained + tokenizer) and `request.json` ({step, version,
  generated_tokens, time}), renamed into place complete; the evaluator deletes the folder once its
  record is in evals.jsonl;
* `evaluator.json`: the evaluator's heartbeat ({pid, time}), rewritten every poll;
* `finished.json`: written by a learner that reached its end (after its final evaluation), removed
  by a learner that starts; the evaluator exits 0 once it is there and no export waits.

Guarantees:
* training never waits for an evaluation: while an export is still waiting for the evaluator,
  the next one is skipped and counted (`treerpo_learner_evals_skipped_total`), so at most one
  export sits on disk;
* a learner that reached its end (`learner.max_steps`, the token budget) requests its final
  weights' evaluation and waits for it up to `learner.eval_final_wait_s`, only while an evaluator
  heartbeats; a stop by signal does not wait;
* evals.jsonl is read from where the last read ended, whole lines only, so each record reaches
  Prometheus and the trackers once per learner process (a restarted learner reads it again from
  the start: its gauges show the latest record, the trackers get the records after the last one
  they had, by step).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common.rundir import read_json, read_jsonl, write_json_atomic

log = logging.getLogger("treerpo.learner.evals")

EVALS_DIR = "evals"
EVALS_FILE = "evals.jsonl"
REQUEST = "request.json"
HEARTBEAT = "evaluator.json"
FINISHED = "finished.json"  # the learner reached its end: the evaluator exits once nothing waits
HEARTBEAT_S = 2.0  # the evaluator rewrites its heartbeat at least this often while idle
ALIVE_S = 60.0  # a heartbeat older than this: no evaluator (an evaluation of a large model beats mid-run)


def evals_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / EVALS_DIR


def export_name(step: int) -> str:
    return f"step-{step:09d}"


def pending_exports(run_dir: str | Path) -> list[Path]:
    """Complete exports waiting for the evaluator, oldest step first."""
    root = evals_dir(run_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if (p / REQUEST).is_file())


def evaluator_alive(run_dir: str | Path, now: float | None = None) -> bool:
    """True while an evaluator heartbeats (its evaluator.json is younger than ALIVE_S)."""
    try:
        beat = read_json(evals_dir(run_dir) / HEARTBEAT)
    except (OSError, ValueError):
        return False
    return (time.time() if now is None else now) - float(beat.get("time", 0.0)) < ALIVE_S


def eval_point(record: dict[str, Any]) -> dict[str, float]:
    """An evals.jsonl record as tracker values (eval/*)."""
    out = {"eval/pass_at_1": float(record["pass_at_1"]),
           f"eval/pass_at_{record['k']}": float(record["pass_at_k"]),
           "eval/mean_response_tokens": float(record["mean_response_tokens"]),
           "eval/problems": float(record["num_problems"])}
    return out


class EvalRequests:
    """The learner's end of the exchange: export the weights for the evaluator, read its records back."""

    def __init__(self, run_dir: str | Path, every: int, export: Callable[[Path], Any]) -> None:
        self.run_dir = Path(run_dir)
        self.every = every
        self._export = export  # Trainer.export_hf (rank 0; under ZeRO-3 the other ranks join the gather)
        self._offset = 0  # evals.jsonl bytes read
        self.requested: set[int] = set()  # steps this process exported
        self.skipped: set[int] = set()  # steps whose export was skipped (the evaluator was busy)
        self.latest: dict[str, Any] | None = None  # the last record read
        if every:
            root = evals_dir(self.run_dir)
            root.mkdir(parents=True, exist_ok=True)
            for stale in root.glob(".tmp-*"):  # an export a killed learner left half written
                shutil.rmtree(stale, ignore_errors=True)
            (root / FINISHED).unlink(missing_ok=True)  # this learner goes on

    @property
    def enabled(self) -> bool:
        return self.every > 0

    def due(self, step: int) -> bool:
        return self.enabled and step % self.every == 0 and step not in self.requested and step not in self.skipped

    def evaluated_steps(self) -> set[int]:
        return {int(r["step"]) for r in read_records(self.run_dir)}

    def request(self, step: int, version: int, generated_tokens: int) -> bool:
        """Export the current weights as evals/step-<step> for the evaluator. False (nothing written) when
        an earlier export still waits for it: the evaluation is skipped, training never waits."""
        waiting = pending_exports(self.run_dir)
        if waiting:
            self.skipped.add(step)
            log.warning("evaluation of step %d skipped: the evaluator has not taken %s yet (is it running? it is "
                        "slower than learner.eval_every=%d steps of training)", step, waiting[0].name, self.every)
            return False
        root = evals_dir(self.run_dir)
        tmp = root / f".tmp-{export_name(step)}-{uuid.uuid4().hex[:8]}"
        try:
            self._export(tmp)
            write_json_atomic(tmp / REQUEST, {"step": step, "version": version,
                                              "generated_tokens": int(generated_tokens), "time": time.time()})
            final = root / export_name(step)
            shutil.rmtree(final, ignore_errors=True)  # a restarted learner's own step again
            tmp.rename(final)
        except Exception:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self.requested.add(step)
        return True

    def poll(self) -> list[dict[str, Any]]:
        """Records appended to evals.jsonl since the last poll (whole lines only)."""
        path = self.run_dir / EVALS_FILE
        try:
            with open(path, "rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return []
        end = data.rfind(b"\n") + 1
        self._offset += end
        out = []
        for line in data[:end].splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                log.warning("evals.jsonl: a line that is not JSON skipped: %.80r", line)
        if out:
            self.latest = out[-1]
        return out

    def finish(self, step: int, version: int, generated_tokens: int, timeout_s: float,
               on_records: Callable[[list[dict[str, Any]]], None], tick_s: float = 0.5) -> bool:
        """The end of the run: export `step` (once the evaluator took the previous export) and feed records to
        `on_records` until the one of `step` arrived (True), the timeout passed or no evaluator heartbeats
        (False)."""
        deadline = time.monotonic() + timeout_s
        done = step in self.evaluated_steps()
        while True:
            records = self.poll()
            if records:
                on_records(records)
            done = done or any(int(r["step"]) == step for r in records)
            if done:
                return True
            if step not in self.requested and not pending_exports(self.run_dir):
                self.request(step, version, generated_tokens)
            if time.monotonic() >= deadline or not evaluator_alive(self.run_dir):
                return False
            time.sleep(tick_s)


def mark_finished(run_dir: str | Path, step: int) -> None:
    """The learner reached its end at `step`: the evaluator may exit once no export waits."""
    write_json_atomic(evals_dir(run_dir) / FINISHED, {"step": step, "time": time.time()})


def run_finished(run_dir: str | Path) -> bool:
    return (evals_dir(run_dir) / FINISHED).is_file()


def read_records(run_dir: str | Path) -> list[dict[str, Any]]:
    """Every complete record of RUN_DIR/evals.jsonl, in order."""
    return read_jsonl(Path(run_dir) / EVALS_FILE)
