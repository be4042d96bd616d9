"""common/errors.py and the one-line failures built on it (design §1.4), and checkpoint recovery (design §7.1)."""

from __future__ import annotations

import errno
import json
import socket

import pytest

import treerpo.cli as cli
from common.config import ConfigError as ConfigErrorFromConfig
from common.config import TransportConfig
from common.data import DataError as DataErrorFromData
from common.errors import (
    KNOWN,
    CheckpointError,
    ConfigError,
    DataError,
    EngineError,
    ModelError,
    PortInUse,
    TreerpoError,
    exit_code_table,
    one_line,
)
from common.metrics import CHECKPOINT_FAILURE_REASONS, MetricsServer, new_registry
from common.rundir import check_model_folder
from common.transport import LearnerEndpoints, TransportError
from learner.checkpoint import LATEST, STATE_JSON, failure_reason, find_latest, recover_checkpoints


def test_codes_are_distinct_and_old_names_still_work():
    codes = [code for code, _ in exit_code_table()]
    assert len(codes) == len(set(codes)) and 0 in codes and 1 in codes
    assert all(issubclass(cls, TreerpoError) and cls.exit_code not in (0, 1) for cls in KNOWN)
    from actor.engine import EngineError as EngineErrorFromEngine  # noqa: PLC0415 -- the old home

    assert ConfigErrorFromConfig is ConfigError and DataErrorFromData is DataError
    assert EngineErrorFromEngine is EngineError
    assert issubclass(ConfigError, ValueError) and issubclass(DataError, ValueError)  # older `except`s still match
    assert issubclass(PortInUse, OSError) and issubclass(TransportError, ConfigError)


def test_one_line_joins_multi_line_messages():
    assert one_line(ValueError("invalid config:\n  tree.depth: too small\n  loss: bad")) == \
        "invalid config: tree.depth: too small; loss: bad"
    assert one_line(RuntimeError("")) == "RuntimeError"


@pytest.mark.parametrize("error", [ConfigError("bad key"), ModelError("no model folder at /x: set model.path"),
                                   CheckpointError("final checkpoint failed", "no_space")])
def test_cli_prints_one_line_and_returns_the_code(monkeypatch, capsys, error):
    def fail(_args):
        raise error

    monkeypatch.setitem(cli.SUBCOMMANDS, "config", (fail, "x", cli.add_config_args))
    assert cli.main(["config"]) == type(error).exit_code
    err = capsys.readouterr().err
    assert err == f"treerpo config: {error}\n"


def test_cli_keeps_the_traceback_of_a_bug(monkeypatch):
    def bug(_args):
        raise KeyError("a bug")

    monkeypatch.setitem(cli.SUBCOMMANDS, "config", (bug, "x", cli.add_config_args))
    with pytest.raises(KeyError):
        cli.main(["config"])


def test_help_lists_every_exit_code():
    text = cli.build_parser().format_help()
    assert all(f"{code:>3}  {meaning}" in text for code, meaning in exit_code_table())


def test_model_folder_check(tmp_path):
    with pytest.raises(ModelError, match="no model folder at /nonexistent/m"):
        check_model_folder("/nonexistent/m")
    with pytest.raises(ModelError, match="holds no config.json"):
        check_model_folder(str(tmp_path))
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    with pytest.raises(ModelError, match="is a treerpo checkpoint: its model is .*hf"):
        check_model_folder(str(tmp_path))
    check_model_folder(str(tmp_path / "hf"))
    check_model_folder("Qwen/Qwen2.5-Math-1.5B")  # a hub id: left to from_pretrained


def test_busy_ports_name_their_key():
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(PortInUse, match=f"port {port} on 127.0.0.1 \\(transport.control_port\\) is already in use"):
            LearnerEndpoints(TransportConfig(data_port=0, control_port=port))
        server = MetricsServer("127.0.0.1", port, new_registry(process_metrics=False), port_key="metrics.learner_port")
        with pytest.raises(PortInUse, match="metrics.learner_port"):
            server.start()


def test_failure_reasons(tmp_path):
    assert failure_reason(OSError(errno.ENOSPC, "No space left on device"), tmp_path) == "no_space"
    assert failure_reason(RuntimeError("I/O error: No space left on device (os error 28)"), tmp_path) == "no_space"
    assert failure_reason(PermissionError(errno.EACCES, "denied"), tmp_path) == "io_error"
    wrapped = RuntimeError("unexpected pos 576 vs 534")
    wrapped.__context__ = OSError(errno.EIO, "I/O error")
    assert failure_reason(wrapped, tmp_path) == "io_error"
    assert failure_reason(ValueError("odd"), tmp_path) == "error"
    assert {"no_space", "io_error", "error"} == set(CHECKPOINT_FAILURE_REASONS)


def _complete(path, version: int) -> None:
    path.mkdir(parents=True)
    (path / STATE_JSON).write_text(json.dumps({"version": version}))


def test_recovery_removes_leftovers_and_puts_a_moved_checkpoint_back(tmp_path):
    root = tmp_path / "checkpoints"
    _complete(root / "step-000000001", 1)
    (root / LATEST).write_text("step-000000002\n")
    _complete(root / ".trash-step-000000002-0123abcd", 2)  # moved aside; the new step-2 never arrived
    (root / ".tmp-step-000000002-89abcdef" / "deepspeed").mkdir(parents=True)
    _complete(root / ".del-step-000000000-00000000", 0)
    (root / ".latest.deadbeef").write_text("step-000000002\n")
    assert find_latest(tmp_path).name == "step-000000001"  # never a partial or hidden folder
    done = recover_checkpoints(tmp_path)
    assert "restored step-000000002 from .trash-step-000000002-0123abcd" in done
    assert sorted(p.name for p in root.iterdir()) == [LATEST, "step-000000001", "step-000000002"]
    assert find_latest(tmp_path).name == "step-000000002"
    # a moved-aside copy whose name is back (the new save completed) is only removed
    _complete(root / ".trash-step-000000002-feedf00d", 1)
    recover_checkpoints(tmp_path)
    assert json.loads((root / "step-000000002" / STATE_JSON).read_text())["version"] == 2
    assert recover_checkpoints(tmp_path) == []


def test_up_reports_a_childs_one_line_failure(tmp_path):
    from treerpo.supervisor import last_error_line  # noqa: PLC0415 -- the supervisor's reader of child logs

    log = tmp_path / "learner.log"
    log.write_text("\n=== start 10:00:00: treerpo learner\n[WARNING] op builder failed, using fallback\n"
                   "treerpo learner: final checkpoint at step 4 failed, the run's end state is not on disk: ...\n"
                   "exception ignored in atexit: error: whatever\n")
    assert last_error_line(log).startswith("treerpo learner: final checkpoint at step 4 failed")
