"""Baseline CNN encoders: the non-capsule side of every capsule-versus-CNN comparison.

Both encoders end in a linear head whose ``K * D`` outputs are reshaped into class
"capsules" ``(B, K, D)`` and, by default, squashed like real capsules, so the
capsule length is a class score in ``[0, 1)`` and every loss, generator and metric
treats them exactly as it treats a CapsNet's output.

Registered names: encoder ``cnn`` (DCGAN-style strided conv stack) and encoder
``resnet`` (a small residual network). The squash, the shape check and the conv
stack come from :mod:`capsgan_toolkit.layers`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field
from torch import nn

from capsgan_toolkit import hookimpl
from capsgan_toolkit.errors import RecipeError
from capsgan_toolkit.interfaces import Encoder, EncoderParams
from capsgan_toolkit.layers import check_image_shape, conv_stack, squash, strided_depth


class _CapsuleHead(nn.Module):
    """Linear map to ``K * D`` values, reshaped to ``(B, K, D)`` and optionally squashed."""

    def __init__(self, in_features: int, num_classes: int, capsule_dim: int, *, dropout: float, squash: bool):
        super().__init__()
        self.num_classes = num_classes
        self.capsule_dim = capsule_dim
        self.squash = squash
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.linear = nn.Linear(in_features, num_classes * capsule_dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        s = self.linear(self.dropout(features.flatten(1)))
        s = s.view(-1, self.num_classes, self.capsule_dim)
        return squash(s) if self.squash else s


# ------------------------------------------------------------------------------ cnn


class CNNEncoder(Encoder):
    """DCGAN-style strided conv encoder with a capsule-shaped (B, K, D) head."""

    class Params(EncoderParams):
        channels: int = Field(
            64, ge=1, description="Width of the first conv block; each later block doubles it (max 512)."
        )
        depth: int | None = Field(
            None,
            ge=1,
            description="Number of stride-2 conv blocks; default: as many as keep the feature map at least 4x4 "
            "(2 for 28 px, 3 for 32 px, 4 for 64 px).",
        )
        capsule_dim: int = Field(16, ge=1, description="D, the size of each class capsule the head produces.")
        batch_norm: bool = Field(True, description="BatchNorm after every conv block except the first.")
        dropout: float = Field(
            0.0, ge=0.0, lt=1.0, description="Dropout probability in conv blocks and before the head."
        )
        squash: bool = Field(True, description="Squash each class vector so its length lies in [0, 1), like a capsule.")

    def __init__(self, params: Params, *, image_shape: Sequence[int], num_classes: int):
        super().__init__(params, image_shape=image_shape, num_classes=num_classes)
        c, h, w = check_image_shape('Encoder "cnn"', image_shape)
        depth = params.depth if params.depth is not None else strided_depth(min(h, w))
        if depth < 1:
            raise RecipeError(f'Encoder "cnn" needs images of at least 2x2 pixels, got {h}x{w}.')
        if min(h, w) >> depth < 1:
            raise RecipeError(
                f'Encoder "cnn": depth = {depth} halves a {h}x{w} image below one pixel; '
                f"use depth <= {min(h, w).bit_length() - 1} or leave depth unset."
            )
        self.capsule_dim = params.capsule_dim
        self.features, out_channels = conv_stack(
            c, params.channels, depth, batch_norm=params.batch_norm, dropout=params.dropout
        )
        flat = out_channels * (h >> depth) * (w >> depth)
        self.head = _CapsuleHead(flat, num_classes, params.capsule_dim, dropout=params.dropout, squash=params.squash)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Return class capsules ``(B, K, D)``."""
        return self.head(self.features(images))


# --------------------------------------------------------------------------- resnet


class _BasicBlock(nn.Module):
    """Two 3x3 convs with BatchNorm and an identity (or 1x1 projection) shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
        )
        if stride != 1 or in_channels != out_channels:
            self.shortcut: nn.Module = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        else:
            self.shortcut = nn.Identity()
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.body(x) + self.shortcut(x))


class ResNetEncoder(Encoder):
    """Small residual CNN (CIFAR-style ResNet) with a capsule-shaped (B, K, D) head."""

    class Params(EncoderParams):
        width: int = Field(32, ge=1, description="Channels of the first stage; each later stage doubles them.")
        stages: int = Field(
            3, ge=1, le=5, description="Number of stages; every stage after the first halves the resolution."
        )
        blocks: int = Field(2, ge=1, description="Residual blocks per stage.")
        capsule_dim: int = Field(16, ge=1, description="D, the size of each class capsule the head produces.")
        dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout probability before the head.")
        squash: bool = Field(True, description="Squash each class vector so its length lies in [0, 1), like a capsule.")

    def __init__(self, params: Params, *, image_shape: Sequence[int], num_classes: int):
        super().__init__(params, image_shape=image_shape, num_classes=num_classes)
        # Padded 3x3 stride-2 convs round up (ceil(n / 2)), so no stage count empties the map.
        c, _, _ = check_image_shape('Encoder "resnet"', image_shape)
        self.capsule_dim = params.capsule_dim
        self.stem = nn.Sequential(
            nn.Conv2d(c, params.width, 3, padding=1, bias=False),
            nn.BatchNorm2d(params.width),
            nn.ReLU(inplace=True),
        )
        blocks: list[nn.Module] = []
        channels = params.width
        for stage in range(params.stages):
            out = params.width * 2**stage
            for b in range(params.blocks):
                stride = 2 if (stage > 0 and b == 0) else 1
                blocks.append(_BasicBlock(channels, out, stride))
                channels = out
        self.body = nn.Sequential(*blocks)
        # Global average pooling makes the head independent of the image size.
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = _CapsuleHead(
            channels, num_classes, params.capsule_dim, dropout=params.dropout, squash=params.squash
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Return class capsules ``(B, K, D)``."""
        return self.head(self.pool(self.body(self.stem(images))))


@hookimpl
def capsgan_register(registry):
    """Register the baseline CNN encoders."""
    registry.register("encoder", "cnn", CNNEncoder)
    registry.register("encoder", "resnet", ResNetEncoder)
