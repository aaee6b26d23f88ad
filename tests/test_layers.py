"""The layering: ``objectives/`` never imports the sweep, and no project modules import each other in a cycle.

Imports are read from the source (module level and inside functions alike, since a deferred import is still
a dependency), so the check costs no import of torch or the modules themselves.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("objectives", "sweeper")
# What the recipe may not depend on: the sweep on top of it and the sweep's own libraries.
FORBIDDEN_IN_OBJECTIVES = ("sweeper", "optuna", "mlflow")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))}


def imported_names(path: Path) -> Iterator[tuple[int, str]]:
    """(line, dotted name) for every import that runs, function-local ones included (not those under
    ``if TYPE_CHECKING:``, which only the type checker reads); ``from a import b`` yields ``a`` and ``a.b``."""
    module = module_name(path)
    is_package = path.name == "__init__.py"
    tree = ast.parse(path.read_text(), filename=str(path))
    typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and is_type_checking(node.test)
                   for stmt in node.body for n in ast.walk(stmt)}
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                # A relative import counts from the importing module's package.
                anchor = module.split(".")
                anchor = anchor if is_package else anchor[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            yield node.lineno, base
            for alias in node.names:
                yield node.lineno, f"{base}.{alias.name}"


def is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def resolve(name: str, modules: Mapping[str, Path]) -> str | None:
    """The project module an imported name lives in (its longest module prefix), or None outside the project."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in modules:
            return candidate
    return None


def import_graph(modules: Mapping[str, Path]) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        for _, name in imported_names(path):
            target = resolve(name, modules)
            # A submodule's import runs its package's __init__ first, which is no dependency of the package on it.
            if target is not None and target != module and not module.startswith(f"{target}."):
                graph[module].add(target)
    return graph


def find_cycle(graph: Mapping[str, set[str]]) -> list[str] | None:
    """One import cycle as a path that ends where it starts, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt):], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_project_has_both_layers() -> None:
    modules = project_modules()
    assert {"objectives.objective", "sweeper.objective", "sweeper.cli"} <= set(modules)


def test_objectives_import_nothing_from_the_sweep() -> None:
    bad = [
        f"{path.relative_to(ROOT)}:{line} imports {name}"
        for module, path in project_modules().items() if module.split(".")[0] == "objectives"
        for line, name in imported_names(path)
        if name.split(".")[0] in FORBIDDEN_IN_OBJECTIVES
    ]
    assert not bad, "objectives/ must not depend on the sweep:\n" + "\n".join(bad)


def test_no_import_cycles() -> None:
    cycle = find_cycle(import_graph(project_modules()))
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


@pytest.mark.parametrize(("graph", "expected"), [
    ({"a": {"b"}, "b": {"c"}, "c": set()}, None),
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, ["a", "b", "c", "a"]),
    ({"a": {"b"}, "b": {"c"}, "c": {"b"}}, ["b", "c", "b"]),
])
def test_find_cycle_reports_the_path(graph: dict[str, set[str]], expected: list[str] | None) -> None:
    assert find_cycle(graph) == expected
