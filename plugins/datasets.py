"""File-backed data-set plugins: MNIST, Fashion-MNIST and CIFAR-10.

Every split is held in memory as a uint8 tensor ``(N, C, H, W)`` and served one item
at a time as a float tensor in ``[-1, 1]`` with an int label
(:class:`capsgan_toolkit.data.ImageTensorDataset`). Nothing is read or downloaded
when a plugin is built, only when a split is first asked for, so a plugin can be
listed and validated offline.

Files are looked for under ``data.root``; left unset it is ``$CAPSGAN_DATA``, or
``~/.cache/capsgan/data``. Missing files with no way to download them raise a
:class:`~capsgan_toolkit.errors.DataError` that names the folder and files expected.
The files themselves are read by :mod:`capsgan_plugins.formats`; the ``image_folder``
data set lives in :mod:`capsgan_plugins.image_folder`.
"""

from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field

from capsgan_plugins.formats import (
    IDX_FILES,
    find_idx,
    read_cifar_batch,
    read_cifar_pickle,
    read_idx_pair,
    short_error,
)
from capsgan_toolkit import hookimpl
from capsgan_toolkit.data import ImageTensorDataset
from capsgan_toolkit.errors import DataError
from capsgan_toolkit.interfaces import DatasetInfo, DatasetParams, DatasetPlugin

__all__ = ["CIFAR10Dataset", "DATA_ENV", "FashionMNISTDataset", "FileDatasetParams", "MNISTDataset", "data_root"]

DATA_ENV = "CAPSGAN_DATA"
"""Environment variable naming the default data folder."""

SYSTEM_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
"""Where the Debian package ``dataset-fashion-mnist`` installs the gzipped IDX files."""

_CIFAR_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
_FASHION_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
_FASHION_URL = "https://github.com/zalandoresearch/fashion-mnist"


def data_root(root: str | None) -> Path:
    """Return the data folder: ``root``, else ``$CAPSGAN_DATA``, else ``~/.cache/capsgan/data``."""
    if root:
        return Path(root).expanduser()
    env = os.environ.get(DATA_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "capsgan" / "data"


def _convert(images: torch.Tensor, channels: int | None, size: int | None) -> torch.Tensor:
    """Convert uint8 images to ``channels`` (grey<->RGB) and a square ``size`` (antialiased)."""
    if channels is not None and channels != images.shape[1]:
        if channels == 3:
            images = images.expand(-1, 3, -1, -1).contiguous()
        else:  # ITU-R 601 luma, as PIL's "L" mode
            luma = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
            images = (images.float() * luma).sum(1, keepdim=True).round().clamp(0, 255).to(torch.uint8)
    if size is not None and tuple(images.shape[2:]) != (size, size):
        chunks = [
            torch.nn.functional.interpolate(part.float(), size=(size, size), mode="bilinear", antialias=True)
            .round().clamp(0, 255).to(torch.uint8)
            for part in images.split(2048)
        ]
        images = torch.cat(chunks)
    return images


def _missing(title: str, where: str, files, how: str, exc: BaseException | None) -> DataError:
    """The error for absent files: what is missing, where it belongs, how to get it."""
    reason = f"the download failed ({short_error(exc)})" if exc else "downloading is off (data.download = false)"
    return DataError(
        f"{title} data not found, and {reason}. Expected these files in {where}: {', '.join(files)}.",
        hint=f"{how}. Or set data.root to the folder that holds them (default: ${DATA_ENV}, else "
        "~/.cache/capsgan/data), or set data.download = true on a machine with network access.",
    )


# ---------------------------------------------------------------------- the plugins


class FileDatasetParams(DatasetParams):
    """Params of the MNIST, Fashion-MNIST and CIFAR-10 plugins."""

    root: str | None = Field(None, description="Data folder; default: $CAPSGAN_DATA, else ~/.cache/capsgan/data.")
    download: bool = Field(True, description="Download missing files (needs network access).")
    image_size: int | None = Field(None, ge=8, le=1024, description="Resize to this square size; default: native.")
    channels: Literal[1, 3] | None = Field(None, description="Convert to 1 (grey) or 3 (RGB) channels; default: native.")
    subset: int | None = Field(None, ge=1, description="Use only the first N training images (quick runs).")


class _FileDataset(DatasetPlugin):
    """Shared split handling: subset, channel and size conversion, per-instance cache."""

    Params = FileDatasetParams
    native_channels = 1
    native_size = 28
    class_names: tuple[str, ...] = ()

    def __init__(self, params: FileDatasetParams):
        super().__init__(params)
        self._splits: dict[str, ImageTensorDataset] = {}

    @property
    def info(self) -> DatasetInfo:
        size = self.params.image_size or self.native_size
        return DatasetInfo(10, (self.params.channels or self.native_channels, size, size), self.class_names)

    def split(self, name: Literal["train", "test"]) -> ImageTensorDataset:
        if name not in ("train", "test"):
            raise ValueError(f'split must be "train" or "test", not {name!r}')
        if name not in self._splits:
            images, labels = self._load(name == "train")
            if name == "train" and self.params.subset:
                images, labels = images[: self.params.subset].clone(), labels[: self.params.subset].clone()
            images = _convert(images, self.params.channels, self.params.image_size)
            self._splits[name] = ImageTensorDataset(images, labels)
        return self._splits[name]

    def _load(self, train: bool) -> tuple[torch.Tensor, torch.Tensor]:  # pragma: no cover - interface
        raise NotImplementedError


class MNISTDataset(_FileDataset):
    """MNIST handwritten digits, 28x28 grey, read by torchvision."""

    class_names = tuple(str(i) for i in range(10))

    def _load(self, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        from torchvision.datasets import MNIST

        root = data_root(self.params.root)
        raw = root / "MNIST" / "raw"
        # torchvision reads only the unpacked files; unpack .gz files a user copied in.
        for name in IDX_FILES:
            packed = raw / f"{name}.gz"
            if not (raw / name).is_file() and packed.is_file():
                try:
                    (raw / name).write_bytes(gzip.decompress(packed.read_bytes()))
                except (OSError, EOFError, zlib.error) as exc:
                    raise DataError(f"Cannot unpack {packed} into {raw}: {short_error(exc)}.") from None
        present = all((raw / n).is_file() for n in IDX_FILES)
        how = f"Download the four .gz files from {MNIST.mirrors[0]} into {raw} (they are unpacked on first use)"
        if not present and not self.params.download:
            raise _missing("MNIST", str(raw), IDX_FILES, how, None)
        try:
            dataset = MNIST(str(root), train=train, download=not present)
        except Exception as exc:  # URLError/OSError offline, RuntimeError from torchvision, parse errors
            if not all((raw / n).is_file() for n in IDX_FILES):
                raise _missing("MNIST", str(raw), IDX_FILES, how, exc) from None
            read_idx_pair(raw, "train")  # names the damaged file, if one is
            read_idx_pair(raw, "t10k")
            raise DataError(f"torchvision cannot read the MNIST files in {raw}: {short_error(exc)}") from None
        images, labels = dataset.data, dataset.targets.long()
        if images.dim() != 3 or len(images) != len(labels) or (len(labels) and int(labels.max()) > 9):
            read_idx_pair(raw, "train" if train else "t10k")
        return images.unsqueeze(1), labels


class FashionMNISTDataset(_FileDataset):
    """Fashion-MNIST clothing images, 28x28 grey, read from IDX files.

    With ``root`` unset the files are looked for in /usr/share/datasets/fashion-mnist
    (Debian's dataset-fashion-mnist), then in the default data folder, where they are
    downloaded by torchvision if missing. A ``root`` that is set is the only place
    looked at. In each folder the files may sit directly or in ``FashionMNIST/raw``
    (torchvision's layout), gzipped or plain.
    """

    class_names = _FASHION_CLASSES

    def _files(self) -> dict[str, Path]:
        bases = [data_root(self.params.root)] if self.params.root else [SYSTEM_FASHION_MNIST, data_root(None)]
        for base in bases:
            for folder in (base, base / "FashionMNIST" / "raw"):
                found = {n: find_idx(folder, n) for n in IDX_FILES}
                if all(found.values()):
                    return found
        target = bases[-1]
        raw = target / "FashionMNIST" / "raw"
        where = " or ".join(f"{b} or {b / 'FashionMNIST' / 'raw'}" for b in bases) + " (each may end in .gz)"
        how = (
            "Install the Debian package dataset-fashion-mnist (read from /usr/share/datasets/fashion-mnist "
            f"when data.root is unset), or download the four .gz files from {_FASHION_URL} into {raw}"
        )
        if not self.params.download:
            raise _missing("Fashion-MNIST", where, IDX_FILES, how, None)
        from torchvision.datasets import FashionMNIST

        try:
            FashionMNIST(str(target), train=True, download=True)
        except Exception as exc:  # offline: URLError/OSError/RuntimeError; anything else is a failed download too
            raise _missing("Fashion-MNIST", where, IDX_FILES, how, exc) from None
        return {n: find_idx(raw, n) for n in IDX_FILES}

    def _load(self, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        files = self._files()
        return read_idx_pair(files[IDX_FILES[0]].parent, "train" if train else "t10k", files)


class CIFAR10Dataset(_FileDataset):
    """CIFAR-10 natural images, 32x32 RGB, 10 classes.

    Downloading uses torchvision's CIFAR-10 source and checksum. The batches are
    read here rather than by ``torchvision.datasets.CIFAR10``, whose md5 check
    accepts only the original files and whose reader unpickles without limits.
    """

    native_channels = 3
    native_size = 32
    class_names = _CIFAR_CLASSES

    def _load(self, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        from torchvision.datasets import CIFAR10
        from torchvision.datasets.utils import download_and_extract_archive

        root = data_root(self.params.root)
        folder = root / CIFAR10.base_folder
        names = [n for n, _ in CIFAR10.train_list + CIFAR10.test_list] + [CIFAR10.meta["filename"]]
        if not all((folder / n).is_file() for n in names):
            how = f"Download {CIFAR10.url} and unpack it in {root} (it holds {CIFAR10.base_folder}/)"
            if not self.params.download:
                raise _missing("CIFAR-10", str(folder), names, how, None)
            try:
                download_and_extract_archive(CIFAR10.url, str(root), filename=CIFAR10.filename, md5=CIFAR10.tgz_md5)
            except Exception as exc:  # URLError/OSError offline, RuntimeError on a bad checksum, tarfile errors
                raise _missing("CIFAR-10", str(folder), names, how, exc) from None
        meta = read_cifar_pickle(folder / CIFAR10.meta["filename"])
        if len(meta.get("label_names", ())) != 10:
            raise DataError(f"{folder / CIFAR10.meta['filename']}: 'label_names' must list the 10 CIFAR-10 classes.")
        batches = [read_cifar_batch(folder / n) for n, _ in (CIFAR10.train_list if train else CIFAR10.test_list)]
        return torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])


@hookimpl
def capsgan_register(registry):
    """Register the MNIST, Fashion-MNIST and CIFAR-10 data sets."""
    registry.register("dataset", "mnist", MNISTDataset)
    registry.register("dataset", "fashion_mnist", FashionMNISTDataset)
    registry.register("dataset", "cifar10", CIFAR10Dataset)
