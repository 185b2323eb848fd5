"""The component registry: named components per family, validated on the way in.

Plugins add components through the ``capsgan_register(registry)`` hook; the engine
creates them by name with ``registry.create(family, name, params, **context)``.
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from dataclasses import dataclass
from typing import Any, Mapping

from pydantic import BaseModel, ValidationError

from capsgan_toolkit.errors import RegistryError
from capsgan_toolkit.interfaces import FAMILIES

_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclass(frozen=True)
class Component:
    """One registered component."""

    family: str
    name: str
    cls: type
    params_model: type[BaseModel]
    source: str
    description: str

    @property
    def role(self) -> str:
        return getattr(self.cls, "role", "")


def suggest(name: str, choices: list[str]) -> str:
    """Return ' Did you mean "x"?' for the closest choice, or ''."""
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.6)
    return f' Did you mean "{close[0]}"?' if close else ""


class Registry:
    """Named components in the families of :data:`capsgan_toolkit.interfaces.FAMILIES`."""

    def __init__(self) -> None:
        self._components: dict[str, dict[str, Component]] = {f: {} for f in FAMILIES}
        self.current_source = "<unknown>"

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
                model that is no pydantic model, or a name already taken.
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
        existing = self._components[family].get(name)
        if existing is not None:
            raise RegistryError(
                f'Plugin "{source}" registers {family} "{name}", but plugin '
                f'"{existing.source}" registered that name already. Rename one of them.'
            )
        doc = description or (cls.__doc__ or "").strip().splitlines()[0:1]
        comp = Component(
            family=family,
            name=name,
            cls=cls,
            params_model=params_model,
            source=source,
            description=doc if isinstance(doc, str) else (doc[0] if doc else ""),
        )
        self._components[family][name] = comp
        return comp

    def remove_source(self, source: str) -> None:
        """Forget every component that plugin ``source`` registered."""
        for components in self._components.values():
            for name in [n for n, c in components.items() if c.source == source]:
                del components[name]

    def get(self, family: str, name: str) -> Component:
        """Return the component, or raise a RegistryError with a suggestion."""
        if family not in self._components:
            raise RegistryError(f'Unknown family "{family}".{suggest(family, self.families)}')
        try:
            return self._components[family][name]
        except KeyError:
            names = sorted(self._components[family])
            raise RegistryError(
                f'Unknown {family} plugin "{name}".{suggest(str(name), names)} '
                f"Registered: {', '.join(names) or '(none)'}. "
                "Run `capsgan plugins` to list every component."
            ) from None

    def list(self, family: str, pattern: str = "*") -> list[str]:
        """Return the sorted names in ``family`` matching the glob ``pattern``."""
        return sorted(n for n in self._components.get(family, {}) if fnmatch.fnmatch(n, pattern))

    def components(self, family: str | None = None) -> list[Component]:
        """Return every component, or those of one family, sorted by family and name."""
        fams = [family] if family else self.families
        return [self._components[f][n] for f in fams for n in sorted(self._components[f])]

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
