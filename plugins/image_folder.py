"""The ``image_folder`` data set: labelled images from class sub-folders.

Two layouts are read (torchvision's ``ImageFolder`` layout, once or per split)::

    root/<class>/**/<image>                 # one pool, split into train and test by seed
    root/train/<class>/**/<image>           # the splits given by the folders
    root/test/<class>/**/<image>

When ``root/train/`` and ``root/test/`` both exist they are the splits, and
``test_fraction`` and ``seed`` are not used; other folders beside them (a
``val/``, say) are ignored. ``split_source`` says which layout a data set uses
(``"folders"`` or ``"random"``) and ``split_description`` says it in a sentence.

Every image is decoded (by :func:`capsgan_plugins.formats.decode_image`) when the
data set is first used, so a damaged file is reported before training starts, and
all images are then held in memory as :class:`capsgan_toolkit.data.ImageTensorDataset`.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field

from capsgan_plugins.formats import IMAGE_EXTENSIONS, decode_image, short_error
from capsgan_toolkit import hookimpl
from capsgan_toolkit.data import ImageTensorDataset
from capsgan_toolkit.errors import DataError
from capsgan_toolkit.interfaces import DatasetInfo, DatasetParams, DatasetPlugin

__all__ = ["ImageFolderDataset", "ImageFolderParams"]

SPLIT_FOLDERS = ("train", "test")
"""The sub-folders of ``root`` that, when both exist, are the train and test splits."""


class ImageFolderParams(DatasetParams):
    """Params of the image-folder plugin."""

    root: str = Field(
        ..., description="Folder with one sub-folder of images per class (sorted names are the classes), "
        "or with train/ and test/ folders that each hold such class sub-folders.",
    )
    extensions: tuple[str, ...] = Field(IMAGE_EXTENSIONS, description="File name endings read as images.")
    test_fraction: float = Field(
        0.1, ge=0.0, lt=1.0,
        description="Share of each class held out for testing; not used when root has train/ and test/ folders.",
    )
    seed: int = Field(0, ge=0, description="Seed of the random train/test split (not used with train/ and test/).")
    image_size: int | None = Field(
        None, ge=8, le=1024, description="Square size to resize to (short side, then centre crop); "
        "required when the images differ in size.",
    )
    channels: Literal[1, 3] = Field(3, description="1: convert to grey; 3: convert to RGB.")
    on_corrupt: Literal["error", "skip"] = Field(
        "error", description="An unreadable image: stop with an error naming it, or skip it and warn."
    )


class ImageFolderDataset(DatasetPlugin):
    """Labelled images from class sub-folders: split by the train/ and test/ folders, or by seed.

    Every image is decoded when the data set is first used (``info`` or
    ``split``), so a damaged file is reported before training starts, and all
    images are then held in memory. ``skipped`` counts the unreadable images left
    out with ``on_corrupt = "skip"``.

    With split folders, the class folders of ``train/`` and ``test/`` must have
    the same names. Without them, ``test_fraction`` of each class (at least one
    image, and never all of a class) is held out, chosen by ``seed``.
    """

    Params = ImageFolderParams

    def __init__(self, params: ImageFolderParams):
        super().__init__(params)
        self.skipped = 0
        self.skipped_files: list[Path] = []
        self._loaded: tuple[dict[str, ImageTensorDataset], tuple[str, ...]] | None = None

    @property
    def root(self) -> Path:
        """The folder named by ``data.root``."""
        return Path(self.params.root).expanduser()

    @property
    def split_source(self) -> Literal["folders", "random"]:
        """``"folders"`` when ``root/train/`` and ``root/test/`` are the splits, else ``"random"``.

        Looks at the folder names only (no image is read).

        Raises:
            DataError: when only one of ``train/`` and ``test/`` exists.
        """
        root = self.root
        present = [name for name in SPLIT_FOLDERS if (root / name).is_dir()]
        if len(present) == len(SPLIT_FOLDERS):
            return "folders"
        if present:
            have, lack = present[0], next(n for n in SPLIT_FOLDERS if n not in present)
            raise DataError(
                f"{root} has a {have}/ folder but no {lack}/ folder.",
                hint=f"For given splits put the class folders in {root / 'train'} and {root / 'test'}; "
                f"for a random split (data.test_fraction) put them directly in {root}.",
            )
        return "random"

    @property
    def split_description(self) -> str:
        """One line saying where the train and test splits come from (for ``capsgan validate``)."""
        root = self.root
        if self.split_source == "folders":
            return f"train and test splits from the folders {root / 'train'} and {root / 'test'}"
        return (
            f"random split: {self.params.test_fraction:g} of each class in {root} held out for test "
            f"(seed {self.params.seed})"
        )

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
        try:
            return decode_image(path, channels=self.params.channels, size=self.params.image_size)
        except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, ... for damaged files
            if self.params.on_corrupt == "error":
                raise DataError(
                    f"Cannot read image {path}: {short_error(exc)}.",
                    hint='Replace or delete it, or set data.on_corrupt = "skip" to leave unreadable images out.',
                ) from None
            self.skipped_files.append(path)
            return None

    def _decode_all(self, root: Path, groups: dict[str, list[tuple[Path, int]]]):
        """Decode every group's files; all images must have one shape. Returns ``{group: (images, labels)}``."""
        out, first = {}, None
        for group, files in groups.items():
            images, labels = [], []
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
            out[group] = (images, labels)
        return out

    def _load(self) -> tuple[dict[str, ImageTensorDataset], tuple[str, ...]]:
        if self._loaded is not None:
            return self._loaded
        root = self.root
        if not root.is_dir():
            raise DataError(f"Image folder {root} does not exist (data.root).")
        by_folders = self.split_source == "folders"
        if by_folders:
            classes, train_files = self._files(root / "train")
            test_classes, test_files = self._files(root / "test")
            if test_classes != classes:
                only = lambda a, b: ", ".join(sorted(set(a) - set(b))) or "none"  # noqa: E731
                raise DataError(
                    f"The class folders of {root / 'train'} and {root / 'test'} differ: only in train: "
                    f"{only(classes, test_classes)}; only in test: {only(test_classes, classes)}.",
                    hint="Both splits need one sub-folder per class, with the same names.",
                )
            # Values other than the defaults were meant for a random split. (Compared with the
            # defaults, not "was it set": a run folder's recipe.toml spells out every default.)
            fields = type(self.params).model_fields
            unused = [n for n in ("test_fraction", "seed") if getattr(self.params, n) != fields[n].default]
            if unused:
                warnings.warn(
                    f"image_folder: {root} has train/ and test/ folders, so data.{' and data.'.join(unused)} "
                    "is not used.",
                    stacklevel=3,
                )
            groups = {"train": train_files, "test": test_files}
        else:
            classes, files = self._files(root)
            groups = {"all": files}
        decoded = self._decode_all(root, groups)
        self.skipped = len(self.skipped_files)
        if self.skipped:
            warnings.warn(
                f"image_folder: skipped {self.skipped} unreadable image(s) in {root}, "
                f"first {self.skipped_files[0]}.",
                stacklevel=3,
            )
        for group, (images, _) in decoded.items():
            if not images:
                raise DataError(f"No readable images in {root if group == 'all' else root / group}.")
        tensors = {g: (torch.stack(images), torch.tensor(labels)) for g, (images, labels) in decoded.items()}
        if by_folders:
            splits = {name: ImageTensorDataset(*tensors[name]) for name in SPLIT_FOLDERS}
        else:
            splits = self._random_split(*tensors["all"], len(classes))
        self._loaded = (splits, classes)
        return self._loaded

    def _random_split(self, data: torch.Tensor, targets: torch.Tensor, num_classes: int):
        """Hold out ``test_fraction`` of each class, chosen by ``seed``; both splits keep file order."""
        gen = torch.Generator().manual_seed(self.params.seed)
        test_mask = torch.zeros(len(targets), dtype=torch.bool)
        for label in range(num_classes):
            index = (targets == label).nonzero().squeeze(1)
            index = index[torch.randperm(len(index), generator=gen)]
            n_test = round(len(index) * self.params.test_fraction)
            if self.params.test_fraction > 0 and len(index) > 1:
                n_test = min(max(n_test, 1), len(index) - 1)  # keep both splits non-empty per class
            test_mask[index[:n_test]] = True
        return {
            "train": ImageTensorDataset(data[~test_mask], targets[~test_mask]),
            "test": ImageTensorDataset(data[test_mask], targets[test_mask]),
        }


@hookimpl
def capsgan_register(registry):
    """Register the image-folder data set."""
    registry.register("dataset", "image_folder", ImageFolderDataset)
