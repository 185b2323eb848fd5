"""Typed run events: one dataclass per lifecycle event, one hook per event.

Observers (a TensorBoard logger, a notifier) implement the matching hook of
:mod:`capsgan_toolkit.plugin.spec` and receive the event object::

    @hookimpl
    def capsgan_epoch_end(event: EpochEnd):
        print(event.epoch, event.metrics.get("test_acc"))

Payloads are plain values (paths, numbers, dicts of numbers), never live models, so an
observer cannot change what is trained.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from capsgan_toolkit.step import distributed


@dataclass(frozen=True)
class RunStart:
    """Training is about to begin (or resume)."""

    run_dir: Path
    recipe: dict[str, Any]
    resumed: bool
    epoch: int
    step: int


@dataclass(frozen=True)
class EpochEnd:
    """An epoch ended; ``metrics`` is its metrics.jsonl row (kind "epoch").

    ``sample_file``: the epoch's sample picture, if one was saved. ``histograms``: name ->
    values of the current models on the sample test images, such as ``capsule_length``
    (every class capsule's length) and ``capsule_length_true_class``; empty without an encoder.
    """

    run_dir: Path
    epoch: int
    step: int
    metrics: dict[str, Any]
    sample_file: Path | None = None
    histograms: dict[str, list[float]] = field(default_factory=dict)


@dataclass(frozen=True)
class CheckpointSaved:
    """A checkpoint file was written atomically."""

    run_dir: Path
    path: Path
    epoch: int
    step: int


@dataclass(frozen=True)
class EvaluationDone:
    """An evaluation finished; ``metrics`` by name, ``protocol`` per metric name.

    Emitted by a periodic evaluation during training and by ``capsgan eval`` of a trained run
    (which writes the run folder's eval.json; not one written elsewhere with ``--out``).
    """

    run_dir: Path
    epoch: int
    step: int
    metrics: dict[str, float]
    protocol: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True)
class RunEnd:
    """Training reached its end; ``summary`` is what summary.json holds."""

    run_dir: Path
    summary: dict[str, Any]


_HOOKS = {RunStart: "capsgan_run_start", EpochEnd: "capsgan_epoch_end", CheckpointSaved: "capsgan_checkpoint_saved",
          EvaluationDone: "capsgan_evaluation_done", RunEnd: "capsgan_run_end"}


def emit(manager, event) -> None:
    """Call the hook of ``event``'s type on every plugin of ``manager`` (a pluggy PluginManager)."""
    if not distributed.current().is_main:  # in a torchrun run, rank 0 alone reports (and writes)
        return
    getattr(manager.hook, _HOOKS[type(event)])(event=event)
