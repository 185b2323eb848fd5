"""Architecture rules: layers import only downward, no import cycle, the plugin API stays small.

The layers
----------
The engine, ``capsgan_toolkit``, is a stack of units (a top-level module or a sub-package),
listed bottom to top in :data:`LAYERS`; ``docs/architecture.md`` draws the same tree. A unit
imports only units of lower layers (and itself). The package's own ``__init__`` imports only
``capsgan_toolkit.plugin.spec`` (``NAME``, ``hookimpl``), which imports nothing of the toolkit,
so every module may import ``capsgan_toolkit`` for ``hookimpl`` and ``__version__``. The
built-in plugins, ``capsgan_plugins`` (folder ``plugins/``), sit beside a third party's: they
import the plugin API and the layers up to :data:`PLUGINS_REACH`, never the loop, the API,
the tools, compare or the command line, and the engine never imports them.

The plugin API (:data:`PLUGIN_API`: what a plugin author imports to write a component)
imports nothing of the engine but itself. No module imports a private name (``_x``) of
another unit.

The import graph
----------------
Every module of the two packages is parsed with :mod:`ast`. Every ``import`` and
``from ... import`` statement counts, at module level *and* inside functions, methods and
``if`` blocks: a lazy import only moves the moment a dependency bites from import time to
call time, the two modules still cannot be read or replaced apart. Relative names are
resolved against the module's package, ``from pkg import name`` is an edge to ``pkg.name``
when that is a module and to ``pkg`` otherwise. Importing ``a.b.c`` first runs the
``__init__`` of ``a`` and ``a.b``, so those are edges too, except where they are packages of
the importing module itself (see :func:`_targets`). ``if TYPE_CHECKING:`` blocks are skipped:
they never run.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"capsgan_toolkit": ROOT / "capsgan_toolkit", "capsgan_plugins": ROOT / "plugins"}
"""Import name -> source folder (pyproject.toml's package-dir)."""

LAYERS: tuple[tuple[str, ...], ...] = (
    ("errors",),
    ("interfaces", "data", "layers", "progress"),
    ("objective",),
    ("step",),          # optim, divergence, EMA, augment, speed, CUDA graphs, distributed
    ("plugin",),        # spec, events, registry + families, manager
    ("catalogue",),     # metric names, directions, the [eval] table
    ("recipe",),        # schema, TOML, build
    ("rundir",),        # the run folder, checkpoint files, logs and pictures
    ("evaluation",),    # evaluator, scores, prior, FLOPs
    ("training",),      # trainer, checkpointing, stepping, state, monitor
    ("api",),
    ("tools",),         # bench, probe, sampling, scaffold
    ("compare",),
    ("testing", "cli"),
    ("__main__",),
)
"""The engine's units, bottom to top (a unit: ``capsgan_toolkit.<unit>`` module or package)."""

PLUGIN_API = frozenset({"errors", "interfaces", "data", "layers", "objective"})
"""The units a plugin author needs to write a component (and ``capsgan_toolkit.hookimpl``)."""

PLUGINS_REACH = "evaluation"
"""The highest layer the built-in plugins may import (the prior fit, image scores)."""


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
    assert "capsgan_toolkit.training.trainer" in graph and "capsgan_plugins.objectives" in graph
    assert "capsgan_toolkit.objective" in graph["capsgan_plugins.objectives"]  # a cross-package edge
    assert "capsgan_toolkit.rundir.folder" in graph["capsgan_toolkit.training.trainer"]
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
                     "from .compare import runner\nimport capsgan_plugins.objectives")
    nodes = list(_import_nodes(tree))
    found = [_targets("capsgan_toolkit.api", n) for n in sorted(nodes, key=lambda n: n.lineno)]
    assert found == [{"capsgan_toolkit.rundir"}, {"capsgan_toolkit.errors"}, {"capsgan_toolkit"},
                     {"capsgan_toolkit.compare", "capsgan_toolkit.compare.runner"},
                     {"capsgan_plugins", "capsgan_plugins.objectives"}]
    # lazy imports count; TYPE_CHECKING-only imports do not
    tree = ast.parse("def f():\n    import capsgan_toolkit.api\nif TYPE_CHECKING:\n    import capsgan_toolkit.cli.main\n")
    found = set().union(*(_targets("capsgan_toolkit.x", n) for n in _import_nodes(tree)))
    assert found == {"capsgan_toolkit.api"}


def test_no_import_cycle_in_the_packages():
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles (module and function-level imports; see this file's docstring):\n" + "\n".join(
        "  " + " -> ".join(cycle) for cycle in cycles)


def _unit(module: str) -> str:
    """``capsgan_toolkit.a.b`` -> ``a``; the package itself -> ``""``; the plugins -> ``capsgan_plugins``."""
    parts = module.split(".")
    if parts[0] == "capsgan_plugins":
        return "capsgan_plugins"
    return parts[1] if len(parts) > 1 else ""


LAYER_OF = {unit: level for level, units in enumerate(LAYERS) for unit in units}


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    """Every edge that breaks the layer rules of this file's docstring, as readable lines."""
    bad = []
    reach = LAYER_OF[PLUGINS_REACH]
    for module, edges in sorted(graph.items()):
        a = _unit(module)
        for target in sorted(edges):
            b = _unit(target)
            if a == "":
                if target not in {"capsgan_toolkit.plugin", "capsgan_toolkit.plugin.spec"}:
                    bad.append(f"{module} -> {target}: the package's __init__ imports only plugin.spec")
            elif b == "" or a == b:
                continue
            elif a == "capsgan_plugins":
                if LAYER_OF[b] > reach:
                    bad.append(f"{module} -> {target}: built-in plugins import no layer above {PLUGINS_REACH}")
            elif b == "capsgan_plugins":
                bad.append(f"{module} -> {target}: the engine never imports the built-in plugins")
            elif a in PLUGIN_API and b not in PLUGIN_API:
                bad.append(f"{module} -> {target}: the plugin API imports no engine internals")
            elif LAYER_OF[b] >= LAYER_OF[a]:
                bad.append(f"{module} -> {target}: layer {LAYER_OF[a]} ({a}) imports layer {LAYER_OF[b]} ({b})")
    return bad


def test_every_unit_has_a_layer():
    units = {_unit(m) for m in MODULES} - {"", "capsgan_plugins"}
    assert units == set(LAYER_OF), f"units without a layer: {sorted(units - set(LAYER_OF))}; " \
                                   f"layers without a unit: {sorted(set(LAYER_OF) - units)}"


def test_layers_import_only_downward():
    bad = layer_violations(import_graph())
    assert not bad, "imports against the layer order (see this file's docstring):\n  " + "\n  ".join(bad)


def test_the_layer_check_catches_an_upward_import():
    graph = {"capsgan_toolkit.step.optim": {"capsgan_toolkit.training.trainer"},
             "capsgan_toolkit.interfaces": {"capsgan_toolkit.rundir.folder"},
             "capsgan_plugins.cnn": {"capsgan_toolkit.api"},
             "capsgan_toolkit.recipe.build": {"capsgan_plugins.cnn", "capsgan_toolkit", "capsgan_toolkit.step.speed"},
             "capsgan_toolkit": {"capsgan_toolkit.api"}}
    bad = layer_violations(graph)
    assert len(bad) == 5, bad
    assert any("layer 3 (step) imports layer 9 (training)" in line for line in bad)
    assert any("plugin API imports no engine internals" in line for line in bad)


def test_no_module_imports_a_private_name_of_another_unit():
    bad = []
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in _import_nodes(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(tuple(PACKAGES)):
                if _unit(node.module) == _unit(name):
                    continue
                bad += [f"{name}: from {node.module} import {a.name}" for a in node.names
                        if a.name.startswith("_") and not a.name.startswith("__")]
    assert not bad, "private names imported across units:\n  " + "\n  ".join(bad)


def test_pyproject_lists_every_package_folder():
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {name for name in MODULES if _is_package(name)}
    assert listed == found, f"pyproject.toml [tool.setuptools] packages: missing {sorted(found - listed)}, " \
                            f"extra {sorted(listed - found)}"


# --------------------------------------------------------------------------- one home per rule

ONE_HOME = {
    # what: (regular expression over the engine's source, the one module allowed to match)
    "flatten a recipe": (r"^def flatten\(", "capsgan_toolkit.recipe.diff"),
    "the lists of recipe keys allowed to differ": (r"^(RESUMABLE|RERUN_IGNORED|GROUP_IGNORED|PER_RUN)\b.*=",
                                                   "capsgan_toolkit.recipe.diff"),
    # directions live on the catalogue's ResultKey entries: no module keeps a name -> direction table
    "a metric direction table": (r"^_?(LOWER|HIGHER|NAMED|DIRECTIONS?)\b.*=", ""),
    "build a component from a recipe table": (r"^def create\(", "capsgan_toolkit.recipe.build"),
    "call the registry's create": (r"(?<![`\w])registry\.create\(", "capsgan_toolkit.recipe.build"),
    "the slot table": (r"^SLOTS\b.*=", "capsgan_toolkit.interfaces"),
    "count FLOPs": (r"FlopCounterMode\(", "capsgan_toolkit.evaluation.flops"),
    "draw a progress bar": (r"from rich\.progress import", "capsgan_toolkit.progress"),
    "the epoch seed": (r"1_000_003 \+ (pos\.)?epoch", "capsgan_toolkit.training.state"),
    "read a recipe file into a resolved recipe": (r"^def (load_recipe|resolve_file)\(", None),
}


@pytest.mark.parametrize("what", sorted(ONE_HOME))
def test_every_rule_has_one_home(what):
    import re

    pattern, home = ONE_HOME[what]
    regex = re.compile(pattern, re.M)
    found = sorted(name for name, path in MODULES.items()
                   if name.startswith("capsgan_toolkit") and regex.search(path.read_text(encoding="utf-8")))
    if home is None:  # two names, one module each: api.load_recipe (plugins first) on schema.resolve_file
        assert found == ["capsgan_toolkit.api", "capsgan_toolkit.recipe.schema"], found
    elif home == "":
        assert found == [], f"{what}: found in {found}; the metric catalogue is its only home"
    else:
        assert found == [home], f"{what}: written in {found}; its one home is {home}"
