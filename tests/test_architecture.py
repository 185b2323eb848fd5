"""Architecture rules that keep the code readable: no import cycle, no module grown too long.

The import graph
----------------
Every module of the two packages, ``capsgan_toolkit`` (folder ``capsgan_toolkit/``) and
``capsgan_plugins`` (folder ``plugins/``, mapped by ``[tool.setuptools] package-dir`` in
pyproject.toml), is parsed with :mod:`ast`. Every ``import`` and ``from ... import``
statement counts, at module level *and* inside functions, methods and ``if`` blocks:
relative names are resolved against the module's package, ``from pkg import name`` is an
edge to ``pkg.name`` when that is a module and to ``pkg`` otherwise, and only edges between
modules of the two packages are kept. Importing ``a.b.c`` first runs the ``__init__`` of
``a`` and ``a.b``, so those are edges too, except where they are packages of the importing
module itself (already being imported; see :func:`_targets`).

Why function-level imports count too: a lazy import inside a function only moves the
moment a cycle bites from import time to call time; the two modules still cannot be read,
tested or replaced apart, which is what the rule is for (issue 8 broke the cycles
``cli`` <-> ``cli_eval`` and ``metric_features`` <-> ``fidelity_adapters``, both of which
were partly lazy). A lazy import remains the right tool to defer a heavy dependency
(torch-fidelity, matplotlib) or to let a low module reach a higher one *without a path
back* — and then it is no cycle and this test does not mind it.

``if TYPE_CHECKING:`` blocks are skipped: they never run.

Module size
-----------
Every module under ``capsgan_toolkit/`` (sub-packages included) and ``plugins/`` stays
under :data:`MAX_LINES` lines, and the training loop, ``capsgan_toolkit/trainer.py``,
under :data:`MAX_TRAINER_LINES`, so that it reads top to bottom in one sitting (issue 8).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"capsgan_toolkit": ROOT / "capsgan_toolkit", "capsgan_plugins": ROOT / "plugins"}
"""Import name -> source folder (pyproject.toml's package-dir)."""

MAX_LINES = 400
MAX_TRAINER_LINES = 250


# --------------------------------------------------------------------------- the modules


def _modules() -> dict[str, Path]:
    """Return every module of the two packages by dotted name (a package by its own name)."""
    out = {}
    for package, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            rel = path.relative_to(folder).with_suffix("")
            parts = [package, *rel.parts]
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _type_checking_block(node: ast.AST) -> bool:
    if not isinstance(node, ast.If):
        return False
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(tree: ast.AST):
    """Yield every Import/ImportFrom node, at any depth, except those under ``if TYPE_CHECKING:``."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        for child in ast.iter_child_nodes(node):
            if not _type_checking_block(child):
                stack.append(child)


def _ancestors(module: str) -> set[str]:
    """The packages that are imported before ``module`` runs (``a`` and ``a.b`` for ``a.b.c``)."""
    parts = module.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


def _targets(module: str, node: ast.Import | ast.ImportFrom) -> set[str]:
    """The modules of the two packages that one import statement of ``module`` makes run first.

    Importing ``a.b.c`` runs ``a``, ``a.b`` and ``a.b.c``; a package that is an ancestor of
    ``module`` is being imported already, so it is no edge, except for ``from pkg import
    name`` where ``name`` is no sub-module: that reads an attribute of ``pkg``'s
    ``__init__``, a real dependency even on an ancestor.
    """
    ancestors = _ancestors(module)
    out: set[str] = set()

    def add(name: str) -> None:
        parts = name.split(".")
        for i in range(1, len(parts) + 1):
            prefix = ".".join(parts[:i])
            if prefix in MODULES and prefix not in ancestors:
                out.add(prefix)

    if isinstance(node, ast.Import):
        for alias in node.names:
            add(alias.name)
        return out - {module}
    if node.level:  # relative: resolve against the importing module's package
        package = module.split(".") if _is_package(module) else module.split(".")[:-1]
        base = ".".join(package[: len(package) - (node.level - 1)] + ([node.module] if node.module else []))
    else:
        base = node.module or ""
    add(base)
    for alias in node.names:
        sub = f"{base}.{alias.name}"
        if sub in MODULES:  # ``from pkg import submodule``
            add(sub)
        elif base in MODULES:  # ``from pkg import attribute``: pkg's own code
            out.add(base)
    return out - {module}


def import_graph() -> dict[str, set[str]]:
    """Return module -> the modules of the two packages it imports (see :func:`_targets`)."""
    graph = {}
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        edges: set[str] = set()
        for node in _import_nodes(tree):
            edges |= _targets(name, node)
        graph[name] = edges
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Return one cycle per strongly connected component with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                components.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_one_cycle(graph, comp) for comp in components]


def _one_cycle(graph: dict[str, set[str]], component: list[str]) -> list[str]:
    """A concrete cycle ``a -> b -> ... -> a`` inside a strongly connected component (BFS back to start)."""
    members, start = set(component), component[0]
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & members):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(previous[path[-1]])
                    return [start, *reversed(path[:-1]), start] if v != start else [start, start]
                if w not in previous:
                    previous[w] = v
                    nxt.append(w)
        frontier = nxt
    return component  # pragma: no cover - a strongly connected component always has a cycle


# --------------------------------------------------------------------------- the tests


def test_the_graph_sees_both_packages_and_resolves_relative_imports():
    graph = import_graph()
    assert "capsgan_toolkit.trainer" in graph and "capsgan_plugins.objectives" in graph
    assert "capsgan_toolkit.objective" in graph["capsgan_plugins.objectives"]  # a cross-package edge
    assert "capsgan_toolkit.rundir" in graph["capsgan_toolkit.trainer"]
    # capsgan_plugins imports capsgan_toolkit, never the reverse
    toolkit_to_plugins = sorted((a, b) for a, edges in graph.items() if a.startswith("capsgan_toolkit")
                                for b in edges if b.startswith("capsgan_plugins"))
    assert not toolkit_to_plugins, f"the engine imports the built-in plugins: {toolkit_to_plugins}"


def test_the_cycle_finder_finds_a_cycle_and_prints_it():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e"}}
    assert find_cycles(graph) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []
    # relative imports resolve against the package; a module's own package is no edge unless
    # an attribute of its __init__ is read
    tree = ast.parse("from . import rundir\nfrom .errors import CapsganError\nfrom . import __version__\n"
                     "from .compare import cost\nimport capsgan_plugins.objectives")
    nodes = list(_import_nodes(tree))
    found = [_targets("capsgan_toolkit.api", n) for n in sorted(nodes, key=lambda n: n.lineno)]
    assert found == [{"capsgan_toolkit.rundir"}, {"capsgan_toolkit.errors"}, {"capsgan_toolkit"},
                     {"capsgan_toolkit.compare", "capsgan_toolkit.compare.cost"},
                     {"capsgan_plugins", "capsgan_plugins.objectives"}]
    # lazy imports count; TYPE_CHECKING-only imports do not
    tree = ast.parse("def f():\n    import capsgan_toolkit.api\nif TYPE_CHECKING:\n    import capsgan_toolkit.cli\n")
    found = set().union(*(_targets("capsgan_toolkit.x", n) for n in _import_nodes(tree)))
    assert found == {"capsgan_toolkit.api"}


def test_no_import_cycle_in_the_packages():
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles (module and function-level imports; see this file's docstring):\n" + "\n".join(
        "  " + " -> ".join(cycle) for cycle in cycles)


def _line_count(path: Path) -> int:
    return len(path.read_text(encoding="utf-8").splitlines())


@pytest.mark.parametrize("name", sorted(MODULES), ids=str)
def test_every_module_is_under_the_size_limit(name):
    path = MODULES[name]
    limit = MAX_TRAINER_LINES if name == "capsgan_toolkit.trainer" else MAX_LINES
    lines = _line_count(path)
    assert lines < limit, (f"{path.relative_to(ROOT)} has {lines} lines; the limit is {limit}. Split it along a "
                           "seam a reader would name (see docs/architecture.md's module map).")
