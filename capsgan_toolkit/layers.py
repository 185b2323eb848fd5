"""Building blocks for plugin authors: the capsule squash, image-shape checks, conv stacks.

The built-in encoders, generator and discriminator are made of these, and a
third-party plugin may import them instead of writing its own copy::

    from capsgan_toolkit.layers import check_image_shape, conv_stack, squash, strided_depth

- :func:`squash` turns vectors into capsules: same direction, length in ``[0, 1)``.
- :func:`check_image_shape`, :func:`check_square_image_shape` and
  :func:`check_image_batch` turn a shape a component cannot work with into a
  :class:`~capsgan_toolkit.errors.RecipeError` of one sentence naming the component,
  instead of a traceback from deep inside a layer.
- :func:`conv_stack` and :func:`strided_depth` build the DCGAN-style strided
  convolution stack of the ``cnn`` encoder and the ``dcgan`` discriminator.

Everything here depends on torch and :mod:`capsgan_toolkit.errors` only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from capsgan_toolkit.errors import RecipeError

__all__ = [
    "SQUASH_EPS",
    "check_image_batch",
    "check_image_shape",
    "check_square_image_shape",
    "conv_stack",
    "squash",
    "strided_depth",
]

SQUASH_EPS = 1e-8
"""Added to the squared length *inside* the square root of :func:`squash`."""


# --------------------------------------------------------------------------- squash


def squash(s: torch.Tensor, dim: int = -1, eps: float = SQUASH_EPS) -> torch.Tensor:
    """Squash vectors along ``dim`` into capsules (Sabour et al. 2017, eq. 1).

    Returns ``|s|^2 / (1 + |s|^2) * s / sqrt(|s|^2 + eps)``: the direction of ``s``
    with a length in ``[0, 1)``, so the length can be read as a probability (the
    class score of a class capsule).

    Args:
        s: any tensor; the vectors lie along ``dim``.
        dim: the dimension that holds the vector components (the last by default).
        eps: added to the squared length inside the square root, so that both the
            value and the gradient are finite (and zero) at ``s = 0``, where
            ``s / |s|`` is undefined. Outside a few ``sqrt(eps)`` of zero it changes
            nothing measurable.

    Returns:
        A tensor of the shape and dtype of ``s``.
    """
    sq = s.pow(2).sum(dim, keepdim=True)
    # One factor per vector, then one multiply over the components.
    return s * (sq / ((1.0 + sq) * torch.sqrt(sq + eps)))


# ---------------------------------------------------------------------- shape checks


def check_image_shape(kind: str, image_shape: Sequence[int]) -> tuple[int, int, int]:
    """Return ``(C, H, W)`` from an image shape, or raise a RecipeError naming ``kind``.

    Call it first in a component's ``__init__`` with the ``image_shape`` the engine
    passes (the data set's).

    Args:
        kind: how the message names the component, e.g. ``'Encoder "cnn"'``.
        image_shape: the image shape ``(C, H, W)``.

    Raises:
        RecipeError: ``<kind> needs an image shape (C, H, W) of positive sizes, got
            (...).`` when the shape does not have three positive sizes.
    """
    if len(image_shape) != 3 or min(image_shape) < 1:
        raise RecipeError(f"{kind} needs an image shape (C, H, W) of positive sizes, got {tuple(image_shape)}.")
    c, h, w = (int(x) for x in image_shape)
    return c, h, w


def check_square_image_shape(kind: str, image_shape: Sequence[int], min_side: int = 4) -> tuple[int, int]:
    """Return ``(C, side)`` for square images of at least ``min_side`` pixels, or raise.

    For components that only make or read square images (the DCGAN layout).

    Args:
        kind: how the message names the component, e.g. ``'Generator "dcgan"'``.
        image_shape: the image shape ``(C, H, W)``.
        min_side: the smallest side accepted, in pixels.

    Raises:
        RecipeError: for a shape that :func:`check_image_shape` refuses, for
            non-square images, and for images smaller than ``min_side``; the
            message names ``kind`` and the data set's image size.
    """
    c, h, w = check_image_shape(kind, image_shape)
    if h != w:
        raise RecipeError(f"{kind} makes square images only, but the data set's images are {h}x{w}.")
    if h < min_side:
        raise RecipeError(f"{kind} needs images of at least {min_side}x{min_side} pixels, got {h}x{w}.")
    return c, h


def check_image_batch(kind: str, images: torch.Tensor, image_shape: Sequence[int]) -> None:
    """Raise a RecipeError unless ``images`` is a batch ``(B, *image_shape)``.

    For a component's ``forward`` whose layers were sized for one image shape
    (flattened feature maps, capsule grids) and would otherwise fail with a
    matrix-size error from deep inside.

    Args:
        kind: how the message names the component, e.g. ``"capsnet"``.
        images: the batch given to ``forward``.
        image_shape: the ``(C, H, W)`` the component was built for.

    Raises:
        RecipeError: ``<kind> was built for images of shape (C, H, W); got a batch
            of shape (...).``
    """
    expected = tuple(image_shape)
    if images.dim() != 4 or tuple(images.shape[1:]) != expected:
        raise RecipeError(
            f"{kind} was built for images of shape {expected}; got a batch of shape {tuple(images.shape)}."
        )


# ------------------------------------------------------------------------ conv stacks


def strided_depth(size: int, min_size: int = 4) -> int:
    """Return how many stride-2 halvings keep ``size`` at or above ``min_size`` pixels.

    28 -> 2 (7x7 at the end), 32 -> 3 (4x4), 64 -> 4 (4x4): the DCGAN layout. A
    :func:`conv_stack` of this depth turns an image of side ``size`` into feature
    maps of side ``size >> depth``.
    """
    depth = 0
    while size // 2 >= min_size:
        size //= 2
        depth += 1
    return depth


def conv_stack(
    in_channels: int,
    base_channels: int,
    depth: int,
    *,
    batch_norm: bool,
    dropout: float = 0.0,
    max_channels: int = 512,
    spectral_norm: bool = False,
) -> tuple[nn.Sequential, int]:
    """Build ``depth`` DCGAN-style blocks: conv 4x4 stride 2, [BatchNorm], LeakyReLU(0.2), [Dropout].

    Each block halves the height and width exactly for even sizes (kernel 4,
    stride 2, padding 1). Widths double from ``base_channels`` at each block
    (capped at ``max_channels``). The first block has no BatchNorm, as in DCGAN:
    normalising raw pixels only removes information the next layers need. A conv
    followed by BatchNorm has no bias (the BatchNorm's shift replaces it).

    Args:
        in_channels: channels of the input images.
        base_channels: width of the first block.
        depth: number of blocks (see :func:`strided_depth`).
        batch_norm: BatchNorm after every conv but the first.
        dropout: ``Dropout2d`` probability after every block (none at 0).
        max_channels: the widest a block may get.
        spectral_norm: spectral normalisation on every conv (discriminators).

    Returns:
        The stack and its number of output channels.
    """
    layers: list[nn.Module] = []
    channels = in_channels
    for i in range(depth):
        out = min(base_channels * 2**i, max(max_channels, base_channels))
        use_bn = batch_norm and i > 0
        conv = nn.Conv2d(channels, out, kernel_size=4, stride=2, padding=1, bias=not use_bn)
        if spectral_norm:
            conv = nn.utils.parametrizations.spectral_norm(conv)
        layers.append(conv)
        if use_bn:
            layers.append(nn.BatchNorm2d(out))
        layers.append(nn.LeakyReLU(0.2, inplace=True))
        if dropout > 0:
            layers.append(nn.Dropout2d(dropout))
        channels = out
    return nn.Sequential(*layers), channels
