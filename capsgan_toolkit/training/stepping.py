"""The optimizers of a run and the one function that steps them: NaN checks, backward, clipping, schedules.

The objective calls :meth:`Optimizers.update` for each optimizer step it wants; everything a
step needs besides the algorithm (zeroing, back-propagation, the gradient norm and clipping,
NaN/Inf handling per ``run.on_nan``, the learning-rate schedules) lives here.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch

from capsgan_toolkit.errors import NumericalError
from capsgan_toolkit.rundir import checkpoint as ckpt
from capsgan_toolkit.step import distributed
from capsgan_toolkit.step.optim import build_optimizer, clip_gradients, scale_learning_rates

# Which recipe table a logged loss term comes from, and what it trains (for NaN messages).
TERMS = {"classification": ("classification", "encoder"), "reconstruction": ("reconstruction", "encoder and generator"),
         "adversarial": ("adversarial", "generator"), "discriminator": ("adversarial", "discriminator")}


def _all_finite(output: Any) -> torch.Tensor | None:
    """One device boolean: whether every floating tensor in ``output`` (tensor, tuple, list, dict) is finite."""
    if isinstance(output, torch.Tensor):
        return torch.isfinite(output.detach()).all() if output.is_floating_point() else None
    parts = output.values() if isinstance(output, dict) else output if isinstance(output, (tuple, list)) else ()
    flags = [f for f in (_all_finite(p) for p in parts) if f is not None]
    return torch.stack(flags).all() if flags else None


class OutputWatch:
    """Remembers, per step, whether each model's output was finite, in the order the models ran.

    A forward hook on each model (encoder, generator, discriminator) keeps one device boolean per
    call (no host synchronisation); they are read only when a loss turned out NaN or Inf, so the
    message can name the model where the NaN started rather than the loss it reached. Forwards
    recorded inside a CUDA graph capture are left out (the replay runs no hooks).
    """

    def __init__(self, modules: dict[str, torch.nn.Module]):
        self.flags: list[tuple[str, torch.Tensor]] = []
        self.handles = [module.register_forward_hook(self._hook(name)) for name, module in modules.items()]

    def _hook(self, name: str):
        def record(module, inputs, output) -> None:
            if not torch.is_grad_enabled() or (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()):
                return  # evaluation forwards, and graph captures, do not count
            flag = _all_finite(output)
            if flag is not None:
                self.flags.append((name, flag))
        return record

    def clear(self) -> None:
        self.flags.clear()

    def first_not_finite(self) -> str | None:
        """The model whose output was first not finite since the step began (``None``: every output was finite)."""
        if not self.flags:
            return None
        finite = torch.stack([flag.to(self.flags[0][1].device) for _, flag in self.flags]).tolist()
        return next((name for (name, _), ok in zip(self.flags, finite) if not ok), None)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


class Optimizers:
    """One Adam optimizer and schedule per optimizer name of the objective (those with parameters).

    Args:
        resolved: the recipe (``[optim.<name>]`` specs, ``run.on_nan``, ``losses`` for messages).
        parameters: optimizer name -> parameters (the objective's ``optimizer_parameters()``).
        total_steps: the run's steps (cosine schedules decay over them).
        modules: the models by name (to name the one whose gradient is NaN).
        pos: the run's :class:`~capsgan_toolkit.training.state.Position` (step, skipped steps, logged values).
        checkpoints_dir: where the last good checkpoint is (for the NaN message).
        dist: the run's :class:`~capsgan_toolkit.step.distributed.Distributed` (gradients averaged over ranks).
    """

    def __init__(self, resolved, parameters: dict[str, list], *, total_steps: int, modules, pos, checkpoints_dir,
                 dist=None):
        self.resolved, self.recipe = resolved, resolved.recipe
        self.params = {name: p for name, p in parameters.items() if p}
        self.optimizers, self.schedulers = {}, {}
        for name, params in self.params.items():
            self.optimizers[name], self.schedulers[name] = build_optimizer(
                resolved.optim[name], params, total_steps=total_steps)
        self.modules, self.pos, self.checkpoints_dir = modules, pos, checkpoints_dir
        self.step_skipped = False
        self.dist = dist if dist is not None else distributed.current()
        self.outputs = OutputWatch(modules)

    def update(self, optimizer: str, loss: torch.Tensor, terms: dict[str, torch.Tensor]) -> bool:
        """Check ``terms``, back-propagate ``loss``, clip, check the gradients and step ``optimizer``."""
        if optimizer not in self.optimizers:
            return False
        if not self._finite(self.dist.all_finite(terms), "the loss"):
            return False
        opt = self.optimizers[optimizer]
        opt.zero_grad(set_to_none=True)
        with torch.autocast(loss.device.type, enabled=False):  # backward outside any bf16 autocast region
            loss.backward()
        self.dist.average_gradients(self.params[optimizer])  # identical gradients (and norms) on every rank
        norm = clip_gradients(self.params[optimizer], self.resolved.optim[optimizer].clip_norm)
        if not math.isfinite(norm):
            bad = {name: torch.tensor(float("nan")) for name, m in self.modules.items()
                   if any(p.grad is not None and not torch.isfinite(p.grad).all() for p in m.parameters())}
            if not self._finite(bad or {optimizer: torch.tensor(norm)}, "the gradient of"):
                return False
        self.pos.add(f"grad_norm_{optimizer}", norm)
        opt.step()
        return True

    def end_step(self) -> None:
        """Advance every schedule by one step (also those whose optimizer sat this step out)."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler")
            for sched in self.schedulers.values():
                sched.step()
        self.step_skipped = False
        self.outputs.clear()

    def learning_rates(self) -> dict[str, float]:
        return {f"lr_{name}": sched.get_last_lr()[0] for name, sched in self.schedulers.items()}

    def scale(self, factor: float) -> None:
        scale_learning_rates(self.optimizers, self.schedulers, factor)

    def state_dict(self) -> dict[str, Any]:
        return {"optimizers": {n: o.state_dict() for n, o in self.optimizers.items()},
                "schedulers": {n: s.state_dict() for n, s in self.schedulers.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, opt in self.optimizers.items():
            opt.load_state_dict(state["optimizers"][name])
            self.schedulers[name].load_state_dict(state["schedulers"][name])

    # ------------------------------------------------------------------ NaN and Inf

    def _finite(self, values: dict[str, torch.Tensor], what: str) -> bool:
        if not values:
            return True
        device = next(iter(values.values())).device  # one read from the device for every value, not one each
        finite = torch.stack([torch.isfinite(v.detach()).all().to(device) for v in values.values()]).tolist()
        bad = [name for name, ok in zip(values, finite) if not ok]
        if not bad:
            return True
        if self.recipe.run.on_nan == "skip":
            if not self.step_skipped:  # count steps, not the checks that failed within one
                self.pos.skipped_steps += 1
                self.step_skipped = True
            return False
        last = ckpt.latest(self.checkpoints_dir)
        kept = f"the last good checkpoint, {last}, is intact" if last is not None else "no checkpoint had been written yet"
        first = self.outputs.first_not_finite()
        origin = ""
        if first is not None:
            spec = getattr(self.recipe, first, None)
            plugin = f' ([{first}] plugin "{spec.plugin}")' if getattr(spec, "plugin", None) else ""
            origin = (f" It started in the {first}{plugin}: the first model whose output was NaN or Inf in this "
                      "step; look there first.")
        raise NumericalError(
            f"Step {self.pos.step + 1} (epoch {self.pos.epoch}, as numbered in metrics.jsonl): {what} "
            f"{', '.join(self._describe(n, what) for n in bad)} is NaN or Inf.{origin} Training stopped; {kept}. "
            'Lower the learning rate, set clip_norm in [optim.<name>], or set run.on_nan = "skip" to skip such steps.')

    def _describe(self, name: str, what: str) -> str:
        if "loss" not in what or name not in TERMS:
            return f"the {name}"
        slot, trains = TERMS[name]
        spec = getattr(self.recipe.losses, slot, None)
        plugin = f' (losses.{slot}, plugin "{spec.plugin}")' if spec is not None else ""
        return f"{name}{plugin}, which trains the {trains},"
