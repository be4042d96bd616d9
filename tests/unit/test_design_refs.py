"""Every design reference in the repository names a section of docs/design.md.

The one citation form is `design §N` (section N of docs/design.md) or `design §N.M` (its
subsection); a list or range continues the same citation: `design §5, §8`, `design §4–§8`.
Inside docs/design.md a bare `§N` refers to the page itself. Older spellings (the capitalised
word before §, the shared spec's INTERFACES name, "design notes") are refused, so a reference
cannot point at a document that is not in the repository.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DESIGN = ROOT / "docs" / "design.md"
SUFFIXES = {".py", ".md", ".yaml", ".yml", ".sh", ".toml"}
NAMES = {"Dockerfile"}
SKIP_DIRS = {
    ".git",
    "__pycache__",
    ".venv",
    "venv",
    "node_modules",
    "runs",
    "build",
    "dist",
    ".pytest_cache",
    ".ruff_cache",
    ".mypy_cache",
    ".hypothesis",
    "shared",
}

HEADING = re.compile(r"^#{2,4}[ \t]+(\d+(?:\.\d+)*)\.?[ \t]+\S", re.M)
NUMBER = r"§(\d+(?:\.\d+)*)"
SECTION_SIGN = re.compile(r"§(?=\d)")
CITATION = re.compile(rf"design[ \t]+{NUMBER}(?:[ \t]*(?:,|–|—|-|and|or|to)[ \t]*{NUMBER})*")
CITED_NUMBER = re.compile(NUMBER)
# assembled from parts so that this file does not match its own patterns
LEGACY = re.compile("|".join([r"DESIGN" + r"[ \t]+§", "INTER" + "FACES", "design" + " notes"]))


def _files() -> list[Path]:
    out = []
    for folder, dirs, names in os.walk(ROOT):
        # hidden folders (.venv-vllm, caches) hold no design references of ours
        dirs[:] = sorted(d for d in dirs
                         if d not in SKIP_DIRS and not d.startswith(".") and not d.endswith(".egg-info"))
        out += [Path(folder) / n for n in sorted(names) if Path(n).suffix in SUFFIXES or n in NAMES]
    return out


def design_sections(text: str | None = None) -> list[str]:
    """Section numbers of the design's headings, in order: ['1', '1.1', ..., '13']."""
    return HEADING.findall(DESIGN.read_text(encoding="utf-8") if text is None else text)


def references(path: Path, text: str) -> list[tuple[int, str, str]]:
    """(line, cited number, problem or '') for every § reference of one file."""
    own = path == DESIGN
    out = []
    for lineno, line in enumerate(text.splitlines(), 1):
        legacy = LEGACY.search(line) if path != Path(__file__).resolve() else None
        if legacy:
            out.append((lineno, legacy.group(0), "old citation form: write `design §N` (docs/design.md section N)"))
            continue
        cited = [(m.start(), m.end()) for m in CITATION.finditer(line)]
        for sign in SECTION_SIGN.finditer(line):
            number = CITED_NUMBER.match(line, sign.start()).group(1)
            inside = any(a <= sign.start() < b for a, b in cited)
            out.append((lineno, number, "" if inside or own else "bare § reference: write `design §N`"))
    return out


def test_design_headings_are_numbered_in_order() -> None:
    numbers = design_sections()
    assert numbers, "docs/design.md has no numbered headings"
    assert len(set(numbers)) == len(numbers), f"duplicate section numbers: {numbers}"
    top = [n for n in numbers if "." not in n]
    assert top == [str(k) for k in range(1, len(top) + 1)], f"sections are not 1, 2, 3, ...: {top}"
    section = None
    for n in numbers:
        if "." not in n:
            section, sub = n, 0
            continue
        major, minor = n.split(".", 1)
        sub += 1
        assert major == section and minor == str(sub), f"subsection {n} is out of place (after section {section})"


def test_reference_parser() -> None:
    text = "see design S4.3, S7 and design S4–S8; bare S2 here\n".replace("S", "\u00a7")
    found = references(ROOT / "x.py", text)
    assert [(n, bool(problem)) for _, n, problem in found] == [
        ("4.3", False),
        ("7", False),
        ("4", False),
        ("8", False),
        ("2", True),
    ]
    assert design_sections("## 1. A\n### 1.1 B\n## 2. C\n#### 2.1.1 D\n") == ["1", "1.1", "2", "2.1.1"]


def test_every_design_reference_resolves() -> None:
    sections = set(design_sections())
    problems = []
    count = 0
    for path in _files():
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        for lineno, number, problem in references(path, text):
            count += 1
            where = f"{path.relative_to(ROOT)}:{lineno}"
            if problem:
                problems.append(f"{where}: {number}: {problem}")
            elif number not in sections:
                problems.append(
                    f"{where}: §{number} is not a heading of docs/design.md "
                    f"(sections: {', '.join(sorted(sections, key=_order))})"
                )
    assert count > 0, "no design reference found at all: is the scan looking at the repository?"
    assert not problems, "design references that do not resolve:\n" + "\n".join(problems)


def _order(number: str) -> tuple[int, ...]:
    return tuple(int(p) for p in number.split("."))
