"""Load plugins from the ``capsgan`` entry-point group and let them register components.

A plugin that fails to import, or whose ``capsgan_register`` raises, is recorded as
broken (name, distribution, error) and every other plugin keeps working.
"""

from __future__ import annotations

import importlib
import importlib.metadata as metadata
from dataclasses import dataclass, field
from types import ModuleType
from typing import Iterable

import pluggy

from capsgan_toolkit import hookspecs
from capsgan_toolkit.errors import PluginLoadError
from capsgan_toolkit.registry import Registry


@dataclass(frozen=True)
class BrokenPlugin:
    """A plugin that could not be loaded or failed to register."""

    name: str
    distribution: str
    error: str

    def describe(self) -> str:
        return f'plugin "{self.name}" (from {self.distribution}) is broken: {self.error.rstrip(".")}'


@dataclass
class PluginSet:
    """The loaded plugin manager, the filled registry and what went wrong."""

    manager: pluggy.PluginManager
    registry: Registry
    broken: list[BrokenPlugin] = field(default_factory=list)
    sources: dict[str, str] = field(default_factory=dict)  # plugin name -> distribution

    def emit(self, event: str, payload: dict) -> None:
        """Tell every plugin observing run events about ``event``."""
        self.manager.hook.capsgan_run_event(event=event, payload=payload)


def _error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def new_manager() -> pluggy.PluginManager:
    """Return a plugin manager with the capsgan hook specifications."""
    pm = pluggy.PluginManager(hookspecs.NAME)
    pm.add_hookspecs(hookspecs)
    return pm


def load_plugins(
    extra_modules: Iterable[str | ModuleType] = (),
    *,
    entry_points: bool = True,
    strict_extra: bool = True,
) -> PluginSet:
    """Load every installed plugin, plus modules a recipe names explicitly.

    Args:
        extra_modules: module names (``"pkg.mod"``) or modules to register besides
            the entry points, such as the ``run.plugins`` list of a recipe.
        entry_points: load the ``capsgan`` entry-point group (off in some tests).
        strict_extra: raise :class:`PluginLoadError` if an explicitly named module
            fails, rather than recording it as broken.

    Returns:
        A :class:`PluginSet`.
    """
    pm = new_manager()
    registry = Registry()
    result = PluginSet(manager=pm, registry=registry)

    if entry_points:
        # Built-ins first, so a third party cannot take a built-in's name; then by name.
        def order(ep):
            own = ep.dist is not None and ep.dist.name.replace("_", "-") == "capsgan-toolkit"
            return (not own, ep.name)

        for ep in sorted(metadata.entry_points(group=hookspecs.NAME), key=order):
            dist = f"{ep.dist.name} {ep.dist.version}" if ep.dist is not None else "unknown distribution"
            if pm.get_plugin(ep.name) is not None:
                continue
            try:
                module = ep.load()
                pm.register(module, name=ep.name)
            except Exception as exc:  # a broken third-party plugin must not stop the rest
                result.broken.append(BrokenPlugin(ep.name, dist, _error_text(exc)))
                continue
            result.sources[ep.name] = dist

    for item in extra_modules:
        name = item if isinstance(item, str) else item.__name__
        if pm.get_plugin(name) is not None or name in result.sources:
            continue
        try:
            module = importlib.import_module(item) if isinstance(item, str) else item
            if pm.is_registered(module):  # installed and also named in the recipe
                continue
            pm.register(module, name=name)
        except Exception as exc:
            if strict_extra:
                raise PluginLoadError(
                    f'The recipe names plugin module "{name}", which could not be imported: '
                    f"{_error_text(exc)}. Check the module name in run.plugins and that its "
                    "package is installed in this environment."
                ) from None
            result.broken.append(BrokenPlugin(name, "recipe run.plugins", _error_text(exc)))
            continue
        result.sources[name] = "recipe run.plugins"

    register_all(result)
    return result


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
