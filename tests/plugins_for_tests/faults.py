"""Components that inject faults, for the reliability tests.

Named in a recipe with ``run.plugins = ["plugins_for_tests.faults"]`` (the tests
folder must be on ``sys.path``). They register like any third-party plugin:

- classification loss ``nan_at_step``: the margin loss, but NaN or Inf at chosen
  training steps, so the trainer's numerical-fault handling can be exercised;
- encoder ``nan_cnn_at_step``: the built-in CNN encoder whose capsules turn NaN at chosen
  training steps, so NaN flows through the generator's BatchNorm before any loss is checked;
- reconstruction loss ``rng_mse``: MSE against a target jittered by the torch,
  NumPy and Python generators, so a resume that restores any RNG state wrongly
  ends with different weights.
"""

from __future__ import annotations

import random
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field

from capsgan_plugins.cnn import CNNEncoder
from capsgan_plugins.losses import MarginLoss
from capsgan_toolkit import hookimpl
from capsgan_toolkit.interfaces import ClassificationLoss, Params, ReconstructionLoss


class NanAtStepLoss(ClassificationLoss):
    """Margin loss that turns NaN or Inf at chosen training steps (fault injection)."""

    class Params(Params):
        at_steps: list[int] = Field(
            default_factory=list,
            description="Training steps (1-based, as in metrics.jsonl) whose loss is broken.",
        )
        value: Literal["nan", "inf"] = Field("nan", description="What the broken loss becomes.")

    def __init__(self, params: Params):
        super().__init__(params)
        self.margin = MarginLoss(MarginLoss.Params())
        # The trainer calls the classification loss exactly once per training step, and a
        # fresh process starts at step 1: tests use this loss only in runs that are not resumed.
        self.calls = 0

    def forward(self, capsules: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        loss = self.margin(capsules, labels)
        if self.calls in self.params.at_steps:
            # Multiplying keeps the graph, so the gradient is broken too.
            loss = loss * float(self.params.value)
        return loss


class NanCNNAtStep(CNNEncoder):
    """The CNN encoder, but its capsules are NaN at chosen training steps (fault injection)."""

    class Params(CNNEncoder.Params):
        at_steps: list[int] = Field(default_factory=list, description="Training steps (1-based) whose capsules are NaN.")

    def __init__(self, params, *, image_shape, num_classes):
        super().__init__(params, image_shape=image_shape, num_classes=num_classes)
        self.calls = 0  # training forwards with gradients: one per step (the contract check runs under no_grad)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        capsules = super().forward(images)
        if self.training and torch.is_grad_enabled():
            self.calls += 1
            if self.calls in self.params.at_steps:
                capsules = capsules * float("nan")
        return capsules


class RngMSELoss(ReconstructionLoss):
    """MSE against a target jittered by the torch, NumPy and Python generators."""

    class Params(Params):
        jitter: float = Field(0.05, ge=0.0, description="Scale of the random jitter added to the target.")

    def forward(self, reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        scale = self.params.jitter
        noise = torch.randn_like(target) + float(np.random.standard_normal()) + random.gauss(0.0, 1.0)
        return F.mse_loss(reconstruction, target + scale * noise)


@hookimpl
def capsgan_register(registry):
    registry.register("classification_loss", "nan_at_step", NanAtStepLoss)
    registry.register("reconstruction_loss", "rng_mse", RngMSELoss)
    registry.register("encoder", "nan_cnn_at_step", NanCNNAtStep)
