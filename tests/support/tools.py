"""System tools some tests run (kubectl, promtool, prometheus, shellcheck, ...): found, or the test skips.

`require_tool(name)` returns the tool's path, or skips the calling test with a reason that names
the tool and where it comes from. Under CI=true a missing tool fails the test instead: CI installs
them all (.ci/run), so a skip there would hide a broken setup. `require_module(name, where)` does
the same for a Python module of an extra. `run(cmd)` runs one, output captured.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

WHERE = {
    "bash": "Debian package bash",
    "kubectl": "https://kubernetes.io/docs/tasks/tools/",
    "kubernetes-validate": "pip install kubernetes-validate, part of the [test] extra",
    "prometheus": "Debian package prometheus",
    "promtool": "Debian package prometheus",
    "shellcheck": "Debian package shellcheck",
}


def require_tool(name: str) -> str:
    path = shutil.which(name)
    if path is not None:
        return path
    reason = f"needs `{name}` ({WHERE.get(name, 'not on PATH')})"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason}: CI=true, where every tool must be installed")
    pytest.skip(reason)


def require_module(name: str, where: str):
    """The imported Python module `name`, or a skip naming `where` it comes from (a failure under
    CI=true, which installs every extra). Call it in a test or fixture, never at a module's import:
    an environment that deselects the test (CI's vLLM one, without the extras) still imports it."""
    try:
        return __import__(name)
    except ImportError:
        reason = f"needs the Python module `{name}` ({where})"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason}: CI=true, where every extra is installed")
        pytest.skip(reason)


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    """A tool's run: text output captured, bounded at 120 s."""
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, **kw)
