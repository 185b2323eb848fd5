"""The built-in generated data set "glyphs": ten classes of geometric shapes.

Needs no download, so every recipe and test can run offline. Each image shows one
shape at a random position, scale (0.35-0.8 of the image), rotation (a full turn,
or up to ``rotation`` degrees either way) and stroke
width, in random foreground and background colours (or grey levels) with enough
contrast, plus optional Gaussian noise.

Rotation is a full turn, so the ten shapes are chosen to stay distinct under any
rotation: a plus and an X, or a square and a diamond, would be the same class.

Rendering is vectorised: every shape is a signed distance function evaluated with
torch on a pixel grid for a whole batch at once, and the distance (in pixels) gives
an anti-aliased coverage. Splits are generated deterministically from ``seed`` and
cached per process, so asking for train and test, or building the plugin twice,
renders each split once.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
from pydantic import Field

from capsgan_toolkit import hookimpl
from capsgan_toolkit.data import ImageTensorDataset
from capsgan_toolkit.interfaces import DatasetInfo, DatasetParams, DatasetPlugin

CLASS_NAMES: tuple[str, ...] = (
    "disc",
    "ring",
    "square",
    "triangle",
    "plus",
    "bar_pair",
    "star",
    "arrow",
    "corner",
    "crescent",
)
"""The glyph classes, in label order."""

_SPLIT_INDEX = {"train": 0, "test": 1}
_CACHE: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
_CACHE_SIZE = 8
# Images per rendering chunk scale with 1/pixels so a chunk's (B, P, edges)
# intermediates stay around tens of megabytes at any image size.
_CHUNK_PIXELS = 2**21
_MIN_CONTRAST = 0.3


class GlyphsParams(DatasetParams):
    """Params of the generated glyphs data set."""

    image_size: Literal[28, 32, 64] = Field(32, description="Image height and width in pixels.")
    channels: Literal[1, 3] = Field(3, description="1: grey levels; 3: random RGB colours.")
    num_train: int = Field(10000, ge=10, description="Images in the training split (classes balanced).")
    num_test: int = Field(2000, ge=10, description="Images in the test split (classes balanced).")
    seed: int = Field(0, ge=0, description="Seed of the generator; train and test use different derived seeds.")
    noise: float = Field(0.05, ge=0.0, le=0.5, description="Std of Gaussian pixel noise, in [0, 1] intensity units.")
    rotation: float = Field(
        180.0,
        ge=0.0,
        le=180.0,
        description="Largest rotation in degrees: angles are uniform in [-rotation, rotation]; 180 is a full turn.",
    )


# ------------------------------------------------------------------------ shapes


def _box(x: torch.Tensor, y: torch.Tensor, half_w, half_h, cx=0.0, cy=0.0) -> torch.Tensor:
    """Signed distance to an axis-aligned box; sizes and centre broadcast against ``x``."""
    dx = (x - cx).abs() - half_w
    dy = (y - cy).abs() - half_h
    return torch.hypot(dx.clamp(min=0), dy.clamp(min=0)) + torch.maximum(dx, dy).clamp(max=0)


def _convex(x: torch.Tensor, y: torch.Tensor, edges) -> torch.Tensor:
    """Signed distance to a convex polygon given as outward ``(normal angle, offset)`` edges.

    The maximum of the half-plane distances is exact inside and along the edges and
    slightly short only beyond a corner, which anti-aliasing never sees.
    """
    return torch.stack([x * math.cos(a) + y * math.sin(a) - c for a, c in edges]).amax(0)


def _star(x: torch.Tensor, y: torch.Tensor, points: int, outer: float, inner: float) -> torch.Tensor:
    """Signed distance to a star, folding every point into one mirrored sector."""
    sector = 2 * math.pi / points
    rho = torch.hypot(x, y)
    ang = torch.remainder(torch.atan2(y, x), sector)
    ang = torch.minimum(ang, sector - ang)  # 0 at a tip, sector/2 at a notch
    qx, qy = rho * ang.cos(), rho * ang.sin()
    ax, ex, ey = outer, inner * math.cos(sector / 2) - outer, inner * math.sin(sector / 2)
    t = (((qx - ax) * ex + qy * ey) / (ex * ex + ey * ey)).clamp(0, 1)
    dist = torch.hypot(qx - ax - ex * t, qy - ey * t)
    inside = ex * qy - ey * (qx - ax) > 0  # the origin's side of the tip-to-notch edge
    return torch.where(inside, -dist, dist)


def _shape_sdf(label: int, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Signed distance (shape units) of class ``label`` at local points ``x, y (B, P)``.

    Shapes fit in the unit disc; ``w (B, 1)`` is the stroke half-width of the
    stroked shapes.
    """
    r = torch.hypot(x, y)
    if label == 0:  # disc
        return r - 0.85
    if label == 1:  # ring
        return (r - 0.75).abs() - w
    if label == 2:  # filled square
        return _box(x, y, 0.62, 0.62)
    if label == 3:  # filled equilateral triangle, circumradius 0.95
        return _convex(x, y, [(-math.pi / 2, 0.475), (math.pi / 6, 0.475), (5 * math.pi / 6, 0.475)])
    if label == 4:  # plus
        return torch.minimum(_box(x, y, 0.9, w), _box(x, y, w, 0.9))
    if label == 5:  # two parallel bars
        return torch.minimum(_box(x, y, 0.85, w, cy=0.45), _box(x, y, 0.85, w, cy=-0.45))
    if label == 6:  # five-pointed star
        return _star(x, y, 5, 0.95, 0.42)
    if label == 7:  # arrow: a shaft and a triangular head with its tip at (0.9, 0)
        slant = math.atan2(0.75, 0.55)
        head = _convex(x, y, [(math.pi, -0.15), (slant, 0.9 * math.cos(slant)), (-slant, 0.9 * math.cos(slant))])
        return torch.minimum(_box(x, y, 0.55, w, cx=-0.35), head)
    if label == 8:  # corner (an L)
        upright = _box(x, y, w, 0.75, cx=-0.6 + w)
        foot = _box(x, y, 0.6, w, cy=-0.75 + w)
        return torch.minimum(upright, foot)
    if label == 9:  # crescent: a disc minus an offset disc
        return torch.maximum(r - 0.85, 0.72 - torch.hypot(x - 0.45, y))
    raise ValueError(f"no glyph class {label}")


# --------------------------------------------------------------------- rendering


def _split_seed(seed: int, split: str) -> int:
    """Derive an independent 63-bit seed per split from the user's seed."""
    state = np.random.SeedSequence([seed, _SPLIT_INDEX[split]]).generate_state(2, dtype=np.uint32)
    return int(state[0]) << 31 ^ int(state[1])


def _colours(n: int, channels: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Foreground and background colours ``(n, C)`` in [0, 1] whose luminance differs enough."""
    luma = torch.tensor([0.299, 0.587, 0.114]) if channels == 3 else torch.ones(1)
    bg = torch.rand(n, channels, generator=gen)
    fg = torch.rand(n, channels, generator=gen)
    for _ in range(8):  # resample only the low-contrast pairs; a fixed count keeps it deterministic
        weak = ((fg - bg) @ luma).abs() < _MIN_CONTRAST
        fresh = torch.rand(n, channels, generator=gen)
        fg = torch.where(weak.unsqueeze(1), fresh, fg)
    weak = ((fg - bg) @ luma).abs() < _MIN_CONTRAST
    # Last resort: white on a dark background, black on a light one (contrast >= 0.5).
    extreme = ((bg @ luma) < 0.5).to(bg.dtype).unsqueeze(1).expand_as(fg)
    return torch.where(weak.unsqueeze(1), extreme, fg), bg


def _render(params: GlyphsParams, count: int, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Render one split: uint8 images ``(N, C, S, S)`` and int64 labels ``(N,)``."""
    gen = torch.Generator().manual_seed(_split_seed(params.seed, split))
    size, channels, k = params.image_size, params.channels, len(CLASS_NAMES)
    labels = torch.arange(count) % k
    labels = labels[torch.randperm(count, generator=gen)]
    # Per-image geometry, drawn for the whole split up front.
    radius = 0.35 + 0.45 * torch.rand(count, generator=gen)  # glyph diameter as a share of the image width
    centre = (torch.rand(count, 2, generator=gen) * 2 - 1) * (1 - radius).unsqueeze(1)
    turn = torch.rand(count, generator=gen)
    # A full turn keeps the original formula, so rotation = 180 renders exactly the images it always did.
    angle = turn * 2 * math.pi if params.rotation >= 180 else (turn * 2 - 1) * math.radians(params.rotation)
    half_w = 0.09 + 0.11 * torch.rand(count, generator=gen)
    # Strokes at least 1.6 pixels wide, so small glyphs still reach full contrast.
    half_w = torch.maximum(half_w, 0.8 / (radius * size / 2))
    fg, bg = _colours(count, channels, gen)

    axis = (torch.arange(size, dtype=torch.float32) + 0.5) / size * 2 - 1  # pixel centres in [-1, 1]
    gy, gx = torch.meshgrid(axis, axis, indexing="ij")
    grid = torch.stack((gx, -gy), -1).reshape(1, -1, 2)  # y up, like the shape definitions
    pixel = 2.0 / size
    images = torch.empty(count, channels, size, size, dtype=torch.uint8)
    chunk = max(1, _CHUNK_PIXELS // (size * size))
    for label in range(k):
        index = (labels == label).nonzero().squeeze(1)
        for start in range(0, len(index), chunk):
            idx = index[start : start + chunk]
            cos, sin = angle[idx].cos().view(-1, 1), angle[idx].sin().view(-1, 1)
            rel = (grid - centre[idx].unsqueeze(1)) / radius[idx].view(-1, 1, 1)
            x = cos * rel[..., 0] + sin * rel[..., 1]
            y = cos * rel[..., 1] - sin * rel[..., 0]
            sdf = _shape_sdf(label, x, y, half_w[idx].view(-1, 1))
            coverage = (0.5 - sdf * radius[idx].view(-1, 1) / pixel).clamp(0, 1)
            img = bg[idx].unsqueeze(2) + (fg[idx] - bg[idx]).unsqueeze(2) * coverage.unsqueeze(1)
            if params.noise > 0:
                img = img + params.noise * torch.randn(img.shape, generator=gen)
            images[idx] = (img.clamp(0, 1) * 255).round().to(torch.uint8).view(-1, channels, size, size)
    return images, labels


def glyph_split(params: GlyphsParams, split: Literal["train", "test"]) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the cached ``(uint8 images (N, C, S, S), labels (N,))`` of one split.

    The cache key is every field that changes the pixels, so ``batch_size`` or
    ``num_workers`` do not cause a second rendering.
    """
    count = params.num_train if split == "train" else params.num_test
    key = (params.image_size, params.channels, count, params.seed, params.noise, params.rotation, split)
    if key not in _CACHE:
        while len(_CACHE) >= _CACHE_SIZE:  # drop the oldest split; a sweep over seeds stays bounded
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[key] = _render(params, count, split)
    return _CACHE[key]


class GlyphsDataset(DatasetPlugin):
    """Generated geometric glyphs, 10 classes, offline and deterministic by seed."""

    Params = GlyphsParams

    @property
    def info(self) -> DatasetInfo:
        size = self.params.image_size
        return DatasetInfo(len(CLASS_NAMES), (self.params.channels, size, size), CLASS_NAMES)

    def split(self, name: Literal["train", "test"]) -> ImageTensorDataset:
        if name not in _SPLIT_INDEX:
            raise ValueError(f'split must be "train" or "test", not {name!r}')
        images, labels = glyph_split(self.params, name)
        return ImageTensorDataset(images, labels)


@hookimpl
def capsgan_register(registry):
    """Register the glyphs data set."""
    registry.register("dataset", "glyphs", GlyphsDataset)
