"""On-disk format readers for the data-set plugins: IDX files, CIFAR-10 python batches, images.

Each reader takes a path and returns uint8 tensors, strictly: a file that is
damaged, truncated or of another kind raises a
:class:`~capsgan_toolkit.errors.DataError` naming the file (images: see
:func:`decode_image`). Nothing here knows about recipes, data folders or
downloads; that is the plugins' part (:mod:`capsgan_plugins.datasets`,
:mod:`capsgan_plugins.image_folder`).

CIFAR-10's python batches are pickles. They are read with an unpickler that accepts
only the numpy array types that format holds (anything else is refused).
"""

from __future__ import annotations

import codecs
import gzip
import math
import pickle
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

from capsgan_toolkit.errors import DataError

IDX_IMAGES_MAGIC = 2051
IDX_LABELS_MAGIC = 2049
IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
"""The four files of an MNIST-style IDX set (each may also end in ``.gz``)."""

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
"""File name endings read as images by default."""


def short_error(exc: BaseException) -> str:
    """One line naming the exception's type and the start of its message, for error texts."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300]}"


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
        raise DataError(f"Cannot read the IDX file {path}: {short_error(exc)}. Replace it with a good copy.") from None
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


def read_idx_pair(
    folder: Path, prefix: str, paths: dict[str, Path] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Read ``<prefix>-images`` and ``<prefix>-labels`` of a 28x28, 10-class IDX set.

    Args:
        folder: the folder of the four :data:`IDX_FILES` (used to find them when
            ``paths`` is not given, and to name it in errors).
        prefix: ``"train"`` or ``"t10k"``.
        paths: where each of the four files is, by its name in :data:`IDX_FILES`.

    Returns:
        uint8 images ``(N, 1, 28, 28)`` and int64 labels ``(N,)`` in 0-9.

    Raises:
        DataError: as :func:`read_idx`, or when the images and labels do not match.
    """
    paths = paths or {n: folder / n for n in IDX_FILES}
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


def find_idx(folder: Path, name: str) -> Path | None:
    """Return ``folder/name`` or ``folder/name.gz``, whichever is a file (plain first), else None."""
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


def read_cifar_pickle(path: Path) -> dict:
    """Unpickle a CIFAR-10 python file (a batch or ``batches.meta``) with the restricted unpickler.

    Raises:
        DataError: naming the file, if it is damaged, holds anything but arrays,
            lists and strings, or is not a dict.
    """
    try:
        with open(path, "rb") as fh:
            entry = _CifarUnpickler(fh, encoding="latin1").load()
    except Exception as exc:  # a damaged pickle fails in many ways; each is the file's fault
        raise DataError(
            f"Cannot read the CIFAR-10 file {path}: {short_error(exc)}. Replace it with a good copy."
        ) from None
    if not isinstance(entry, dict):
        raise DataError(f"{path} is not a CIFAR-10 python batch (it holds a {type(entry).__name__}, not a dict).")
    return entry


def read_cifar_batch(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Read one CIFAR-10 python batch: uint8 images ``(N, 3, 32, 32)`` and labels ``(N,)``.

    Raises:
        DataError: naming the file, if it is damaged or not in CIFAR-10's format
            (a dict with ``data`` (N, 3072) uint8 and ``labels``, N ints in 0-9).
    """
    entry = read_cifar_pickle(Path(path))
    data, labels = entry.get("data"), entry.get("labels")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(f"{path}: 'data' must be a uint8 array (N, 3072), found {getattr(data, 'shape', type(data))}.")
    if not isinstance(labels, list) or len(labels) != len(data):
        raise DataError(f"{path}: 'labels' must be a list of {len(data)} ints.")
    targets = torch.tensor(labels, dtype=torch.long)
    if len(targets) and (int(targets.min()) < 0 or int(targets.max()) > 9):
        raise DataError(f"{path}: labels must be in 0-9.")
    return torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()), targets


# ------------------------------------------------------------------------ image files


def decode_image(path: Path, *, channels: int, size: int | None = None) -> torch.Tensor:
    """Decode one image file with Pillow into a uint8 tensor ``(C, H, W)``.

    Args:
        path: the image file (any format Pillow reads).
        channels: 1 converts to grey (ITU-R 601 luma, Pillow's ``"L"``), 3 to RGB.
        size: if set, resize the short side to ``size`` and crop the centre to a
            ``size`` x ``size`` square (bicubic).

    Raises:
        Exception: whatever Pillow raises for a damaged or unreadable file (OSError,
            SyntaxError, ValueError, ...); the caller decides whether that stops the
            run or skips the file.
    """
    from PIL import Image, ImageOps

    with Image.open(path) as img:
        img.load()
        img = img.convert("L" if channels == 1 else "RGB")
        if size is not None:
            img = ImageOps.fit(img, (size, size), method=Image.Resampling.BICUBIC)
        array = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(array.reshape(array.shape[0], array.shape[1], -1).copy()).permute(2, 0, 1)
