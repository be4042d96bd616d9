"""Experiment trackers: TensorBoard, W&B and MLflow, fed from the one metric table (design §11).

`tracking.backends` names them (none by default). What a tracker receives is what the run
directory records, under the same names (common/metrics.py):

* every step record (`metrics.jsonl`): each numeric key of it, at the learner's step;
* every weight sync (`syncs.jsonl`): `sync/seconds`, `sync/members`, `sync/confirmed`, `sync/bytes`
  and `sync/version`, at the step it followed;
* the resolved config, flattened to dotted keys (`loss.clip_low`), as the run's parameters.

Guarantees:

* **A tracker never stops or slows training.** The learner hands points to `Trackers.log`, which
  only queues them (a bounded queue: a point that finds it full is dropped and logged); one
  thread of this class calls the backends. Whatever a backend raises, at start-up or on any
  call (disk full, server gone, a library bug), is counted in
  `treerpo_learner_tracker_errors_total{backend}` and logged (the first error and then every
  `LOG_EVERY`-th), and the backend is tried again with the next point (one that failed to start,
  at most every `RESTART_S`): it comes back when its cause goes away. `close()` flushes within `CLOSE_TIMEOUT_S`.
* **A resumed learner continues the same runs.** The run ids live in
  `RUN_DIR/tracking/runs.json`: W&B resumes its run (`resume="allow"`), MLflow logs to the same
  run id, TensorBoard writes a new event file into the same directory (its reader merges them).
  Every point carries the learner's step as its x-axis (W&B: `define_metric` over the `step` key,
  so points of a resumed run that repeat steps are kept), and the parameters are logged once,
  when the run is created.
* Where things go: TensorBoard in `RUN_DIR/tracking/tensorboard`; W&B in `RUN_DIR/tracking/wandb`
  (offline by default: `tracking.wandb_mode`; `wandb sync` uploads it later); MLflow to
  `tracking.mlflow_uri`, by default a local file store in `RUN_DIR/tracking/mlruns` (MLflow 3 keeps
  that store in maintenance mode behind MLFLOW_ALLOW_FILE_STORE, which the learner sets for a
  `file:` URI; `tracking.mlflow_uri: sqlite:///...` or a server gets its database backend).

Only learner rank 0 tracks. The libraries are imported when a backend starts, so a job without
trackers never imports them.
"""

from __future__ import annotations

import json
import logging
import math
import os
import queue
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from common.config import JobConfig, TrackingConfig, config_params
from common.rundir import write_json_atomic

log = logging.getLogger(__name__)

QUEUE_POINTS = 10_000  # points waiting for the tracker thread; beyond it a point is dropped (logged)
LOG_EVERY = 100  # a backend's errors after its first are logged once per this many
RESTART_S = 30.0  # a backend that failed to start is started again at most this often
CLOSE_TIMEOUT_S = 30.0  # close(): how long the queued points may take to reach the backends
RUNS_FILE = "runs.json"  # RUN_DIR/tracking/: each backend's run id, for a resumed learner


def numeric(record: Mapping[str, Any], prefix: str = "", skip: tuple[str, ...] = ("step", "time")) -> dict[str, float]:
    """The finite numbers of a record (bools and lists left out), keys prefixed."""
    out = {}
    for k, v in record.items():
        if k in skip or isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if math.isfinite(float(v)):
            out[prefix + k] = float(v)
    return out


def sync_point(record: Mapping[str, Any]) -> dict[str, float]:
    """A syncs.jsonl record as tracker values."""
    return {"sync/seconds": float(record["seconds"]), "sync/members": float(len(record["members"])),
            "sync/confirmed": float(len(record["confirmed"])), "sync/bytes": float(record["bytes"]),
            "sync/version": float(record["version"])}


class _TensorBoard:
    name = "tensorboard"

    def __init__(self, root: Path, cfg: TrackingConfig, params: dict[str, Any], runs: dict[str, str]) -> None:
        from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415 -- only when the backend is on

        self.writer = SummaryWriter(log_dir=str(root / "tensorboard"))
        if "tensorboard" not in runs:
            text = "\n".join(f"    {k} = {v}" for k, v in params.items())
            self.writer.add_text("config", text, 0)
            runs["tensorboard"] = str(root / "tensorboard")

    def log(self, values: dict[str, float], step: int) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class _WandB:
    name = "wandb"

    def __init__(self, root: Path, cfg: TrackingConfig, params: dict[str, Any], runs: dict[str, str]) -> None:
        import wandb  # noqa: PLC0415 -- only when the backend is on
        from wandb.sdk.lib.runid import generate_id  # noqa: PLC0415

        run_id = runs.get("wandb") or generate_id()
        (root / "wandb").mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=cfg.project, name=cfg.run_name, id=run_id, resume="allow",
                              mode=cfg.wandb_mode, dir=str(root / "wandb"),
                              config=None if "wandb" in runs else params,
                              settings=wandb.Settings(console="off", x_disable_stats=True, silent=True))
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")
        runs["wandb"] = run_id

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log({"step": step, **values})

    def flush(self) -> None:
        pass  # the W&B service writes as it receives

    def close(self) -> None:
        self.run.finish()


class _MLflow:
    name = "mlflow"

    def __init__(self, root: Path, cfg: TrackingConfig, params: dict[str, Any], runs: dict[str, str]) -> None:
        from mlflow.entities import Param  # noqa: PLC0415 -- only when the backend is on
        from mlflow.tracking import MlflowClient  # noqa: PLC0415

        uri = cfg.mlflow_uri or (root / "mlruns").resolve().as_uri()
        if uri.startswith("file:"):  # MLflow 3 keeps its file store in maintenance mode, behind this opt-in
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=uri)
        run_id = runs.get("mlflow")
        if run_id is None:
            experiment = self.client.get_experiment_by_name(cfg.project)
            experiment_id = (experiment.experiment_id if experiment is not None
                             else self.client.create_experiment(cfg.project))
            run_id = self.client.create_run(experiment_id, run_name=cfg.run_name).info.run_id
            items = [Param(k, str(v)[:6000]) for k, v in params.items()]
            for i in range(0, len(items), 100):  # MLflow takes at most 100 parameters per batch
                self.client.log_batch(run_id, params=items[i:i + 100])
            runs["mlflow"] = run_id
        else:
            self.client.update_run(run_id, status="RUNNING")
        self.run_id = run_id

    def log(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric  # noqa: PLC0415

        now = int(time.time() * 1000)
        items = [Metric(k, v, now, step) for k, v in values.items()]
        for i in range(0, len(items), 1000):  # MLflow takes at most 1000 metrics per batch
            self.client.log_batch(self.run_id, metrics=items[i:i + 1000])

    def flush(self) -> None:
        pass  # every call is written when it returns

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


BACKENDS = {"tensorboard": _TensorBoard, "wandb": _WandB, "mlflow": _MLflow}


class Trackers:
    """The configured backends, fed on a thread of their own (module docstring)."""

    def __init__(self, cfg: JobConfig, run_dir: Path, on_error=None) -> None:
        self.cfg = cfg.tracking
        self.root = Path(run_dir) / "tracking"
        self.on_error = on_error or (lambda backend: None)  # counts a backend's error (the learner's metric)
        self.errors: dict[str, int] = {name: 0 for name in self.cfg.backends}
        self.dropped = 0
        self._params = config_params(cfg)
        self._backends: dict[str, Any] = {}
        self._restart_at: dict[str, float] = {}  # backend -> when a failed start may be tried again
        self._queue: queue.Queue = queue.Queue(QUEUE_POINTS)
        self._thread: threading.Thread | None = None
        if self.cfg.backends:
            self._thread = threading.Thread(target=self._run, name="trackers", daemon=True)
            self._thread.start()

    def log(self, values: Mapping[str, float], step: int) -> None:
        """Queue one point (never blocks; a full queue drops it)."""
        if self._thread is None or not values:
            return
        try:
            self._queue.put_nowait(("log", dict(values), int(step)))
        except queue.Full:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % LOG_EVERY == 0:
                log.warning("trackers: %d points dropped so far: the trackers are slower than training "
                            "(their queue holds %d points)", self.dropped, QUEUE_POINTS)

    def close(self, timeout_s: float = CLOSE_TIMEOUT_S) -> None:
        """Send what is queued, close every backend; returns by `timeout_s` whatever they do."""
        if self._thread is None:
            return
        try:
            self._queue.put(("close", None, 0), timeout=timeout_s)
        except queue.Full:
            pass
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            log.warning("trackers: not closed within %.0f s; what was still queued may be missing", timeout_s)
        self._thread = None

    # -- the tracker thread ---------------------------------------------------------------------
    def _failed(self, backend: str, what: str, e: BaseException) -> None:
        self.errors[backend] += 1
        self.on_error(backend)
        n = self.errors[backend]
        if n == 1 or n % LOG_EVERY == 0:
            log.warning("tracker %s: %s failed (%d so far; training goes on): %s: %s", backend, what, n,
                        type(e).__name__, str(e).splitlines()[0][:300] if str(e) else "")

    def _start(self, name: str) -> Any:
        runs_path = self.root / RUNS_FILE
        try:
            runs = json.loads(runs_path.read_text()) if runs_path.exists() else {}
        except (OSError, ValueError):
            runs = {}
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            backend = BACKENDS[name](self.root, self.cfg, self._params, runs)
        except ImportError as e:
            raise ImportError(f"{e}: install the trackers with pip install 'treerpo[tracking]'") from e
        write_json_atomic(runs_path, runs)
        return backend

    def _backend(self, name: str) -> Any:
        """The started backend, starting it on first use (or again after a failed start)."""
        if name not in self._backends:
            if time.monotonic() < self._restart_at.get(name, 0.0):
                return None
            try:
                self._backends[name] = self._start(name)
            except Exception as e:  # noqa: BLE001 - any failure of a tracker is its own, never the learner's
                self._restart_at[name] = time.monotonic() + RESTART_S
                self._failed(name, "start", e)
                return None
        return self._backends[name]

    def _run(self) -> None:
        for name in self.cfg.backends:
            self._backend(name)
        while True:
            kind, values, step = self._queue.get()
            if kind == "close":
                break
            for name in self.cfg.backends:
                backend = self._backend(name)
                if backend is None:
                    continue
                try:
                    backend.log(values, step)
                except Exception as e:  # noqa: BLE001
                    self._failed(name, "log", e)
        for name, backend in self._backends.items():
            try:
                backend.flush()
                backend.close()
            except Exception as e:  # noqa: BLE001
                self._failed(name, "close", e)
