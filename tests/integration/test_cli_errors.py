"""Known failures end a `treerpo` command with one line and their own exit code (design §1.4).

Each case runs the real console script in a fresh interpreter, as a user would, and checks the
exit code, that no traceback is printed, and that the last stderr line is `treerpo <command>:
<problem and fix>`. Where the failure is found before any model loads, stderr is exactly that
one line. A learner that cannot be reached is not a failure: the actor waits and says so.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from common.errors import (
    EXIT_CHILD_FAILED,
    CheckpointError,
    ConfigError,
    DataError,
    DeviceError,
    EngineError,
    ModelError,
    PortInUse,
)
from tests.support.paths import REPO
from tests.support.system import free_port
from treerpo.supervisor import child_env

ENV = {**child_env(dict(os.environ)), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def treerpo(*argv: str, timeout_s: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "treerpo", *argv], capture_output=True, text=True, env=ENV,
                          cwd=REPO, timeout=timeout_s)


def error_line(result: subprocess.CompletedProcess, command: str, *, alone: bool) -> str:
    """The one error line (asserting no traceback; `alone`: nothing else on stderr)."""
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines, f"nothing on stderr (exit {result.returncode})"
    assert lines[-1].startswith(f"treerpo {command}: "), result.stderr[-3000:]
    assert sum(line.startswith("treerpo ") for line in lines) == 1
    if alone:
        assert len(lines) == 1, result.stderr
    return lines[-1]


@pytest.fixture(scope="module")
def short_model(make_tiny_model) -> Path:
    """A tiny model with 64 positions: benchmark prompts do not fit it."""
    return make_tiny_model(hidden_size=32, num_layers=1, max_position_embeddings=64)


def busy_port() -> tuple[socket.socket, int]:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s, s.getsockname()[1]


def test_exit_codes_are_distinct_and_documented():
    from common.errors import KNOWN, exit_code_table  # noqa: PLC0415 -- the table under test

    codes = [code for code, _ in exit_code_table()]
    assert len(codes) == len(set(codes)) and {c.exit_code for c in KNOWN} <= set(codes)
    from treerpo.supervisor import EXIT_CHILD_FAILED as up_code  # noqa: PLC0415

    assert up_code == EXIT_CHILD_FAILED
    help_text = treerpo("--help", timeout_s=60).stdout
    assert all(f"{code:>3}  " in help_text for code in codes)


def test_config_error():
    result = treerpo("config", "--set", "tree.depth=0")
    assert result.returncode == ConfigError.exit_code
    assert "tree.depth" in error_line(result, "config", alone=True)


def test_eval_with_an_unknown_reward_is_a_config_error(tiny_model_dir):
    result = treerpo("eval", "--model", str(tiny_model_dir), "--reward", "bogus")
    assert result.returncode == ConfigError.exit_code
    assert "unknown reward 'bogus'" in error_line(result, "eval", alone=True)


def test_a_gguf_or_a_package_as_model_path_says_to_import_it(tmp_path):
    gguf_file = tmp_path / "m.gguf"
    gguf_file.write_bytes(b"GGUF")
    result = treerpo("learner", "--set", f"model.path={gguf_file}", "--run-dir", str(tmp_path / "run"))
    assert result.returncode == ModelError.exit_code
    assert f"treerpo model import {gguf_file} --out DIR" in error_line(result, "learner", alone=True)


def test_learner_without_a_model_folder():
    result = treerpo("learner", "--set", "model.path=/nonexistent/model", "--run-dir", "/tmp/unused-treerpo-run")
    assert result.returncode == ModelError.exit_code
    line = error_line(result, "learner", alone=True)
    assert "no model folder at /nonexistent/model" in line and "model.path" in line


def test_actor_and_eval_without_a_model_folder(tmp_path):
    result = treerpo("actor", "--set", "model.path=/nonexistent/model", "--run-dir", str(tmp_path))
    assert result.returncode == ModelError.exit_code
    assert "no model folder at /nonexistent/model" in error_line(result, "actor", alone=True)
    result = treerpo("eval", "--model", str(tmp_path / "nowhere"))
    assert result.returncode == ModelError.exit_code
    assert "no config.json" in error_line(result, "eval", alone=True)


def test_eval_on_a_row_without_answer_names_the_row(short_model, tmp_path):
    data = tmp_path / "bench.jsonl"
    data.write_text(json.dumps({"id": "a", "problem": "1+1?", "answer": "2"}) + "\n"
                    + json.dumps({"id": "b", "problem": "2+2?"}) + "\n")
    result = treerpo("eval", "--model", str(short_model), "--data", str(data), "-k", "1")
    assert result.returncode == DataError.exit_code
    line = error_line(result, "eval", alone=True)  # rows are checked before the model loads
    assert f"{data}:2: missing field 'answer'" in line and "data.answer_field" in line


def test_eval_where_no_prompt_fits_the_model(short_model, benchmarks_dir):
    result = treerpo("eval", "--model", str(short_model), "--data", str(benchmarks_dir / "aime24.jsonl"),
                     "-k", "1", "--max-tokens", "40")
    assert result.returncode == EngineError.exit_code
    line = error_line(result, "eval", alone=False)  # after the model loaded (its progress bar)
    assert "no problem fits" in line and "64 positions" in line and "--max-tokens" in line


def test_learner_on_a_busy_port(tiny_model_dir, tmp_path):
    holder, port = busy_port()
    with holder:
        result = treerpo("learner", "--config", "demo", "--set", f"model.path={tiny_model_dir}",
                         "--set", f"transport.data_port={port}", "--run-dir", str(tmp_path))
    assert result.returncode == PortInUse.exit_code
    line = error_line(result, "learner", alone=True)  # found before the model loads
    assert f"port {port}" in line and "transport.data_port" in line and "already in use" in line


def test_actor_on_a_busy_metrics_port(tiny_model_dir, tmp_path):
    holder, port = busy_port()
    with holder:
        result = treerpo("actor", "--set", f"model.path={tiny_model_dir}", "--set", f"metrics.actor_port={port}",
                         "--run-dir", str(tmp_path))
    assert result.returncode == PortInUse.exit_code
    assert "metrics.actor_port" in error_line(result, "actor", alone=True)  # found before the model loads


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_learner_asking_for_a_missing_device(tiny_model_dir, tmp_path):
    result = treerpo("learner", "--config", "demo", "--set", f"model.path={tiny_model_dir}",
                     "--set", "model.device=cuda", "--run-dir", str(tmp_path))
    assert result.returncode == DeviceError.exit_code
    assert "CUDA is not available" in error_line(result, "learner", alone=False)


def test_learner_resuming_from_an_unreadable_checkpoint(tiny_model_dir, tmp_path):
    step = tmp_path / "checkpoints" / "step-000000003"
    step.mkdir(parents=True)
    (step / "learner_state.json").write_text("{not json")  # a complete-looking folder with a broken state
    result = treerpo("learner", "--config", "demo", "--set", f"model.path={tiny_model_dir}", "--resume", "auto",
                     "--run-dir", str(tmp_path))
    assert result.returncode == CheckpointError.exit_code
    assert "is not a complete treerpo checkpoint" in error_line(result, "learner", alone=False)


def test_demo_in_a_foreign_folder(tmp_path):
    (tmp_path / "mine.txt").write_text("not the demo's")
    result = treerpo("demo", "--run-dir", str(tmp_path))
    assert result.returncode == ConfigError.exit_code
    assert "holds files the demo did not write" in error_line(result, "demo", alone=True)


def test_up_reports_the_learner_line_when_it_can_never_start(tmp_path):
    result = treerpo("up", "--config", "demo", "--set", "model.path=/nonexistent/model", "--run-dir", str(tmp_path))
    assert result.returncode == EXIT_CHILD_FAILED
    assert "Traceback" not in result.stdout + result.stderr
    assert "treerpo learner: no model folder at /nonexistent/model" in result.stdout


def _actor_waiting(argv: list[str], tmp_path: Path, line: str, times: int = 2) -> tuple[int, str]:
    """Run `treerpo actor` until its stderr holds `line` `times` times, then SIGTERM it: (exit code, stderr)."""
    log = tmp_path / "actor.err"
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "treerpo", "actor", *argv], stdout=subprocess.DEVNULL,
                                stderr=err, env=ENV, cwd=REPO)
        try:
            deadline = time.monotonic() + 180
            while log.read_text().count(line) < times and time.monotonic() < deadline:
                assert proc.poll() is None, log.read_text()[-3000:]  # waiting is not an error
                time.sleep(0.2)
            assert proc.poll() is None, log.read_text()[-3000:]
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return code, log.read_text()


def test_actor_waits_for_an_unreachable_learner_and_says_where_it_looks(tiny_model_dir, tmp_path):
    # fixed ports nobody listens on: it keeps registering, one line every transport.peer_timeout_s
    port, data_port = free_port(), free_port()  # nothing listens on them
    code, err = _actor_waiting(["--config", "demo", "--set", f"model.path={tiny_model_dir}",
                                "--set", f"transport.control_port={port}", "--set", f"transport.data_port={data_port}",
                                "--set", "transport.peer_timeout_s=1", "--run-dir", str(tmp_path / "a")], tmp_path,
                               f"no answer from the learner at tcp://127.0.0.1:{port}")
    assert code == 0 and "Traceback" not in err
    assert err.count(f"no answer from the learner at tcp://127.0.0.1:{port}") >= 2, err[-3000:]

    # ephemeral ports (the demo preset) and no endpoints.json yet: it waits for the file
    run_dir = tmp_path / "b"
    waiting = f"waiting for the learner: {run_dir / 'endpoints.json'} does not exist yet"
    code, err = _actor_waiting(["--config", "demo", "--set", f"model.path={tiny_model_dir}",
                                "--set", "transport.peer_timeout_s=1", "--run-dir", str(run_dir)], tmp_path, waiting)
    assert code == 0 and "Traceback" not in err
    assert err.count(waiting) >= 2, err[-3000:]
