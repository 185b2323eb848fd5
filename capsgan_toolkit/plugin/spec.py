"""Hook specifications: the contract between the engine and every plugin.

One name, ``capsgan``, is used for the plugin manager, the hook markers and the
entry-point group, so a third-party package needs only::

    [project.entry-points.capsgan]
    my_encoder = "my_package.my_module"

and, in that module, functions decorated with :data:`capsgan_toolkit.hookimpl`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:  # for the annotations only: this module imports nothing of the toolkit at run time
    from capsgan_toolkit.plugin.events import CheckpointSaved, EpochEnd, EvaluationDone, RunEnd, RunStart
    from capsgan_toolkit.plugin.registry import Registry

NAME = "capsgan"
"""Project name: plugin manager, hook markers and entry-point group."""

hookspec = pluggy.HookspecMarker(NAME)
hookimpl = pluggy.HookimplMarker(NAME)


@hookspec
def capsgan_register(registry: Registry) -> None:  # pragma: no cover - specification only
    """Add named components to the registry's families."""


@hookspec
def capsgan_run_start(event: RunStart) -> None:  # pragma: no cover - specification only
    """Observe the start (or resume) of training; ``event`` is a :class:`~capsgan_toolkit.plugin.events.RunStart`."""


@hookspec
def capsgan_epoch_end(event: EpochEnd) -> None:  # pragma: no cover - specification only
    """Observe the end of an epoch; ``event`` is an :class:`~capsgan_toolkit.plugin.events.EpochEnd`."""


@hookspec
def capsgan_checkpoint_saved(event: CheckpointSaved) -> None:  # pragma: no cover - specification only
    """Observe a checkpoint written; ``event`` is a :class:`~capsgan_toolkit.plugin.events.CheckpointSaved`."""


@hookspec
def capsgan_evaluation_done(event: EvaluationDone) -> None:  # pragma: no cover - specification only
    """Observe an evaluation's results; ``event`` is an :class:`~capsgan_toolkit.plugin.events.EvaluationDone`."""


@hookspec
def capsgan_run_end(event: RunEnd) -> None:  # pragma: no cover - specification only
    """Observe the end of training; ``event`` is a :class:`~capsgan_toolkit.plugin.events.RunEnd`."""
