"""Whole-batch reading (capsgan_toolkit.data.batch_loader) gives exactly what item-by-item reading gives."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, Subset

from capsgan_toolkit.data import ImageTensorDataset, batch_fetcher, batch_loader
from capsgan_toolkit.step.augment import _CentreCropSplit


def _dataset(n=50, shape=(3, 8, 8), seed=0):
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, *shape), dtype=torch.uint8, generator=gen)
    labels = torch.randint(0, 10, (n,), generator=gen)
    return ImageTensorDataset(images, labels)


def _batches(n, size, seed=1):
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return [order[i:i + size] for i in range(0, n, size)]


def _item_by_item(dataset, batches):
    """The reference: PyTorch's own per-item reading and default collate."""
    return list(DataLoader(dataset, batch_sampler=batches))


def _assert_same(got, want):
    assert len(got) == len(want)
    for (gi, gl), (wi, wl) in zip(got, want):
        assert gi.dtype == wi.dtype == torch.float32 and gl.dtype == wl.dtype
        assert torch.equal(gi, wi) and torch.equal(gl, wl)


WRAPS = ["plain", "subset", "nested subset", "centre crop", "crop of subset"]


def _wrapped(base, wrap):
    return {
        "plain": base,
        "subset": Subset(base, list(range(49, 9, -1))),
        "nested subset": Subset(Subset(base, list(range(5, 50))), [3, 0, 7, 30, 2, 11, 44, 1]),
        "centre crop": _CentreCropSplit(base, 5),
        "crop of subset": _CentreCropSplit(Subset(base, list(range(0, 50, 2))), 6),
    }[wrap]


@pytest.mark.parametrize("wrap", WRAPS)
def test_whole_batches_equal_item_by_item_reading_bit_for_bit(wrap):
    dataset = _wrapped(_dataset(), wrap)
    assert batch_fetcher(dataset) is not None  # the fast path is taken
    batches = _batches(len(dataset), 7)
    _assert_same(list(batch_loader(dataset, batches)), _item_by_item(dataset, batches))


def test_batch_size_reads_the_split_in_order_with_a_short_last_batch():
    dataset = Subset(_dataset(23), list(range(22, -1, -1)))
    got = list(batch_loader(dataset, batch_size=10))
    assert [len(lab) for _, lab in got] == [10, 10, 3]
    _assert_same(got, list(DataLoader(dataset, batch_size=10, shuffle=False)))


def test_a_subclass_that_serves_items_differently_is_read_item_by_item():
    class Inverted(ImageTensorDataset):
        def __getitem__(self, index):
            image, label = super().__getitem__(index)
            return -image, label

    base = _dataset()
    dataset = Inverted(base.images, base.labels)
    assert batch_fetcher(dataset) is None and batch_fetcher(Subset(dataset, [1, 2])) is None
    batches = _batches(len(dataset), 8)
    got = list(batch_loader(dataset, batches))
    _assert_same(got, _item_by_item(dataset, batches))
    assert torch.equal(got[0][0], -list(batch_loader(base, batches))[0][0])


def test_a_data_set_without_batch_reading_is_read_item_by_item():
    class Plain(torch.utils.data.Dataset):
        def __len__(self):
            return 9

        def __getitem__(self, i):
            return torch.full((1, 2, 2), float(i)), i % 3

    batches = [[8, 1], [0, 4, 5], [7]]
    assert batch_fetcher(Plain()) is None
    _assert_same(list(batch_loader(Plain(), batches)), _item_by_item(Plain(), batches))


def test_worker_processes_read_the_same_batches():
    dataset = Subset(_dataset(), list(range(40)))
    batches = _batches(len(dataset), 6)
    _assert_same(list(batch_loader(dataset, batches, num_workers=1)), _item_by_item(dataset, batches))


def test_batch_loader_needs_batches_or_a_batch_size():
    with pytest.raises(ValueError, match="batches or batch_size"):
        batch_loader(_dataset())


# ------------------------------------------------------------------ batches read on the device
# "meta" stands in for a GPU here (a device that is not the CPU; it holds shapes, not values); the
# values read on a real GPU are compared with the host's bit for bit by test_cuda_batches_equal_host_batches.


@pytest.mark.parametrize("wrap", WRAPS)
def test_device_batches_are_read_on_the_device_with_the_host_shapes(wrap):
    base = _dataset()
    dataset = _wrapped(base, wrap)
    batches = _batches(len(dataset), 7)
    host = list(batch_loader(dataset, batches))
    got = list(batch_loader(dataset, batches, device="meta"))
    assert len(got) == len(host)
    for (gi, gl), (hi, hl) in zip(got, host):
        assert gi.device.type == gl.device.type == "meta"
        assert gi.shape == hi.shape and gi.dtype == hi.dtype and gl.shape == hl.shape and gl.dtype == hl.dtype
    copies = base.__dict__["_on_device"]
    assert list(copies) == ["meta"] and copies["meta"][0].shape == base.images.shape
    assert copies["meta"][2].shape == (256,)  # the conversion table
    first = copies["meta"][0]
    list(batch_loader(dataset, batches, device="meta"))  # a second loader reuses the copy
    assert base.__dict__["_on_device"]["meta"][0] is first


def test_device_batches_fall_back_to_the_host_when_they_cannot_live_there(monkeypatch):
    import pickle

    from capsgan_toolkit import data

    base = _dataset()
    batches = _batches(len(base), 8)
    want = _item_by_item(base, batches)
    # with worker processes (they read on the host)
    got = list(batch_loader(base, batches, device="meta", num_workers=1))
    _assert_same(got, want)
    # a data set larger than the limit
    monkeypatch.setattr(data, "DEVICE_DATA_LIMIT", base.images.numel() - 1)
    _assert_same(list(batch_loader(base, batches, device="meta")), want)
    assert "_on_device" not in base.__dict__
    monkeypatch.undo()
    # a data set whose own batch reader takes no device
    class OwnReader(torch.utils.data.Dataset):
        def __init__(self, inner):
            self.inner = inner

        def __len__(self):
            return len(self.inner)

        def __getitem__(self, i):
            return self.inner[i]

        def _batch_fetcher(self):
            return batch_fetcher(self.inner)

    assert batch_fetcher(OwnReader(base), "meta") is None
    _assert_same(list(batch_loader(OwnReader(base), batches, device="meta")), want)
    # the device copy never travels with the data set (to a worker process, say)
    list(batch_loader(base, batches, device="meta"))
    assert "_on_device" in base.__dict__ and "_on_device" not in pickle.loads(pickle.dumps(base)).__dict__


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on one by benchmarks/gpu.sh)")
@pytest.mark.parametrize("wrap", WRAPS)
def test_cuda_batches_equal_host_batches(wrap):
    dataset = _wrapped(_dataset(), wrap)
    batches = _batches(len(dataset), 7)
    got = [(i.cpu(), lab.cpu()) for i, lab in batch_loader(dataset, batches, device="cuda")]
    _assert_same(got, _item_by_item(dataset, batches))
