"""Where the shared data lives: `shared/` beside the checkout (as CI lays it out), else /work/shared."""

from __future__ import annotations

from pathlib import Path


def shared_dir() -> Path:
    beside = Path(__file__).resolve().parents[2] / "shared"
    return beside if beside.exists() else Path("/work/shared")


BENCHMARKS = shared_dir() / "data" / "benchmarks"
