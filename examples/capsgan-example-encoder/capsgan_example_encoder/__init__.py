"""An example third-party capsgan plugin: the ``patch_mlp`` encoder (and an ``npz_images`` data set).

The encoder cuts an image into non-overlapping square patches, embeds every patch
with one shared linear map (a convolution whose kernel and stride both equal the
patch size), mixes the features of all patches in a small MLP, and ends in
``K * D`` values that are reshaped to class capsules ``(B, K, D)`` and squashed,
so the length of capsule ``k`` is the score of class ``k``, in ``[0, 1)``.

The encoder is built from :mod:`capsgan_toolkit.layers` (``squash`` and the image-shape
check); the data set in :mod:`capsgan_example_encoder.npz_dataset` serves its images
through :class:`capsgan_toolkit.data.ImageTensorDataset`.

capsgan finds this module through the ``capsgan`` entry-point group declared in
this package's ``pyproject.toml``; nothing in capsgan-toolkit names it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from pydantic import Field
from torch import nn

from capsgan_example_encoder.npz_dataset import NpzImagesDataset
from capsgan_toolkit import hookimpl
from capsgan_toolkit.errors import RecipeError
from capsgan_toolkit.interfaces import Encoder, EncoderParams
from capsgan_toolkit.layers import check_image_shape, squash  # building blocks shared with the built-ins

__all__ = ["NpzImagesDataset", "PatchMLPEncoder", "capsgan_register", "squash"]

__version__ = "0.1.0"


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


class PatchMLPEncoder(Encoder):
    """Patch-MLP encoder: a shared patch embedding, an MLP over all patches, K squashed capsules."""

    class Params(EncoderParams):
        patch_size: int = Field(
            4, ge=1, description="Side of the square patches in pixels; it must divide the image height and width."
        )
        embed_dim: int = Field(16, ge=1, description="Features per patch from the shared patch embedding.")
        hidden: int = Field(128, ge=1, description="Width of the hidden layer that mixes the features of all patches.")
        capsule_dim: int = Field(16, ge=1, description="D, the size of each class capsule.")
        dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout probability before the capsule head.")

    def __init__(self, params: Params, *, image_shape: Sequence[int], num_classes: int):
        super().__init__(params, image_shape=image_shape, num_classes=num_classes)
        c, h, w = check_image_shape('Encoder "patch_mlp"', image_shape)
        p = params.patch_size
        if h % p or w % p:
            # Checked here rather than in Params: only the data set knows the image size.
            raise RecipeError(
                f'Encoder "patch_mlp": encoder.patch_size = {p} does not divide the {h}x{w} images of '
                f"this data set. Use one of {', '.join(map(str, _divisors(math.gcd(h, w))))}."
            )
        self.capsule_dim = params.capsule_dim
        self.num_patches = (h // p) * (w // p)
        self.embed = nn.Conv2d(c, params.embed_dim, kernel_size=p, stride=p)
        self.mix = nn.Linear(self.num_patches * params.embed_dim, params.hidden)
        self.dropout = nn.Dropout(params.dropout) if params.dropout > 0 else nn.Identity()
        self.head = nn.Linear(params.hidden, num_classes * params.capsule_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Return class capsules ``(B, K, D)`` with lengths in ``[0, 1)``."""
        patches = torch.relu(self.embed(images))  # (B, embed_dim, H / p, W / p)
        hidden = torch.relu(self.mix(patches.flatten(1)))
        s = self.head(self.dropout(hidden)).view(-1, self.num_classes, self.capsule_dim)
        capsules = squash(s)
        if self.training:
            # Logged by the trainer as a metrics.jsonl column each log interval.
            self.diagnostics["capsule_length_mean"] = self.class_scores(capsules).mean().item()
        return capsules


@hookimpl
def capsgan_register(registry):
    """Register the ``patch_mlp`` encoder and the ``npz_images`` data set."""
    registry.register("encoder", "patch_mlp", PatchMLPEncoder)
    registry.register("dataset", "npz_images", NpzImagesDataset)
