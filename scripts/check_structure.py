"""Structural rules of the library, checked by the default test suite (tests/test_structure.py).

- no import cycle between the modules of ``surgery/`` (function-level imports count too: a cycle
  hidden inside a function is still a cycle in the design);
- no class longer than 300 lines, no module longer than 600 lines.

Usage: ``python scripts/check_structure.py [PACKAGE_DIR]``; prints each violation, exits 1 if any.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

MAX_CLASS_LINES = 300
MAX_MODULE_LINES = 600


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(tree: ast.Module, name: str, modules: set[str], is_package: bool) -> set[str]:
    """Modules of the package that ``name`` imports (anywhere in its body)."""
    found: set[str] = set()
    package = name if is_package else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import mod` imports the submodule pkg.mod; `from mod import name` imports mod
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None. Edges to a package's own __init__ from its
    submodules are ignored: Python runs the parent package first anyway, not as a design dependency."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if node.startswith(nxt + "."):
                continue
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def check(root: Path) -> list[str]:
    problems: list[str] = []
    files = sorted(root.rglob("*.py"))
    modules = {module_name(f, root): f for f in files}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        text = path.read_text()
        tree = ast.parse(text)
        graph[name] = imports_of(tree, name, set(modules), path.name == "__init__.py")
        lines = len(text.splitlines())
        if lines > MAX_MODULE_LINES:
            problems.append(f"{path}: {lines} lines (limit {MAX_MODULE_LINES})")
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                size = node.end_lineno - node.lineno + 1
                if size > MAX_CLASS_LINES:
                    problems.append(f"{path}:{node.lineno}: class {node.name} has {size} lines "
                                    f"(limit {MAX_CLASS_LINES})")  # fmt: skip
    cycle = find_cycle(graph)
    if cycle:
        problems.append("import cycle: " + " -> ".join(cycle))
    return problems


def main() -> int:
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[1] / "surgery"
    problems = check(root)
    for p in problems:
        print(p)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
