"""Optimizers that do not fall over: learning-rate schedules and gradient clipping.

Independent parts, each usable on its own (the trainer wires them; see
docs/training-stability.md):

- :class:`OptimizerSpec` (one ``[optim.<name>]`` recipe table) and :func:`build_optimizer`:
  Adam plus a :class:`torch.optim.lr_scheduler.LambdaLR` whose multiplier is a pure
  function of the step (:func:`lr_multiplier`), so the scheduler's ``state_dict`` holds only
  plain numbers and a resumed run gets exactly the same learning rates.
  :func:`lr_at` is that same function times ``lr``, for tests, plots and docs.
- :func:`clip_gradients`: the pre-clip global gradient norm, clipping by it when asked.
- :func:`scale_learning_rates` lowers learning rates after a rollback (the divergence guard,
  :mod:`capsgan_toolkit.step.divergence`) in a way that survives a checkpoint round-trip.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch.optim.lr_scheduler import LambdaLR, LRScheduler

__all__ = [
    "OptimizerSpec",
    "build_optimizer",
    "lr_multiplier",
    "lr_at",
    "clip_gradients",
    "scale_learning_rates",
]

CLIP_EPS = 1e-6
"""Added to the norm in the clipping coefficient, as ``torch.nn.utils.clip_grad_norm_`` does."""


# --------------------------------------------------------------------------- optimizer + schedule


class OptimizerSpec(BaseModel):
    """One optimizer: Adam's settings, its learning-rate schedule and its gradient clipping."""

    model_config = ConfigDict(extra="forbid")

    lr: float = Field(
        1e-4, gt=0.0,
        description="Peak learning rate of Adam: reached at the end of the warm-up; the schedule multiplies it.",
    )
    betas: tuple[float, float] = Field((0.5, 0.999), description="Adam betas (beta1, beta2), each in [0, 1).")
    weight_decay: float = Field(0.0, ge=0.0, description="L2 weight decay (Adam's, added to the gradient).")
    schedule: Literal["constant", "cosine", "step"] = Field(
        "constant",
        description='Learning rate after the warm-up: "constant" (lr), "cosine" (lr down to lr * min_lr_ratio '
        'at the run\'s last step) or "step" (lr * step_gamma every step_every steps).',
    )
    warmup_steps: int = Field(
        0, ge=0,
        description="Linear warm-up: step s < warmup_steps uses lr * (s + 1) / warmup_steps; 0 turns it off.",
    )
    min_lr_ratio: float = Field(
        0.0, ge=0.0, le=1.0,
        description='schedule = "cosine": the final learning rate as a fraction of lr.',
    )
    step_every: int = Field(
        0, ge=0,
        description='schedule = "step": steps between decays, counted from the end of the warm-up '
        '(required, >= 1, with schedule = "step").',
    )
    step_gamma: float = Field(
        0.1, gt=0.0, le=1.0, description='schedule = "step": factor applied to the learning rate at each decay.'
    )
    clip_norm: float = Field(
        0.0, ge=0.0,
        description="Clip this optimizer's gradients to this global L2 norm; 0 turns clipping off "
        "(the pre-clip norm is measured either way).",
    )

    @model_validator(mode="after")
    def _consistent(self):
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas must each be in [0, 1), got {tuple(self.betas)}")
        if self.schedule == "step" and self.step_every < 1:
            raise ValueError('schedule = "step" needs step_every >= 1 (steps between decays)')
        return self


def lr_multiplier(spec: OptimizerSpec, step: int, total_steps: int) -> float:
    """Return the factor the schedule applies to ``spec.lr`` at 0-based ``step``.

    ``step`` counts scheduler steps taken so far: the update made after ``step`` calls of
    ``scheduler.step()`` uses ``lr * lr_multiplier(spec, step, total_steps)``. With
    ``W = warmup_steps``, ``T = total_steps``:

    - ``s < W``: ``(s + 1) / W`` (linear warm-up; the first update already moves);
    - ``constant``: ``1``;
    - ``cosine``: ``r + (1 - r) * (1 + cos(pi * p)) / 2`` with ``r = min_lr_ratio`` and
      ``p = min(1, (s - W) / max(1, T - W))`` (so ``r`` from step ``T`` on);
    - ``step``: ``step_gamma ** ((s - W) // step_every)``.
    """
    s = max(0, int(step))
    w = spec.warmup_steps
    if s < w:
        return (s + 1) / w
    if spec.schedule == "constant":
        return 1.0
    if spec.schedule == "cosine":
        p = min(1.0, (s - w) / max(1, int(total_steps) - w))
        r = spec.min_lr_ratio
        return r + (1.0 - r) * 0.5 * (1.0 + math.cos(math.pi * p))
    return spec.step_gamma ** ((s - w) // spec.step_every)


def lr_at(spec: OptimizerSpec, step: int, total_steps: int) -> float:
    """Return the learning rate at 0-based ``step``: ``spec.lr * lr_multiplier(...)``.

    Exactly the value the scheduler of :func:`build_optimizer` puts in the optimizer.
    """
    return spec.lr * lr_multiplier(spec, step, total_steps)


def build_optimizer(
    spec: OptimizerSpec, params: Iterable[Any], *, total_steps: int
) -> tuple[torch.optim.Adam, LambdaLR]:
    """Return Adam over ``params`` and its learning-rate scheduler.

    ``total_steps`` is the run's number of training steps (epochs x steps per epoch); the
    cosine schedule decays over it, the others ignore it. Call ``scheduler.step()`` once per
    training step, after ``optimizer.step()``. The scheduler's multiplier is a plain function
    (not saved in its ``state_dict``, which holds only numbers such as ``last_epoch`` and
    ``base_lrs``): to resume, build both again from the same spec and ``total_steps``, then
    load the optimizer's state and then the scheduler's.
    """
    total_steps = int(total_steps)
    if total_steps < 0:
        raise ValueError(f"total_steps must be >= 0, got {total_steps}")
    if spec.schedule == "cosine" and total_steps < 1:
        raise ValueError('schedule = "cosine" needs total_steps >= 1 (the steps it decays over)')
    params = list(params)
    settings = dict(lr=spec.lr, betas=tuple(spec.betas), weight_decay=spec.weight_decay)
    fused = _fused_on_cpu(params)
    try:
        optimizer = torch.optim.Adam(params, **settings, fused=True if fused else None)
    except RuntimeError:
        if not fused:
            raise
        optimizer = torch.optim.Adam(params, **settings)  # torch before 2.4 has no fused CPU kernel

    def multiplier(step: int) -> float:  # a plain function: LambdaLR's state_dict stores nothing of it
        return lr_multiplier(spec, step, total_steps)

    return optimizer, LambdaLR(optimizer, multiplier)


_FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _fused_on_cpu(params: list[Any]) -> bool:
    """Whether every parameter (or every parameter of every group) is a floating CPU tensor.

    There Adam runs torch's fused kernel: one pass over each parameter and its state instead
    of the default implementation's pass per arithmetic operation (about seven). It computes
    the same update, rounded in a different order (within a few units in the last place per
    step). On a GPU torch's default (one launch per operation for all parameters) is kept: the
    fused kernel measured no faster there (docs/performance.md). A checkpoint's optimizer state
    carries its setting, so a run resumed from an older checkpoint keeps the implementation it
    started with and stays exact.
    """
    tensors = [p for item in params for p in (item["params"] if isinstance(item, Mapping) else [item])]
    return bool(tensors) and all(torch.is_tensor(p) and p.device.type == "cpu" and p.dtype in _FUSED_DTYPES
                                 for p in tensors)


def _items(obj: Any) -> list[Any]:
    if obj is None:
        return []
    if isinstance(obj, Mapping):
        return list(obj.values())
    if isinstance(obj, (torch.optim.Optimizer, LRScheduler)):
        return [obj]
    return list(obj)


def scale_learning_rates(optimizers: Any, schedulers: Any, factor: float) -> None:
    """Multiply the learning rates of ``optimizers`` by ``factor``, now and for the rest of the run.

    Both arguments take one object, a sequence, a mapping (its values) or ``None``. For a
    scheduler, its ``base_lrs`` (and its optimizer's ``initial_lr``) are scaled and the
    current learning rate is set to ``base_lr * multiplier(last_epoch)``; the change is part
    of the scheduler's and optimizer's ``state_dict``, so it survives a checkpoint. An
    optimizer without a scheduler among ``schedulers`` has its groups' ``lr`` scaled.
    """
    factor = float(factor)
    if not (factor > 0.0 and math.isfinite(factor)):
        raise ValueError(f"factor must be a positive number, got {factor}")
    scheduled: set[int] = set()
    for sched in _items(schedulers):
        sched.base_lrs = [base * factor for base in sched.base_lrs]
        groups = sched.optimizer.param_groups
        new_lrs = []
        for i, (group, base) in enumerate(zip(groups, sched.base_lrs)):
            group["initial_lr"] = base
            if isinstance(sched, LambdaLR):
                group["lr"] = base * sched.lr_lambdas[i](sched.last_epoch)
            else:
                group["lr"] = group["lr"] * factor
            new_lrs.append(group["lr"])
        sched._last_lr = new_lrs
        scheduled.add(id(sched.optimizer))
    for opt in _items(optimizers):
        if id(opt) in scheduled:
            continue
        for group in opt.param_groups:
            group["lr"] = group["lr"] * factor
            if "initial_lr" in group:
                group["initial_lr"] = group["initial_lr"] * factor


# --------------------------------------------------------------------------- gradient clipping


def clip_gradients(parameters: Iterable[torch.Tensor] | torch.Tensor, max_norm: float) -> float:
    """Return the global L2 norm of the gradients before clipping; clip them when ``max_norm > 0``.

    The norm is ``sqrt(sum over every gradient element of g**2)`` (parameters without a
    gradient are skipped; none at all gives 0.0). With ``max_norm > 0`` and a norm above
    it, every gradient is multiplied by ``max_norm / (norm + 1e-6)`` (as
    ``torch.nn.utils.clip_grad_norm_`` does). With ``max_norm == 0`` the gradients are left
    alone. A non-finite norm (a NaN/Inf gradient) is returned as is and the gradients are
    left alone, so the caller's NaN handling sees them.
    """
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return 0.0
    device = grads[0].device
    # One fused launch per device and dtype on a GPU (the per-tensor norms, as vector_norm computes them).
    if all(g.device == device for g in grads):
        norms = torch._foreach_norm([g.detach() for g in grads], 2.0)
    else:
        norms = [torch.linalg.vector_norm(g.detach(), 2.0).to(device) for g in grads]
    total = torch.linalg.vector_norm(torch.stack(norms), 2.0)
    norm = float(total)
    if max_norm > 0.0 and math.isfinite(norm):
        coef = max_norm / (norm + CLIP_EPS)
        if coef < 1.0:
            with torch.no_grad():
                torch._foreach_mul_(grads, coef)
    return norm
