"""Built-in losses: classification on capsule lengths, image reconstruction, adversarial.

Registered names, one family per recipe slot (``classification_loss``, ``reconstruction_loss``,
``adversarial_loss``):

- classification: ``margin`` (the source report's eq. 1, from Sabour et al. 2017),
  ``cross_entropy`` (softmax over capsule lengths, for CNN-style baselines);
- reconstruction: ``mse``, ``l1``;
- adversarial: ``minimax`` (the report's eq. 2 as written), ``nonsaturating``, ``hinge``.

Not a registered component: :func:`r1_penalty`, the R1 gradient penalty on real images
(Mescheder et al. 2018), which the ``reconstruction_gan`` objective adds with ``r1_weight``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import ConfigDict, Field, model_validator

from capsgan_toolkit import hookimpl
from capsgan_toolkit.interfaces import AdversarialLoss, ClassificationLoss, Encoder, ReconstructionLoss
from capsgan_toolkit.interfaces import Params as ComponentParams


def _check_capsules(name: str, capsules: torch.Tensor, labels: torch.Tensor) -> None:
    if capsules.dim() != 3 or labels.dim() != 1 or labels.shape[0] != capsules.shape[0]:
        raise ValueError(
            f'Loss "{name}" expects capsules (B, K, D) and labels (B,), '
            f"got {tuple(capsules.shape)} and {tuple(labels.shape)}."
        )


def _check_same_shape(name: str, reconstruction: torch.Tensor, target: torch.Tensor) -> None:
    # F.mse_loss would broadcast mismatched shapes with only a warning; a silent wrong loss is worse.
    if reconstruction.shape != target.shape:
        raise ValueError(
            f'Loss "{name}" compares tensors of one shape, got {tuple(reconstruction.shape)} '
            f"and {tuple(target.shape)}: does the generator make images of the data set's size?"
        )


# ---------------------------------------------------------------------- classification


class MarginLoss(ClassificationLoss):
    """Capsule margin loss: sum_k T_k relu(m+ - |v_k|)^2 + lambda (1 - T_k) relu(|v_k| - m-)^2."""

    class Params(ComponentParams):
        # "lambda" is a Python keyword, so the field is lambda_ and recipes use the alias.
        model_config = ConfigDict(populate_by_name=True)

        m_plus: float = Field(
            0.9, gt=0.0, le=1.0, description="m+: the true class's capsule should be at least this long."
        )
        m_minus: float = Field(
            0.1, ge=0.0, lt=1.0, description="m-: other classes' capsules should be at most this long."
        )
        lambda_: float = Field(
            0.5,
            alias="lambda",
            ge=0.0,
            description="Down-weighting of absent classes, so early training does not shrink every capsule.",
        )

        @model_validator(mode="after")
        def _margins_ordered(self):
            if not self.m_minus < self.m_plus:
                raise ValueError(
                    f"m_minus ({self.m_minus}) must be smaller than m_plus ({self.m_plus}): "
                    "absent classes must be held shorter than the present one."
                )
            return self

    def forward(self, capsules: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Return the loss summed over classes and averaged over the batch."""
        _check_capsules("margin", capsules, labels)
        p = self.params
        # class_scores keeps the epsilon inside the square root, so zero-length capsules have finite gradients.
        lengths = Encoder.class_scores(capsules)
        present = F.one_hot(labels.long(), capsules.shape[1]).to(lengths.dtype)
        per_class = present * F.relu(p.m_plus - lengths).pow(2) + p.lambda_ * (1.0 - present) * F.relu(
            lengths - p.m_minus
        ).pow(2)
        return per_class.sum(dim=1).mean()


class CrossEntropyLoss(ClassificationLoss):
    """Softmax cross-entropy with capsule lengths divided by a temperature as logits."""

    class Params(ComponentParams):
        temperature: float = Field(
            0.1,
            gt=0.0,
            description="Logits are lengths / temperature; squashed lengths lie in [0, 1), so a small "
            "temperature is needed for confident predictions.",
        )

    def forward(self, capsules: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Return the batch-mean cross-entropy."""
        _check_capsules("cross_entropy", capsules, labels)
        logits = Encoder.class_scores(capsules) / self.params.temperature
        return F.cross_entropy(logits, labels.long())


# ---------------------------------------------------------------------- reconstruction


class MSELoss(ReconstructionLoss):
    """Mean squared error over all pixels (the report's L2 reconstruction loss)."""

    def forward(self, reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Return the mean over every element of ``(reconstruction - target)^2``."""
        _check_same_shape("mse", reconstruction, target)
        return F.mse_loss(reconstruction, target, reduction="mean")


class L1Loss(ReconstructionLoss):
    """Mean absolute error over all pixels."""

    def forward(self, reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Return the mean over every element of ``|reconstruction - target|``."""
        _check_same_shape("l1", reconstruction, target)
        return F.l1_loss(reconstruction, target, reduction="mean")


# ------------------------------------------------------------------------- adversarial


def _bce_discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    # -log sigmoid(x) = softplus(-x) and -log(1 - sigmoid(x)) = softplus(x), stable for any logit.
    return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()


class MinimaxLoss(AdversarialLoss):
    """The original GAN game as the report's eq. 2 states it; G minimises E[log(1 - D(G(z)))]."""

    def generator_loss(self, fake_logits: torch.Tensor) -> torch.Tensor:
        """Return mean log(1 - D(G(z))) = -softplus(fake).mean(): saturates when D wins."""
        return -F.softplus(fake_logits).mean()

    def discriminator_loss(self, real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
        """Return BCE(real, 1) + BCE(fake, 0)."""
        return _bce_discriminator_loss(real_logits, fake_logits)


class NonSaturatingLoss(AdversarialLoss):
    """GAN loss with the non-saturating generator objective -E[log D(G(z))]."""

    def generator_loss(self, fake_logits: torch.Tensor) -> torch.Tensor:
        """Return -mean log D(G(z)) = softplus(-fake).mean()."""
        return F.softplus(-fake_logits).mean()

    def discriminator_loss(self, real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
        """Return BCE(real, 1) + BCE(fake, 0)."""
        return _bce_discriminator_loss(real_logits, fake_logits)


class HingeLoss(AdversarialLoss):
    """Hinge GAN loss (as in SAGAN / BigGAN)."""

    def generator_loss(self, fake_logits: torch.Tensor) -> torch.Tensor:
        """Return -fake.mean()."""
        return -fake_logits.mean()

    def discriminator_loss(self, real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
        """Return relu(1 - real).mean() + relu(1 + fake).mean()."""
        return F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean()


def r1_penalty(real_logits: torch.Tensor, real_images: torch.Tensor) -> torch.Tensor:
    """Return ``E |grad_x D(x)|^2`` over the batch: the R1 penalty of Mescheder et al. (2018) without its gamma / 2.

    ``real_logits`` must come from ``real_images`` with ``requires_grad``; the result keeps its
    graph (``create_graph``), so the penalty trains the discriminator's weights. Each image's
    gradient is that of the summed logits, which is its own logit's gradient when the
    discriminator treats images independently (with BatchNorm, the batch statistics add
    cross terms).
    """
    (grad,) = torch.autograd.grad(real_logits.sum(), real_images, create_graph=True)
    return grad.pow(2).flatten(1).sum(1).mean()


@hookimpl
def capsgan_register(registry):
    """Register the built-in losses."""
    registry.register("classification_loss", "margin", MarginLoss)
    registry.register("classification_loss", "cross_entropy", CrossEntropyLoss)
    registry.register("reconstruction_loss", "mse", MSELoss)
    registry.register("reconstruction_loss", "l1", L1Loss)
    registry.register("adversarial_loss", "minimax", MinimaxLoss)
    registry.register("adversarial_loss", "nonsaturating", NonSaturatingLoss)
    registry.register("adversarial_loss", "hinge", HingeLoss)
