"""What the trainer saves and restores: the checkpoint's contents, writing, pruning and loading.

The :class:`~capsgan_toolkit.training.trainer.Trainer` holds one :class:`Checkpointing` (its
``checkpoints``), made with every object whose state a checkpoint holds (models, optimizers and
schedules, gate, guard, position, EMA) and with where checkpoints go. In a distributed run
only rank 0 writes; every rank restores from the same file.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pluggy
import torch

from capsgan_toolkit import __version__
from capsgan_toolkit.errors import CheckpointError
from capsgan_toolkit.plugin.events import CheckpointSaved, emit
from capsgan_toolkit.recipe.build import Built
from capsgan_toolkit.recipe.schema import ResolvedRecipe
from capsgan_toolkit.rundir import checkpoint as ckpt
from capsgan_toolkit.rundir.folder import RunDir
from capsgan_toolkit.rundir.reporting import MetricsLog
from capsgan_toolkit.step.distributed import DiscardLog, Distributed
from capsgan_toolkit.step.divergence import DivergenceGuard
from capsgan_toolkit.step.ema import EMA
from capsgan_toolkit.training.state import Position, rng_state, set_rng_state
from capsgan_toolkit.training.stepping import Optimizers


class Checkpointing:
    """A run's checkpoints: :meth:`state_dict` / :meth:`restore` of the training state, :meth:`save` to disk.

    Args:
        resolved: the run's recipe (saved in each checkpoint; its ``[checkpoint]`` table: pruning, timing).
        built: the components (their models and gate are saved).
        opt: the optimizers and schedules.
        pos: the position in training and the running values.
        guard: the divergence guard.
        ema: the averaged weights (``None`` without ``[ema]``).
        rd: the run folder (checkpoints/ inside it).
        metrics: the run's metrics log (a restore drops its rows after the restored step).
        dist: this process's place in a distributed run (rank 0 alone writes).
        events: the plugin manager told of each saved checkpoint.
    """

    def __init__(self, resolved: ResolvedRecipe, built: Built, opt: Optimizers, pos: Position, guard: DivergenceGuard,
                 ema: EMA | None, *, rd: RunDir, metrics: MetricsLog | DiscardLog, dist: Distributed,
                 events: pluggy.PluginManager) -> None:
        self.resolved, self.built, self.opt, self.pos, self.guard, self.ema = resolved, built, opt, pos, guard, ema
        self.rd, self.metrics, self.dist, self.events = rd, metrics, dist, events
        self.settings = resolved.recipe.checkpoint
        self._last_saved = time.monotonic()  # checkpoint.every_minutes counts from here

    # ------------------------------------------------------------------ the training state

    def state_dict(self) -> dict[str, Any]:
        """Return everything needed to continue exactly (see the trainer's module docstring)."""
        pos = self.pos.state_dict()
        return {
            "format": ckpt.FORMAT_VERSION, "toolkit_version": __version__,
            "recipe": self.resolved.to_dict(), "recipe_digest": self.resolved.digest(),
            "models": {name: m.state_dict() for name, m in self.built.modules().items()},
            **self.opt.state_dict(),
            "gate": self.built.gate.state_dict(), "guard": self.guard.state_dict(),
            "position": {k: pos.pop(k) for k in ("epoch", "batch_in_epoch", "step")},
            "running": pos, "rng": rng_state(), "ema": self.ema.state_dict() if self.ema is not None else None,
            "world_size": self.dist.world_size,
        }

    def restore(self, state: dict[str, Any], source: str | Path = "the checkpoint") -> None:
        """Load ``state`` (a :meth:`state_dict`) into the run; ``source`` names it in messages.

        Raises:
            CheckpointError: it holds other models, or comes from a run on another number of processes.
        """
        expected = set(self.built.modules())
        if set(state.get("models", {})) != expected:
            raise CheckpointError(f"{source} holds models {sorted(state.get('models', {}))}, but this recipe builds "
                                  f"{sorted(expected)}. It comes from another recipe.")
        saved_world = int(state.get("world_size", 1))
        if saved_world != self.dist.world_size:
            raise CheckpointError(
                f"{source} was written by a run on {saved_world} process(es), and this one has {self.dist.world_size}. "
                f"The global batch (data.batch_size x processes) would change, so the run would not continue "
                f"exactly: resume with {saved_world} process(es) (torchrun --nproc_per_node), or start a new run.")
        try:
            for name, module in self.built.modules().items():
                module.load_state_dict(state["models"][name])
            self.opt.load_state_dict(state)
            self.pos.load_state_dict({**state["position"], **state["running"]})
            if self.ema is not None:
                self.ema.load_state_dict(state["ema"])
        except (RuntimeError, KeyError, ValueError, TypeError) as exc:
            raise CheckpointError(f"{source} does not fit the models of this recipe ({str(exc).splitlines()[0]}). "
                                  "It comes from another recipe or an incompatible version.") from None
        self.built.gate.load_state_dict(state["gate"])
        self.guard.load_state_dict(state["guard"])
        set_rng_state(state["rng"])
        self.metrics.truncate_after(self.pos.step, self.pos.epoch)

    # ------------------------------------------------------------------ files

    def load(self, path: str | Path, device: torch.device) -> dict[str, Any]:
        """Read the checkpoint at ``path`` (tensors onto ``device``)."""
        return ckpt.load_checkpoint(path, device)

    def latest(self) -> Path | None:
        """Return the newest checkpoint of the run folder (``None`` before the first)."""
        return ckpt.latest(self.rd.checkpoints_dir)

    def save(self, name: str) -> Path | None:
        """Write checkpoint ``name`` atomically into checkpoints/ (rank 0 only; others return ``None``)."""
        if not self.dist.is_main:
            return None
        path = ckpt.save_checkpoint(self.state_dict(), self.rd.checkpoint_file(name))
        self._last_saved = time.monotonic()
        emit(self.events, CheckpointSaved(self.rd.path, path, self.pos.epoch, self.pos.step))
        return path

    def periodic_name(self) -> str:
        """The file name of a periodic checkpoint at the current step (``step_*.pt``)."""
        return ckpt.periodic_name(self.pos.step)

    def prune(self) -> None:
        """Delete the periodic checkpoints but the last ``checkpoint.keep_last``."""
        ckpt.prune(self.rd.checkpoints_dir, self.settings.keep_last)

    def minutes_due(self) -> bool:
        """Whether ``checkpoint.every_minutes`` have passed since the last checkpoint (or the start)."""
        minutes = self.settings.every_minutes
        return bool(minutes) and time.monotonic() - self._last_saved >= 60 * minutes

    def epoch_due(self, done: int) -> bool:
        """Whether ``checkpoint.every_epochs`` asks for a periodic checkpoint after ``done`` epochs."""
        every = self.settings.every_epochs
        return bool(every) and done % every == 0
