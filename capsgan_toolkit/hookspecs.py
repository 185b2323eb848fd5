"""Hook specifications: the contract between the engine and every plugin.

One name, ``capsgan``, is used for the plugin manager, the hook markers and the
entry-point group, so a third-party package needs only::

    [project.entry-points.capsgan]
    my_encoder = "my_package.my_module"

and, in that module, functions decorated with :data:`capsgan_toolkit.hookimpl`.
"""

from __future__ import annotations

import pluggy

NAME = "capsgan"
"""Project name: plugin manager, hook markers and entry-point group."""

hookspec = pluggy.HookspecMarker(NAME)
hookimpl = pluggy.HookimplMarker(NAME)


@hookspec
def capsgan_register(registry):  # pragma: no cover - specification only
    """Add named components to the registry's families."""


@hookspec
def capsgan_run_event(event, payload):  # pragma: no cover - specification only
    """Observe a training event (``run_start``, ``epoch_end``, ``run_end``)."""
