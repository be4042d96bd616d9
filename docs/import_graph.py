"""The import graph of treerpo's five packages: draw it into docs/design.md, check the layering.

Usage (from anywhere; stdlib only, nothing of treerpo is imported):

    python docs/import_graph.py            # rewrite the generated block of docs/design.md, print the report
    python docs/import_graph.py --check    # change nothing; exit 1 if the block is stale or a rule is broken
    python docs/import_graph.py --report   # print the report only
    python docs/import_graph.py --print    # print the generated block to stdout

Exit status: 0 when every rule holds (and, with --check, the block is current), 1 otherwise.

What counts as an import (read with `ast`, never executed):

* `import a.b`, `from a.b import c` and relative imports, anywhere in a module: at module level
  (kind "top"), or inside a function body (kind "lazy": runs on first call, still a dependency);
  `importlib.import_module("a.b")` / `__import__("a.b")` with a literal name (kind "dynamic");
* an edge goes to the longest imported name that is a module of the scan: `from common import
  tasks` is an edge to common.tasks, `from common.wire import encode_tree` to common.wire.
  Parent packages' `__init__` are not edges (Python runs them, but they hold no code here);
* imports under `if TYPE_CHECKING:` (kind "type") never run. They are excluded from the cycle
  check (a type-only back-reference is how a cycle is legitimately broken) but included in the
  layering check: an annotation naming a type from a higher floor still couples the floors.

Rules (design §1.2):

* layers: common (0) < weightsync (1) < actor, learner (2) < treerpo (3). A module may import its
  own package and packages on lower layers only; actor and learner never import each other;
  nothing in the five packages imports the repository's other top-level folders (tests, bench,
  deploy, docs);
* no import cycle between modules (runtime edges: top, lazy, dynamic).

Imports of a module of the five packages that does not exist are listed as warnings.
"""

from __future__ import annotations

import argparse
import ast
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DESIGN = ROOT / "docs" / "design.md"
BEGIN = "<!-- import-graph:begin -->"
END = "<!-- import-graph:end -->"

LAYERS: dict[str, int] = {"common": 0, "weightsync": 1, "actor": 2, "learner": 2, "treerpo": 3}
"""Package -> floor. An import must go to the same package or a strictly lower floor."""

OUTSIDE = ("tests", "bench", "deploy", "docs")
"""Top-level folders of the repository the packages must never import."""

RUNTIME_KINDS = ("top", "lazy", "dynamic")


@dataclass(frozen=True)
class Edge:
    src: str  # importing module, e.g. "learner.trainer"
    dst: str  # imported module, e.g. "common.config"
    line: int
    kind: str  # "top" | "lazy" | "dynamic" | "type"


@dataclass
class Graph:
    root: Path
    modules: dict[str, Path] = field(default_factory=dict)  # module name -> file
    edges: list[Edge] = field(default_factory=list)
    unresolved: list[tuple[str, int, str]] = field(default_factory=list)  # (module, line, imported name)

    def package(self, module: str) -> str:
        return module.split(".", 1)[0]

    def runtime_edges(self) -> list[Edge]:
        return [e for e in self.edges if e.kind in RUNTIME_KINDS]


# ---------------------------------------------------------------------------------------------
# scanning
# ---------------------------------------------------------------------------------------------
def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def discover(root: Path, packages: tuple[str, ...] = tuple(LAYERS)) -> dict[str, Path]:
    """Every .py file under the packages, by module name."""
    out = {}
    for pkg in packages:
        for path in sorted((root / pkg).rglob("*.py")):
            if "__pycache__" not in path.parts:
                out[module_name(path, root)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


class _Imports(ast.NodeVisitor):
    """(line, kind, absolute dotted names) of every import statement of one module."""

    def __init__(self, module: str, is_package: bool) -> None:
        self.module, self.is_package = module, is_package
        self.found: list[tuple[int, str, list[str]]] = []
        self._function_depth = 0
        self._type_depth = 0

    def _kind(self) -> str:
        return "type" if self._type_depth else ("lazy" if self._function_depth else "top")

    def visit_FunctionDef(self, node: ast.AST) -> None:
        self._function_depth += 1
        self.generic_visit(node)
        self._function_depth -= 1

    visit_AsyncFunctionDef = visit_FunctionDef
    visit_Lambda = visit_FunctionDef

    def visit_If(self, node: ast.If) -> None:
        if not _is_type_checking(node.test):
            self.generic_visit(node)
            return
        self.visit(node.test)
        self._type_depth += 1
        for stmt in node.body:
            self.visit(stmt)
        self._type_depth -= 1
        for stmt in node.orelse:  # the else branch runs
            self.visit(stmt)

    def visit_Import(self, node: ast.Import) -> None:
        self.found.append((node.lineno, self._kind(), [alias.name for alias in node.names]))

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = node.module or ""
        if node.level:
            package = self.module.split(".") if self.is_package else self.module.split(".")[:-1]
            package = package[: len(package) - (node.level - 1)] if node.level > 1 else package
            base = ".".join(package + ([base] if base else []))
        # `from a import b`: b may be a submodule (edge to a.b) or a name inside a (edge to a)
        names = [f"{base}.{alias.name}" if alias.name != "*" else base for alias in node.names]
        self.found.append((node.lineno, self._kind(), names))

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
        if name in ("import_module", "__import__") and node.args:
            arg = node.args[0]
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and not arg.value.startswith("."):
                kind = "type" if self._type_depth else "dynamic"
                self.found.append((node.lineno, kind, [arg.value]))
        self.generic_visit(node)


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The longest prefix of the dotted name that is a scanned module."""
    parts = name.split(".")
    for k in range(len(parts), 0, -1):
        candidate = ".".join(parts[:k])
        if candidate in modules:
            return candidate
    return None


def _resolve_outside(name: str, root: Path) -> str:
    """The longest prefix of the dotted name that is a file or folder under root (else its top)."""
    parts = name.split(".")
    for k in range(len(parts), 1, -1):
        path = root.joinpath(*parts[:k])
        if path.with_suffix(".py").is_file() or path.is_dir():
            return ".".join(parts[:k])
    return parts[0]


def scan(root: Path = ROOT, packages: tuple[str, ...] = tuple(LAYERS)) -> Graph:
    """Parse every module of `packages` under `root` and collect its imports of local code."""
    graph = Graph(root=root, modules=discover(root, packages))
    for module, path in graph.modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        visitor = _Imports(module, path.name == "__init__.py")
        visitor.visit(tree)
        seen: set[tuple[str, int, str]] = set()
        for line, kind, names in visitor.found:
            for name in names:
                top = name.split(".", 1)[0]
                if top not in packages and top not in OUTSIDE:
                    continue  # the standard library or a third-party package
                dst = _resolve(name, graph.modules) if top in packages else _resolve_outside(name, root)
                if dst is None:
                    graph.unresolved.append((module, line, name))
                    continue
                if (dst, line, kind) in seen or dst == module:
                    continue
                seen.add((dst, line, kind))
                graph.edges.append(Edge(module, dst, line, kind))
    graph.edges.sort(key=lambda e: (e.src, e.dst, e.line, e.kind))
    return graph


# ---------------------------------------------------------------------------------------------
# rules
# ---------------------------------------------------------------------------------------------
def layer_violations(graph: Graph) -> list[Edge]:
    """Edges (type-only included) that go up a floor, sideways between actor and learner, or out."""
    bad = []
    for e in graph.edges:
        src, dst = graph.package(e.src), graph.package(e.dst)
        if src == dst:
            continue
        if dst not in LAYERS or LAYERS[dst] >= LAYERS[src]:
            bad.append(e)
    return bad


def find_cycles(graph: Graph) -> list[list[str]]:
    """One cycle (module names, first repeated at the end) per strongly connected group of
    modules joined by runtime imports; [] when the module graph is acyclic."""
    succ: dict[str, set[str]] = {m: set() for m in graph.modules}
    for e in graph.runtime_edges():
        if e.dst in succ:
            succ[e.src].add(e.dst)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def strongconnect(v: str) -> None:  # Tarjan; the graph is small, recursion is fine
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(succ[v]):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(succ):
        if v not in index:
            strongconnect(v)
    return sorted(_cycle_in(group, succ) for group in groups)


def _cycle_in(group: list[str], succ: dict[str, set[str]]) -> list[str]:
    """A shortest cycle through the group's first module, staying inside the group."""
    start, members = group[0], set(group)
    parent: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(succ[v] & members):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(parent[path[-1]])
                    return path[::-1] + [start]
                if w not in parent:
                    parent[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no cycle through {start} in {group}")  # pragma: no cover


def cycle_edges(graph: Graph, cycle: list[str]) -> list[Edge]:
    """The import statements along a cycle (first runtime edge of each hop)."""
    out = []
    for a, b in zip(cycle, cycle[1:], strict=False):
        out.append(next(e for e in graph.runtime_edges() if e.src == a and e.dst == b))
    return out


def type_only_cycles(graph: Graph) -> list[list[str]]:
    """Cycles that exist only when type-only imports are counted (informational)."""
    full = Graph(graph.root, graph.modules, [Edge(e.src, e.dst, e.line, "top") for e in graph.edges])
    runtime = {tuple(c) for c in find_cycles(graph)}
    return [c for c in find_cycles(full) if tuple(c) not in runtime]


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------
def _where(graph: Graph, e: Edge) -> str:
    return f"{graph.modules[e.src].relative_to(graph.root)}:{e.line}"


def allowed_targets(package: str) -> list[str]:
    return [p for p in LAYERS if LAYERS[p] < LAYERS[package]]


def report(graph: Graph) -> tuple[str, bool]:
    """(readable text, True iff every rule holds)."""
    lines = [
        f"{len(graph.modules)} modules, {len(graph.edges)} imports of local modules "
        f"({sum(e.kind == 'type' for e in graph.edges)} type-only)"
    ]
    cycles, upward = find_cycles(graph), layer_violations(graph)
    if cycles:
        lines.append(f"CYCLES ({len(cycles)}): modules that import each other at run time")
        for cycle in cycles:
            lines.append("  " + " -> ".join(cycle))
            for e in cycle_edges(graph, cycle):
                lines.append(f"      {_where(graph, e)}: {e.src} imports {e.dst} ({e.kind})")
    else:
        lines.append("cycles: none")
    if upward:
        lines.append(f"LAYERING ({len(upward)}): imports up a floor, between actor and learner, or out of the packages")
        for e in upward:
            may = ", ".join(allowed_targets(graph.package(e.src))) or "nothing outside itself"
            lines.append(
                f"  {_where(graph, e)}: {e.src} imports {e.dst} ({e.kind}); {graph.package(e.src)} may import: {may}"
            )
    else:
        lines.append("layering: no upward, sideways or outside imports")
    for cycle in type_only_cycles(graph):
        lines.append("note: cycle through type-only imports (allowed): " + " -> ".join(cycle))
    for module, line, name in graph.unresolved:
        lines.append(
            f"warning: {graph.modules[module].relative_to(graph.root)}:{line}: "
            f"{module} imports {name}, which is not a module of the scan"
        )
    return "\n".join(lines), not cycles and not upward


# ---------------------------------------------------------------------------------------------
# the generated block
# ---------------------------------------------------------------------------------------------
def _node_id(module: str) -> str:
    return module.replace(".", "_")


def _short(module: str) -> str:
    return module.split(".", 1)[1] if "." in module else "__init__"


def render_block(graph: Graph) -> str:
    """Markdown between the markers: package graph, one module graph per package, a listing."""
    out = [BEGIN, "<!-- generated by `python docs/import_graph.py`; do not edit by hand -->", ""]
    pkg_edges: dict[tuple[str, str], int] = {}
    for a_mod, b_mod in sorted({(e.src, e.dst) for e in graph.edges}):
        a, b = graph.package(a_mod), graph.package(b_mod)
        if a != b:
            pkg_edges[(a, b)] = pkg_edges.get((a, b), 0) + 1
    out += [
        "Packages (arrow = imports; the number counts the pairs of modules joined by an import):",
        "",
        "```mermaid",
        "graph TD",
    ]
    for pkg in LAYERS:
        out.append(f'  {pkg}["{pkg}/"]')
    for (a, b), n in sorted(pkg_edges.items()):
        out.append(f"  {a} -->|{n}| {b}")
    out += ["```", ""]
    out += [
        "Inside each package (solid: imported at module level; dotted: inside a function or "
        "by `importlib`; type-only imports are not drawn):",
        "",
    ]
    for pkg in LAYERS:
        mods = [m for m in graph.modules if graph.package(m) == pkg]
        inner = sorted(
            {
                (e.src, e.dst, e.kind == "top")
                for e in graph.runtime_edges()
                if graph.package(e.src) == pkg and graph.package(e.dst) == pkg
            }
        )
        solid = {(a, b) for a, b, top in inner if top}
        out += [f"`{pkg}/`", "", "```mermaid", "graph LR"]
        for m in mods:
            out.append(f'  {_node_id(m)}["{_short(m)}"]')
        for a, b, top in inner:
            if top or (a, b) not in solid:
                out.append(f"  {_node_id(a)} {'-->' if top else '-.->'} {_node_id(b)}")
        out += ["```", ""]
    out += [
        "Cross-package imports by module († inside a function or by `importlib`, ‡ type-only):",
        "",
        "| module | imports from lower floors |",
        "|---|---|",
    ]
    for m in graph.modules:
        seen: dict[str, str] = {}
        for e in graph.edges:
            if e.src == m and graph.package(e.dst) != graph.package(m):
                mark = "" if e.kind == "top" else ("‡" if e.kind == "type" else "†")
                if e.dst not in seen or mark == "" or (mark == "†" and seen[e.dst] == "‡"):
                    seen[e.dst] = mark
        if seen:
            out.append(f"| `{m}` | " + ", ".join(f"`{d}`{mark}" for d, mark in sorted(seen.items())) + " |")
    cycles, upward = find_cycles(graph), layer_violations(graph)
    out += [
        "",
        "Checks: "
        + ("cycles: none" if not cycles else "CYCLES: " + "; ".join(" → ".join(c) for c in cycles))
        + "; "
        + ("layering: holds" if not upward else "LAYERING BROKEN: " + "; ".join(f"{e.src} → {e.dst}" for e in upward))
        + ".",
        END,
    ]
    return "\n".join(out)


def splice(text: str, block: str) -> str:
    """`text` with the part from BEGIN to END (inclusive) replaced by `block`."""
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise ValueError(f"the design doc has no '{BEGIN}' ... '{END}' markers")
    return text[:start] + block + text[end + len(END) :]


def is_stale(graph: Graph, design: Path = DESIGN) -> bool:
    text = design.read_text(encoding="utf-8")
    return splice(text, render_block(graph)) != text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="exit 1 if the doc's block is stale or a rule is broken")
    mode.add_argument("--report", action="store_true", help="print the report only")
    mode.add_argument("--print", action="store_true", help="print the generated block")
    ap.add_argument("--design", type=Path, default=DESIGN, help="the Markdown file holding the markers")
    args = ap.parse_args(argv)
    graph = scan(ROOT)
    text, ok = report(graph)
    if args.print:
        print(render_block(graph))
        return 0 if ok else 1
    print(text)
    if args.report:
        return 0 if ok else 1
    if args.check:
        if is_stale(graph, args.design):
            print(f"STALE: {args.design} does not show the current graph: run python docs/import_graph.py")
            return 1
        return 0 if ok else 1
    old = args.design.read_text(encoding="utf-8")
    new = splice(old, render_block(graph))
    if new != old:
        args.design.write_text(new, encoding="utf-8")
        print(f"wrote the import graph into {args.design}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
