"""DCGAN-style generator and discriminator (Radford et al., 2016), sized from the image shape.

The generator decodes the encoder's class capsules ``(B, K, D)`` into an image;
the discriminator scores real versus reconstructed images, optionally class-conditionally
(``projection_classes``: the projection discriminator of Miyato & Koyama 2018), and hands
its intermediate features to objectives that match them (``forward_with_features``).
Both work for square images whose side is a small seed (4 to 7 pixels) times a power of
two: 28 px (7 * 4), 32 px (4 * 8), 64 px (4 * 16), and 1 or 3 channels.

Registered names: generator ``dcgan`` and discriminator ``dcgan``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from capsgan_toolkit import hookimpl
from capsgan_toolkit.interfaces import Discriminator, Generator
from capsgan_toolkit.interfaces import Params as ComponentParams
from capsgan_toolkit.layers import check_square_image_shape, conv_stack, strided_depth


def _upsampling_plan(side: int) -> tuple[int, int]:
    """Return ``(seed, n)`` with ``side == seed * 2**n`` and 4 <= seed, halving while it stays even.

    28 -> (7, 2), 32 -> (4, 3), 64 -> (4, 4). Odd sides get ``n = 0`` and a stride-1 decoder.
    """
    n = 0
    while side % 2 == 0 and side // 2 >= 4:
        side //= 2
        n += 1
    return side, n


def _doubling(cin: int, cout: int, how: str, *, bias: bool) -> list[nn.Module]:
    """Layers that double the side of ``cin``-channel maps into ``cout`` channels."""
    if how == "nearest":
        return [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(cin, cout, 3, padding=1, bias=bias)]
    # kernel 4, stride 2, padding 1 doubles the side exactly: (s - 1) * 2 - 2 + 4 = 2s.
    return [nn.ConvTranspose2d(cin, cout, 4, stride=2, padding=1, bias=bias)]


# -------------------------------------------------------------------------- generator


class DCGANGenerator(Generator):
    """DCGAN generator: latent (B, K, D) -> linear -> 4x4 (7x7 for 28 px) -> transposed convs -> tanh."""

    class Params(ComponentParams):
        base_channels: int = Field(
            64,
            ge=1,
            description="Channels of the last hidden layer; each earlier layer doubles them "
            "(64 px: 512-256-128-64).",
        )
        batch_norm: bool = Field(True, description="BatchNorm after the projection and every hidden transposed conv.")
        upsampling: Literal["transposed", "nearest"] = Field(
            "transposed",
            description='How each layer doubles the side: "transposed", DCGAN\'s 4x4 stride-2 transposed '
                        'convolution, or "nearest", nearest-neighbour upsampling then a 3x3 convolution '
                        "(Odena et al. 2016; no checkerboard; measured in docs/capsules.md).",
        )

    def __init__(self, params: Params, *, num_classes: int, capsule_dim: int, image_shape: Sequence[int]):
        super().__init__(params, num_classes=num_classes, capsule_dim=capsule_dim, image_shape=image_shape)
        channels, side = check_square_image_shape('Generator "dcgan"', image_shape)
        seed, n = _upsampling_plan(side)
        base, bn = params.base_channels, params.batch_norm
        # The last hidden width is base_channels; the projection starts n - 1 doublings above it.
        start = base * 2 ** max(n - 1, 0)
        self.seed = seed
        self.start_channels = start
        self.project = nn.Linear(num_classes * capsule_dim, start * seed * seed, bias=not bn)
        self.project_act = nn.Sequential(nn.BatchNorm2d(start) if bn else nn.Identity(), nn.ReLU(inplace=True))
        layers: list[nn.Module] = []
        width = start
        for _ in range(max(n - 1, 0)):
            layers += _doubling(width, width // 2, params.upsampling, bias=not bn)
            layers += [nn.BatchNorm2d(width // 2) if bn else nn.Identity(), nn.ReLU(inplace=True)]
            width //= 2
        if n >= 1:
            layers += _doubling(width, channels, params.upsampling, bias=True)
        else:
            layers.append(nn.Conv2d(width, channels, 3, padding=1))
        layers.append(nn.Tanh())
        self.decode = nn.Sequential(*layers)

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        """Return images ``(B, C, H, W)`` in ``[-1, 1]`` from a latent ``(B, K, D)``."""
        x = self.project(latent.flatten(1))
        x = self.project_act(x.view(-1, self.start_channels, self.seed, self.seed))
        return self.decode(x)


# ---------------------------------------------------------------------- discriminator


class DCGANDiscriminator(Discriminator):
    """DCGAN discriminator: strided convs with LeakyReLU(0.2) and a linear head to one logit."""

    class Params(ComponentParams):
        base_channels: int = Field(
            64, ge=1, description="Channels of the first conv; each later conv doubles them (max 512)."
        )
        batch_norm: bool = Field(True, description="BatchNorm after every conv except the first.")
        spectral_norm: bool = Field(
            False, description="Spectral normalisation on every conv and the head (usually with batch_norm = false)."
        )
        dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout probability after every conv block.")
        projection_classes: int | None = Field(
            None, ge=2,
            description="Class-conditional projection discriminator (Miyato & Koyama 2018) over this many "
                        "classes (the data set's number): logit = head(h) + <embed(y), h>, h the flattened "
                        "features. Unset: unconditional (the report's discriminator).",
        )

    def __init__(self, params: Params, *, image_shape: Sequence[int]):
        super().__init__(params, image_shape=image_shape)
        channels, side = check_square_image_shape('Discriminator "dcgan"', image_shape)
        depth = strided_depth(side)
        self.features, out_channels = conv_stack(
            channels,
            params.base_channels,
            depth,
            batch_norm=params.batch_norm,
            dropout=params.dropout,
            spectral_norm=params.spectral_norm,
        )
        head = nn.Linear(out_channels * (side >> depth) ** 2, 1)
        self.head = nn.utils.parametrizations.spectral_norm(head) if params.spectral_norm else head
        self.projection_classes = params.projection_classes
        if params.projection_classes is not None:
            embed = nn.Embedding(params.projection_classes, head.in_features)
            nn.init.xavier_uniform_(embed.weight)  # as in Miyato & Koyama's code (Glorot uniform)
            self.embed = nn.utils.parametrizations.spectral_norm(embed) if params.spectral_norm else embed

    def _logits(self, h: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        out = self.head(h).squeeze(1)
        if labels is not None and self.projection_classes is not None:
            out = out + (self.embed(labels.long()) * h).sum(1)
        return out

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Return real/fake logits ``(B,)``; positive means real.

        With ``projection_classes``, ``labels`` ``(B,)`` add the projection term
        ``<embed(y), h>``; without labels the logit is the unconditional part alone.
        """
        return self._logits(self.features(images).flatten(1), labels)

    def forward_with_features(self, images: torch.Tensor,
                              labels: torch.Tensor | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Return the logits of :meth:`forward` and every conv block's output (after its LeakyReLU).

        The same computation as :meth:`forward`, layer by layer; objectives match these
        features between real and generated images (``feature_matching_weight``).
        """
        x, maps = images, []
        for layer in self.features:
            x = layer(x)
            if isinstance(layer, nn.LeakyReLU):
                maps.append(x)
        return self._logits(x.flatten(1), labels), maps


@hookimpl
def capsgan_register(registry):
    """Register the DCGAN generator and discriminator."""
    registry.register("generator", "dcgan", DCGANGenerator)
    registry.register("discriminator", "dcgan", DCGANDiscriminator)
