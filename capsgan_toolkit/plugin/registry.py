"""The component registry: named components per family, validated on the way in.

Plugins add components through the ``capsgan_register(registry)`` hook; the engine
creates them by name with ``registry.create(family, name, params, **context)``.

Names: a recipe names a component by its bare name (``plugin = "vit"``) or qualified by
its distribution (``plugin = "capsgan-vit:vit"``; a module named in ``run.plugins`` and
installed by no distribution qualifies by its module name). A built-in's name always means
the built-in; a third party registering it is reachable only qualified. A name registered
by two third-party distributions means neither: asking for it raises
:class:`~capsgan_toolkit.errors.NameClashError` naming both and how to choose, unless the
recipe lists exactly one of their modules in ``run.plugins`` (:attr:`Registry.preferred`).
"""

from __future__ import annotations

import builtins
import difflib
import fnmatch
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError

from capsgan_toolkit.errors import NameClashError, RegistryError
from capsgan_toolkit.plugin.families import FAMILIES

_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")


def normalize_distribution(name: str) -> str:
    """Return a distribution's normalized name (PEP 503): ``Capsgan_ViT`` -> ``capsgan-vit``."""
    return re.sub(r"[-_.]+", "-", name).lower()


@dataclass(frozen=True)
class PluginOrigin:
    """Where a plugin comes from: its distribution, its module, and whether it is built in."""

    distribution: str = ""  # the project name ("capsgan-vit"); "" for a module named in run.plugins only
    module: str = ""
    builtin: bool = False


@dataclass(frozen=True)
class Component:
    """One registered component."""

    family: str
    name: str
    cls: type
    params_model: type[BaseModel]
    source: str
    description: str
    distribution: str = ""
    module: str = ""
    builtin: bool = False

    @property
    def qualifier(self) -> str:
        """The part before the colon of :attr:`qualified_name`: the distribution, else the plugin."""
        return normalize_distribution(self.distribution) if self.distribution else self.source

    @property
    def qualified_name(self) -> str:
        """The name that always means this component: ``distribution:name``."""
        return f"{self.qualifier}:{self.name}"

    def origin(self) -> str:
        """``plugin "vit" (module capsgan_vit.plugin, from capsgan-vit)``, for messages."""
        parts = [f"module {self.module}"] if self.module else []
        parts += [f"from {self.distribution}"] if self.distribution else []
        return f'plugin "{self.source}"' + (f" ({', '.join(parts)})" if parts else "")


def suggest(name: str, choices: list[str]) -> str:
    """Return ' Did you mean "x"?' for the closest choice, or ''."""
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.6)
    return f' Did you mean "{close[0]}"?' if close else ""


class Registry:
    """Named components in the families of :data:`capsgan_toolkit.plugin.families.FAMILIES`."""

    def __init__(self) -> None:
        # family -> name -> every component registered under that name, in registration order
        self._components: dict[str, dict[str, list[Component]]] = {f: {} for f in FAMILIES}
        self._origins: dict[str, PluginOrigin] = {}
        self.current_source = "<unknown>"
        self.preferred: set[str] = set()
        """Plugins a recipe lists in ``run.plugins``: they win a bare name two third parties share."""

    def set_origin(self, source: str, origin: PluginOrigin) -> None:
        """Record where plugin ``source`` comes from, before it registers its components."""
        self._origins[source] = origin

    @property
    def families(self) -> list[str]:
        return list(self._components)

    def register(
        self,
        family: str,
        name: str,
        cls: type,
        *,
        params: type[BaseModel] | None = None,
        description: str | None = None,
    ) -> Component:
        """Register ``cls`` as component ``name`` of ``family``.

        Args:
            family: one of :attr:`families` (``encoder``, ``generator``, ...).
            name: lowercase identifier used in recipes (``[a-z][a-z0-9_]*``).
            cls: a subclass of the family's base class.
            params: the pydantic params model; defaults to ``cls.Params``.
            description: one line for ``capsgan plugins``; defaults to the class
                docstring's first line.

        Returns:
            The registered :class:`Component`.

        Raises:
            RegistryError: unknown family, bad name, wrong base class, a params
                model that is no pydantic model, or a name the same plugin, another
                plugin of its distribution, or another built-in registered already.
                (Two third-party distributions may register one name: see :meth:`get`.)
        """
        source = self.current_source
        if family not in self._components:
            raise RegistryError(
                f'Plugin "{source}" registers "{name}" in unknown family "{family}".'
                f"{suggest(family, self.families)} Families: {', '.join(self.families)}."
            )
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise RegistryError(
                f'Plugin "{source}" registers {family} {name!r}: names must be lowercase '
                "identifiers (letters, digits, underscores, starting with a letter)."
            )
        base = FAMILIES[family]
        if not (isinstance(cls, type) and issubclass(cls, base)):
            raise RegistryError(
                f'Plugin "{source}" registers {family} "{name}" as {cls!r}, which does not '
                f"subclass capsgan_toolkit.interfaces.{base.__name__}."
            )
        params_model = params if params is not None else getattr(cls, "Params", None)
        if not (isinstance(params_model, type) and issubclass(params_model, BaseModel)):
            raise RegistryError(
                f'Plugin "{source}" registers {family} "{name}" with params {params_model!r}, '
                "which is not a pydantic model."
            )
        origin = self._origins.get(source, PluginOrigin())
        for other in self._components[family].get(name, []):
            same_dist = bool(origin.distribution) and (
                normalize_distribution(other.distribution) == normalize_distribution(origin.distribution))
            if other.source == source or same_dist or (origin.builtin and other.builtin):
                raise RegistryError(
                    f'Plugin "{source}" registers {family} "{name}", but plugin '
                    f'"{other.source}" registered that name already. Rename one of them.'
                )
        doc = description or (cls.__doc__ or "").strip().splitlines()[0:1]
        comp = Component(
            family=family,
            name=name,
            cls=cls,
            params_model=params_model,
            source=source,
            description=doc if isinstance(doc, str) else (doc[0] if doc else ""),
            distribution=origin.distribution,
            module=origin.module,
            builtin=origin.builtin,
        )
        self._components[family].setdefault(name, []).append(comp)
        return comp

    def remove_source(self, source: str) -> None:
        """Forget every component that plugin ``source`` registered."""
        for components in self._components.values():
            for name in list(components):
                components[name] = [c for c in components[name] if c.source != source]
                if not components[name]:
                    del components[name]

    def _choose(self, candidates: list[Component]) -> Component | None:
        """The component a bare name means: the only one, the built-in, the preferred one, or None."""
        if len(candidates) == 1:
            return candidates[0]
        for chosen in ([c for c in candidates if c.builtin], [c for c in candidates if c.source in self.preferred]):
            if len(chosen) == 1:
                return chosen[0]
        return None

    def recipe_name(self, comp: Component) -> str:
        """The name a recipe uses for ``comp``: bare where it means ``comp``, else qualified."""
        return comp.name if self._choose(self._components[comp.family].get(comp.name, [])) is comp else comp.qualified_name

    def _clash_message(self, family: str, name: str, candidates: list[Component]) -> str:
        who = ", ".join(c.origin() for c in candidates[:-1]) + f" and {candidates[-1].origin()}"
        choices = " or ".join(f'plugin = "{c.qualified_name}"' for c in candidates)
        modules = ", ".join(f'"{c.module}"' for c in candidates if c.module)
        via = f" (one of {modules})" if modules else ""
        return (
            f'{family} "{name}" is registered by more than one third-party plugin, {who}, so none of '
            f"them is used under that bare name. Choose one in the recipe with its qualified name, {choices}, or list "
            f"the wanted plugin's module in run.plugins{via}."
        )

    def conflicts(self) -> list[str]:
        """One line per name two plugins registered: a built-in's name taken, or an unresolved clash."""
        lines = []
        for family, components in self._components.items():
            for name, candidates in sorted(components.items()):
                if len(candidates) < 2:
                    continue
                chosen = self._choose(candidates)
                if chosen is None:
                    lines.append(self._clash_message(family, name, candidates))
                elif chosen.builtin:
                    lines += [
                        f'{c.origin()} registers {family} "{name}", the name of a built-in: the built-in keeps '
                        f'it, and a recipe reaches this one only as plugin = "{c.qualified_name}".'
                        for c in candidates if c is not chosen
                    ]
        return lines

    def get(self, family: str, name: str) -> Component:
        """Return the component a recipe's ``plugin = name`` means.

        ``name`` is bare (``"vit"``) or qualified (``"capsgan-vit:vit"``, see the module docstring).

        Raises:
            NameClashError: two third-party plugins registered the bare name and the recipe
                did not choose.
            RegistryError: an unknown family or name, with a suggestion.
        """
        if family not in self._components:
            raise RegistryError(f'Unknown family "{family}".{suggest(family, self.families)}')
        name = str(name)
        qualifier, colon, bare = name.rpartition(":")
        candidates = self._components[family].get(bare if colon else name, [])
        if colon:
            wanted = normalize_distribution(qualifier)
            matches = ([c for c in candidates if c.distribution and normalize_distribution(c.distribution) == wanted]
                       or [c for c in candidates if qualifier in (c.source, c.module)])
            if len(matches) == 1:
                return matches[0]
            if candidates and not matches:
                raise RegistryError(
                    f'No plugin "{qualifier}" registers {family} "{bare}". It comes from: '
                    f"{'; '.join(c.origin() for c in candidates)}. Use "
                    f"{' or '.join(repr(c.qualified_name) for c in candidates)}."
                )
        elif candidates:
            chosen = self._choose(candidates)
            if chosen is None:
                raise NameClashError(self._clash_message(family, name, candidates))
            return chosen
        if len(candidates) > 1:  # a qualifier naming two of them (a module and a distribution)
            raise NameClashError(self._clash_message(family, bare, candidates))
        names = self.list(family)
        raise RegistryError(
            f'Unknown {family} plugin "{name}".{suggest(name, names)} '
            f"Registered: {', '.join(names) or '(none)'}. "
            "Run `capsgan plugins` to list every component."
        )

    # This method shadows the builtin ``list`` in the rest of the class body: annotations say ``builtins.list``.
    def list(self, family: str, pattern: str = "*") -> builtins.list[str]:
        """Return the sorted names :meth:`get` accepts in ``family``, matching the glob ``pattern``.

        A component reachable under its bare name is listed bare; one that is not (a
        built-in's name taken, or two third parties sharing a name) is listed qualified.
        """
        names = [self.recipe_name(c) for c in self.components(family)] if family in self._components else []
        return sorted(n for n in names if fnmatch.fnmatch(n, pattern))

    def components(self, family: str | None = None) -> builtins.list[Component]:
        """Return every component, or those of one family, sorted by family and name.

        Components sharing a name are all listed: the built-in first, then by qualified name.
        """
        fams = [family] if family else self.families
        return [
            c for f in fams for n in sorted(self._components[f])
            for c in sorted(self._components[f][n], key=lambda c: (not c.builtin, c.qualified_name))
        ]

    def validate_params(self, family: str, name: str, params: Mapping[str, Any] | BaseModel | None) -> BaseModel:
        """Return ``params`` validated against the component's own params model.

        Raises:
            pydantic.ValidationError: for the caller to report with its own location.
        """
        comp = self.get(family, name)
        if isinstance(params, comp.params_model):
            return params
        return comp.params_model.model_validate(dict(params or {}))

    def create(self, family: str, name: str, params: Mapping[str, Any] | BaseModel | None = None, **context: Any):
        """Build component ``name`` of ``family``.

        Args:
            family: the component family.
            name: the registered name.
            params: a dict (validated here) or an instance of the params model.
            **context: keyword arguments the family's constructor takes
                (``image_shape``, ``num_classes``, ``capsule_dim``).

        Returns:
            The component instance.

        Raises:
            RegistryError: unknown name, or params that do not validate.
        """
        comp = self.get(family, name)
        try:
            validated = self.validate_params(family, name, params)
        except ValidationError as exc:
            raise RegistryError(f'Bad params for {family} "{name}": {exc}') from None
        return comp.cls(validated, **context)
