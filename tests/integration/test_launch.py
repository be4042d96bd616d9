"""The `up` supervisor's children: their own torch.distributed worlds, logs, stop by pid."""

from __future__ import annotations

import os
import sys

from treerpo.supervisor import Child


def test_children_do_not_inherit_a_distributed_world(tmp_path):
    # a parent that initialised torch.distributed in-process (or runs under torchrun) exports
    # RANK/WORLD_SIZE/MASTER_PORT; a learner started by `up` that inherited them would try to
    # join that world (and bind a port the parent holds)
    code = ("import os; "
            "print(sorted(k for k in ('RANK', 'WORLD_SIZE', 'MASTER_PORT', 'MASTER_ADDR') if k in os.environ)); "
            "print(os.environ['KEEP'])")
    child = Child("probe", [sys.executable, "-c", code], tmp_path / "probe.log", restartable=False)
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1", "KEEP": "yes"}
    child.start(env)
    assert child.proc.wait(timeout=60) == 0
    lines = (tmp_path / "probe.log").read_text().splitlines()
    assert lines[-2:] == ["[]", "yes"]
