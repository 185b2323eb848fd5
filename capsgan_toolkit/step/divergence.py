"""The divergence guard: notice a loss spike or an accuracy collapse, once per episode.

:class:`DivergenceSpec` is the ``[run.divergence]`` recipe table; :class:`DivergenceGuard`
watches one loss and the running accuracy, reports an episode once, keeps only plain numbers
as state (exact resume), and does the bookkeeping of a rollback (see docs/training-stability.md).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


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
