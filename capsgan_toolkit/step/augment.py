"""Data augmentation of training batches: the recipe's ``[augment]`` table.

Four options, all off by default, applied to each training batch on the fly in this order:

- ``crop = S``: a random ``S x S`` window of each image (Sabour et al.'s CIFAR-10: 24x24 random
  crops of the 32x32 images). It changes the models' input size: the data set the models are
  built from serves the *centre* ``S x S`` crop of every image (:class:`CentreCropped`), so
  validation, test, sample grids and evaluation all see ``S x S`` centre crops, and only the
  training batches are random crops of the full images.
- ``shift = N``: translate each image by a random whole number of pixels in ``[-N, N]``,
  independently in x and y, filling with zeros (Sabour et al.'s MNIST: "shifted by up to 2
  pixels in each direction with zero padding"). The same as padding ``N`` zeros and cropping
  a random window of the original size.
- ``crop_padding = P``: pad ``P`` pixels, then crop a random window of the image's size
  (the usual CIFAR-10 set-up, ``P = 4``); the padding is zeros or a mirror of the border
  (``padding_mode``). With zeros it is ``shift = P``; only one of the two may be set.

"Zeros" are pixel value 0 of the images' 0-255 range, black, as in the papers: :data:`FILL`,
-1 in the engine's ``[-1, 1]`` range (a 0 there would be mid-grey).
- ``hflip = true``: flip each image left-right with probability 0.5.

Every random number comes from a generator seeded from the run's seed and the global step
(:func:`step_generator`; in a distributed run also the rank, so that the ranks' shards are
augmented independently), drawn on the CPU and then moved to the batch's device: the
augmentation of step ``s`` is a pure function of ``(images, seed, s)``, identical on CPU and
CUDA, and a run resumed at step ``s`` re-creates the same augmentations with no extra state
in the checkpoint. Everything is vectorised over the batch (one gather), no loop per image.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from capsgan_toolkit.data import ImageTensorDataset, batch_fetcher
from capsgan_toolkit.errors import RecipeError
from capsgan_toolkit.interfaces import DatasetInfo, DatasetPlugin

FILL = -1.0
"""The fill of ``shift`` and of ``crop_padding`` with ``padding_mode = "zeros"``: pixel value 0 (black) in [-1, 1] units."""

__all__ = ["FILL", "AugmentSection", "Augmenter", "CentreCropped", "Draw", "apply", "augment", "centre_offsets", "draw",
           "step_generator", "wrap_dataset"]


class AugmentSection(BaseModel):
    """The recipe's ``[augment]`` table (absent: no augmentation)."""

    model_config = ConfigDict(extra="forbid")

    shift: int = Field(0, ge=0, description="Translate each training image by up to this many pixels in x and y, "
                       "zero fill (Sabour et al.'s MNIST: 2); 0: off.")
    crop_padding: int = Field(0, ge=0, description="Pad this many pixels, then crop a random window of the image's "
                              "size (CIFAR-10 style: 4); 0: off. Not together with shift.")
    padding_mode: Literal["zeros", "reflect"] = Field(
        "zeros", description='Fill of crop_padding: "zeros" (black pixels, as He et al. and torchvision) or '
        '"reflect" (a mirror of the border).')
    hflip: bool = Field(False, description="Flip each training image left-right with probability 0.5.")
    crop: int = Field(0, ge=0, description="Train on random crop x crop windows, and build the models for, validate, "
                      "test and evaluate on the centre crop x crop window (Sabour et al.'s CIFAR-10: 24); 0: off.")

    @property
    def active(self) -> bool:
        return bool(self.shift or self.crop_padding or self.hflip or self.crop)

    def check(self) -> list[tuple[str, str]]:
        """Return ``(key, message)`` problems found without the data (see also :meth:`check_image`)."""
        problems = []
        if self.shift and self.crop_padding:
            problems.append(("augment.crop_padding", "shift and crop_padding both translate the image: set one of "
                             'them to 0 (shift = N is crop_padding = N with padding_mode = "zeros")'))
        if self.padding_mode != "zeros" and self.shift:
            problems.append(("augment.padding_mode", "is the fill of crop_padding; shift always fills with zeros "
                             "(black): for a mirrored border use crop_padding instead of shift"))
        return problems

    def check_image(self, shape: Sequence[int]) -> list[tuple[str, str]]:
        """Return ``(key, message)`` problems of these options for the data set's images ``(C, H, W)``."""
        _, h, w = (int(v) for v in shape)
        if self.crop > min(h, w):
            return [("augment.crop", f"crop = {self.crop} is larger than the data's {h} x {w} images; use at most "
                     f"{min(h, w)} (or 0: off)")]
        side = self.crop or min(h, w)
        for key in ("shift", "crop_padding"):
            if getattr(self, key) >= side:
                return [(f"augment.{key}", f"{key} = {getattr(self, key)} must be smaller than the image side the "
                         f"augmentation works on ({side} pixels); {side // 8 or 1} or so is usual")]
        return []


# --------------------------------------------------------------------------- the pure function


def step_generator(seed: int, step: int, rank: int = 0) -> torch.Generator:
    """Return a CPU generator seeded from ``(seed, step)`` alone (SHA-256 of both: no overlap with other seeds).

    ``rank``: a distributed run's process; rank 0 draws what a one-process run draws.
    """
    key = f"capsgan-augment:{int(seed)}:{int(step)}" + (f":rank{int(rank)}" if rank else "")
    digest = hashlib.sha256(key.encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


@dataclasses.dataclass(frozen=True)
class Draw:
    """The random choices for one batch (CPU tensors of shape ``(B,)``; ``None``: option off).

    ``top``/``left``: corner of the ``crop`` window; ``dy``/``dx``: translation in pixels
    (content moves down/right by that much, in ``[-N, N]``); ``flip``: which images are mirrored.
    """

    top: torch.Tensor | None = None
    left: torch.Tensor | None = None
    dy: torch.Tensor | None = None
    dx: torch.Tensor | None = None
    flip: torch.Tensor | None = None


def draw(spec: AugmentSection, batch: int, size: Sequence[int], generator: torch.Generator) -> Draw:
    """Draw the choices for a batch of ``batch`` images of ``size = (H, W)``, in a fixed order."""
    h, w = int(size[0]), int(size[1])
    out: dict[str, Any] = {}
    if spec.crop:
        out["top"] = torch.randint(0, h - spec.crop + 1, (batch,), generator=generator)
        out["left"] = torch.randint(0, w - spec.crop + 1, (batch,), generator=generator)
    n = spec.shift or spec.crop_padding
    if n:
        out["dy"] = torch.randint(-n, n + 1, (batch,), generator=generator)
        out["dx"] = torch.randint(-n, n + 1, (batch,), generator=generator)
    if spec.hflip:
        out["flip"] = torch.rand(batch, generator=generator) < 0.5
    return Draw(**out)


def _windows(images: torch.Tensor, top: torch.Tensor, left: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Return ``images[b, :, top[b]:top[b] + h, left[b]:left[b] + w]`` for every ``b``, in one gather."""
    dev = images.device
    top, left = top.to(dev), left.to(dev)
    b = torch.arange(images.shape[0], device=dev)[:, None, None, None]
    c = torch.arange(images.shape[1], device=dev)[None, :, None, None]
    rows = (top[:, None] + torch.arange(h, device=dev))[:, None, :, None]
    cols = (left[:, None] + torch.arange(w, device=dev))[:, None, None, :]
    return images[b, c, rows, cols]


def apply(images: torch.Tensor, choices: Draw, spec: AugmentSection) -> torch.Tensor:
    """Apply ``choices`` to ``images (B, C, H, W)``: crop, then translate, then flip. Returns a new tensor."""
    if choices.top is not None:
        images = _windows(images, choices.top, choices.left, spec.crop, spec.crop)
    if choices.dy is not None:
        n = spec.shift or spec.crop_padding
        mode = "reflect" if spec.crop_padding and spec.padding_mode == "reflect" else "constant"
        padded = F.pad(images, (n, n, n, n), mode=mode, **({"value": FILL} if mode == "constant" else {}))
        images = _windows(padded, n - choices.dy, n - choices.dx, images.shape[-2], images.shape[-1])
    if choices.flip is not None:
        images = torch.where(choices.flip.to(images.device)[:, None, None, None], images.flip(-1), images)
    return images


def augment(images: torch.Tensor, spec: AugmentSection, generator: torch.Generator) -> torch.Tensor:
    """Augment a batch ``(B, C, H, W)`` (any device) with random choices from ``generator`` (a CPU one)."""
    return apply(images, draw(spec, images.shape[0], images.shape[-2:], generator), spec)


class Augmenter:
    """``augmenter(images, step)``: the training batch of global step ``step``, augmented as the recipe asks.

    Identity (the same tensor back) when the recipe has no ``[augment]`` or all its options are off.
    ``rank``: this process's rank in a distributed run (see :func:`step_generator`).
    """

    def __init__(self, spec: AugmentSection | None, seed: int, rank: int = 0):
        self.spec = spec if spec is not None and spec.active else None
        self.seed, self.rank = int(seed), int(rank)

    def __call__(self, images: torch.Tensor, step: int) -> torch.Tensor:
        if self.spec is None:
            return images
        return augment(images, self.spec, step_generator(self.seed, step, self.rank))


# --------------------------------------------------------------------------- the data side of ``crop``


def centre_offsets(h: int, w: int, crop: int) -> tuple[int, int]:
    """Return ``(top, left)`` of the centre ``crop x crop`` window (TensorFlow's crop_or_pad: floor)."""
    return (h - crop) // 2, (w - crop) // 2


class _CentreCropSplit(torch.utils.data.Dataset):
    """A split whose items are the centre ``crop x crop`` window of the inner split's items."""

    def __init__(self, inner, crop: int):
        self.inner, self.crop = inner, crop

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, index):
        image, label = self.inner[index]
        top, left = centre_offsets(image.shape[-2], image.shape[-1], self.crop)
        return image[..., top:top + self.crop, left:left + self.crop], label

    def _batch_fetcher(self, device=None):
        inner = batch_fetcher(self.inner, device)
        if inner is None:
            return None

        def fetch(idx):
            images, labels = inner(idx)
            top, left = centre_offsets(images.shape[-2], images.shape[-1], self.crop)
            return images[..., top:top + self.crop, left:left + self.crop].contiguous(), labels
        return fetch

    def __getattr__(self, name):  # e.g. ``labels``; never for private names (pickling looks them up first)
        if name.startswith("_") or name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)


class CentreCropped(DatasetPlugin):
    """A data set plugin seen through its centre ``crop x crop`` window (``[augment] crop``).

    ``info.image_shape`` is ``(C, crop, crop)`` and every split serves centre crops, so the models
    are built for, validated, tested and evaluated on them; the trainer draws its batches from
    ``uncropped.split("train")`` and crops them at random. Other attributes are the wrapped plugin's.
    """

    def __init__(self, dataset: DatasetPlugin, crop: int):
        self.uncropped, self.crop = dataset, int(crop)
        self.params = dataset.params

    @property
    def info(self) -> DatasetInfo:
        inner = self.uncropped.info
        return dataclasses.replace(inner, image_shape=(inner.image_shape[0], self.crop, self.crop))

    def split(self, name):
        inner = self.uncropped.split(name)
        if isinstance(inner, ImageTensorDataset):  # a view of the uint8 tensor: no copy, no per-item work
            top, left = centre_offsets(inner.images.shape[-2], inner.images.shape[-1], self.crop)
            return ImageTensorDataset(inner.images[..., top:top + self.crop, left:left + self.crop], inner.labels)
        return _CentreCropSplit(inner, self.crop)

    def __getattr__(self, name):  # e.g. ``split_description``
        if name.startswith("_") or name == "uncropped":
            raise AttributeError(name)
        return getattr(self.uncropped, name)


def wrap_dataset(dataset: DatasetPlugin, spec: AugmentSection | None, source: str) -> DatasetPlugin:
    """Check ``spec`` against the data's image size and return the data set the models are built from.

    Raises:
        RecipeError: an option that does not fit the images (e.g. a crop larger than the image), naming the key.
    """
    if spec is None or not spec.active:
        return dataset
    shape = dataset.info.image_shape
    problems = spec.check_image(shape)
    if problems:
        lines = [f"{source}: the recipe is not valid for this data set's {tuple(shape)} images "
                 f"({len(problems)} problem{'s' if len(problems) != 1 else ''}):"]
        lines += [f"  - {key}: {msg}" for key, msg in problems]
        lines.append("Fix these keys in the recipe's [augment] table (see docs/recipes.md).")
        raise RecipeError("\n".join(lines))
    return CentreCropped(dataset, spec.crop) if spec.crop else dataset
