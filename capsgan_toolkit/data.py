"""Data building blocks for plugin authors: an in-memory image data set and balanced picks.

- :class:`ImageTensorDataset` holds labelled uint8 images in memory and serves them
  as the engine expects (float ``(C, H, W)`` in ``[-1, 1]``, int label). Every
  built-in data set returns its splits as one; a data-set plugin that can load its
  images into a tensor needs nothing more::

      from capsgan_toolkit.data import ImageTensorDataset

      def split(self, name):
          images, labels = my_reader(name)  # uint8 (N, C, H, W), int (N,)
          return ImageTensorDataset(images, labels)

- :func:`batch_loader` serves a split's batches; an :class:`ImageTensorDataset` (also
  through a ``Subset``) is read a whole batch at a time: one gather and one conversion
  instead of one Python call per image and a collate, which bound a GPU's epoch.
- :func:`class_balanced_indices` picks ``n`` items that cover every class in turn,
  for sample grids and other small showcases of a split whose order is sorted by
  class (an image folder's test split lists class 0 first).

Depends on torch only.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence

import torch
from torch.utils.data import DataLoader, Subset

__all__ = ["ImageTensorDataset", "batch_loader", "class_balanced_indices"]

Fetch = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]

#: The most bytes of images and labels :func:`batch_loader` keeps on a GPU for reading batches there.
DEVICE_DATA_LIMIT = 2 * 1024**3


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

    def _batch_fetcher(self, device: torch.device | None = None) -> Fetch | None:
        """Items ``indices`` (an int64 tensor) at once, as the default collate stacks them: the same
        values bit for bit (the same float32 operations, element by element). ``None`` for a subclass
        that serves its items differently.

        With a ``device``, the uint8 images and the labels are copied there once (kept for later
        loaders) and each batch is gathered and converted there: on a GPU, no host work and no
        host-to-device copy per step. The conversion looks each byte up in a table of the 256
        values the CPU computes (a GPU divides by a constant as a multiplication by its inverse,
        which can differ in the last bit). ``None`` when they would take more than
        :data:`DEVICE_DATA_LIMIT` bytes there."""
        if type(self).__getitem__ is not ImageTensorDataset.__getitem__:
            return None
        images, labels = self.images, self.labels
        if device is None or torch.device(device).type == "cpu":
            return lambda idx: (images[idx].float().div_(127.5).sub_(1.0), labels[idx])
        if images.numel() + 8 * labels.numel() > DEVICE_DATA_LIMIT:
            return None
        key = str(torch.device(device))
        cache = self.__dict__.setdefault("_on_device", {})
        if key not in cache:
            table = torch.arange(256, dtype=torch.uint8).float().div_(127.5).sub_(1.0)
            cache[key] = (images.to(device), labels.to(device), table.to(device))
        images, labels, table = cache[key]
        return lambda idx: (table[images[idx].int()], labels[idx])

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_on_device"}  # a worker reads the host copy


def batch_fetcher(dataset, device: torch.device | None = None) -> Fetch | None:
    """Return a function that reads a batch of ``dataset`` at once, or ``None`` where only items can be read.

    Whole batches come from an :class:`ImageTensorDataset`, a ``Subset`` of one (nested too), and
    any data set with a ``_batch_fetcher()`` method that returns such a function (or ``None``).
    With a ``device`` (not the CPU) the function takes indices on that device and returns the batch
    there, or ``None`` comes back where the data cannot be kept there (then read batches on the host).
    """
    on_device = device is not None and torch.device(device).type != "cpu"
    if isinstance(dataset, Subset):
        inner = batch_fetcher(dataset.dataset, device)
        if inner is None:
            return None
        mapping = torch.as_tensor(dataset.indices, dtype=torch.long)
        mapping = mapping.to(device) if on_device else mapping
        return lambda idx: inner(mapping[idx])
    make = getattr(type(dataset), "_batch_fetcher", None)
    if make is None:
        return None
    if not on_device:
        return make(dataset)
    return make(dataset, device) if "device" in inspect.signature(make).parameters else None


class _Batches(torch.utils.data.Dataset):
    """A data set whose item ``i`` is the whole batch ``batches[i]`` of ``dataset`` (read with ``fetch``)."""

    def __init__(self, dataset, batches: Sequence[Sequence[int]], fetch: Fetch, device: torch.device | None = None):
        self.dataset, self.batches, self._fetch, self.device = dataset, batches, fetch, device

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._fetch is None:  # a worker process builds its own
            self._fetch = batch_fetcher(self.dataset)
        return self._fetch(torch.as_tensor(self.batches[i], dtype=torch.long, device=self.device))

    def __getstate__(self):
        return {**self.__dict__, "_fetch": None}  # closures do not pickle; a worker builds its own


def batch_loader(dataset, batches: Sequence[Sequence[int]] | None = None, *, batch_size: int | None = None,
                 num_workers: int = 0, generator: torch.Generator | None = None,
                 pin_memory: bool = False, device: torch.device | None = None) -> DataLoader:
    """A ``DataLoader`` over ``batches`` (lists of indices; or, with ``batch_size``, the split in order).

    It yields ``(images, labels)`` exactly as ``DataLoader(dataset, batch_sampler=batches)`` would,
    but reads a whole batch at once where :func:`batch_fetcher` can: an epoch of 60,000 MNIST-size
    images no longer spends its time in 60,000 ``__getitem__`` calls and a collate per batch.
    With a GPU ``device`` and no worker processes, a data set that :func:`batch_fetcher` can keep
    there yields its batches already on it (the same values); any other is read on the host.
    """
    if batches is None:
        if batch_size is None:
            raise ValueError("batch_loader needs batches or batch_size")
        batches = [range(i, min(i + batch_size, len(dataset))) for i in range(0, len(dataset), batch_size)]
    extra = {"generator": generator} if generator is not None else {}
    if device is not None and torch.device(device).type != "cpu" and num_workers == 0:
        fetch = batch_fetcher(dataset, device)
        if fetch is not None:
            return DataLoader(_Batches(dataset, batches, fetch, device), batch_size=None, **extra)
    fetch = batch_fetcher(dataset)
    if fetch is not None:
        return DataLoader(_Batches(dataset, batches, fetch), batch_size=None, num_workers=num_workers,
                          pin_memory=pin_memory, **extra)
    return DataLoader(dataset, batch_sampler=batches, num_workers=num_workers, pin_memory=pin_memory, **extra)


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
