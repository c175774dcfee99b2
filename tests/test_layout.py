"""The package's shape: imports flow one way between subpackages, and the product stands alone.

Read from the source with :mod:`ast` (every import, including ones inside
functions), so a lazy import cannot hide a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "isoscope"

# Modules directly under src/isoscope that are shared leaves (vocabulary and small utilities).
LEAVES = {"model", "spool", "otlpjson", "logs", "__init__"}


def _unit(module: str) -> str | None:
    """The top-level unit of an ``isoscope.*`` module name: its subpackage or its top-level module."""
    parts = module.split(".")
    if parts[0] != "isoscope":
        return None
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(path: Path, package: str) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the file's package
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)
    return out


def _module_files() -> dict[str, Path]:
    files = {}
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC.parent).with_suffix("")
        name = ".".join(rel.parts)
        files[name.removesuffix(".__init__")] = path
    return files


def _graph() -> dict[str, set[str]]:
    """Top-level unit → the units it imports (``isoscope`` itself, i.e. ``__version__``, counts as a leaf)."""
    files = _module_files()
    units = {u for u in map(_unit, files) if u}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        unit = _unit(name)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for imp in _imports(path, package):
            other = _unit(imp)
            if other in units and other != unit:
                graph.setdefault(unit, set()).add(other)
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if not state.get(m):
                found = visit(m)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if not state.get(n):
            found = visit(n)
            if found:
                return found
    return None


def test_no_import_cycles_between_subpackages() -> None:
    graph = _graph()
    assert graph, "no imports found: the test reads the wrong tree"
    assert _cycle(graph) is None, f"import cycle: {' -> '.join(_cycle(graph) or [])}"


def test_the_cycle_finder_finds_cycles() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": {"c"}}) is None


def test_exporters_import_only_the_model_and_leaves() -> None:
    graph = _graph()
    assert graph.get("exporters", set()) <= LEAVES, graph.get("exporters")


def test_model_imports_nothing_of_the_package() -> None:
    assert not _graph().get("model")


@pytest.mark.parametrize("forbidden", ["isoscope_lab", "tests", "bench"])
def test_product_never_imports_lab_tests_or_bench(forbidden: str) -> None:
    offenders = []
    for name, path in _module_files().items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        if any(i == forbidden or i.startswith(forbidden + ".") for i in _imports(path, package)):
            offenders.append(name)
    assert not offenders, f"{forbidden} imported by {offenders}"


def test_nothing_cites_files_outside_the_repository() -> None:
    cited = [str(p.relative_to(ROOT)) for p in list(SRC.rglob("*")) + list((ROOT / "lab").rglob("*"))
             if p.is_file() and p.suffix in {".py", ".c", ".h"} and "../shared" in p.read_text(errors="replace")]
    assert not cited, cited
