"""An exponential moving average (EMA) of the generator's weights, and optionally the encoder's.

``[ema] decay = 0.999`` keeps, besides the trained weights, a shadow copy ``e`` of every
parameter, updated once per training step in which an optimizer that trains an averaged
model stepped::

    e_0 = theta_0                                  (the weights at the start of training)
    e_t = d_t * e_(t-1) + (1 - d_t) * theta_t      (theta_t: the weights after update t)
    d_t = decay                                    (warmup = false)
    d_t = min(decay, (1 + t) / (10 + t))           (warmup = true, the default)

With the warm-up an average forgets the random initial weights within the first steps
(``d_1`` = 0.18, ``d_100`` = 0.92) and reaches ``decay`` after about ``9 / (1 - decay)``
updates (TensorFlow's ``ExponentialMovingAverage`` with ``num_updates``). Buffers (batch-norm
statistics) are not averaged: the shadow copies the model's at each update.

The shadow is in every checkpoint (key ``"ema"``) and a resumed run continues it exactly.
Sample pictures, periodic evaluation, ``capsgan eval`` and ``capsgan sample`` use the
averaged weights when a run has them (:meth:`EMA.applied` swaps them in and back out).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn


class EmaSection(BaseModel):
    """The recipe's ``[ema]`` table."""

    model_config = ConfigDict(extra="forbid")

    decay: float = Field(0.0, ge=0.0, lt=1.0, description="EMA decay per update (0.999 is usual); 0 turns the EMA off.")
    encoder: bool = Field(False, description="Average the encoder too (classification and reconstruction use it).")
    warmup: bool = Field(True, description="Ramp the decay up as min(decay, (1 + t) / (10 + t)) over the first updates.")

    def check(self, recipe) -> list[tuple[str, str]]:
        """Return ``(key, message)`` problems with the recipe as a whole (nothing to average)."""
        if self.decay > 0 and recipe.generator is None and not (self.encoder and recipe.encoder is not None):
            hint = " or set ema.encoder = true to average the encoder" if recipe.encoder is not None else ""
            return [("ema.decay", f"there is no [generator] to average; set ema.decay = 0{hint}")]
        return []


class EMA:
    """Shadow weights of ``modules`` (name -> model), averaged with :meth:`update`.

    Args:
        modules: the models to average, by their checkpoint names.
        decay: ``d`` of the module docstring's formula, in (0, 1).
        warmup: ramp the decay up over the first updates.
        optimizers: names of the optimizers whose steps change the averaged models; the
            update function :meth:`wrap` returns records whether one of them stepped.
    """

    def __init__(self, modules: dict[str, nn.Module], decay: float, *, warmup: bool = True,
                 optimizers: set[str] | None = None):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay must be in (0, 1), got {decay}")
        self.modules, self.decay, self.warmup = dict(modules), float(decay), bool(warmup)
        self.optimizers = set(optimizers or ())
        self.updates = 0
        self.shadow = {name: {k: v.detach().clone() for k, v in m.state_dict().items()}
                       for name, m in self.modules.items()}
        self._stepped = False

    @classmethod
    def from_recipe(cls, section: EmaSection | None, parts, optimizer_params: dict[str, list]) -> EMA | None:
        """Return the EMA a recipe's ``[ema]`` asks for (``None`` when off).

        Args:
            section: the recipe's ``ema`` (``None`` or ``decay = 0``: off).
            parts: the built :class:`~capsgan_toolkit.objective.Parts`.
            optimizer_params: optimizer name -> the parameters it steps.
        """
        if section is None or section.decay <= 0:
            return None
        modules = {name: m for name, m in (("generator", parts.generator),
                                           ("encoder", parts.encoder if section.encoder else None)) if m is not None}
        if not modules:
            from capsgan_toolkit.errors import CapsganError

            raise CapsganError("ema.decay is set, but this recipe has no generator (and ema.encoder is false) to "
                               "average. Set ema.decay = 0, or ema.encoder = true.")
        ids = {id(p) for m in modules.values() for p in m.parameters()}
        watched = {name for name, params in optimizer_params.items() if any(id(p) in ids for p in params)}
        return cls(modules, section.decay, warmup=section.warmup, optimizers=watched)

    def current_decay(self, t: int) -> float:
        """Return ``d_t`` for update number ``t`` (1 for the first update)."""
        return min(self.decay, (1 + t) / (10 + t)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self) -> None:
        """Move the shadow towards the models' current weights (one update); copy their buffers."""
        self.updates += 1
        weight = 1.0 - self.current_decay(self.updates)
        for name, module in self.modules.items():
            shadow = self.shadow[name]
            for key, value in module.state_dict(keep_vars=True).items():
                if isinstance(value, nn.Parameter) and value.is_floating_point():
                    shadow[key].lerp_(value.detach(), weight)
                else:
                    shadow[key].copy_(value.detach())

    # ------------------------------------------------------------------ in the training loop

    def wrap(self, update: Callable[..., bool]) -> Callable[..., bool]:
        """Return the loop's ``update`` function, recording whether it stepped an averaged model."""

        def recorded(optimizer: str, loss, terms) -> bool:
            applied = update(optimizer, loss, terms)
            if applied and optimizer in self.optimizers:
                self._stepped = True
            return applied

        return recorded

    def end_step(self) -> None:
        """Call after each training step: one update if an averaged model was stepped during it."""
        if self._stepped:
            self.update()
        self._stepped = False

    # ------------------------------------------------------------------ using the average

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """Put the averaged weights into the models for the ``with`` block, then the trained ones back.

        Only weights are copied (in place, so optimizers keep their parameters); no random
        number is drawn.
        """
        with torch.no_grad():
            raw = {name: {k: v.detach().clone() for k, v in m.state_dict().items()}
                   for name, m in self.modules.items()}
            for name, module in self.modules.items():
                module.load_state_dict(self.shadow[name])
        try:
            yield
        finally:
            with torch.no_grad():
                for name, module in self.modules.items():
                    module.load_state_dict(raw[name])

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "warmup": self.warmup, "updates": self.updates,
                "models": {name: {k: v.clone() for k, v in s.items()} for name, s in self.shadow.items()}}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (the same models; shapes and keys must match)."""
        if set(state["models"]) != set(self.shadow):
            raise KeyError(f"the checkpoint averages {sorted(state['models'])}, this recipe {sorted(self.shadow)}")
        for name, shadow in self.shadow.items():
            saved = state["models"][name]
            if set(saved) != set(shadow):
                raise KeyError(f"the averaged {name} has other weights than this recipe's")
            for key, value in shadow.items():
                if tuple(saved[key].shape) != tuple(value.shape):
                    raise KeyError(f"the averaged {name}.{key} has shape {tuple(saved[key].shape)}, this recipe's "
                                   f"{tuple(value.shape)}")
                value.copy_(saved[key])
        self.updates = int(state["updates"])


def averaged(ema: EMA | None):
    """``ema.applied()``, or a context that does nothing when there is no EMA."""
    return ema.applied() if ema is not None else contextlib.nullcontext()


def load_averaged(modules: dict[str, nn.Module], state: dict[str, Any] | None) -> list[str]:
    """Load a checkpoint's ``"ema"`` entry into ``modules``; return the names of the models it replaced."""
    if not state:
        return []
    for name, weights in state["models"].items():
        modules[name].load_state_dict(weights)
    return sorted(state["models"])
