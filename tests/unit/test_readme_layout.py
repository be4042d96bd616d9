"""The README's Layout section matches the tree: every module named, every name real."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("treerpo", "actor", "learner", "common", "weightsync")


def layout_block() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    return section.split("```", 2)[1]


def named_files(block: str) -> dict[str, set[str]]:
    """package -> module file names listed under its `package/` line."""
    named: dict[str, set[str]] = {}
    package = None
    for line in block.splitlines():
        top = re.match(r"^([a-z_]+)/\s", line + " ")
        if top:
            package = top.group(1)
            named.setdefault(package, set())
            continue
        if package is not None and line.startswith("  "):
            named[package].update(re.findall(r"\b([a-z_]+\.py)\b", line))
    return named


def test_every_module_is_named_and_every_name_exists():
    named = named_files(layout_block())
    for package in PACKAGES:
        on_disk = {p.name for p in (ROOT / package).glob("*.py") if not p.name.startswith("__")}
        assert named.get(package, set()) == on_disk, (
            f"README Layout, {package}/: missing {sorted(on_disk - named.get(package, set()))}, "
            f"not on disk {sorted(named.get(package, set()) - on_disk)}"
        )


def test_every_top_level_folder_is_named():
    named = set(named_files(layout_block()))
    packages = {p.name for p in ROOT.iterdir() if (p / "__init__.py").exists()}
    folders = packages | {"docs", "deploy", "tests", "bench"}
    assert folders <= named, f"README Layout lacks {sorted(folders - named)}"


def test_named_files_parser_reads_nested_lines():
    block = "actor/      side\n  main.py   a; b.py too\ncommon/  x\n  tree.py\n"
    assert named_files(block) == {"actor": {"main.py", "b.py"}, "common": {"tree.py"}}
