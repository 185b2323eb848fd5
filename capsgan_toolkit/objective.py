"""The ``objective`` family: what one training step computes and which optimizers it owns.

The training loop (:mod:`capsgan_toolkit.training.trainer`) only iterates over batches, asks the gate
which phases run, hands the objective an ``update`` function that applies one optimizer
step, logs, checkpoints and handles signals. Everything model-specific — which parts are
called in which order, which losses are combined with which weights, what is detached —
lives in an objective, as the loss object owns the objective in NVlabs' EDM loop.

An objective also says what a trained model can do, so that evaluation and pictures need
not know the algorithm: classify images, reconstruct them, or generate new ones.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar, Protocol, TypeAlias

import torch
from torch import nn

from capsgan_toolkit.interfaces import SLOTS, DatasetInfo, Params, Phases

_Params: TypeAlias = Params
"""The base :class:`Params` for annotations inside :class:`Objective`, whose ``Params`` class attribute
shadows the imported name there (for type checkers)."""

PART_KEYS: tuple[str, ...] = tuple(key for key, _family in SLOTS if key not in ("data", "objective", "gate"))
"""Recipe tables an objective may use (the model's parts); each objective says which it needs."""


@dataclass
class Parts:
    """The built components an objective works with (``None`` where the recipe has none)."""

    info: DatasetInfo
    encoder: nn.Module | None = None
    generator: nn.Module | None = None
    discriminator: nn.Module | None = None
    classification: nn.Module | None = None
    reconstruction: nn.Module | None = None
    adversarial: nn.Module | None = None

    def modules(self) -> dict[str, nn.Module]:
        """Return the trainable models by name (the names checkpoints use)."""
        return {name: m for name in ("encoder", "generator", "discriminator")
                if (m := getattr(self, name)) is not None}

    def get(self, key: str):
        """Return the part behind a recipe key such as ``losses.adversarial``."""
        return getattr(self, key.split(".")[-1])


class Update(Protocol):
    """The loop's optimizer step: ``update(optimizer, loss, {name: loss term}) -> applied``.

    It checks the terms for NaN/Inf, zeroes the optimizer's gradients, back-propagates
    ``loss``, clips and checks the gradients, and steps the optimizer. It returns whether
    the step was applied (``False`` when a step with a NaN was skipped).
    """

    def __call__(self, optimizer: str, loss: torch.Tensor, terms: dict[str, torch.Tensor]) -> bool: ...


@dataclass
class StepResult:
    """What one step reports: logged scalars, and the batch accuracies the gate's running values use."""

    values: dict[str, float] = field(default_factory=dict)
    encoder_acc: float | None = None
    disc_acc: float | None = None


class Objective:
    """Base of every training objective.

    Class attributes a subclass sets:
        parts: recipe key -> ``True`` (required) or ``False`` (optional), for the keys of
            :data:`PART_KEYS` the objective uses; a recipe giving any other is refused.
        optimizers: optimizer name -> default learning rate and betas; the recipe's
            ``[optim.<name>]`` tables may change them and no other name is accepted.

    Args:
        params: the objective's validated ``Params`` (its ``[objective]`` table).
        parts: the built components.
        weights: ``generator_weight``, ``reconstruction_weight`` and ``adversarial_weight``
            of the recipe's ``[losses]`` table.
    """

    Params: ClassVar[type[Params]] = Params
    parts: ClassVar[dict[str, bool]] = {}
    optimizers: ClassVar[dict[str, dict]] = {}
    has_classifier: ClassVar[bool] = False
    has_reconstruction: ClassVar[bool] = False
    has_generation: ClassVar[bool] = False

    def __init__(self, params: _Params, *, parts: Parts, weights: dict[str, float]):
        self.params = params
        self.p = parts
        self.weights = dict(weights)

    # ---------------------------------------------------------------- training

    def modules(self) -> dict[str, nn.Module]:
        """Return the trainable models by name."""
        return self.p.modules()

    def optimizer_parameters(self) -> dict[str, list[nn.Parameter]]:  # pragma: no cover - interface
        """Return the parameters each optimizer of :attr:`optimizers` steps."""
        raise NotImplementedError

    def step(self, images: torch.Tensor, labels: torch.Tensor, phases: Phases,
             update: Update) -> StepResult:  # pragma: no cover - interface
        """Run one training step on a batch, calling ``update`` for each optimizer step."""
        raise NotImplementedError

    # ---------------------------------------------------------------- a trained model

    def classify(self, images: torch.Tensor) -> torch.Tensor:
        """Return class scores ``(B, K)`` (only when :attr:`has_classifier`)."""
        raise NotImplementedError(f"{type(self).__name__} has no classifier")

    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        """Return reconstructions of ``images`` (only when :attr:`has_reconstruction`)."""
        raise NotImplementedError(f"{type(self).__name__} reconstructs nothing")

    def classify_and_reconstruct(self, images: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Return ``(classify(images), reconstruct(images))``, ``None`` for what the objective cannot give.

        Evaluation that needs both calls this; an objective whose two share work (one encoder
        pass) overrides it to do that work once.
        """
        return (self.classify(images) if self.has_classifier else None,
                self.reconstruct(images) if self.has_reconstruction else None)

    def prepare_generation(self, train_split, *, limit: int, seed: int, batch_size: int,
                           device: torch.device, progress: Callable | None = None, prior: str | None = None,
                           prior_components: int | None = None, prior_temperature: float | None = None) -> None:
        """Get ready to generate (fit a latent prior on training images, if the objective needs one).

        ``prior``, ``prior_components`` and ``prior_temperature`` are ``eval.prior``, ``eval.prior_components``
        and ``eval.prior_temperature`` when the
        ``[eval]`` table sets them (one of :data:`~capsgan_toolkit.evaluation.prior.PRIOR_KINDS`: the
        latent prior to fit instead of the objective's own); an objective without a latent prior ignores
        them. The evaluator passes them only when set, so an override without them still works.
        """

    def generate(self, classes: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Return one new image per entry of ``classes`` (only when :attr:`has_generation`)."""
        raise NotImplementedError(f"{type(self).__name__} generates nothing")

    @property
    def conditional(self) -> bool:
        """Whether :meth:`generate` honours the requested classes."""
        return True

    def sample_latents(self, classes: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Return generator latents for ``classes`` (after :meth:`prepare_generation`)."""
        raise NotImplementedError(f"{type(self).__name__} has no latent sampler")

    def train(self, mode: bool = True) -> Objective:
        """Put every model in training (or evaluation) mode."""
        for module in self.modules().values():
            module.train(mode)
        return self

    def eval(self) -> Objective:
        return self.train(False)
