"""Data building blocks for plugin authors: an in-memory image data set and balanced picks.

- :class:`ImageTensorDataset` holds labelled uint8 images in memory and serves them
  as the engine expects (float ``(C, H, W)`` in ``[-1, 1]``, int label). Every
  built-in data set returns its splits as one; a data-set plugin that can load its
  images into a tensor needs nothing more::

      from capsgan_toolkit.data import ImageTensorDataset

      def split(self, name):
          images, labels = my_reader(name)  # uint8 (N, C, H, W), int (N,)
          return ImageTensorDataset(images, labels)

- :func:`class_balanced_indices` picks ``n`` items that cover every class in turn,
  for sample grids and other small showcases of a split whose order is sorted by
  class (an image folder's test split lists class 0 first).

Depends on torch only.
"""

from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["ImageTensorDataset", "class_balanced_indices"]


class ImageTensorDataset(torch.utils.data.Dataset):
    """Labelled uint8 images ``(N, C, H, W)`` in memory, served as floats in ``[-1, 1]``.

    Item ``i`` is ``(images[i] / 127.5 - 1, int(labels[i]))``: a float32 tensor
    ``(C, H, W)`` and a Python int. Pixels are kept as uint8 (a quarter of the
    memory of float32) and converted one item at a time.

    Args:
        images: uint8 tensor ``(N, C, H, W)``.
        labels: ``N`` class indices (any integer tensor; stored as int64).

    Attributes:
        images: the uint8 tensor as given (not copied).
        labels: the labels as an int64 tensor ``(N,)``.

    Raises:
        ValueError: if ``images`` is not a 4-d uint8 tensor, or the number of labels
            differs from the number of images.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        if images.dtype != torch.uint8 or images.dim() != 4 or len(images) != len(labels):
            raise ValueError("images must be uint8 (N, C, H, W) with one label per image")
        self.images = images
        self.labels = labels.long()

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index].float().div_(127.5).sub_(1.0), int(self.labels[index])


def class_balanced_indices(labels: Sequence[int] | torch.Tensor, n: int, seed: int = 0) -> list[int]:
    """Return ``n`` indices into ``labels`` that take every class in turn.

    The classes present are visited in ascending order, round after round, and
    each visit takes the next index of that class, so the first ``K`` indices show
    ``K`` different classes (for ``K`` classes present), and a grid of ``K``
    columns shows one class per column for as long as every class has images
    left. A class that runs out is skipped in later rounds. Which images of a
    class are taken, and in which order, is a permutation drawn from ``seed``:
    the same labels, ``n`` and ``seed`` always give the same list.

    Args:
        labels: the class of each item (a sequence of ints or an integer tensor),
            e.g. ``split.labels`` of an :class:`ImageTensorDataset`.
        n: how many indices to return; fewer come back if ``labels`` is shorter.
        seed: seed of the per-class shuffle.

    Returns:
        ``min(n, len(labels))`` distinct indices, as Python ints.

    Raises:
        ValueError: if ``n`` is negative or ``labels`` is not one-dimensional.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    labels = torch.as_tensor(labels)
    if labels.dim() != 1:
        raise ValueError(f"labels must be one-dimensional, got shape {tuple(labels.shape)}")
    labels = labels.long()
    gen = torch.Generator().manual_seed(seed)
    queues = []
    for cls in torch.unique(labels).tolist():  # sorted ascending
        members = (labels == cls).nonzero().squeeze(1)
        queues.append(members[torch.randperm(len(members), generator=gen)].tolist())
    picked: list[int] = []
    depth = 0
    n = min(n, len(labels))
    while len(picked) < n:
        for queue in queues:
            if depth < len(queue):
                picked.append(queue[depth])
                if len(picked) == n:
                    break
        depth += 1
    return picked


def split_labels(dataset, limit: int | None = None) -> list[int]:
    """Return the labels of a split's first ``limit`` items (all by default), without decoding images
    when the split keeps its labels in a ``labels`` tensor (as :class:`ImageTensorDataset` does)."""
    n = len(dataset) if limit is None else min(limit, len(dataset))
    labels = getattr(dataset, "labels", None)
    if isinstance(labels, torch.Tensor) and len(labels) == len(dataset):
        return [int(v) for v in labels[:n].tolist()]
    return [int(dataset[i][1]) for i in range(n)]
