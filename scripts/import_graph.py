"""The import graph of the sdrt package (module-level and function-level imports alike), its
cycles and its largest functions: ``python scripts/import_graph.py [--functions N]``.

Used by ``tests/test_layout.py`` (no cycles) and for the layout notes in docs/architecture.md.
"""
from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def modules() -> dict[str, Path]:
    """sdrt's module names -> source files (``export/`` is installed as ``sdrt.export``)."""
    out = {}
    for base, prefix in ((ROOT / "sdrt", ("sdrt",)), (ROOT / "export", ("sdrt", "export"))):
        for path in sorted(base.rglob("*.py")):
            parts = list(prefix) + list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _resolve(name: str, mods: dict) -> str | None:
    """The longest sdrt module that ``name`` names (a package, a module or a name in one)."""
    while name:
        if name in mods:
            return name
        name = name.rpartition(".")[0]
    return None


def _runtime_nodes(tree: ast.AST):
    """Every node but those under ``if TYPE_CHECKING:`` (imports for annotations only)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            stack.extend(node.orelse)
            continue
        yield node
        stack.extend(ast.iter_child_nodes(node))


def edges(mods: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the sdrt modules it imports when it runs (at import time or inside a function)."""
    graph = {m: set() for m in mods}
    for mod, path in mods.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in _runtime_nodes(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")
                    anchor = anchor[:len(anchor) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{a.name}" for a in node.names] + [base]
            for t in targets:
                hit = _resolve(t, mods)
                if hit and hit != mod and not mod.startswith(hit + "."):   # a package's own parents
                    graph[mod].add(hit)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    sys.setrecursionlimit(10000)
    for v in graph:
        if v not in index:
            visit(v)
    return out


def largest_functions(mods: dict[str, Path], n: int) -> list[tuple[int, str]]:
    rows = []
    for mod, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                rows.append((node.end_lineno - node.lineno + 1, f"{mod}.{node.name}"))
    return sorted(rows, reverse=True)[:n]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--functions", type=int, default=10, help="list the N largest functions")
    args = p.parse_args()
    mods = modules()
    found = cycles(edges(mods))
    print(f"{len(mods)} modules, {sum(len(p.read_text().splitlines()) for p in mods.values())} lines")
    print("cycles:", "none" if not found else "; ".join(" <-> ".join(c) for c in found))
    for lines, name in largest_functions(mods, args.functions):
        print(f"{lines:5d}  {name}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
