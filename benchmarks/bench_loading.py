"""Benchmark reading a training epoch: whole batches (``batch_loader``) against item by item.

Prints, measured side by side in one process, the seconds to read one shuffled epoch of the
built-in glyph data at MNIST's size (60,000 images 1x28x28 by default) in batches:

* item by item: ``DataLoader(split, batch_sampler=batches)``, one ``__getitem__`` per image and
  the default collate (how every run read its data before whole-batch reading);
* whole batches: :func:`capsgan_toolkit.data.batch_loader`, one gather and one conversion per batch;

and checks that both give the same tensors. Best of ``--repeats`` each.

Usage::

    python benchmarks/bench_loading.py                    # about 10 s on 2 cores
    python benchmarks/bench_loading.py --size 32 --channels 3 --num-train 50000
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils.data import DataLoader

from capsgan_plugins.glyphs import GlyphsDataset
from capsgan_toolkit.data import batch_loader


def _epoch(loader) -> tuple[float, int]:
    start = time.perf_counter()
    n = sum(images.shape[0] for images, _ in loader)
    return time.perf_counter() - start, n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-train", type=int, default=60000)
    parser.add_argument("--size", type=int, default=28)
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    params = GlyphsDataset.Params(image_size=args.size, channels=args.channels, num_train=args.num_train,
                                  num_test=100, batch_size=args.batch)
    split = GlyphsDataset(params).split("train")
    order = torch.randperm(len(split), generator=torch.Generator().manual_seed(0)).tolist()
    batches = [order[i:i + args.batch] for i in range(0, len(order), args.batch)]
    first = next(iter(DataLoader(split, batch_sampler=batches[:1])))
    again = next(iter(batch_loader(split, batches[:1])))
    same = torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    items = min(_epoch(DataLoader(split, batch_sampler=batches))[0] for _ in range(args.repeats))
    whole = min(_epoch(batch_loader(split, batches))[0] for _ in range(args.repeats))
    print(f"{len(split)} images {args.channels}x{args.size}x{args.size}, batch {args.batch}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); best of {args.repeats}")
    print(f"item by item  {items:7.3f} s/epoch")
    print(f"whole batches {whole:7.3f} s/epoch   {items / whole:5.1f}x   same tensors: {same}")


if __name__ == "__main__":
    main()
