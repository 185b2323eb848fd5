"""What the trainer saves and restores: the checkpoint's contents, writing, pruning and loading.

A mixin of :class:`capsgan_toolkit.training.trainer.Trainer` (it uses the trainer's models, optimizers,
position, gate, guard, EMA and run folder). In a distributed run only rank 0 writes; every rank
restores from the same file.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from capsgan_toolkit import __version__
from capsgan_toolkit.rundir import checkpoint as ckpt
from capsgan_toolkit.errors import CheckpointError
from capsgan_toolkit.plugin.events import CheckpointSaved, emit
from capsgan_toolkit.training.state import rng_state, set_rng_state


class Checkpointing:
    """``state_dict`` / ``_restore`` / ``save`` for the trainer."""

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

    def _restore(self, state: dict[str, Any], path) -> None:
        expected = set(self.built.modules())
        if set(state.get("models", {})) != expected:
            raise CheckpointError(f"{path} holds models {sorted(state.get('models', {}))}, but this recipe builds "
                                  f"{sorted(expected)}. It comes from another recipe.")
        saved_world = int(state.get("world_size", 1))
        if saved_world != self.dist.world_size:
            raise CheckpointError(
                f"{path} was written by a run on {saved_world} process(es), and this one has {self.dist.world_size}. "
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
            raise CheckpointError(f"{path} does not fit the models of this recipe ({str(exc).splitlines()[0]}). "
                                  "It comes from another recipe or an incompatible version.") from None
        self.built.gate.load_state_dict(state["gate"])
        self.guard.load_state_dict(state["guard"])
        set_rng_state(state["rng"])
        self.metrics.truncate_after(self.pos.step, self.pos.epoch)

    def save(self, name: str) -> Path | None:
        """Write checkpoint ``name`` atomically into checkpoints/ (rank 0 only; others return ``None``)."""
        if not self.dist.is_main:
            return None
        path = ckpt.save_checkpoint(self.state_dict(), self.rd.checkpoint_file(name))
        self._last_minutes_ckpt = time.monotonic()
        emit(self.plugins.manager, CheckpointSaved(self.rd.path, path, self.pos.epoch, self.pos.step))
        return path

    def _save_periodic(self) -> None:  # a step_*.pt, keeping the last checkpoint.keep_last
        if self.dist.is_main:
            self.save(ckpt.periodic_name(self.pos.step))
            ckpt.prune(self.rd.checkpoints_dir, self.recipe.checkpoint.keep_last)
