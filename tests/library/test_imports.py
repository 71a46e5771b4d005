"""The import graph of src/ksam has no cycles (every import counts, also one inside a
function; only imports under ``if TYPE_CHECKING:`` are left out: they never run)."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"
PACKAGE = "ksam"

# Cycles known and fixed elsewhere, as frozensets of the modules in them.
KNOWN: set[frozenset[str]] = set()


def _modules() -> dict[str, Path]:
    out = {}
    for path in (SRC / PACKAGE).rglob("*.py"):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _edges(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in _imports(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            bases = [alias.name for alias in node.names]
            names: list[str] = []
        else:
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            bases = [base]
            names = [alias.name for alias in node.names]
        for base in bases:
            subs = [f"{base}.{n}" for n in names if f"{base}.{n}" in modules]
            if subs:
                targets.update(subs)
            if base in modules and len(subs) < len(names or [None]):
                targets.add(base)
    targets.discard(name)
    return targets


def _cycles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[frozenset[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(frozenset(comp))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _edges(name, path, modules) for name, path in modules.items()}


def test_the_graph_sees_the_engine_imports():
    graph = import_graph()
    assert {"ksam.core", "ksam.executor", "ksam.fast"} <= graph["ksam.engine"]
    assert {"ksam.core"} <= graph["ksam.executor"] and {"ksam.core"} <= graph["ksam.fast"]
    assert "ksam.engine" not in graph["ksam.fast"] | graph["ksam.executor"] | graph["ksam.core"]
    assert "ksam.engine" in graph["ksam.distributed"]
    assert "ksam.distributed" not in graph["ksam.engine"]


def test_a_cycle_is_found():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [
        frozenset({"a", "b", "c"})]


def test_no_import_cycles():
    cycles = [c for c in _cycles(import_graph()) if c not in KNOWN]
    assert not cycles, [sorted(c) for c in cycles]


#: The harness: the command line and what it runs (tasks, presets, comparisons, training
#: runs, benchmarks, cluster runs), and ``ksam.tasks``, its names for a task of your own.
HARNESS_ROOTS = ("ksam.lab", "ksam.tasks")
#: The entry point of ``python -m ksam``: the command line itself.
ENTRY_POINTS = {"ksam.__main__"}


def _is_harness(module: str) -> bool:
    return any(module == root or module.startswith(root + ".") for root in HARNESS_ROOTS)


def test_no_library_module_imports_the_harness():
    graph = import_graph()
    library = [m for m in graph if not _is_harness(m) and m not in ENTRY_POINTS]
    assert "ksam.core" in library and "ksam.engine" in library and "ksam.lab.cli" in graph
    leaks = {m: sorted(t for t in graph[m] if _is_harness(t)) for m in library}
    assert not {m: t for m, t in leaks.items() if t}, leaks


def test_the_harness_check_sees_an_import_of_the_harness():
    assert _is_harness("ksam.lab.compare") and _is_harness("ksam.tasks")
    assert not _is_harness("ksam.core") and not _is_harness("ksam.tasksx")
