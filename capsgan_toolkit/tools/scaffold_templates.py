"""The component sources ``capsgan new-plugin`` writes, one working example per family.

Placeholders: ``__NAME__`` (the component's registered name), ``__CLASS__`` (its class),
``__FAMILY__``. Each source is a complete module: imports, a params model subclassing the
family's base, the component, and the ``@hookimpl capsgan_register`` that registers it.
:mod:`capsgan_toolkit.tools.scaffold` fills them in; the generated package's tests run them through
:mod:`capsgan_toolkit.testing`.
"""

from __future__ import annotations

_REGISTER = '''

@hookimpl
def capsgan_register(registry):
    """Register the ``__NAME__`` __FAMILY__ (capsgan calls this through the ``capsgan`` entry point)."""
    registry.register("__FAMILY__", "__NAME__", __CLASS__)
'''

ENCODER = '''from typing import Sequence

import torch
from pydantic import Field
from torch import nn

from capsgan_toolkit import hookimpl
from capsgan_toolkit.interfaces import Encoder, EncoderParams
from capsgan_toolkit.layers import check_image_batch, check_image_shape, squash


class __CLASS__(Encoder):
    """Two strided convolutions and a linear head to K squashed class capsules of D dimensions."""

    class Params(EncoderParams):  # EncoderParams adds `latent` (what the generator receives)
        channels: int = Field(16, ge=1, description="Channels of both convolutions.")
        capsule_dim: int = Field(8, ge=1, description="D, the size of each class capsule.")

    def __init__(self, params: Params, *, image_shape: Sequence[int], num_classes: int):
        # The base sets self.params, self.image_shape, self.num_classes, self.capsule_dim (16)
        # and self.diagnostics ({}); set capsule_dim to the D your forward returns.
        super().__init__(params, image_shape=image_shape, num_classes=num_classes)
        c, h, w = check_image_shape('Encoder "__NAME__"', image_shape)  # a RecipeError for unusable shapes
        self.capsule_dim = params.capsule_dim
        self.features = nn.Sequential(
            nn.Conv2d(c, params.channels, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(params.channels, params.channels, 3, stride=2, padding=1), nn.ReLU(),
        )
        side_h, side_w = (h + 1) // 2, (w + 1) // 2  # each stride-2 convolution halves, rounding up
        side_h, side_w = (side_h + 1) // 2, (side_w + 1) // 2
        self.head = nn.Linear(params.channels * side_h * side_w, num_classes * params.capsule_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Return class capsules ``(B, K, D)``; the length of capsule k is the score of class k."""
        check_image_batch('Encoder "__NAME__"', images, self.image_shape)
        s = self.head(self.features(images).flatten(1)).view(-1, self.num_classes, self.capsule_dim)
        capsules = squash(s)  # lengths in [0, 1)
        # A metrics.jsonl column, kept on the device: float(...) here would make every GPU step wait
        # for the device (and cannot be captured by speed.cuda_graphs). The trainer reads it through
        # device_diagnostics() and converts it when it logs.
        self._capsule_len = self.class_scores(capsules.detach()).amax(1).mean()
        return capsules

    def device_diagnostics(self) -> dict[str, torch.Tensor]:
        """Diagnostics of the last forward pass as 0-d device tensors (``diagnostics`` holds floats)."""
        value = self.__dict__.get("_capsule_len")
        return {} if value is None else {"capsule_len": value}
''' + _REGISTER

GENERATOR = '''from typing import Sequence

import torch
from pydantic import Field
from torch import nn

from capsgan_toolkit import hookimpl
from capsgan_toolkit.interfaces import Generator
from capsgan_toolkit.interfaces import Params as ComponentParams
from capsgan_toolkit.layers import check_image_shape


class __CLASS__(Generator):
    """An MLP from the (K, D) latent to images of any shape, in [-1, 1] by a final tanh."""

    class Params(ComponentParams):
        hidden: int = Field(128, ge=1, description="Width of the hidden layer.")

    def __init__(self, params: Params, *, num_classes: int, capsule_dim: int, image_shape: Sequence[int]):
        # The base sets self.params, self.num_classes, self.capsule_dim and self.image_shape.
        super().__init__(params, num_classes=num_classes, capsule_dim=capsule_dim, image_shape=image_shape)
        c, h, w = check_image_shape('Generator "__NAME__"', image_shape)
        self.net = nn.Sequential(
            nn.Linear(num_classes * capsule_dim, params.hidden), nn.ReLU(),
            nn.Linear(params.hidden, c * h * w), nn.Tanh(),
        )

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        """Return images ``(B, C, H, W)`` in [-1, 1] from a latent ``(B, K, D)``."""
        return self.net(latent.flatten(1)).view(-1, *self.image_shape)
''' + _REGISTER

DISCRIMINATOR = '''from typing import Sequence

import torch
from pydantic import Field
from torch import nn

from capsgan_toolkit import hookimpl
from capsgan_toolkit.interfaces import Discriminator
from capsgan_toolkit.interfaces import Params as ComponentParams
from capsgan_toolkit.layers import check_image_batch, check_image_shape


class __CLASS__(Discriminator):
    """An MLP with LeakyReLU from images to one real/fake logit each (positive means real)."""

    class Params(ComponentParams):
        hidden: int = Field(128, ge=1, description="Width of the hidden layer.")

    def __init__(self, params: Params, *, image_shape: Sequence[int]):
        super().__init__(params, image_shape=image_shape)  # sets self.params and self.image_shape
        c, h, w = check_image_shape('Discriminator "__NAME__"', image_shape)
        self.net = nn.Sequential(nn.Linear(c * h * w, params.hidden), nn.LeakyReLU(0.2), nn.Linear(params.hidden, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Return logits ``(B,)``."""
        check_image_batch('Discriminator "__NAME__"', images, self.image_shape)
        return self.net(images.flatten(1)).squeeze(1)
''' + _REGISTER

CLASSIFICATION_LOSS = '''import torch
from pydantic import Field

from capsgan_toolkit import hookimpl
from capsgan_toolkit.interfaces import ClassificationLoss, Encoder
from capsgan_toolkit.interfaces import Params as ComponentParams


class __CLASS__(ClassificationLoss):
    """Spread loss on capsule lengths: sum over wrong classes of relu(margin - (|v_true| - |v_k|))^2."""

    class Params(ComponentParams):
        margin: float = Field(0.5, gt=0.0, le=1.0, description="How much longer the true class's capsule should be.")

    def forward(self, capsules: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Return the loss of capsules ``(B, K, D)`` and labels ``(B,)``, averaged over the batch."""
        lengths = Encoder.class_scores(capsules)  # (B, K); finite gradients at zero length
        true = lengths.gather(1, labels.long()[:, None])
        spread = torch.relu(self.params.margin - (true - lengths)).pow(2)
        wrong = torch.ones_like(spread).scatter_(1, labels.long()[:, None], 0.0)
        return (spread * wrong).sum(1).mean()
''' + _REGISTER

RECONSTRUCTION_LOSS = '''import torch
import torch.nn.functional as F
from pydantic import Field

from capsgan_toolkit import hookimpl
from capsgan_toolkit.interfaces import Params as ComponentParams
from capsgan_toolkit.interfaces import ReconstructionLoss


class __CLASS__(ReconstructionLoss):
    """Huber loss: squared error for small differences, absolute error beyond delta."""

    class Params(ComponentParams):
        delta: float = Field(0.5, gt=0.0, description="Where the loss turns from squared to absolute error.")

    def forward(self, reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Return the mean Huber loss over every pixel."""
        if reconstruction.shape != target.shape:  # never broadcast into a silently wrong loss
            raise ValueError(f'Loss "__NAME__" compares images of one shape, got {tuple(reconstruction.shape)} '
                             f"and {tuple(target.shape)}.")
        return F.huber_loss(reconstruction, target, delta=self.params.delta)
''' + _REGISTER

ADVERSARIAL_LOSS = '''import torch
from pydantic import Field, model_validator

from capsgan_toolkit import hookimpl
from capsgan_toolkit.interfaces import AdversarialLoss
from capsgan_toolkit.interfaces import Params as ComponentParams


class __CLASS__(AdversarialLoss):
    """Least-squares GAN (Mao et al. 2017): logits are pulled towards a real and a fake target."""

    class Params(ComponentParams):
        real_target: float = Field(1.0, description="Target logit of real images.")
        fake_target: float = Field(-1.0, description="Target logit of generated images.")

        @model_validator(mode="after")
        def _ordered(self):
            if not self.fake_target < self.real_target:
                raise ValueError("fake_target must be smaller than real_target (positive logits mean real)")
            return self

    def generator_loss(self, fake_logits: torch.Tensor) -> torch.Tensor:
        """Return 0.5 * mean (fake - real_target)^2: the generator wants its images scored as real."""
        return 0.5 * (fake_logits - self.params.real_target).pow(2).mean()

    def discriminator_loss(self, real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
        """Return 0.5 * (mean (real - real_target)^2 + mean (fake - fake_target)^2)."""
        p = self.params
        return 0.5 * ((real_logits - p.real_target).pow(2).mean() + (fake_logits - p.fake_target).pow(2).mean())
''' + _REGISTER

GATE = '''from pydantic import Field

from capsgan_toolkit import hookimpl
from capsgan_toolkit.interfaces import Gate, Phases, TrainState
from capsgan_toolkit.interfaces import Params as ComponentParams


class __CLASS__(Gate):
    """Encoder-only warm-up for some steps, then the discriminator trains every period-th step."""

    class Params(ComponentParams):
        warmup_steps: int = Field(10, ge=0, description="Steps of encoder-only training before G and D start.")
        period: int = Field(2, ge=1, description="The discriminator trains every period-th step after the warm-up.")

    def decide(self, state: TrainState) -> Phases:
        """Return the phases of this step from the training state alone."""
        if state.step < self.params.warmup_steps:
            return Phases(generator=False, discriminator=False, warmup=True)
        return Phases(generator=True, discriminator=state.has_discriminator and state.step % self.params.period == 0)

    # A gate that keeps state (a latch, a counter) returns it from state_dict() and takes it
    # back in load_state_dict(state), so a resumed run decides exactly as an uninterrupted one.
    # This one decides from the TrainState alone, so the base class's empty state is right.
''' + _REGISTER

DATASET = '''import math
from typing import Literal

import torch
from pydantic import Field

from capsgan_toolkit import hookimpl
from capsgan_toolkit.data import ImageTensorDataset
from capsgan_toolkit.interfaces import DatasetInfo, DatasetParams, DatasetPlugin


class __CLASS__(DatasetPlugin):
    """Generated stripes: class k is a grating at k * 180 / K degrees, random frequency and phase."""

    class Params(DatasetParams):  # DatasetParams adds batch_size and num_workers
        num_classes: int = Field(4, ge=2, le=16, description="Classes (grating orientations).")
        image_size: int = Field(28, ge=8, le=128, description="Image height and width in pixels.")
        num_train: int = Field(512, ge=1, description="Images in the training split.")
        num_test: int = Field(128, ge=1, description="Images in the test split.")
        seed: int = Field(0, ge=0, description="Seed of the generator; train and test use different seeds.")

    def __init__(self, params: Params):
        super().__init__(params)  # sets self.params
        self._splits: dict[str, ImageTensorDataset] = {}

    @property
    def info(self) -> DatasetInfo:
        k, size = self.params.num_classes, self.params.image_size
        return DatasetInfo(k, (1, size, size), tuple(f"{round(i * 180 / k)}deg" for i in range(k)))

    def split(self, name: Literal["train", "test"]) -> ImageTensorDataset:
        """Return ``(image (1, H, W) in [-1, 1], label)`` items, the same for the same params."""
        if name not in ("train", "test"):
            raise ValueError(f'split must be "train" or "test", not {name!r}')
        if name not in self._splits:
            p = self.params
            count = p.num_train if name == "train" else p.num_test
            gen = torch.Generator().manual_seed(2 * p.seed + (name == "test"))
            labels = torch.arange(count) % p.num_classes
            angle = (labels * math.pi / p.num_classes).view(-1, 1, 1)
            freq = (2 + 3 * torch.rand(count, generator=gen)).view(-1, 1, 1)
            phase = (2 * math.pi * torch.rand(count, generator=gen)).view(-1, 1, 1)
            axis = torch.linspace(-1, 1, p.image_size)
            y, x = torch.meshgrid(axis, axis, indexing="ij")
            wave = torch.sin(math.pi * freq * (x * angle.cos() + y * angle.sin()) + phase)
            images = ((wave + 1) * 127.5).round().to(torch.uint8).unsqueeze(1)  # uint8 (N, 1, H, W)
            self._splits[name] = ImageTensorDataset(images, labels)
        return self._splits[name]
''' + _REGISTER

OBJECTIVE = '''from typing import ClassVar

import torch
from pydantic import Field

from capsgan_toolkit import hookimpl
from capsgan_toolkit.interfaces import Params as ComponentParams
from capsgan_toolkit.interfaces import Phases
from capsgan_toolkit.objective import Objective, StepResult, Update


class __CLASS__(Objective):
    """A classifying autoencoder: the encoder classifies, the generator reconstructs from its latent."""

    class Params(ComponentParams):
        reconstruction_weight: float = Field(
            1.0, ge=0.0, description="Weight of the reconstruction loss against the classification loss.")

    # Recipe tables this objective uses (True: required, False: optional) and its optimizers,
    # whose names are the recipe's [optim.<name>] tables.
    parts: ClassVar[dict[str, bool]] = {"encoder": True, "generator": True,
                                        "losses.classification": True, "losses.reconstruction": True}
    optimizers: ClassVar[dict[str, dict]] = {"model": {"lr": 1e-3}}
    has_classifier = has_reconstruction = True

    def optimizer_parameters(self) -> dict[str, list[torch.nn.Parameter]]:
        return {"model": [*self.p.encoder.parameters(), *self.p.generator.parameters()]}

    def step(self, images: torch.Tensor, labels: torch.Tensor, phases: Phases, update: Update) -> StepResult:
        """One training step; ``update(optimizer, loss, terms)`` back-propagates and steps."""
        p = self.p  # the built parts: p.encoder, p.generator, p.classification, p.reconstruction
        capsules = p.encoder(images)
        terms = {"classification": p.classification(capsules, labels)}
        total = terms["classification"]
        if phases.generator and not phases.warmup:
            reconstruction = p.generator(p.encoder.to_latent(capsules, labels))
            terms["reconstruction"] = p.reconstruction(reconstruction, images)
            total = total + self.params.reconstruction_weight * terms["reconstruction"]
        update("model", total, terms)
        accuracy = (p.encoder.class_scores(capsules).argmax(1) == labels).float().mean().item()
        return StepResult(values={k: v.item() for k, v in terms.items()}, encoder_acc=accuracy)

    def classify(self, images: torch.Tensor) -> torch.Tensor:
        return self.p.encoder.class_scores(self.p.encoder(images))

    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        return self.p.generator(self.p.encoder.to_latent(self.p.encoder(images)))
''' + _REGISTER

SOURCES = {
    "encoder": ENCODER, "generator": GENERATOR, "discriminator": DISCRIMINATOR,
    "classification_loss": CLASSIFICATION_LOSS, "reconstruction_loss": RECONSTRUCTION_LOSS,
    "adversarial_loss": ADVERSARIAL_LOSS, "gate": GATE, "dataset": DATASET, "objective": OBJECTIVE,
}
"""The component module of each family the scaffold writes."""

TEST_PARAMS = {
    "encoder": {"channels": 4, "capsule_dim": 4}, "generator": {"hidden": 16}, "discriminator": {"hidden": 16},
    "dataset": {"num_train": 16, "num_test": 8},
}
"""Params that keep the component small in its tests (the defaults elsewhere)."""

RECIPE_TABLES = {
    "encoder": ("encoder", {"plugin": "__NAME__", "channels": 16, "capsule_dim": 8, "latent": "true_class"}),
    "generator": ("generator", {"plugin": "__NAME__", "hidden": 128}),
    "discriminator": ("discriminator", {"plugin": "__NAME__", "hidden": 128}),
    "classification_loss": ("losses.classification", {"plugin": "__NAME__"}),
    "reconstruction_loss": ("losses.reconstruction", {"plugin": "__NAME__"}),
    "adversarial_loss": ("losses.adversarial", {"plugin": "__NAME__"}),
    "gate": ("gate", {"plugin": "__NAME__", "warmup_steps": 4, "period": 2}),
    "dataset": ("data", {"plugin": "__NAME__", "num_classes": 4, "image_size": 28, "num_train": 512,
                         "num_test": 128, "batch_size": 32}),
    "objective": ("objective", {"plugin": "__NAME__"}),
}
"""The recipe table that names the new component, per family, and its params there."""
