"""Imports point down: no import cycle in ``src/fedsplit``, no library floor importing the floors above it.

Reads the source with :mod:`ast` (nothing is imported), so every import counts: top-level ones,
the ones inside functions and the ones under ``TYPE_CHECKING``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "fedsplit"
LIBRARY_FLOORS = ("split", "train", "security", "strategy")  # the floors that must not look up
UPPER_FLOORS = ("client", "server", "recipes", "transport", "channel", "cli")


def module_names(src: Path = SRC) -> dict[str, Path]:
    """Every module under ``src/fedsplit`` by dotted name (a package is its ``__init__``)."""
    out = {}
    for path in sorted((src / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The longest prefix of ``name`` that is a module of ours (``fedsplit.x.func`` -> ``fedsplit.x``)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The fedsplit modules ``module`` imports, wherever in the file the import statement is."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package holding this module
                anchor = module.split(".")
                anchor = anchor[: len(anchor) - node.level + (1 if is_package else 0)]
                base = ".".join(anchor + ([base] if base else []))
            # ``from fedsplit.server import trunk`` imports the module fedsplit.server.trunk
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for name in names:
            target = _resolve(name, modules) if name.split(".")[0] == PACKAGE else None
            if target is not None and target != module:
                found.add(target)
    return found


def import_graph(src: Path = SRC) -> dict[str, set[str]]:
    modules = module_names(src)
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph.get(node, ())):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return out


def floor(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def upward_imports(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    return sorted((m, t) for m, targets in graph.items() if floor(m) in LIBRARY_FLOORS
                  for t in targets if floor(t) in UPPER_FLOORS)


# -- the checker itself ------------------------------------------------------------------------------
def _write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / PACKAGE / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_the_checker_finds_a_cycle_through_a_function_level_import_and_an_upward_arrow(tmp_path):
    # Arrange: a <-> b (b imports a inside a function), and split/ importing server/ by a relative import
    src = _write(tmp_path, {
        "__init__.py": "",
        "a.py": "from fedsplit.b import g\n",
        "b.py": "def g():\n    from fedsplit import a\n",
        "split/__init__.py": "",
        "split/check.py": "from ..server.trunk import TrunkServer\n",
        "server/__init__.py": "",
        "server/trunk.py": "import fedsplit.split.check\n",
    })

    # Act
    graph = import_graph(src)

    # Assert
    assert cycles(graph) == [["fedsplit.a", "fedsplit.b"], ["fedsplit.server.trunk", "fedsplit.split.check"]]
    assert upward_imports(graph) == [("fedsplit.split.check", "fedsplit.server.trunk")]


# -- the real source -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph()


def test_no_import_cycle_between_modules(graph):
    assert len(graph) > 50  # the whole package was read
    assert cycles(graph) == []


def test_library_floors_import_nothing_from_the_floors_above_them(graph):
    assert upward_imports(graph) == []
