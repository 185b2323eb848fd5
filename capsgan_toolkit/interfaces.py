"""Plugin interfaces: the base class of each component family.

Every component is a class that subclasses one of these bases and declares its
parameters as a nested pydantic model named ``Params`` (``extra="forbid"``, so a
typo in a recipe is an error). The engine builds components with keyword-only
context arguments (image shape, number of classes, capsule size) so that any
encoder fits any generator.

Tensor conventions: images are float tensors ``(B, C, H, W)`` scaled to
``[-1, 1]``; class capsules are ``(B, K, D)`` and the length of capsule ``k``
is the score of class ``k``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeAlias

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

SLOTS: tuple[tuple[str, str], ...] = (
    ("data", "dataset"),
    ("objective", "objective"),
    ("encoder", "encoder"),
    ("generator", "generator"),
    ("discriminator", "discriminator"),
    ("losses.classification", "classification_loss"),
    ("losses.reconstruction", "reconstruction_loss"),
    ("losses.adversarial", "adversarial_loss"),
    ("gate", "gate"),
)
"""The one slot table: recipe table -> component family (plus ``eval.features.<label>`` ->
``metric_features``). Validation, building, evaluation and the objective's parts all read it;
the base class of each family is in :data:`capsgan_toolkit.plugin.families.FAMILIES`."""


class Params(BaseModel):
    """Base of every component's params model: unknown keys are rejected."""

    model_config = ConfigDict(extra="forbid", frozen=True)


_Params: TypeAlias = Params
"""The base :class:`Params` for annotations inside the family classes, whose ``Params`` class
attribute shadows the module's name there (for type checkers)."""


# ----------------------------------------------------------------------------- encoders


class EncoderParams(Params):
    """Params every encoder accepts besides its own."""

    latent: Literal["all", "true_class", "predicted_class"] = Field(
        "all",
        description="What the generator receives: all capsules, or only the true "
        "(training; predicted at test time) or predicted class's capsule, others zeroed.",
    )


class Encoder(nn.Module):
    """Map images ``(B, C, H, W)`` to class capsules ``(B, K, D)``.

    Args:
        params: the component's validated ``Params``.
        image_shape: ``(C, H, W)`` of the data set.
        num_classes: ``K``, the number of class capsules.

    Subclasses set ``self.capsule_dim`` (``D``) in ``__init__`` and may fill
    ``self.diagnostics`` (a dict of floats) during ``forward`` for logging.
    """

    Params: ClassVar[type[Params]] = EncoderParams

    def __init__(self, params: EncoderParams, *, image_shape: Sequence[int], num_classes: int):
        super().__init__()
        self.params = params
        self.image_shape = tuple(image_shape)
        self.num_classes = num_classes
        self.capsule_dim: int = 16
        self.diagnostics: dict[str, float] = {}

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    @staticmethod
    def class_scores(capsules: torch.Tensor) -> torch.Tensor:
        """Return capsule lengths ``(B, K)``: the class scores."""
        return capsules.pow(2).sum(-1).add(1e-12).sqrt()

    def to_latent(self, capsules: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Return the latent ``(B, K, D)`` handed to the generator, masked per ``params.latent``."""
        mode = getattr(self.params, "latent", "all")
        if mode == "all":
            return capsules
        if mode == "true_class" and labels is not None:
            index = labels
        else:
            index = self.class_scores(capsules).argmax(dim=1)
        mask = torch.nn.functional.one_hot(index, capsules.shape[1]).to(capsules.dtype)
        return capsules * mask.unsqueeze(-1)


# --------------------------------------------------------------------------- generators


class Generator(nn.Module):
    """Map a latent ``(B, K, D)`` to images ``(B, C, H, W)`` in ``[-1, 1]``.

    Args:
        params: the component's validated ``Params``.
        num_classes: ``K``.
        capsule_dim: ``D``.
        image_shape: ``(C, H, W)`` of the images to produce.
    """

    Params: ClassVar[type[Params]] = Params

    def __init__(self, params: _Params, *, num_classes: int, capsule_dim: int, image_shape: Sequence[int]):
        super().__init__()
        self.params = params
        self.num_classes = num_classes
        self.capsule_dim = capsule_dim
        self.image_shape = tuple(image_shape)

    def forward(self, latent: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError


# ----------------------------------------------------------------------- discriminators


class Discriminator(nn.Module):
    """Map images ``(B, C, H, W)`` to real/fake logits ``(B,)`` (positive means real).

    Args:
        params: the component's validated ``Params``.
        image_shape: ``(C, H, W)``.
    """

    Params: ClassVar[type[Params]] = Params

    def __init__(self, params: _Params, *, image_shape: Sequence[int]):
        super().__init__()
        self.params = params
        self.image_shape = tuple(image_shape)

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError


# ------------------------------------------------------------------------------- losses


class Loss(nn.Module):
    """Base of the three loss families (classification, reconstruction, adversarial)."""

    Params: ClassVar[type[Params]] = Params

    def __init__(self, params: _Params):
        super().__init__()
        self.params = params


class ClassificationLoss(Loss):
    """``forward(capsules (B, K, D), labels (B,)) -> scalar``."""

    def forward(self, capsules: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError


class ReconstructionLoss(Loss):
    """``forward(reconstruction, target) -> scalar`` over images ``(B, C, H, W)``."""

    def forward(self, reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError


class AdversarialLoss(Loss):
    """Two scalars from discriminator logits: one for the generator, one for the discriminator."""

    def generator_loss(self, fake_logits: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def discriminator_loss(self, real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError


# -------------------------------------------------------------------------------- gates


@dataclass
class TrainState:
    """What a gate sees each step.

    ``encoder_acc`` is the running training accuracy of the encoder and
    ``disc_acc`` the running accuracy of the discriminator on real versus
    reconstructed images (``None`` until it has been measured, or when the recipe
    has no discriminator).
    """

    epoch: int
    step: int
    encoder_acc: float
    disc_acc: float | None
    has_discriminator: bool = True


@dataclass(frozen=True)
class Phases:
    """Which parts train this step. The classification loss always trains the encoder."""

    generator: bool
    discriminator: bool
    warmup: bool = False

    def label(self) -> str:
        if self.warmup:
            return "warmup"
        return f"G{'+' if self.generator else '-'} D{'+' if self.discriminator else '-'}"


class Gate:
    """Decide each step which phases run, from the training state.

    A gate may keep state (a latch, a counter); it must then return it from
    ``state_dict`` and take it back in ``load_state_dict`` so a resumed run decides
    exactly as an uninterrupted one.
    """

    Params: ClassVar[type[Params]] = Params

    def __init__(self, params: _Params):
        self.params = params

    def decide(self, state: TrainState) -> Phases:  # pragma: no cover - interface
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None


# ----------------------------------------------------------------------------- datasets


class DatasetParams(Params):
    """Params every data set accepts besides its own."""

    batch_size: int = Field(64, ge=1, description="Images per training step.")
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes.")


@dataclass(frozen=True)
class DatasetInfo:
    """What the engine needs to size the models."""

    num_classes: int
    image_shape: tuple[int, int, int]
    class_names: tuple[str, ...] = field(default=())


class DatasetPlugin:
    """Provide train and test splits of labelled images in ``[-1, 1]``.

    ``split(name)`` returns a ``torch.utils.data.Dataset`` whose items are
    ``(image (C, H, W) float tensor, label int)``. Missing files must raise
    :class:`capsgan_toolkit.errors.DataError` saying where to put them.
    """

    Params: ClassVar[type[Params]] = DatasetParams

    def __init__(self, params: DatasetParams):
        self.params = params

    @property
    def info(self) -> DatasetInfo:  # pragma: no cover - interface
        raise NotImplementedError

    def split(self, name: Literal["train", "test"]) -> torch.utils.data.Dataset:  # pragma: no cover
        raise NotImplementedError


# ---------------------------------------------------------------------- metric features


@dataclass
class FeatureSetup:
    """A feature extractor made ready for ``torch_fidelity.calculate_metrics``.

    ``fidelity_kwargs`` select it (at least ``feature_extractor``, often
    ``feature_extractor_weights_path``); ``identity`` names its weights uniquely (reference
    feature caches and eval.json use it); ``metrics`` are those it supports among
    ``fid``, ``kid``, ``isc`` (needs class logits) and ``prc``; ``classifier``, when not
    ``None``, maps uint8 RGB images ``(B, 3, H, W)`` to logits over the data set's classes.
    """

    fidelity_kwargs: dict[str, Any]
    identity: str
    description: str
    metrics: frozenset[str]
    classifier: Callable[[torch.Tensor], torch.Tensor] | None = None


class FeatureExtractor:
    """A feature network for FID / KID / IS-style scores, run through torch-fidelity.

    Args:
        params: the component's validated ``Params``.
        info: the data set's :class:`DatasetInfo`.

    An extractor that needs a weights file takes it as one of its own params (the Inception
    extractors' ``weights``; ``capsgan eval --inception-weights`` fills it in).
    """

    Params: ClassVar[type[Params]] = Params

    def __init__(self, params: _Params, *, info: DatasetInfo):
        self.params = params
        self.info = info

    def check(self) -> None:
        """Raise a CapsganError now if the extractor cannot run later (weights missing offline)."""

    def prepare(self, dataset: DatasetPlugin, *, data_id: str, cache_dir: Path, device: torch.device,
                log: Callable[[str], None] | None = None) -> FeatureSetup:  # pragma: no cover - interface
        """Make the network available (train and cache it, or find its weights) and describe it.

        ``data_id`` identifies the data set's content (cache key); ``cache_dir`` is where a
        trained network may be kept; ``log`` receives progress lines for people.
        """
        raise NotImplementedError
