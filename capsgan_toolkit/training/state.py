"""What a training run carries between steps, and how it is saved: RNG states, running means, counters.

Everything here goes into each checkpoint, so a resumed run continues exactly.
"""

from __future__ import annotations

import random
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import Subset

from capsgan_toolkit.errors import CapsganError
from capsgan_toolkit.step import distributed
from capsgan_toolkit.step.augment import CentreCropped


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of everything random in one epoch (its order, its loader's workers): a function of seed and epoch."""
    return seed * 1_000_003 + epoch


def epoch_permutation(seed: int, epoch: int, n: int) -> torch.Tensor:
    """Return the training order of ``epoch``: a pure function of seed and epoch, so resume needs no sampler state."""
    generator = torch.Generator().manual_seed(epoch_seed(seed, epoch))
    return torch.randperm(n, generator=generator)


def split_train_val(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Return ``(train, val)`` indices of a training split: a seeded share ``fraction`` held out for validation."""
    if fraction <= 0:
        return list(range(n)), []
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7_919 + 17)).tolist()
    n_val = max(1, int(round(n * fraction)))
    return sorted(order[n_val:]), sorted(order[:n_val])


def rng_state() -> dict[str, Any]:
    """Return the states of Python's, NumPy's and torch's global RNGs (CUDA too, when present)."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"].cpu())
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextmanager
def kept_rng() -> Iterator[None]:
    """Run a block that may draw from the global RNGs, then put every one back as it was.

    Covers what a checkpoint keeps (:func:`rng_state`): work outside the training step (per-epoch
    measurements, pictures, evaluation) then never shifts the random stream the steps draw from, so
    a run stopped part-way through an epoch and resumed trains exactly as an uninterrupted one.
    """
    state = rng_state()
    try:
        yield
    finally:
        set_rng_state(state)


@dataclass
class RunningMean:
    """A bias-corrected exponential moving average (Adam's correction).

    ``value`` is ``None`` before the first update; after ``t`` updates it is
    ``m_t / (1 - momentum**t)`` with ``m_t = momentum * m_{t-1} + (1 - momentum) * x_t``,
    ``m_0 = 0``: an average of the recent values that gives the first ones no extra weight.
    """

    momentum: float
    raw: float = 0.0
    count: int = 0

    def update(self, x: float) -> None:
        self.raw = self.momentum * self.raw + (1 - self.momentum) * float(x)
        self.count += 1

    @property
    def value(self) -> float | None:
        if self.count == 0:
            return None
        return self.raw / (1 - self.momentum ** self.count)

    def state_dict(self) -> dict[str, Any]:
        return {"raw": self.raw, "count": self.count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.raw, self.count = float(state["raw"]), int(state["count"])


def encoder_diagnostics(encoder) -> dict[str, float | torch.Tensor] | None:
    """The encoder's diagnostics of its last forward: as device tensors where it offers them
    (``device_diagnostics()``, as the built-in capsnet does: no device read per step), else its
    ``diagnostics`` dict of floats (the plugin contract)."""
    if encoder is None:
        return None
    device_values = getattr(encoder, "device_diagnostics", None)
    return device_values() if callable(device_values) else getattr(encoder, "diagnostics", None)


@dataclass
class Position:
    """Where training is: epoch, batch inside the epoch, global step, and running values."""

    momentum: float
    epoch: int = 0
    batch_in_epoch: int = 0
    step: int = 0
    skipped_steps: int = 0
    best_val_acc: float = -1.0
    elapsed: float = 0.0
    encoder_acc: RunningMean = field(init=False)
    disc_acc: RunningMean = field(init=False)
    interval: dict[str, Any] = field(init=False)

    def __post_init__(self):
        self.encoder_acc = RunningMean(self.momentum)
        self.disc_acc = RunningMean(self.momentum)
        self.reset_interval()

    def advance(self, images: int, seconds: float) -> None:
        """Count one finished step of ``images`` images that took ``seconds``."""
        self.batch_in_epoch += 1
        self.step += 1
        self.interval["images"] += images
        self.interval["time"] += seconds
        self.elapsed += seconds

    def reset_interval(self) -> None:
        """Start a new log interval (sums and counts of logged values, images, time)."""
        self.interval = {"sums": {}, "counts": {}, "images": 0, "time": 0.0}

    def add(self, key: str, value: float | torch.Tensor) -> None:
        """Add a value to the interval's sum of ``key``. A tensor (a 0-d value on the model's device) is
        summed there in float64, the precision of a Python float, and read only by :meth:`means`."""
        value = value.detach().double() if isinstance(value, torch.Tensor) else float(value)
        self.interval["sums"][key] = self.interval["sums"].get(key, 0.0) + value
        self.interval["counts"][key] = self.interval["counts"].get(key, 0) + 1

    def record(self, result, phases, diagnostics: dict[str, float] | None) -> None:
        """Fold one step's :class:`~capsgan_toolkit.objective.StepResult`, gate phases and diagnostics in."""
        if result.encoder_acc is not None:
            self.encoder_acc.update(result.encoder_acc)
            self.add("batch_acc", result.encoder_acc)
        if result.disc_acc is not None:
            self.disc_acc.update(result.disc_acc)
        for name, value in result.values.items():
            self.add(f"loss_{name}", value)
        for name in ("generator", "discriminator", "warmup"):
            self.add(f"gate_{name}", float(getattr(phases, name)))
        for key, value in (diagnostics or {}).items():
            self.add(key, value)

    def means(self) -> dict[str, float]:
        return {k: float(total) / self.interval["counts"][k] for k, total in self.interval["sums"].items()}

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch, "step": self.step,
                "skipped_steps": self.skipped_steps, "best_val_acc": self.best_val_acc, "elapsed": self.elapsed,
                "encoder_acc": self.encoder_acc.state_dict(), "disc_acc": self.disc_acc.state_dict(),
                "interval": {**self.interval, "sums": {k: float(v) for k, v in self.interval["sums"].items()}}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("epoch", "batch_in_epoch", "step", "skipped_steps", "best_val_acc", "elapsed", "interval"):
            setattr(self, key, state[key])
        self.encoder_acc.load_state_dict(state["encoder_acc"])
        self.disc_acc.load_state_dict(state["disc_acc"])


class StopSignals:
    """SIGINT/SIGTERM ask training to stop after the current step; a second SIGINT aborts at once."""

    def __init__(self):
        self.received: int | None = None
        self._previous: dict = {}

    def _handler(self, signum, frame):
        if self.received is not None and signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        self.received = signum

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread
                pass

    def restore(self) -> None:
        for sig, old in self._previous.items():
            signal.signal(sig, old)
        self._previous = {}


@dataclass
class DataPlan:
    """The run's splits and step counts: train (less a validation share), validation, test.

    With ``[augment] crop`` the training images are the full-size ones (the trainer's
    ``built.augment`` crops them at random), validation and test the centre crops.
    """

    train_set: Any
    val_set: Any
    test_set: Any
    batch_size: int
    batches_per_epoch: int
    total_steps: int

    @classmethod
    def make(cls, built, resolved) -> DataPlan:
        """Hold out ``run.val_fraction`` of train, whatever the objective: every arm of a comparison then trains
        on the same images in the same number of steps (the held-out share chooses best.pt where the objective
        classifies, and is unused otherwise)."""
        run = resolved.recipe.run
        train = built.dataset.split("train")
        full_size = built.dataset.uncropped.split("train") if isinstance(built.dataset, CentreCropped) else train
        kept, held = split_train_val(len(train), run.val_fraction, run.seed)
        train_set = Subset(full_size, kept) if held else full_size
        batch_size, world = resolved.params["data"].batch_size, distributed.current().world_size
        if len(train_set) < batch_size * world:
            ranks = f" x {world} processes" if world > 1 else ""
            raise CapsganError(
                f"{resolved.source}: data.batch_size = {batch_size}{ranks} is larger than the training split "
                f"({len(train_set)} images after holding out run.val_fraction). Lower data.batch_size.")
        full = len(train_set) // (batch_size * world)  # global batches: data.batch_size per rank
        per_epoch = min(full, run.steps_per_epoch) if run.steps_per_epoch else full
        total = run.epochs * per_epoch
        return cls(train_set, Subset(train, held) if held else None, built.dataset.split("test"), batch_size,
                   per_epoch, min(total, run.max_steps) if run.max_steps else total)
