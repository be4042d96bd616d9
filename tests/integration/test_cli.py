"""The `treerpo` console script in a fresh interpreter: `config` prints the resolved YAML, `--help` stays light."""

from __future__ import annotations

import subprocess
import sys


def test_cli_config_subcommand_prints_resolved_yaml():
    out = subprocess.run(
        [sys.executable, "-m", "treerpo", "config", "--set", "tree.depth=1", "--set", "tree.branching=[4]"],
        capture_output=True, text=True, check=True,
    ).stdout
    assert "branching:\n  - 4" in out or "branching: [4]" in out
    bad = subprocess.run(
        [sys.executable, "-m", "treerpo", "config", "--set", "tree.bogus=1"], capture_output=True, text=True
    )
    assert bad.returncode == 2 and "unknown key 'tree.bogus'" in bad.stderr


def test_cli_help_does_not_import_torch():
    code = "import sys; from treerpo.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
