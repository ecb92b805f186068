"""The house reads in one direction: no import cycle between the modules of ``higher``, and no
class over about 400 lines.

The import graph is read from the source with ``ast``, not by importing it: every ``import`` and
``from ... import`` statement counts, at the top of a module or inside a function (a deferred
import still ties the two modules together) or under ``if TYPE_CHECKING:``; relative imports are
resolved against the module's package. ``from package import name`` is an edge to
``package.name`` when that is a module of ``higher``, else to ``package`` itself. The implicit
import of a module's parent packages is not an edge (``higher/__init__.py`` imports every public
module, so counting it would make everything a cycle).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "higher"
MAX_CLASS_LINES = 400


def _modules(src: Path = SRC, package: str = PACKAGE) -> dict[str, Path]:
    """Every module of ``package`` under ``src``: dotted name -> file (``__init__.py`` for packages)."""
    modules = {}
    for path in sorted((src / package).rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _imported(name: str, path: Path, modules: Mapping[str, Path]) -> Iterator[tuple[str, int]]:
    """``(module of the package, line)`` for every import in the module ``name`` at ``path``."""
    is_package = path.name == "__init__.py"
    package_parts = name.split(".") if is_package else name.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = alias.name
                while target and target not in modules:  # import a.b.c binds a but runs a.b.c
                    target = target.rpartition(".")[0]
                if target:
                    yield target, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package_parts[: len(package_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if not (base == PACKAGE or base.startswith(PACKAGE + ".")) or base not in modules:
                continue
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                yield (submodule if submodule in modules else base), node.lineno


def import_graph(src: Path = SRC, package: str = PACKAGE) -> dict[str, dict[str, int]]:
    """module -> {imported module: line of the (first) import}, between the modules of ``package``."""
    modules = _modules(src, package)
    graph: dict[str, dict[str, int]] = {}
    for name, path in modules.items():
        edges = graph.setdefault(name, {})
        for target, line in _imported(name, path, modules):
            if target != name:
                edges.setdefault(target, line)
    return graph


def find_cycle(graph: Mapping[str, Mapping[str, object]]) -> list[str] | None:
    """A cycle of ``graph`` as ``[a, b, ..., a]``, or ``None`` if it has none (depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, {})):
            if state.get(target) == 1:
                return path[path.index(target) :] + [target]
            if target not in state:
                found = visit(target)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def class_sizes(src: Path = SRC, package: str = PACKAGE) -> list[tuple[int, str]]:
    """``(lines, "module:Class")`` for every class of ``package`` (nested ones too), largest first."""
    sizes = []
    for name, path in _modules(src, package).items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                assert node.end_lineno is not None
                sizes.append((node.end_lineno - node.lineno + 1, f"{name}:{node.name}"))
    return sorted(sizes, reverse=True)


# ------------------------------------------------------------------------------------- tests


def test_no_import_cycle() -> None:
    graph = import_graph()
    assert "higher.patch" in graph and "higher._fmodel.core" in graph  # the source was found
    cycle = find_cycle(graph)
    if cycle:
        steps = [f"{a} imports {b} (line {graph[a][b]})" for a, b in zip(cycle, cycle[1:])]
        pytest.fail("import cycle in src/higher:\n  " + "\n  ".join(steps))


def test_the_graph_sees_every_kind_of_import(tmp_path: Path) -> None:
    package = tmp_path / "higher"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("from . import a\n")
    (package / "a.py").write_text("import higher.b\nfrom .sub import c\n")
    (package / "b.py").write_text("def late():\n    from . import sub\n")
    (package / "sub" / "__init__.py").write_text("")
    (package / "sub" / "c.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..a import thing\nfrom .. import VERSION\n"
    )
    graph = import_graph(tmp_path)
    assert graph == {
        "higher": {"higher.a": 1},
        "higher.a": {"higher.b": 1, "higher.sub.c": 2},
        "higher.b": {"higher.sub": 2},
        "higher.sub": {},
        "higher.sub.c": {"higher.a": 3, "higher": 4},
    }
    cycle = find_cycle(graph)
    assert cycle is not None and cycle[0] == cycle[-1]
    assert set(cycle) == {"higher", "higher.a", "higher.sub.c"}  # a -> sub.c -> a, or through higher


def test_find_cycle_on_small_graphs() -> None:
    assert find_cycle({}) is None
    assert find_cycle({"a": {"b": 1}, "b": {"c": 1}, "c": {}}) is None
    assert find_cycle({"a": {"b": 1, "c": 1}, "b": {"d": 1}, "c": {"d": 1}, "d": {}}) is None  # a diamond
    assert find_cycle({"a": {"a": 1}}) == ["a", "a"]
    assert find_cycle({"a": {"b": 1}, "b": {"c": 1}, "c": {"b": 1}}) == ["b", "c", "b"]
    assert find_cycle({"x": {}, "a": {"b": 1}, "b": {"a": 1}}) == ["a", "b", "a"]


def test_no_class_over_400_lines() -> None:
    sizes = class_sizes()
    assert any(name == "higher.patch:FunctionalModule" for _, name in sizes)
    too_big = [f"{name}: {lines} lines" for lines, name in sizes if lines > MAX_CLASS_LINES]
    assert not too_big, f"classes over {MAX_CLASS_LINES} lines (split them by responsibility): {too_big}"


if __name__ == "__main__":  # python tests/test_imports.py: the class sizes and the import graph
    for lines, name in class_sizes()[:15]:
        print(f"{lines:5d}  {name}")
    print("cycle:", find_cycle(import_graph()))
