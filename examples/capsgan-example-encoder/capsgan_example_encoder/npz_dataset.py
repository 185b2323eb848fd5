"""The example's data set ``npz_images``: labelled images from two numpy ``.npz`` files.

``<root>/train.npz`` and ``<root>/test.npz`` each hold two arrays: ``images``,
uint8 ``(N, H, W)`` (grey) or ``(N, H, W, C)`` with C = 1 or 3, and ``labels``,
``N`` class indices from 0. Write them with
``numpy.savez(path, images=..., labels=...)``.

A data-set plugin has two jobs: ``info`` (class count and image shape, which size
the models) and ``split(name)`` (a torch Dataset of ``(image in [-1, 1], label)``).
Once the pixels are a uint8 tensor, :class:`capsgan_toolkit.data.ImageTensorDataset`
does the second: the built-in data sets use it too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import Field

from capsgan_toolkit.data import ImageTensorDataset
from capsgan_toolkit.errors import DataError
from capsgan_toolkit.interfaces import DatasetInfo, DatasetParams, DatasetPlugin


class NpzImagesDataset(DatasetPlugin):
    """Labelled images from ``<root>/train.npz`` and ``<root>/test.npz`` (arrays ``images``, ``labels``)."""

    class Params(DatasetParams):
        root: str = Field(..., description="Folder holding train.npz and test.npz.")
        num_classes: int | None = Field(
            None, ge=2, description="Number of classes; default: the largest training label + 1."
        )

    def __init__(self, params: Params):
        super().__init__(params)
        self._splits: dict[str, ImageTensorDataset] = {}  # read once, on first use

    @property
    def info(self) -> DatasetInfo:
        train = self.split("train")
        k = self.params.num_classes or int(train.labels.max()) + 1
        return DatasetInfo(k, tuple(train.images.shape[1:]), tuple(str(i) for i in range(k)))

    def split(self, name: Literal["train", "test"]) -> ImageTensorDataset:
        if name not in ("train", "test"):
            raise ValueError(f'split must be "train" or "test", not {name!r}')
        if name not in self._splits:
            images, labels = self._read(Path(self.params.root).expanduser() / f"{name}.npz")
            if name == "test" and images.shape[1:] != self.split("train").images.shape[1:]:
                raise DataError(
                    f"The images in test.npz are {tuple(images.shape[1:])} (C, H, W), but those in "
                    f"train.npz are {tuple(self.split('train').images.shape[1:])}."
                )
            self._splits[name] = ImageTensorDataset(images, labels)
        return self._splits[name]

    @staticmethod
    def _read(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
        """Return uint8 images ``(N, C, H, W)`` and labels ``(N,)``, or raise a DataError naming ``path``."""
        if not path.is_file():
            raise DataError(f"{path} does not exist. Put train.npz and test.npz in data.root.")
        try:
            with np.load(path, allow_pickle=False) as npz:  # no pickles: loading runs no code
                images, labels = npz["images"], npz["labels"]
        except Exception as exc:  # a damaged zip, a missing array, an object array
            raise DataError(f"Cannot read {path}: {type(exc).__name__}: {exc}.") from None
        if images.ndim == 3:
            images = images[..., None]
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
            raise DataError(f"{path}: 'images' must be uint8 (N, H, W) or (N, H, W, 1 or 3), not "
                            f"{images.dtype} {images.shape}.")
        if labels.ndim != 1 or len(labels) != len(images) or not np.issubdtype(labels.dtype, np.integer) \
                or (len(labels) and labels.min() < 0):
            raise DataError(f"{path}: 'labels' must be {len(images)} class indices from 0.")
        return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(labels).long()
