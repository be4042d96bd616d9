"""The floors of design §1.2 hold: no module import cycle, no upward, sideways or outside import,
and design §13 (the generated import graph) matches the code.

The rules live in docs/import_graph.py (loaded by path: docs/ is not a package); the first tests
check that its checker catches what it must on a small hand-made repository.
"""

from __future__ import annotations

import importlib.util
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _load_import_graph():
    path = ROOT / "docs" / "import_graph.py"
    spec = importlib.util.spec_from_file_location("treerpo_docs_import_graph", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


ig = _load_import_graph()


def _write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root


@pytest.fixture
def toy(tmp_path: Path) -> Path:
    """Four packages with one of each thing the checker must see."""
    return _write(
        tmp_path,
        {
            "common/__init__.py": "",
            "common/a.py": "import os\nfrom common import b\n",  # `from pkg import module`: edge to common.b
            "common/b.py": (
                "from typing import TYPE_CHECKING\n"
                "if TYPE_CHECKING:\n    from learner.x import X\n"  # type-only, but upward
                "def f():\n    from common.a import g\n"  # function-local: closes the cycle a -> b -> a
            ),
            "actor/__init__.py": "",
            # a relative import, and a sideways one by importlib
            "actor/s.py": "from . import t\nimport importlib\nM = importlib.import_module('learner.x')\n",
            "actor/t.py": "from common.a import g\n",
            "learner/__init__.py": "",
            "learner/x.py": "from common.a import g\nfrom tests.helpers import h\n",  # out of the packages
            "treerpo/__init__.py": "",
            "treerpo/cli.py": "def main():\n    from actor.s import M\n    from learner.x import X\n",
            "tests/helpers.py": "def h():\n    pass\n",
        },
    )


def test_checker_sees_every_kind_of_import(toy: Path) -> None:
    graph = ig.scan(toy)
    edges = {(e.src, e.dst, e.kind) for e in graph.edges}
    assert ("common.a", "common.b", "top") in edges
    assert ("common.b", "learner.x", "type") in edges
    assert ("common.b", "common.a", "lazy") in edges
    assert ("actor.s", "actor.t", "top") in edges
    assert ("actor.s", "learner.x", "dynamic") in edges
    assert ("treerpo.cli", "actor.s", "lazy") in edges
    assert not any(e.dst == "os" or e.dst == "importlib" for e in graph.edges)


def test_checker_reports_the_cycle(toy: Path) -> None:
    graph = ig.scan(toy)
    assert ig.find_cycles(graph) == [["common.a", "common.b", "common.a"]]
    text, ok = ig.report(graph)
    assert not ok and "common.a -> common.b -> common.a" in text


def test_checker_reports_upward_sideways_and_outside_imports(toy: Path) -> None:
    graph = ig.scan(toy)
    bad = {(e.src, e.dst) for e in ig.layer_violations(graph)}
    assert bad == {("common.b", "learner.x"), ("actor.s", "learner.x"), ("learner.x", "tests.helpers")}


def test_checker_ignores_type_only_cycles(tmp_path: Path) -> None:
    root = _write(
        tmp_path,
        {
            "common/__init__.py": "",
            "common/a.py": "from common.b import B\n",
            "common/b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from common.a import A\n",
            "actor/__init__.py": "",
            "learner/__init__.py": "",
            "treerpo/__init__.py": "",
        },
    )
    graph = ig.scan(root)
    assert ig.find_cycles(graph) == []
    assert ig.type_only_cycles(graph) == [["common.a", "common.b", "common.a"]]


def test_stale_block_is_detected(toy: Path) -> None:
    design = toy / "design.md"
    design.write_text(f"# t\n\n{ig.BEGIN}\n{ig.END}\n")
    graph = ig.scan(toy)
    assert ig.is_stale(graph, design)
    design.write_text(ig.splice(design.read_text(), ig.render_block(graph)))
    assert not ig.is_stale(graph, design)


# -- the repository itself ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def graph():
    return ig.scan(ROOT)


def test_no_import_cycles(graph) -> None:
    cycles = ig.find_cycles(graph)
    assert not cycles, "import cycles between modules (design §1.2):\n" + ig.report(graph)[0]


def test_no_upward_sideways_or_outside_imports(graph) -> None:
    bad = ig.layer_violations(graph)
    assert not bad, "imports that break the floors (design §1.2):\n" + ig.report(graph)[0]


def test_no_unresolved_package_imports(graph) -> None:
    assert not graph.unresolved, "imports of modules that do not exist:\n" + ig.report(graph)[0]


def test_design_import_graph_is_current(graph) -> None:
    assert not ig.is_stale(graph, ROOT / "docs" / "design.md"), (
        "design §13 (docs/design.md) does not match the code's imports: run `python docs/import_graph.py`"
    )
