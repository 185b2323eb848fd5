"""Data-set plugins: tiny files in the real on-disk formats, loaded offline.

MNIST and Fashion-MNIST files are IDX (big-endian header, magic 2051 images / 2049
labels), CIFAR-10 files are the python pickle batches, the image folder holds PNGs
written by PIL. Expected values are computed here from the raw bytes written, not by
the code under test.
"""

from __future__ import annotations

import gzip
import math
import pickle
import struct
import urllib.error
import urllib.request
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from capsgan_plugins import datasets as ds
from capsgan_plugins import formats, glyphs, image_folder
from capsgan_toolkit.data import ImageTensorDataset, class_balanced_indices
from capsgan_toolkit.errors import DataError, RegistryError
from capsgan_toolkit.plugin.registry import Registry

IDX_NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


# ------------------------------------------------------------------------- helpers


def _idx_bytes(magic: int, array: np.ndarray) -> bytes:
    return struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape) + array.astype(np.uint8).tobytes()


def _write_idx_set(folder: Path, n_train=12, n_test=5, gz=False, seed=0) -> dict[str, np.ndarray]:
    """Write the four MNIST-style IDX files; return the arrays written."""
    rng = np.random.default_rng(seed)
    arrays = {
        IDX_NAMES[0]: rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        IDX_NAMES[1]: rng.integers(0, 10, n_train, dtype=np.uint8),
        IDX_NAMES[2]: rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        IDX_NAMES[3]: rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    folder.mkdir(parents=True, exist_ok=True)
    for name, arr in arrays.items():
        data = _idx_bytes(2051 if "images" in name else 2049, arr)
        if gz:
            (folder / f"{name}.gz").write_bytes(gzip.compress(data))
        else:
            (folder / name).write_bytes(data)
    return arrays


def _expected_float(pixels: np.ndarray) -> np.ndarray:
    return pixels.astype(np.float64) / 255.0 * 2.0 - 1.0


def _params(**kw) -> ds.FileDatasetParams:
    return ds.FileDatasetParams(**kw)


@pytest.fixture
def no_network(monkeypatch):
    """Make every urllib request fail as it does offline; count the attempts."""
    calls = []

    def refuse(*args, **kwargs):
        calls.append(args)
        raise urllib.error.URLError("network is unreachable (blocked by test)")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    return calls


# --------------------------------------------------------------------------- MNIST


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_reads_torchvision_layout(tmp_path, no_network, gz):
    arrays = _write_idx_set(tmp_path / "MNIST" / "raw", gz=gz)
    plugin = ds.MNISTDataset(_params(root=str(tmp_path), download=False))
    train, test = plugin.split("train"), plugin.split("test")
    assert (len(train), len(test)) == (12, 5)
    for i in (0, 7):
        image, label = train[i]
        assert image.shape == (1, 28, 28) and image.dtype == torch.float32
        np.testing.assert_allclose(image[0].double().numpy(), _expected_float(arrays[IDX_NAMES[0]][i]), atol=1e-6)
        assert label == int(arrays[IDX_NAMES[1]][i])
    assert test[4][1] == int(arrays[IDX_NAMES[3]][4])
    assert plugin.info.image_shape == (1, 28, 28) and plugin.info.num_classes == 10
    assert not no_network


def test_mnist_channels_resize_subset(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    _write_idx_set(raw)
    # Constant images stay constant under any resize: an exact reference.
    flat = np.stack([np.full((28, 28), 20 * i, np.uint8) for i in range(12)])
    (raw / IDX_NAMES[0]).write_bytes(_idx_bytes(2051, flat))
    plugin = ds.MNISTDataset(_params(root=str(tmp_path), download=False, channels=3, image_size=32, subset=5))
    train = plugin.split("train")
    assert len(train) == 5 and len(plugin.split("test")) == 5  # subset cuts training data only
    image, _ = train[3]
    assert image.shape == (3, 32, 32) == plugin.info.image_shape
    assert torch.allclose(image, torch.full_like(image, 60 / 127.5 - 1), atol=1e-6)


def test_rgb_to_grey_uses_luma():
    rgb = torch.tensor([200, 100, 50], dtype=torch.uint8).view(1, 3, 1, 1).expand(2, 3, 4, 4)
    grey = ds._convert(rgb, 1, None)
    assert grey.shape == (2, 1, 4, 4)
    assert int(grey[0, 0, 0, 0]) == round(0.299 * 200 + 0.587 * 100 + 0.114 * 50)


@pytest.mark.parametrize("plugin_cls", [ds.MNISTDataset, ds.CIFAR10Dataset, ds.FashionMNISTDataset])
def test_missing_files_without_download_says_where(tmp_path, no_network, plugin_cls):
    plugin = plugin_cls(_params(root=str(tmp_path), download=False))
    with pytest.raises(DataError) as err:
        plugin.split("train")
    text = str(err.value)
    folder = {
        ds.MNISTDataset: tmp_path / "MNIST" / "raw",
        ds.CIFAR10Dataset: tmp_path / "cifar-10-batches-py",
        ds.FashionMNISTDataset: tmp_path / "FashionMNIST" / "raw",
    }[plugin_cls]
    assert str(folder) in text
    assert ("data_batch_1" if plugin_cls is ds.CIFAR10Dataset else "train-images-idx3-ubyte") in text
    assert "data.root" in text and "data.download" in text and "http" in text
    assert not no_network  # no download was tried


@pytest.mark.parametrize("plugin_cls", [ds.MNISTDataset, ds.CIFAR10Dataset, ds.FashionMNISTDataset])
def test_failed_download_says_where(tmp_path, no_network, plugin_cls):
    plugin = plugin_cls(_params(root=str(tmp_path), download=True))
    with pytest.raises(DataError) as err:
        plugin.split("test")
    text = str(err.value)
    assert "download failed" in text and "network is unreachable" in text
    assert str(tmp_path) in text and "data.root" in text
    assert no_network  # a download was tried, and refused


def test_mnist_damaged_file_is_named(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    _write_idx_set(raw)
    path = raw / IDX_NAMES[0]
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DataError, match="train-images-idx3-ubyte"):
        ds.MNISTDataset(_params(root=str(tmp_path), download=False)).split("train")


def test_mnist_damaged_gzip_is_named(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    _write_idx_set(raw, gz=True)
    packed = raw / f"{IDX_NAMES[3]}.gz"
    packed.write_bytes(packed.read_bytes()[:15])
    with pytest.raises(DataError, match=str(packed)):
        ds.MNISTDataset(_params(root=str(tmp_path), download=False)).split("train")


# ------------------------------------------------------------------- IDX reader


def test_read_idx_round_trip_plain_and_gzip(tmp_path):
    arr = np.arange(2 * 28 * 28, dtype=np.uint32).reshape(2, 28, 28).astype(np.uint8)
    (tmp_path / "plain").write_bytes(_idx_bytes(2051, arr))
    (tmp_path / "packed.gz").write_bytes(gzip.compress(_idx_bytes(2051, arr)))
    for name in ("plain", "packed.gz"):
        out = formats.read_idx(tmp_path / name, 2051)
        assert out.dtype == torch.uint8 and np.array_equal(out.numpy(), arr)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda b: b[:-1], "truncated"),
        (lambda b: b + b"\x00", "truncated"),
        (lambda b: b[:6], "truncated"),
        (lambda b: struct.pack(">I", 2049) + b[4:], "magic number 2049"),
        (lambda b: gzip.compress(b)[:-20], "Cannot read"),
    ],
    ids=["short", "trailing", "header", "magic", "gzip"],
)
def test_read_idx_rejects_damaged_files(tmp_path, damage, message):
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(damage(_idx_bytes(2051, np.zeros((3, 28, 28), np.uint8))))
    with pytest.raises(DataError, match=message) as err:
        formats.read_idx(path, 2051)
    assert str(path) in str(err.value)


# ------------------------------------------------------------------ Fashion-MNIST


def test_fashion_mnist_from_root_in_both_layouts(tmp_path):
    flat = _write_idx_set(tmp_path / "flat", gz=True, seed=1)
    tv = _write_idx_set(tmp_path / "tv" / "FashionMNIST" / "raw", seed=2)
    for sub, arrays in (("flat", flat), ("tv", tv)):
        plugin = ds.FashionMNISTDataset(_params(root=str(tmp_path / sub), download=False))
        image, label = plugin.split("test")[2]
        np.testing.assert_allclose(image[0].double().numpy(), _expected_float(arrays[IDX_NAMES[2]][2]), atol=1e-6)
        assert label == int(arrays[IDX_NAMES[3]][2])
        assert plugin.info.class_names[0] == "T-shirt/top" and len(plugin.info.class_names) == 10


def test_fashion_mnist_default_search_uses_system_folder(tmp_path, monkeypatch, no_network):
    arrays = _write_idx_set(tmp_path / "system", gz=True, n_train=9)
    monkeypatch.setattr(ds, "SYSTEM_FASHION_MNIST", tmp_path / "system")
    monkeypatch.setenv(ds.DATA_ENV, str(tmp_path / "cache"))
    train = ds.FashionMNISTDataset(_params()).split("train")
    assert len(train) == 9 and train[8][1] == int(arrays[IDX_NAMES[1]][8])
    assert not no_network


def test_fashion_mnist_bad_labels_rejected(tmp_path):
    _write_idx_set(tmp_path)
    (tmp_path / IDX_NAMES[1]).write_bytes(_idx_bytes(2049, np.full(12, 10, np.uint8)))
    with pytest.raises(DataError, match="0-9"):
        ds.FashionMNISTDataset(_params(root=str(tmp_path), download=False)).split("train")


@pytest.mark.skipif(
    not ds.SYSTEM_FASHION_MNIST.is_dir(),
    reason="needs the Debian package dataset-fashion-mnist (/usr/share/datasets/fashion-mnist)",
)
def test_fashion_mnist_real_debian_files(monkeypatch, tmp_path):
    monkeypatch.setenv(ds.DATA_ENV, str(tmp_path))
    plugin = ds.FashionMNISTDataset(_params(download=False))
    train, test = plugin.split("train"), plugin.split("test")
    assert (len(train), len(test)) == (60000, 10000)
    assert train.images.shape == (60000, 1, 28, 28)
    assert torch.equal(train.labels.bincount(), torch.full((10,), 6000))
    assert torch.equal(test.labels.bincount(), torch.full((10,), 1000))


# ---------------------------------------------------------------------- CIFAR-10


def _cifar_batch(n: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "batch_label": f"batch {seed}",
        "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        "labels": [int(v) for v in rng.integers(0, 10, n)],
        "filenames": [f"img_{seed}_{i}.png" for i in range(n)],
    }


def _write_cifar(root: Path) -> dict[str, dict]:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    batches = {f"data_batch_{i}": _cifar_batch(4, i) for i in range(1, 6)}
    batches["test_batch"] = _cifar_batch(3, 9)
    meta = {"label_names": list(ds._CIFAR_CLASSES), "num_cases_per_batch": 4, "num_vis": 3072}
    for name, content in {**batches, "batches.meta": meta}.items():
        (folder / name).write_bytes(pickle.dumps(content, protocol=2))  # the original files' protocol
    return batches


def test_cifar10_reads_python_batches(tmp_path, no_network):
    batches = _write_cifar(tmp_path)
    plugin = ds.CIFAR10Dataset(_params(root=str(tmp_path), download=False))
    train, test = plugin.split("train"), plugin.split("test")
    assert (len(train), len(test)) == (20, 3)
    row = batches["data_batch_2"]["data"][1]  # train index 4 + 1
    image, label = train[5]
    assert image.shape == (3, 32, 32) and label == batches["data_batch_2"]["labels"][1]
    # Row layout: 1024 red values, then green, then blue, each row-major.
    for c, y, x in ((0, 0, 0), (1, 5, 17), (2, 31, 30)):
        assert math.isclose(float(image[c, y, x]), row[c * 1024 + y * 32 + x] / 127.5 - 1, abs_tol=1e-6)
    assert test[2][1] == batches["test_batch"]["labels"][2]
    assert plugin.info.class_names[-1] == "truck" and not no_network


_EXECUTED = []


class _Payload:
    def __reduce__(self):
        return (_EXECUTED.append, ("ran",))


def test_cifar10_refuses_foreign_pickles(tmp_path):
    _write_cifar(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    path.write_bytes(pickle.dumps({"data": _Payload(), "labels": []}, protocol=2))
    with pytest.raises(DataError, match="refused to load") as err:
        ds.CIFAR10Dataset(_params(root=str(tmp_path), download=False)).split("train")
    assert str(path) in str(err.value) and not _EXECUTED


def test_cifar10_truncated_batch_is_named(tmp_path):
    _write_cifar(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(DataError, match="test_batch"):
        ds.CIFAR10Dataset(_params(root=str(tmp_path), download=False)).split("test")


# ------------------------------------------------------------------- image folder

_COLOURS = {"apple": (200, 30, 10), "kiwi": (20, 180, 40), "plum": (90, 20, 160)}


def _write_folder(root: Path, per_class=6, size=(8, 8)) -> None:
    for name, colour in _COLOURS.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixel = tuple(min(255, v + 5 * i) for v in colour)
            Image.new("RGB", size, pixel).save(root / name / f"{i}.png")
    (root / "apple" / "notes.txt").write_text("not an image")


def _folder(root: Path, **kw) -> image_folder.ImageFolderDataset:
    return image_folder.ImageFolderDataset(image_folder.ImageFolderParams(root=str(root), **kw))


def test_image_folder_classes_values_and_split(tmp_path):
    _write_folder(tmp_path)
    plugin = _folder(tmp_path, test_fraction=0.34, seed=3)
    assert plugin.info.class_names == ("apple", "kiwi", "plum")
    assert plugin.info.image_shape == (3, 8, 8) and plugin.info.num_classes == 3
    train, test = plugin.split("train"), plugin.split("test")
    assert (len(train), len(test)) == (12, 6)  # round(6 * 0.34) = 2 per class
    assert torch.equal(test.labels.bincount(), torch.tensor([2, 2, 2]))
    for dataset in (train, test):
        for i in range(len(dataset)):
            image, label = dataset[i]
            base = _COLOURS[plugin.info.class_names[label]]
            step = (image[:, 0, 0].double().numpy() + 1) * 127.5 - np.array(base)
            k = round(step[0] / 5)  # pixel i of a class is its colour plus 5 * i
            assert np.allclose(step, 5 * k, atol=1e-4) and 0 <= k < 6
    # Every image lands in exactly one split; a seed picks the same split again.
    seen = lambda d: sorted((d.images[i].sum().item(), int(d.labels[i])) for i in range(len(d)))  # noqa: E731
    assert sorted(seen(train) + seen(test)) == sorted(seen(_folder(tmp_path, test_fraction=0.0).split("train")))
    again = _folder(tmp_path, test_fraction=0.34, seed=3).split("test")
    assert seen(again) == seen(test)
    others = [seen(_folder(tmp_path, test_fraction=0.34, seed=s).split("test")) for s in range(4, 8)]
    assert any(o != seen(test) for o in others)


def test_image_folder_grey_and_resize(tmp_path):
    _write_folder(tmp_path, per_class=2, size=(12, 6))
    plugin = _folder(tmp_path, channels=1, image_size=8, test_fraction=0.0)
    image, label = plugin.split("train")[0]
    assert image.shape == (1, 8, 8) and plugin.info.image_shape == (1, 8, 8)
    r, g, b = _COLOURS[plugin.info.class_names[label]]
    grey = (r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16  # PIL's integer ITU-R 601 luma
    assert abs((float(image[0, 4, 4]) + 1) * 127.5 - grey) < 1.01


def test_image_folder_sizes_must_agree(tmp_path):
    _write_folder(tmp_path, per_class=2)
    Image.new("RGB", (10, 10), (1, 2, 3)).save(tmp_path / "kiwi" / "big.png")
    with pytest.raises(DataError, match="image_size"):
        _folder(tmp_path).info
    assert _folder(tmp_path, image_size=10).info.image_shape == (3, 10, 10)


def test_image_folder_corrupt_files(tmp_path):
    _write_folder(tmp_path)
    truncated = tmp_path / "kiwi" / "zz_truncated.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:200])
    garbage = tmp_path / "plum" / "garbage.png"
    garbage.write_bytes(b"this is no png")
    with pytest.raises(DataError) as err:
        _folder(tmp_path).split("train")
    assert str(truncated) in str(err.value) or str(garbage) in str(err.value)
    plugin = _folder(tmp_path, on_corrupt="skip", test_fraction=0.0)
    with pytest.warns(UserWarning, match="skipped 2 unreadable"):
        train = plugin.split("train")
    assert plugin.skipped == 2 and set(plugin.skipped_files) == {truncated, garbage}
    assert len(train) == 18


def test_image_folder_missing_root_and_empty_class(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        _folder(tmp_path / "nowhere").info
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images"):
        _folder(tmp_path).info


def _write_split_folders(root: Path, counts: dict[str, tuple[int, int]], size=(8, 8)) -> None:
    """``root/train/<class>`` and ``root/test/<class>`` PNGs; class c's pixel value encodes split and index."""
    for split_index, split in enumerate(("train", "test")):
        for name, colour in _COLOURS.items():
            if name not in counts:
                continue
            (root / split / name).mkdir(parents=True)
            for i in range(counts[name][split_index]):
                pixel = (colour[0], 100 * split_index + i, colour[2])
                Image.new("RGB", size, pixel).save(root / split / name / f"{i}.png")


def test_image_folder_uses_train_and_test_folders(tmp_path):
    counts = {"apple": (4, 2), "kiwi": (3, 1), "plum": (5, 3)}
    _write_split_folders(tmp_path, counts)
    (tmp_path / "val" / "apple").mkdir(parents=True)  # other folders beside train/ and test/ are ignored
    plugin = _folder(tmp_path)
    assert plugin.split_source == "folders"
    assert "folders" in plugin.split_description and str(tmp_path / "train") in plugin.split_description
    assert plugin.info.class_names == ("apple", "kiwi", "plum") and plugin.info.image_shape == (3, 8, 8)
    for split_index, split in enumerate(("train", "test")):
        data = plugin.split(split)
        assert isinstance(data, ImageTensorDataset)
        assert data.labels.bincount().tolist() == [counts[c][split_index] for c in ("apple", "kiwi", "plum")]
        for i in range(len(data)):
            image, label = data[i]
            red, green = ((image[:2, 0, 0].double() + 1) * 127.5).round().tolist()
            assert red == _COLOURS[plugin.info.class_names[label]][0]  # the class is its folder's
            assert green // 100 == split_index  # every image comes from its own split's folder


def test_image_folder_split_folders_ignore_test_fraction_with_a_warning(tmp_path):
    _write_split_folders(tmp_path, {"apple": (3, 2), "kiwi": (3, 2)})
    with pytest.warns(UserWarning, match="test_fraction is not used"):
        test = _folder(tmp_path, test_fraction=0.5).split("test")
    assert len(test) == 4
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the defaults, spelled out as in a run folder's recipe.toml: no warning
        _folder(tmp_path, test_fraction=0.1, seed=0).info


def test_image_folder_split_folders_must_agree(tmp_path):
    _write_split_folders(tmp_path, {"apple": (2, 1), "kiwi": (2, 1)})
    (tmp_path / "test" / "kiwi").rename(tmp_path / "test" / "lime")
    with pytest.raises(DataError, match=r"differ: only in train: kiwi; only in test: lime"):
        _folder(tmp_path).info
    for name in ("kiwi", "lime"):  # a class folder without images is named, as without split folders
        (tmp_path / "train" / name).mkdir(exist_ok=True)
    (tmp_path / "test" / "kiwi").mkdir()
    with pytest.raises(DataError, match="no images"):
        _folder(tmp_path).info


def test_image_folder_split_folders_sizes_agree_across_splits(tmp_path):
    _write_split_folders(tmp_path, {"apple": (2, 1)})
    Image.new("RGB", (10, 10), (1, 2, 3)).save(tmp_path / "test" / "apple" / "big.png")
    with pytest.raises(DataError, match="differ in size"):
        _folder(tmp_path).info
    assert len(_folder(tmp_path, image_size=8).split("test")) == 2


def test_image_folder_train_without_test_folder_is_an_error(tmp_path):
    _write_split_folders(tmp_path, {"apple": (2, 1)})
    for path in (tmp_path / "test" / "apple").iterdir():
        path.unlink()
    (tmp_path / "test" / "apple").rmdir()
    (tmp_path / "test").rmdir()
    with pytest.raises(DataError, match="has a train/ folder but no test/ folder"):
        _folder(tmp_path).info


def test_image_folder_without_split_folders_splits_at_random(tmp_path):
    _write_folder(tmp_path, per_class=2)
    plugin = _folder(tmp_path, test_fraction=0.5, seed=4)
    assert plugin.split_source == "random"
    description = plugin.split_description
    assert description.startswith("random split: 0.5 of each class") and "seed 4" in description


# --------------------------------------------------------------- capsgan_toolkit.data


def test_image_tensor_dataset_serves_floats_in_range_and_checks_input():
    images = torch.tensor([0, 255, 51], dtype=torch.uint8).view(3, 1, 1, 1).expand(3, 2, 2, 2).contiguous()
    data = ImageTensorDataset(images, torch.tensor([2, 0, 1], dtype=torch.int32))
    assert len(data) == 3 and data.labels.dtype == torch.long
    image, label = data[1]
    assert image.dtype == torch.float32 and image.shape == (2, 2, 2) and label == 0 and isinstance(label, int)
    assert torch.equal(image, torch.ones(2, 2, 2)) and torch.equal(data[0][0], -torch.ones(2, 2, 2))
    assert data[2][0][0, 0, 0].item() == pytest.approx(51 / 127.5 - 1)
    assert torch.equal(data.images, images)  # the uint8 pixels are kept as given
    for bad_images, bad_labels in [(images.float(), torch.zeros(3)), (images[0], torch.zeros(2)),
                                   (images, torch.zeros(2))]:
        with pytest.raises(ValueError, match="uint8"):
            ImageTensorDataset(bad_images, bad_labels)


def test_builtin_splits_are_image_tensor_datasets(tmp_path):
    _write_folder(tmp_path, per_class=2)
    assert isinstance(_folder(tmp_path).split("train"), ImageTensorDataset)
    assert isinstance(glyphs.GlyphsDataset(_glyph_params()).split("test"), ImageTensorDataset)


def test_class_balanced_indices_take_every_class_in_turn():
    labels = [0] * 6 + [1] * 2 + [2] * 4  # sorted by class, as an image folder's split is
    picked = class_balanced_indices(labels, 9, seed=0)
    assert len(picked) == len(set(picked)) == 9
    classes = [labels[i] for i in picked]
    assert classes == [0, 1, 2, 0, 1, 2, 0, 2, 0]  # class 1 runs out after two rounds
    assert classes[:3] == [0, 1, 2]
    # Deterministic; another seed picks other members of a class, never other classes.
    assert class_balanced_indices(labels, 9, seed=0) == picked
    others = [class_balanced_indices(labels, 9, seed=s) for s in range(1, 6)]
    assert any(o != picked for o in others)
    assert all([labels[i] for i in o] == classes for o in others)
    # A tensor works as well as a list, n beyond the length returns every index once.
    everything = class_balanced_indices(torch.tensor(labels), 50, seed=3)
    assert sorted(everything) == list(range(len(labels)))
    assert class_balanced_indices(labels, 0) == [] and class_balanced_indices([], 4) == []


def test_class_balanced_indices_cover_classes_with_gaps_and_reject_bad_input():
    labels = torch.tensor([7, 3, 7, 3, 9, 7])  # labels need not start at 0 or be contiguous
    assert [int(labels[i]) for i in class_balanced_indices(labels, 3)] == [3, 7, 9]
    with pytest.raises(ValueError, match="n must be"):
        class_balanced_indices(labels, -1)
    with pytest.raises(ValueError, match="one-dimensional"):
        class_balanced_indices(labels.view(2, 3), 2)


def test_example_plugin_data_set_uses_image_tensor_dataset(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "examples" / "capsgan-example-encoder"))
    from capsgan_example_encoder.npz_dataset import NpzImagesDataset

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 6, 6), dtype=np.uint8)  # (N, H, W): grey
    np.savez(tmp_path / "train.npz", images=images, labels=np.array([0, 1, 2, 1, 0]))
    np.savez(tmp_path / "test.npz", images=rng.integers(0, 256, (2, 6, 6, 3), dtype=np.uint8), labels=[2, 0])
    plugin = NpzImagesDataset(NpzImagesDataset.Params(root=str(tmp_path)))
    assert plugin.info.num_classes == 3 and plugin.info.image_shape == (1, 6, 6)
    train = plugin.split("train")
    assert isinstance(train, ImageTensorDataset) and len(train) == 5
    assert torch.equal(train.images[:, 0], torch.from_numpy(images))
    with pytest.raises(DataError, match="test.npz"):  # RGB test images do not match the grey train images
        plugin.split("test")
    with pytest.raises(DataError, match="nowhere"):
        NpzImagesDataset(NpzImagesDataset.Params(root=str(tmp_path / "nowhere"))).info


# ------------------------------------------------------------------------- glyphs


def _glyph_params(**kw) -> glyphs.GlyphsParams:
    base = dict(num_train=200, num_test=50, image_size=28)
    return glyphs.GlyphsParams(**{**base, **kw})


def test_glyphs_deterministic_by_seed():
    p = _glyph_params()
    a_img, a_lab = glyphs._render(p, 200, "train")
    b_img, b_lab = glyphs._render(p, 200, "train")
    assert torch.equal(a_img, b_img) and torch.equal(a_lab, b_lab)
    c_img, _ = glyphs._render(_glyph_params(seed=1), 200, "train")
    assert not torch.equal(a_img, c_img)
    t_img, _ = glyphs._render(p, 200, "test")
    assert not torch.equal(a_img, t_img)


@pytest.mark.parametrize("size, channels", [(28, 1), (32, 3), (64, 1)])
def test_glyphs_shapes_range_and_balance(size, channels):
    plugin = glyphs.GlyphsDataset(_glyph_params(image_size=size, channels=channels, num_train=60, num_test=20))
    assert plugin.info.image_shape == (channels, size, size)
    assert plugin.info.num_classes == 10 == len(plugin.info.class_names)
    train = plugin.split("train")
    assert train.images.dtype == torch.uint8 and len(train) == 60
    assert torch.equal(train.labels.bincount(minlength=10), torch.full((10,), 6))
    assert torch.equal(plugin.split("test").labels.bincount(minlength=10), torch.full((10,), 2))
    image, label = train[0]
    assert image.shape == (channels, size, size) and image.dtype == torch.float32 and isinstance(label, int)
    assert image.min() >= -1 and image.max() <= 1


def test_glyphs_contrast_without_noise():
    for channels in (1, 3):
        images, _ = glyphs._render(_glyph_params(channels=channels, noise=0.0), 100, "train")
        luma = torch.tensor([0.299, 0.587, 0.114])[:channels] if channels == 3 else torch.ones(1)
        grey = (images.double() / 255 * luma.double().view(1, -1, 1, 1)).sum(1)
        spread = grey.flatten(1).amax(1) - grey.flatten(1).amin(1)
        assert spread.min() > 0.25  # foreground and background differ by at least ~0.3 luminance


def test_glyphs_split_is_cached():
    first = glyphs.GlyphsDataset(_glyph_params(seed=5)).split("train")
    second = glyphs.GlyphsDataset(_glyph_params(seed=5, batch_size=7)).split("train")
    assert first.images is second.images


def _invariant_features(images: torch.Tensor) -> torch.Tensor:
    """Rotation-, shift-, scale- and colour-free descriptors of the ink in each image."""
    x = images.double().mean(1) / 255
    n, h, w = x.shape
    border = torch.cat([x[:, 0], x[:, -1], x[:, :, 0], x[:, :, -1]], 1)
    ink = (x - border.median(1).values.view(n, 1, 1)).abs()
    ink = (ink - 0.15 * ink.amax((1, 2), keepdim=True)).clamp(min=0)
    ink = ink / ink.sum((1, 2), keepdim=True)
    yy, xx = torch.meshgrid(torch.arange(h).double(), torch.arange(w).double(), indexing="ij")
    dx = xx - (ink * xx).sum((1, 2)).view(n, 1, 1)
    dy = yy - (ink * yy).sum((1, 2)).view(n, 1, 1)
    rho = torch.hypot(dx, dy)
    gyration = (ink * rho**2).sum((1, 2)).sqrt().view(n, 1, 1)
    r, phi = rho / gyration, torch.atan2(dy, dx)
    feats = [(ink * ((r >= lo) & (r < lo + 0.25))).sum((1, 2)) for lo in np.arange(0, 2.5, 0.25)]
    feats += [torch.hypot((ink * (m * phi).cos()).sum((1, 2)), (ink * (m * phi).sin()).sum((1, 2))) for m in range(1, 7)]
    area = (ink > 0.2 * ink.amax((1, 2), keepdim=True)).sum((1, 2)).double()
    feats.append(area / gyration.view(n) ** 2)
    return torch.stack(feats, 1)


@pytest.mark.parametrize("channels", [1, 3])
def test_glyph_classes_are_separable(channels):
    p = _glyph_params(channels=channels, image_size=32, num_train=400, num_test=200)
    x_train, y_train = glyphs._render(p, 400, "train")
    x_test, y_test = glyphs._render(p, 200, "test")
    f_train, f_test = _invariant_features(x_train), _invariant_features(x_test)
    mu, sd = f_train.mean(0), f_train.std(0) + 1e-9
    f_train, f_test = (f_train - mu) / sd, (f_test - mu) / sd
    means = torch.stack([f_train[y_train == k].mean(0) for k in range(10)])
    accuracy = (torch.cdist(f_test, means).argmin(1) == y_test).double().mean().item()
    assert accuracy > 0.6, accuracy  # chance is 0.1


# ----------------------------------------------------------------------- registry


def test_registration_and_default_construction():
    registry = Registry()
    for module in (ds, image_folder, glyphs):
        module.capsgan_register(registry)
    assert registry.list("dataset") == ["cifar10", "fashion_mnist", "glyphs", "image_folder", "mnist"]
    for name in ("cifar10", "fashion_mnist", "glyphs", "mnist"):
        plugin = registry.create("dataset", name)  # builds without reading or downloading anything
        assert plugin.info.num_classes == 10
    with pytest.raises(RegistryError, match="root"):
        registry.create("dataset", "image_folder")
    with pytest.raises(RegistryError, match="on_corrupt"):
        registry.create("dataset", "image_folder", {"root": ".", "on_corrupt": "ignore"})


def test_split_labels_reads_the_labels_tensor_or_the_items():
    import torch

    from capsgan_toolkit.data import ImageTensorDataset, split_labels

    images = torch.zeros(5, 1, 4, 4, dtype=torch.uint8)
    tensor_backed = ImageTensorDataset(images, torch.tensor([3, 1, 4, 1, 5]))
    assert split_labels(tensor_backed) == [3, 1, 4, 1, 5] and split_labels(tensor_backed, 2) == [3, 1]
    plain = [(torch.zeros(1, 4, 4), k) for k in (2, 7, 1)]  # no labels attribute: read item by item
    assert split_labels(plain) == [2, 7, 1] and split_labels(plain, 10) == [2, 7, 1]
