"""Optimizers that do not fall over: learning-rate schedules, gradient clipping, a divergence guard.

Three independent parts, each usable on its own (the trainer wires them; see
docs/training-stability.md):

- :class:`OptimizerSpec` (one ``[optim.<name>]`` recipe table) and :func:`build_optimizer`:
  Adam plus a :class:`torch.optim.lr_scheduler.LambdaLR` whose multiplier is a pure
  function of the step (:func:`lr_multiplier`), so the scheduler's ``state_dict`` holds only
  plain numbers and a resumed run gets exactly the same learning rates.
  :func:`lr_at` is that same function times ``lr``, for tests, plots and docs.
- :func:`clip_gradients`: the pre-clip global gradient norm, clipping by it when asked.
- :class:`DivergenceSpec` (the ``[run.divergence]`` table) and :class:`DivergenceGuard`:
  watches one loss and the running accuracy, reports a loss spike or an accuracy collapse
  once per episode, keeps only plain numbers as state, and does the bookkeeping of a
  rollback; :func:`scale_learning_rates` lowers learning rates in a way that survives a
  checkpoint round-trip.
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
    "DivergenceSpec",
    "DivergenceGuard",
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
    optimizer = torch.optim.Adam(params, lr=spec.lr, betas=tuple(spec.betas), weight_decay=spec.weight_decay)

    def multiplier(step: int) -> float:  # a plain function: LambdaLR's state_dict stores nothing of it
        return lr_multiplier(spec, step, total_steps)

    return optimizer, LambdaLR(optimizer, multiplier)


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
    norms = [torch.linalg.vector_norm(g.detach(), 2.0).to(device) for g in grads]
    total = torch.linalg.vector_norm(torch.stack(norms), 2.0)
    norm = float(total)
    if max_norm > 0.0 and math.isfinite(norm):
        coef = max_norm / (norm + CLIP_EPS)
        if coef < 1.0:
            with torch.no_grad():
                for g in grads:
                    g.mul_(coef)
    return norm


# --------------------------------------------------------------------------- divergence guard


class DivergenceSpec(BaseModel):
    """The divergence guard (recipe table ``[run.divergence]``)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(True, description="Watch the training for a divergence (a loss spike or accuracy collapse).")
    monitor: str = Field(
        "",
        description="Loss the guard watches, by its name in metrics.jsonl; empty: the objective's main loss "
        "(the classification loss where there is one).",
    )
    loss_factor: float = Field(
        3.0, ge=0.0,
        description="Loss spike: the watched loss above loss_factor x its running level (bias-corrected EMA); "
        "0 turns this check off, otherwise > 1.",
    )
    ema_momentum: float = Field(
        0.98, ge=0.0, lt=1.0, description="Momentum of the loss's running level (0.98: about the last 50 steps)."
    )
    accuracy_drop: float = Field(
        0.5, ge=0.0, lt=1.0,
        description="Accuracy collapse: the running accuracy below accuracy_drop x its best so far; 0 turns "
        "this check off.",
    )
    accuracy_floor: float = Field(
        0.3, ge=0.0, le=1.0,
        description="The accuracy check starts once the best running accuracy has reached this value.",
    )
    min_steps: int = Field(100, ge=0, description="Steps watched before either check can fire.")
    patience: int = Field(
        3, ge=1,
        description="Consecutive bad steps that make a divergence (and good steps that end one); "
        "one event per episode.",
    )
    action: Literal["warn", "rollback"] = Field(
        "warn",
        description='On a divergence: "warn" (log it and go on) or "rollback" (restore the last checkpoint, '
        "multiply the learning rates by lr_factor and go on).",
    )
    lr_factor: float = Field(
        0.5, gt=0.0, lt=1.0, description='action = "rollback": factor applied to every learning rate per rollback.'
    )
    max_rollbacks: int = Field(
        3, ge=0, description='action = "rollback": rollbacks allowed in a run; later divergences only warn.'
    )

    @model_validator(mode="after")
    def _factor(self):
        if 0.0 < self.loss_factor <= 1.0:
            raise ValueError(f"loss_factor must be 0 (off) or above 1, got {self.loss_factor}")
        return self


_TRACKING_KEYS = ("seen", "n", "ema", "best_accuracy", "bad_streak", "good_streak", "in_episode", "first_bad_step")
_BOOK_KEYS = ("episodes", "rollbacks", "lr_scale")


class DivergenceGuard:
    """Detects a loss spike or a running-accuracy collapse; one event per episode.

    Call :meth:`update` once per training step with the watched loss and the running
    accuracy. A step is *bad* when, after the first ``min_steps`` updates,

    - the loss is above ``loss_factor * level`` (or not finite), ``level`` being the
      bias-corrected EMA of the earlier finite losses: ``ema_n = m * ema_{n-1} + (1 - m) * x_n``,
      ``level = ema_n / (1 - m ** n)``. A bad step's loss is left out of the level until
      its episode starts (so the spike cannot raise its own bar); inside an episode every
      finite loss counts (so a lasting new level ends the episode); or
    - the best running accuracy so far has reached ``accuracy_floor`` and the accuracy is
      below ``accuracy_drop * best``.

    ``patience`` consecutive bad steps start an episode and return one event; the episode
    ends after ``patience`` consecutive good steps, and only then can a new event come.
    The state is plain ints, floats and bools (:meth:`state_dict`).
    """

    def __init__(self, spec: DivergenceSpec | None = None):
        self.spec = spec if spec is not None else DivergenceSpec()
        self._seen = 0  # updates so far
        self._n = 0  # finite losses folded into the EMA
        self._ema = 0.0
        self._best_acc = 0.0
        self._bad_streak = 0
        self._good_streak = 0
        self._in_episode = False
        self._first_bad_step = -1
        self._episodes = 0
        self._rollbacks = 0
        self._lr_scale = 1.0

    # ----------------------------------------------------------- reading

    @property
    def level(self) -> float | None:
        """The loss's running level (bias-corrected EMA), ``None`` before any finite loss."""
        if self._n == 0:
            return None
        m = self.spec.ema_momentum
        return self._ema / (1.0 - m ** self._n)

    @property
    def best_accuracy(self) -> float:
        return self._best_acc

    @property
    def in_episode(self) -> bool:
        return self._in_episode

    @property
    def episodes(self) -> int:
        return self._episodes

    @property
    def rollbacks(self) -> int:
        return self._rollbacks

    @property
    def lr_scale(self) -> float:
        """Product of the rollbacks' learning-rate factors so far (``lr_factor ** rollbacks``)."""
        return self._lr_scale

    # ----------------------------------------------------------- feeding

    def update(self, step: int, loss: float | None = None, accuracy: float | None = None) -> dict[str, Any] | None:
        """Feed one training step; return the divergence event when an episode starts, else ``None``.

        ``loss`` (the watched loss) or ``accuracy`` (the running accuracy) may be ``None``
        when the run has none; that check is then skipped for this step.
        """
        s = self.spec
        if not s.enabled:
            return None
        armed = self._seen >= s.min_steps
        self._seen += 1
        level = self.level

        loss_bad = False
        if loss is not None:
            loss = float(loss)
            if armed and s.loss_factor > 0.0 and level is not None:
                loss_bad = not math.isfinite(loss) or loss > s.loss_factor * level
            if math.isfinite(loss) and (not loss_bad or self._in_episode):
                m = s.ema_momentum
                self._ema = m * self._ema + (1.0 - m) * loss
                self._n += 1

        acc_bad = False
        best_before = self._best_acc
        if accuracy is not None and math.isfinite(float(accuracy)):
            accuracy = float(accuracy)
            if armed and s.accuracy_drop > 0.0 and best_before >= s.accuracy_floor:
                acc_bad = accuracy < s.accuracy_drop * best_before
            self._best_acc = max(self._best_acc, accuracy)

        if loss_bad or acc_bad:
            if self._bad_streak == 0:
                self._first_bad_step = int(step)
            self._bad_streak += 1
            self._good_streak = 0
        else:
            self._bad_streak = 0
            self._good_streak += 1

        if not self._in_episode and self._bad_streak >= s.patience:
            self._in_episode = True
            self._episodes += 1
            reasons = [r for r, bad in (("loss_spike", loss_bad), ("accuracy_collapse", acc_bad)) if bad]
            return self._event(int(step), "+".join(reasons), loss, level, accuracy, best_before)
        if self._in_episode and self._good_streak >= s.patience:
            self._in_episode = False
        return None

    def _event(self, step, reason, loss, level, accuracy, best) -> dict[str, Any]:
        s = self.spec
        rollback = s.action == "rollback" and self._rollbacks < s.max_rollbacks
        threshold = s.loss_factor * level if level is not None and s.loss_factor > 0 else None
        parts = []
        if "loss_spike" in reason:
            parts.append(f"loss {loss:.4g} > {s.loss_factor:g} x running level {level:.4g}")
        if "accuracy_collapse" in reason:
            parts.append(f"running accuracy {accuracy:.3f} < {s.accuracy_drop:g} x best {best:.3f}")
        if rollback:
            then = f"rolling back to the last checkpoint with learning rates x {s.lr_factor:g}"
        elif s.action == "rollback":
            then = f"no rollback left (max_rollbacks = {s.max_rollbacks}); continuing"
        else:
            then = "continuing (run.divergence.action = \"warn\")"
        message = (f"divergence at step {step} (bad since step {self._first_bad_step}): "
                   f"{'; '.join(parts)}; {then}")
        return {
            "event": "divergence",
            "step": step,
            "since_step": self._first_bad_step,
            "reason": reason,
            "monitor": s.monitor,
            "loss": loss,
            "level": level,
            "threshold": threshold,
            "accuracy": accuracy,
            "best_accuracy": best,
            "episode": self._episodes,
            "action": "rollback" if rollback else "warn",
            "lr_factor": s.lr_factor if rollback else None,
            "rollbacks": self._rollbacks,
            "message": message,
        }

    def rollback(self, restored: Mapping[str, Any] | None) -> float:
        """Record a rollback; return the factor to pass to :func:`scale_learning_rates`.

        Call it after restoring the models, optimizers and schedulers from a checkpoint,
        with ``restored`` = the guard state saved in that checkpoint (or a fresh guard's
        ``state_dict()`` when restarting from the initial weights; ``None`` when nothing was
        restored). The loss level and best accuracy go back to ``restored``; the count of
        episodes and rollbacks carries on. The returned factor takes the restored learning
        rates (at ``restored``'s scale) to ``lr_factor ** rollbacks``.
        """
        old_scale = self._lr_scale
        if restored is not None:
            self._load(restored, _TRACKING_KEYS)
            old_scale = float(restored["lr_scale"])
        self._bad_streak = 0
        self._good_streak = 0
        self._in_episode = False
        self._first_bad_step = -1
        self._rollbacks += 1
        self._lr_scale = self.spec.lr_factor ** self._rollbacks
        return self._lr_scale / old_scale

    # ----------------------------------------------------------- state

    def state_dict(self) -> dict[str, Any]:
        """Return the whole state as plain ints, floats and bools."""
        return {
            "seen": self._seen,
            "n": self._n,
            "ema": self._ema,
            "best_accuracy": self._best_acc,
            "bad_streak": self._bad_streak,
            "good_streak": self._good_streak,
            "in_episode": self._in_episode,
            "first_bad_step": self._first_bad_step,
            "episodes": self._episodes,
            "rollbacks": self._rollbacks,
            "lr_scale": self._lr_scale,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a state from :meth:`state_dict`."""
        self._load(state, _TRACKING_KEYS + _BOOK_KEYS)

    def _load(self, state: Mapping[str, Any], keys: tuple[str, ...]) -> None:
        missing = [k for k in keys if k not in state]
        if missing:
            raise ValueError(f"divergence guard state lacks {', '.join(missing)}")
        ints = {"seen": "_seen", "n": "_n", "bad_streak": "_bad_streak", "good_streak": "_good_streak",
                "first_bad_step": "_first_bad_step", "episodes": "_episodes", "rollbacks": "_rollbacks"}
        floats = {"ema": "_ema", "best_accuracy": "_best_acc", "lr_scale": "_lr_scale"}
        for key in keys:
            if key in ints:
                setattr(self, ints[key], int(state[key]))
            elif key in floats:
                setattr(self, floats[key], float(state[key]))
            else:
                self._in_episode = bool(state[key])
