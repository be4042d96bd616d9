"""The failures a user can fix, one class each, with the exit code the `treerpo` CLI returns for it.

A `TreerpoError`'s message names the problem and the fix ("no model folder at /x: set
model.path to ..."); `treerpo <command>` prints it as one line, `treerpo <command>: <message>`,
and exits with the class's `exit_code`. Anything else that escapes a command is a bug and keeps
its traceback (exit 1). `exit_code_table()` is the table `treerpo --help` prints (design §1.4).

Subclasses keep the builtin base older code caught (`ConfigError` and `DataError` are still
`ValueError`s, `PortInUse` an `OSError`); the modules that raised them before import them from
here, so `common.config.ConfigError`, `common.data.DataError`, `common.device.DeviceError` and
`actor.engine.EngineError` still name them. A learner that cannot be reached is no error: an
actor waits for it by design, logging where it looks (actor/main.py).
"""

from __future__ import annotations

EXIT_BUG = 1
EXIT_CHILD_FAILED = 3  # `treerpo up` (treerpo.supervisor): a child can never start, or the learner ran out of restarts
EXIT_INTERRUPTED = 130


class TreerpoError(RuntimeError):
    """A known failure; the message says what is wrong and how to fix it."""

    exit_code = 1
    what = "known failure"


class ConfigError(TreerpoError, ValueError):
    """A config or command line that cannot be used; the message says which key and how to fix it."""

    exit_code = 2
    what = "config or command line: an unknown key, a bad value or argument"


class ModelError(TreerpoError):
    """No usable model at model.path / --model (missing folder, no config.json, unloadable), or no GGUF to import."""

    exit_code = 4
    what = "model: no HF model folder at model.path / --model, or it cannot be loaded; no GGUF at `model import` SRC"


class DataError(TreerpoError, ValueError):
    """Unreadable prompt data; the message names the file and line/row and how to fix it."""

    exit_code = 5
    what = "data: a prompt or benchmark file cannot be read, or a row lacks a field"


class EngineError(TreerpoError):
    """An engine that cannot be built or a request it cannot serve; the message says the fix."""

    exit_code = 6
    what = "engine: a request the inference engine cannot serve, or an engine this machine cannot run"


class DeviceError(TreerpoError):
    """The configured device is not available here."""

    exit_code = 7
    what = "device: the configured device (model.device) is not available"


class PortInUse(TreerpoError, OSError):
    """A port this process must bind is taken; the message names the port, its config key and the fix."""

    exit_code = 8
    what = "port in use: a port the process binds is taken"

    @classmethod
    def at(cls, host: str, port: int, key: str) -> PortInUse:
        """The error for `port` on `host`, configured by `key` (e.g. transport.data_port)."""
        return cls(f"port {port} on {host} ({key}) is already in use: stop the process that holds it "
                   f"(`ss -ltnp 'sport = :{port}'` shows it) or pick another with --set {key}=PORT (0 = any free port)")


class CheckpointError(TreerpoError):
    """A checkpoint that could not be written (or read); `reason` is a CHECKPOINT_FAILURE_REASONS value.

    `recoverable`: the process may go on training (the write failed before or outside any step
    that all ranks take together); False means the ranks may be out of step and the learner must stop.
    """

    exit_code = 9
    what = "checkpoint: the final one could not be written, or the one to resume from cannot be read"

    def __init__(self, message: str, reason: str = "error", *, recoverable: bool = True) -> None:
        super().__init__(message)
        self.reason = reason
        self.recoverable = recoverable


class DependencyError(TreerpoError):
    """An optional package the command needs is not installed; the message names the pip install that adds it."""

    exit_code = 10
    what = "dependency: an optional package the command needs is not installed (the message says what to pip install)"


KNOWN: tuple[type[TreerpoError], ...] = (ConfigError, ModelError, DataError, EngineError, DeviceError, PortInUse,
                                         CheckpointError, DependencyError)


def exit_code_table() -> list[tuple[int, str]]:
    """(code, meaning) for every exit code of the CLI, ascending."""
    rows = [(0, "success"), (EXIT_BUG, "a bug: an unexpected error, with its traceback"),
            (EXIT_CHILD_FAILED, "`treerpo up`: a child can never start, or the learner ran out of restarts"),
            (EXIT_INTERRUPTED, "interrupted (Ctrl-C)")]
    rows += [(cls.exit_code, cls.what) for cls in KNOWN]
    return sorted(rows)


def one_line(error: BaseException) -> str:
    """The error's message on one line: its lines joined by '; ' (by ' ' after a line ending in ':')."""
    text = ""
    for line in (line.strip() for line in str(error).splitlines()):
        if line:
            text += line if not text else (" " if text.endswith(":") else "; ") + line
    return text or type(error).__name__
