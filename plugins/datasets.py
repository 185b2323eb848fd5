"""File-backed data-set plugins: MNIST, Fashion-MNIST, CIFAR-10 and a folder of images.

Every split is held in memory as a uint8 tensor ``(N, C, H, W)`` and served one item
at a time as a float tensor in ``[-1, 1]`` with an int label. Nothing is read or
downloaded when a plugin is built, only when a split is first asked for, so a plugin
can be listed and validated offline.

Files are looked for under ``data.root``; left unset it is ``$CAPSGAN_DATA``, or
``~/.cache/capsgan/data``. Missing files with no way to download them raise a
:class:`~capsgan_toolkit.errors.DataError` that names the folder and files expected.

CIFAR-10's python batches are pickles. They are read with an unpickler that accepts
only the numpy array types that format holds (anything else is refused), and only
from the data folder the user names.
"""

from __future__ import annotations

import codecs
import gzip
import math
import os
import pickle
import struct
import warnings
import zlib
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import Field

from capsgan_toolkit import hookimpl
from capsgan_toolkit.errors import DataError
from capsgan_toolkit.interfaces import DatasetInfo, DatasetParams, DatasetPlugin

DATA_ENV = "CAPSGAN_DATA"
"""Environment variable naming the default data folder."""

SYSTEM_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
"""Where the Debian package ``dataset-fashion-mnist`` installs the gzipped IDX files."""

IDX_IMAGES_MAGIC = 2051
IDX_LABELS_MAGIC = 2049
_IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
_CIFAR_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
_FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
_FASHION_URL = "https://github.com/zalandoresearch/fashion-mnist"
_IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class ImageTensorDataset(torch.utils.data.Dataset):
    """Labelled uint8 images ``(N, C, H, W)`` in memory, served as floats in ``[-1, 1]``."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        if images.dtype != torch.uint8 or images.dim() != 4 or len(images) != len(labels):
            raise ValueError("images must be uint8 (N, C, H, W) with one label per image")
        self.images = images
        self.labels = labels.long()

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index].float().div_(127.5).sub_(1.0), int(self.labels[index])


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


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300]}"


def _missing(title: str, where: str, files, how: str, exc: BaseException | None) -> DataError:
    """The error for absent files: what is missing, where it belongs, how to get it."""
    reason = f"the download failed ({_short(exc)})" if exc else "downloading is off (data.download = false)"
    return DataError(
        f"{title} data not found, and {reason}. Expected these files in {where}: {', '.join(files)}.",
        hint=f"{how}. Or set data.root to the folder that holds them (default: ${DATA_ENV}, else "
        "~/.cache/capsgan/data), or set data.download = true on a machine with network access.",
    )


# -------------------------------------------------------------------------- IDX files


def read_idx(path: Path, magic: int) -> torch.Tensor:
    """Read an IDX file of unsigned bytes (gzipped or plain) strictly.

    Args:
        path: the file; gzip is recognised by its content, not its name.
        magic: the expected magic number (2051 images, 2049 labels).

    Returns:
        A uint8 tensor with the dimensions the header declares.

    Raises:
        DataError: naming the file, if it cannot be read, is damaged, has another
            magic number, or holds more or fewer bytes than its header declares.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"Cannot read the IDX file {path}: {_short(exc)}. Replace it with a good copy.") from None
    if len(raw) < 4 or struct.unpack(">I", raw[:4])[0] != magic:
        found = struct.unpack(">I", raw[:4])[0] if len(raw) >= 4 else "none (file too short)"
        raise DataError(f"{path} is not an IDX file of the expected kind: magic number {found}, expected {magic}.")
    ndim = raw[3]
    header = 4 + 4 * ndim
    dims = struct.unpack(f">{ndim}I", raw[4:header]) if len(raw) >= header else ()
    if len(raw) < header or len(raw) != header + math.prod(dims):
        raise DataError(
            f"{path} is truncated or damaged: its header declares dimensions {dims} "
            f"({math.prod(dims) if dims else '?'} bytes of data) but it holds {max(len(raw) - header, 0)}. "
            "Replace it with a good copy."
        )
    return torch.from_numpy(np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims).copy())


def _idx_pair(folder: Path, prefix: str, paths: dict[str, Path] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Read ``<prefix>-images`` and ``<prefix>-labels`` of a 28x28, 10-class IDX set."""
    paths = paths or {n: folder / n for n in _IDX_FILES}
    images = read_idx(paths[f"{prefix}-images-idx3-ubyte"], IDX_IMAGES_MAGIC)
    labels = read_idx(paths[f"{prefix}-labels-idx1-ubyte"], IDX_LABELS_MAGIC).long()
    if images.dim() != 3 or tuple(images.shape[1:]) != (28, 28) or labels.dim() != 1 or len(labels) != len(images):
        raise DataError(
            f"The {prefix} files in {folder} do not match: images {tuple(images.shape)}, labels "
            f"{tuple(labels.shape)} (expected (N, 28, 28) and (N,))."
        )
    if len(labels) and int(labels.max()) > 9:
        raise DataError(f"The {prefix} labels in {folder} go up to {int(labels.max())}; expected 0-9.")
    return images.unsqueeze(1), labels


def _find_idx(folder: Path, name: str) -> Path | None:
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


# ------------------------------------------------------------------------ CIFAR files


def _cifar_globals() -> dict[tuple[str, str], object]:
    try:  # numpy >= 2 moved the pickling helpers; files written by either are accepted
        from numpy._core import multiarray, numeric
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray, numeric
    allowed = {("_codecs", "encode"): codecs.encode, ("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for module in ("numpy.core", "numpy._core"):
        allowed[(f"{module}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{module}.multiarray", "scalar")] = multiarray.scalar
        allowed[(f"{module}.numeric", "_frombuffer")] = numeric._frombuffer
    return allowed


class _CifarUnpickler(pickle.Unpickler):
    """An unpickler that builds numpy arrays, lists and strings, and refuses everything else."""

    _allowed: dict | None = None

    def find_class(self, module: str, name: str):
        if _CifarUnpickler._allowed is None:
            _CifarUnpickler._allowed = _cifar_globals()
        try:
            return _CifarUnpickler._allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refused to load {module}.{name}: a CIFAR batch holds only arrays") from None


def _read_cifar_pickle(path: Path) -> dict:
    try:
        with open(path, "rb") as fh:
            entry = _CifarUnpickler(fh, encoding="latin1").load()
    except Exception as exc:  # a damaged pickle fails in many ways; each is the file's fault
        raise DataError(f"Cannot read the CIFAR-10 file {path}: {_short(exc)}. Replace it with a good copy.") from None
    if not isinstance(entry, dict):
        raise DataError(f"{path} is not a CIFAR-10 python batch (it holds a {type(entry).__name__}, not a dict).")
    return entry


def read_cifar_batch(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Read one CIFAR-10 python batch: uint8 images ``(N, 3, 32, 32)`` and labels ``(N,)``.

    Raises:
        DataError: naming the file, if it is damaged or not in CIFAR-10's format
            (a dict with ``data`` (N, 3072) uint8 and ``labels``, N ints in 0-9).
    """
    entry = _read_cifar_pickle(Path(path))
    data, labels = entry.get("data"), entry.get("labels")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(f"{path}: 'data' must be a uint8 array (N, 3072), found {getattr(data, 'shape', type(data))}.")
    if not isinstance(labels, list) or len(labels) != len(data):
        raise DataError(f"{path}: 'labels' must be a list of {len(data)} ints.")
    targets = torch.tensor(labels, dtype=torch.long)
    if len(targets) and (int(targets.min()) < 0 or int(targets.max()) > 9):
        raise DataError(f"{path}: labels must be in 0-9.")
    return torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()), targets


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
        for name in _IDX_FILES:
            packed = raw / f"{name}.gz"
            if not (raw / name).is_file() and packed.is_file():
                try:
                    (raw / name).write_bytes(gzip.decompress(packed.read_bytes()))
                except (OSError, EOFError, zlib.error) as exc:
                    raise DataError(f"Cannot unpack {packed} into {raw}: {_short(exc)}.") from None
        present = all((raw / n).is_file() for n in _IDX_FILES)
        how = f"Download the four .gz files from {MNIST.mirrors[0]} into {raw} (they are unpacked on first use)"
        if not present and not self.params.download:
            raise _missing("MNIST", str(raw), _IDX_FILES, how, None)
        try:
            dataset = MNIST(str(root), train=train, download=not present)
        except Exception as exc:  # URLError/OSError offline, RuntimeError from torchvision, parse errors
            if not all((raw / n).is_file() for n in _IDX_FILES):
                raise _missing("MNIST", str(raw), _IDX_FILES, how, exc) from None
            _idx_pair(raw, "train")  # names the damaged file, if one is
            _idx_pair(raw, "t10k")
            raise DataError(f"torchvision cannot read the MNIST files in {raw}: {_short(exc)}") from None
        images, labels = dataset.data, dataset.targets.long()
        if images.dim() != 3 or len(images) != len(labels) or (len(labels) and int(labels.max()) > 9):
            _idx_pair(raw, "train" if train else "t10k")
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
                found = {n: _find_idx(folder, n) for n in _IDX_FILES}
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
            raise _missing("Fashion-MNIST", where, _IDX_FILES, how, None)
        from torchvision.datasets import FashionMNIST

        try:
            FashionMNIST(str(target), train=True, download=True)
        except Exception as exc:  # offline: URLError/OSError/RuntimeError; anything else is a failed download too
            raise _missing("Fashion-MNIST", where, _IDX_FILES, how, exc) from None
        return {n: _find_idx(raw, n) for n in _IDX_FILES}

    def _load(self, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        files = self._files()
        return _idx_pair(files[_IDX_FILES[0]].parent, "train" if train else "t10k", files)


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
        meta = _read_cifar_pickle(folder / CIFAR10.meta["filename"])
        if len(meta.get("label_names", ())) != 10:
            raise DataError(f"{folder / CIFAR10.meta['filename']}: 'label_names' must list the 10 CIFAR-10 classes.")
        batches = [read_cifar_batch(folder / n) for n, _ in (CIFAR10.train_list if train else CIFAR10.test_list)]
        return torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])


class ImageFolderParams(DatasetParams):
    """Params of the image-folder plugin."""

    root: str = Field(..., description="Folder with one sub-folder of images per class; sorted names are the classes.")
    extensions: tuple[str, ...] = Field(_IMAGE_EXTENSIONS, description="File name endings read as images.")
    test_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="Share of each class held out for testing.")
    seed: int = Field(0, ge=0, description="Seed of the train/test split.")
    image_size: int | None = Field(
        None, ge=8, le=1024, description="Square size to resize to (short side, then centre crop); "
        "required when the images differ in size.",
    )
    channels: Literal[1, 3] = Field(3, description="1: convert to grey; 3: convert to RGB.")
    on_corrupt: Literal["error", "skip"] = Field(
        "error", description="An unreadable image: stop with an error naming it, or skip it and warn."
    )


class ImageFolderDataset(DatasetPlugin):
    """Labelled images from class sub-folders, split into train and test by seed.

    Every image is decoded when the data set is first used (``info`` or
    ``split``), so a damaged file is reported before training starts, and all
    images are then held in memory. ``skipped`` counts the unreadable images left
    out with ``on_corrupt = "skip"``.
    """

    Params = ImageFolderParams

    def __init__(self, params: ImageFolderParams):
        super().__init__(params)
        self.skipped = 0
        self.skipped_files: list[Path] = []
        self._loaded: tuple[dict[str, ImageTensorDataset], tuple[str, ...]] | None = None

    @property
    def info(self) -> DatasetInfo:
        splits, classes = self._load()
        return DatasetInfo(len(classes), tuple(splits["train"].images.shape[1:]), classes)

    def split(self, name: Literal["train", "test"]) -> ImageTensorDataset:
        if name not in ("train", "test"):
            raise ValueError(f'split must be "train" or "test", not {name!r}')
        return self._load()[0][name]

    def _files(self, root: Path) -> tuple[tuple[str, ...], list[tuple[Path, int]]]:
        if not root.is_dir():
            raise DataError(f"Image folder {root} does not exist (data.root).")
        classes = tuple(sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")))
        if not classes:
            raise DataError(f"{root} has no class sub-folders: put the images of each class in <root>/<class>/.")
        exts = {e.lower() if e.startswith(".") else f".{e.lower()}" for e in self.params.extensions}
        files = []
        for label, cls in enumerate(classes):
            found = sorted(
                p for p in (root / cls).rglob("*")
                if p.is_file() and p.suffix.lower() in exts and not p.name.startswith(".")
            )
            if not found:
                raise DataError(f"Class folder {root / cls} holds no images ending in {', '.join(sorted(exts))}.")
            files += [(p, label) for p in found]
        return classes, files

    def _decode(self, path: Path) -> torch.Tensor | None:
        from PIL import Image, ImageOps

        size = self.params.image_size
        try:
            with Image.open(path) as img:
                img.load()
                img = img.convert("L" if self.params.channels == 1 else "RGB")
                if size is not None:
                    img = ImageOps.fit(img, (size, size), method=Image.Resampling.BICUBIC)
                array = np.asarray(img, dtype=np.uint8)
        except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, ... for damaged files
            if self.params.on_corrupt == "error":
                raise DataError(
                    f"Cannot read image {path}: {_short(exc)}.",
                    hint='Replace or delete it, or set data.on_corrupt = "skip" to leave unreadable images out.',
                ) from None
            self.skipped_files.append(path)
            return None
        return torch.from_numpy(array.reshape(array.shape[0], array.shape[1], -1).copy()).permute(2, 0, 1)

    def _load(self) -> tuple[dict[str, ImageTensorDataset], tuple[str, ...]]:
        if self._loaded is not None:
            return self._loaded
        root = Path(self.params.root).expanduser()
        classes, files = self._files(root)
        images, labels, first = [], [], None
        for path, label in files:
            img = self._decode(path)
            if img is None:
                continue
            if first is None:
                first = (path, img.shape)
            elif img.shape != first[1]:
                raise DataError(
                    f"Images in {root} differ in size: {path} is {tuple(img.shape[1:])}, "
                    f"{first[0]} is {tuple(first[1][1:])}.",
                    hint="Set data.image_size to resize them all to one square size.",
                )
            images.append(img)
            labels.append(label)
        self.skipped = len(self.skipped_files)
        if self.skipped:
            warnings.warn(
                f"image_folder: skipped {self.skipped} unreadable image(s) in {root}, "
                f"first {self.skipped_files[0]}.",
                stacklevel=3,
            )
        if not images:
            raise DataError(f"No readable images in {root}.")
        data, targets = torch.stack(images), torch.tensor(labels)
        gen = torch.Generator().manual_seed(self.params.seed)
        test_mask = torch.zeros(len(targets), dtype=torch.bool)
        for label in range(len(classes)):
            index = (targets == label).nonzero().squeeze(1)
            index = index[torch.randperm(len(index), generator=gen)]
            n_test = round(len(index) * self.params.test_fraction)
            if self.params.test_fraction > 0 and len(index) > 1:
                n_test = min(max(n_test, 1), len(index) - 1)  # keep both splits non-empty per class
            test_mask[index[:n_test]] = True
        splits = {
            "train": ImageTensorDataset(data[~test_mask], targets[~test_mask]),
            "test": ImageTensorDataset(data[test_mask], targets[test_mask]),
        }
        self._loaded = (splits, classes)
        return self._loaded


@hookimpl
def capsgan_register(registry):
    """Register the MNIST, Fashion-MNIST, CIFAR-10 and image-folder data sets."""
    registry.register("dataset", "mnist", MNISTDataset)
    registry.register("dataset", "fashion_mnist", FashionMNISTDataset)
    registry.register("dataset", "cifar10", CIFAR10Dataset)
    registry.register("dataset", "image_folder", ImageFolderDataset)
