"""Load plugins from the ``capsgan`` entry-point group and let them register components.

A plugin that fails to import, implements a hook with a wrong signature, or whose
``capsgan_register`` raises, is recorded as broken (name, distribution, error) and every
other plugin keeps working. Silent mistakes become warnings (:attr:`PluginSet.warnings`):
a plugin that registers nothing, a ``capsgan_*`` function that is no hook (a misspelt hook
name) or lacks the ``@hookimpl`` marker, a built-in's name taken by a third party, and a
name two third-party distributions both register (then neither gets the bare name; see
:mod:`capsgan_toolkit.plugin.registry`). In strict mode (``strict=True``, the CLI's
``--strict-plugins``, or the environment variable ``CAPSGAN_STRICT_PLUGINS=1``) any broken
plugin or warning raises :class:`~capsgan_toolkit.errors.PluginError` instead.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata as metadata
import importlib.util
import inspect
import os
import re
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import pluggy

from capsgan_toolkit.errors import PluginError, PluginLoadError
from capsgan_toolkit.plugin import spec as hookspecs
from capsgan_toolkit.plugin.registry import PluginOrigin, Registry, normalize_distribution

STRICT_ENV = "CAPSGAN_STRICT_PLUGINS"
"""Environment variable: ``1`` (or ``true``, ``yes``, ``on``) makes :func:`load_plugins` strict."""

_OWN_DISTRIBUTION = "capsgan-toolkit"
"""The distribution whose entry points (named ``builtin_*``) are the built-ins."""


@dataclass(frozen=True)
class BrokenPlugin:
    """A plugin that could not be loaded or failed to register."""

    name: str
    distribution: str
    error: str
    what: str = "is broken"
    """What went wrong, as the predicate of :meth:`describe` ("implements hook X with a wrong signature")."""

    def describe(self) -> str:
        return f'plugin "{self.name}" (from {self.distribution}) {self.what}: {self.error.rstrip(".")}'


@dataclass
class PluginSet:
    """The loaded plugin manager, the filled registry and what went wrong."""

    manager: pluggy.PluginManager
    registry: Registry
    broken: list[BrokenPlugin] = field(default_factory=list)
    sources: dict[str, str] = field(default_factory=dict)  # plugin name -> distribution
    warnings: list[str] = field(default_factory=list)
    """One line each: a plugin that registers nothing, an unknown hook, a name clash."""
    modules: dict[str, str] = field(default_factory=dict)  # plugin name -> module name

    def problems(self) -> list[str]:
        """Every broken plugin and every warning, one sentence each."""
        return [f"{b.describe()}." for b in self.broken] + list(self.warnings)

    def where(self, name: str) -> str:
        """``plugin "x" (module m, from dist 1.0)``: a plugin named for messages."""
        module = self.modules.get(name)
        return f'plugin "{name}" ({f"module {module}, " if module else ""}from {self.sources.get(name, "unknown distribution")})'


def _error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def new_manager() -> pluggy.PluginManager:
    """Return a plugin manager with the capsgan hook specifications."""
    pm = pluggy.PluginManager(hookspecs.NAME)
    pm.add_hookspecs(hookspecs)
    return pm


def _known_hooks() -> list[str]:
    marker = f"{hookspecs.NAME}_spec"
    return sorted(n for n, f in vars(hookspecs).items() if inspect.isfunction(f) and hasattr(f, marker))


def _strict_from_env() -> bool:
    """Whether :data:`STRICT_ENV` asks for strict plugin checks."""
    return os.environ.get(STRICT_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


def _implicit_entries() -> list[str]:
    """The ``sys.path`` entries that stand for the current folder without the user naming it.

    ``python -m``, ``python -c`` and the REPL put the current folder (``""`` or its path) first on
    ``sys.path``; ``PYTHONPATH`` entries are the user's own choice and are kept.
    """
    cwd = os.path.realpath(os.getcwd())
    explicit = {os.path.realpath(p) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p}
    return [entry for entry in sys.path
            if os.path.realpath(entry or os.curdir) == cwd and os.path.realpath(entry or os.curdir) not in explicit]


@contextmanager
def _current_folder_off_path() -> Iterator[None]:
    implicit = set(_implicit_entries())
    saved = list(sys.path)
    sys.path[:] = [entry for entry in sys.path if entry not in implicit]
    try:
        yield
    finally:
        sys.path[:] = saved


def _import_received(name: str, received_from: str) -> ModuleType:
    """Import a module that a run folder's own recipe names, never from the current folder."""
    if name in sys.modules:
        return sys.modules[name]
    try:
        with _current_folder_off_path():
            return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name is None or not name.startswith(exc.name):
            raise
        found = importlib.util.find_spec(exc.name) if _implicit_entries() else None
        if found is None:
            raise
        where = found.origin or ", ".join(found.submodule_search_locations or [])
        raise PluginLoadError(
            f'The recipe saved in {received_from} names plugin module "{name}" (run.plugins), which is found '
            f"only in the current folder ({where}). A run folder does not import code from where it is opened: "
            "if you trust the module, install its package (pip install) or put its folder on PYTHONPATH, then "
            "run the command again."
        ) from None


def load_plugins(
    extra_modules: Iterable[str | ModuleType] = (),
    *,
    entry_points: bool = True,
    strict_extra: bool = True,
    strict: bool = False,
    received_from: str | Path | None = None,
    trusted: Iterable[str] = (),
) -> PluginSet:
    """Load every installed plugin, plus modules a recipe names explicitly.

    Args:
        extra_modules: module names (``"pkg.mod"``) or modules to register besides
            the entry points, such as the ``run.plugins`` list of a recipe. These
            also choose between two third-party plugins registering the same name.
        entry_points: load the ``capsgan`` entry-point group (off in some tests).
        strict_extra: raise :class:`PluginLoadError` if an explicitly named module
            fails, rather than recording it as broken.
        strict: raise :class:`PluginError` listing every broken plugin and warning
            (also when the environment variable :data:`STRICT_ENV` is ``1``).
        received_from: the run folder or checkpoint whose saved recipe names ``extra_modules``. Such
            modules come from installed packages or the user's ``PYTHONPATH`` only, never from the
            current folder (which ``python -m`` puts on ``sys.path``): a run folder someone sent
            must not run code by being opened. Unset: the user's own recipe, imported normally.
        trusted: modules the user's own recipe or command line names too: imported normally even
            with ``received_from``.

    Returns:
        A :class:`PluginSet`.
    """
    pm = new_manager()
    registry = Registry()
    result = PluginSet(manager=pm, registry=registry)

    if entry_points:
        _load_entry_points(result)

    for item in extra_modules:
        name = item if isinstance(item, str) else item.__name__
        if pm.get_plugin(name) is not None or name in result.sources:
            registry.preferred.add(name)
            continue
        try:
            if not isinstance(item, str):
                module = item
            elif received_from is not None and item not in set(trusted):
                module = _import_received(item, str(received_from))
            else:
                module = importlib.import_module(item)
        except PluginLoadError:
            raise
        except Exception as exc:
            if strict_extra:
                raise PluginLoadError(
                    f'The recipe names plugin module "{name}", which could not be imported: '
                    f"{_error_text(exc)}. Check the module name in run.plugins and that its "
                    "package is installed in this environment."
                ) from None
            result.broken.append(BrokenPlugin(name, "recipe run.plugins", _error_text(exc), "could not be imported"))
            continue
        if pm.is_registered(module):  # installed and also named in the recipe: the recipe prefers it
            registered_as = pm.get_name(module)  # a str: the module is registered
            if registered_as is not None:
                registry.preferred.add(registered_as)
            continue
        try:
            pm.register(module, name=name)
        except Exception as exc:
            what, detail = _registration_problem(pm, exc)
            if strict_extra:
                raise PluginLoadError(
                    f'The recipe names plugin module "{name}", which {what}: {detail.rstrip(".")}. '
                    "Fix the plugin, or remove it from run.plugins."
                ) from None
            result.broken.append(BrokenPlugin(name, "recipe run.plugins", detail, what))
            continue
        result.sources[name] = "recipe run.plugins"
        result.modules[name] = name
        registry.set_origin(name, PluginOrigin(module=name))
        registry.preferred.add(name)

    register_all(result)
    _collect_warnings(result)
    if result.problems() and (strict or _strict_from_env()):
        raise PluginError(_strict_paragraph(result.problems()))
    return result


def _load_entry_points(result: PluginSet) -> None:
    pm, registry = result.manager, result.registry

    def own(ep) -> bool:
        return ep.dist is not None and normalize_distribution(ep.dist.name) == _OWN_DISTRIBUTION

    taken: dict[str, str] = {}  # plugin name -> normalized distribution
    # Built-ins first, then by name (precedence for a built-in's name is the registry's, not this order).
    for ep in sorted(metadata.entry_points(group=hookspecs.NAME), key=lambda ep: (not own(ep), ep.name)):
        project = ep.dist.name if ep.dist is not None else ""
        dist = f"{ep.dist.name} {ep.dist.version}" if ep.dist is not None else "unknown distribution"
        name = ep.name
        if name in taken:
            if taken[name] == normalize_distribution(project):
                continue  # the same distribution seen twice on the path
            name = f"{ep.name}@{normalize_distribution(project) or 'unknown'}"  # entry-point names are per distribution
        taken[name] = normalize_distribution(project)
        try:
            module = ep.load()
        except Exception as exc:  # a broken third-party plugin must not stop the rest
            result.broken.append(BrokenPlugin(name, dist, _error_text(exc), "could not be imported"))
            continue
        try:
            pm.register(module, name=name)
        except Exception as exc:
            what, detail = _registration_problem(pm, exc)
            result.broken.append(BrokenPlugin(name, dist, detail, what))
            continue
        module_name = ep.value.split(":")[0].strip()
        result.sources[name] = dist
        result.modules[name] = module_name
        registry.set_origin(name, PluginOrigin(distribution=project, module=module_name, builtin=own(ep)))


def _registration_problem(pm: pluggy.PluginManager, exc: Exception) -> tuple[str, str]:
    """Return (what, detail) for a failed ``pm.register``: a wrong hook signature, said so."""
    text = str(exc)
    hook = re.search(r"for hook '(\w+)'", text)
    if not isinstance(exc, pluggy.PluginValidationError) or hook is None:
        return "could not be registered", " ".join(_error_text(exc).split())
    name = hook.group(1)
    definition = re.search(r"hookimpl definition: (.*)", text)
    extra = re.search(r"Argument\(s\) (\{.*?\}) are declared", text)
    spec = getattr(getattr(pm.hook, name, None), "spec", None)
    passes = ", ".join(spec.argnames) if spec is not None else "?"
    if extra is not None:
        args = ", ".join(sorted(re.findall(r"'(\w+)'", extra.group(1))))
        detail = (f"{definition.group(1).strip() if definition else name} takes {args}, which the hook does "
                  f"not pass (it passes only: {passes}). Write it as def {name}({passes})")
    else:  # a wrapper that is no generator, historic wrappers, ...
        detail = " ".join(text.split())
    return f"implements hook {name} with a wrong signature", detail


def register_all(result: PluginSet) -> None:
    """Call each plugin's ``capsgan_register`` in isolation, recording failures."""
    for impl in result.manager.hook.capsgan_register.get_hookimpls():  # registration order
        name = impl.plugin_name
        result.registry.current_source = name
        try:
            impl.function(registry=result.registry)
        except Exception as exc:
            # All or nothing: drop what the plugin registered before it failed.
            result.registry.remove_source(name)
            dist = result.sources.get(name, "unknown distribution")
            result.broken.append(BrokenPlugin(name, dist, _error_text(exc)))
        finally:
            result.registry.current_source = "<unknown>"


def _hook_problems(pm: pluggy.PluginManager, plugin: object, known: list[str]) -> list[str]:
    """What a plugin defines that pluggy accepts silently but never calls."""
    prefix = f"{hookspecs.NAME}_"
    listing = f"The hooks are: {', '.join(known)}."
    problems = []
    for attr in dir(plugin):
        try:
            opts = pm.parse_hookimpl_opts(plugin, attr)
            obj = inspect.getattr_static(plugin, attr)
        except Exception:
            continue
        hook = (opts.get("specname") if opts is not None else None) or attr
        close = difflib.get_close_matches(hook, known, n=1, cutoff=0.6)
        guess = f' (did you mean "{close[0]}"?)' if close else ""
        if opts is not None and hook not in known:
            problems.append(f"implements {hook}, which is no {hookspecs.NAME} hook{guess}, so it is never called. {listing}")
        elif opts is None and attr.startswith(prefix) and (
                inspect.isroutine(obj) or isinstance(obj, (staticmethod, classmethod))):
            if attr in known:
                problems.append(f"defines {attr} without the @hookimpl marker, so it is never called: decorate it "
                                "with @capsgan_toolkit.hookimpl.")
            else:
                problems.append(f"defines {attr}, which is no {hookspecs.NAME} hook{guess}, so it is never "
                                f"called. {listing}")
    return problems


def _collect_warnings(result: PluginSet) -> None:
    pm = result.manager
    known = _known_hooks()
    broken = {b.name for b in result.broken}
    sources = {c.source for c in result.registry.components()}
    for name, plugin in pm.list_name_plugin():
        if plugin is None:
            continue
        problems = _hook_problems(pm, plugin, known)
        result.warnings += [f"{result.where(name)} {p}" for p in problems]
        observes = [h.name for h in pm.get_hookcallers(plugin) or [] if h.has_spec() and h.name != "capsgan_register"]
        if not problems and name not in broken and name not in sources and not observes:
            result.warnings.append(
                f"{result.where(name)} registers nothing: it adds no component and implements no other hook. "
                "Check that its capsgan_register calls registry.register and that the entry point names "
                "the right module."
            )
    result.warnings += result.registry.conflicts()


def _strict_paragraph(problems: list[str]) -> str:
    listed = " ".join(f"({i}) {p}" for i, p in enumerate(problems, 1))
    count = f"{len(problems)} problem{'s' if len(problems) != 1 else ''}"
    return (
        f"Strict plugin checks (--strict-plugins or {STRICT_ENV}=1) found {count}: {listed} "
        f"Fix or uninstall these plugins; without strict checks they are warnings and the other plugins load."
    )
