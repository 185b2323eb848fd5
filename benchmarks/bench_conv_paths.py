"""Benchmark the capsnet's two CPU convolution paths on each recipe's convolutions, side by side.

For every convolution of the capsnet encoder of each recipe given (``conv1`` and the primary
capsules' ``primary``), at the recipe's batch size and image shape, prints the median time of
the forward pass and of forward + backward (input and weight gradients) through
:func:`capsgan_plugins.capsule_cpu.conv_nhwc` with ``gemm=True`` (the toolkit's patch-matrix GEMM,
the CPU default) and ``gemm=False`` (the library's convolution, oneDNN), interleaved, and the
ratio. It tells for which shapes the GEMM path pays off (docs/performance.md).

Usage::

    python benchmarks/bench_conv_paths.py                                  # the three capsule recipes below
    python benchmarks/bench_conv_paths.py recipes/quickstart.toml --repeats 21
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

if __name__ == "__main__" and os.environ.get("OMP_WAIT_POLICY") != "PASSIVE":  # as bench_capsule.py does
    os.execve(sys.executable, [sys.executable, os.path.abspath(__file__), *sys.argv[1:]],
              {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})

import torch  # noqa: E402

from capsgan_plugins.capsule_cpu import conv_nhwc, keep_freed_memory  # noqa: E402
from capsgan_toolkit.tools.bench import build_for_bench  # noqa: E402

RECIPES = ["recipes/quickstart.toml", "recipes/capsgan_mnist.toml", "recipes/capsgan_cifar.toml"]


def _median_ms(fn, repeats: int) -> float:
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipes", nargs="*", default=RECIPES)
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    keep_freed_memory()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); median of {args.repeats}; "
          f"ratio = oneDNN time / GEMM time (above 1: the GEMM path is faster)")
    print(f"{'recipe':28s} {'conv':8s} {'in (B,H,W,C)':18s} {'kernel':>9s} {'pass':>9s} "
          f"{'GEMM ms':>8s} {'oneDNN ms':>9s} {'ratio':>6s}")
    for recipe in args.recipes:
        notes: list[str] = []  # said when the data set could not be built and (1, 28, 28) stood in
        built, resolved = build_for_bench(recipe, [], image_shape=(1, 28, 28), classes=10, notes=notes)
        for note in notes:
            print(f"note: {note}")
        enc, batch = built.parts.encoder, resolved.recipe.data.batch_size
        c, h, w = built.info.image_shape
        x = (torch.rand(batch, c, h, w, generator=torch.Generator().manual_seed(0)) * 2 - 1).permute(0, 2, 3, 1)
        with torch.no_grad():
            h1 = conv_nhwc(x, enc.conv1, relu=True)
        for name, conv, inp, relu in (("conv1", enc.conv1, x, True), ("primary", enc.primary, h1, False)):
            grad_in = inp.clone().requires_grad_(name != "conv1")  # the images need no gradient

            def fwd(gemm, conv=conv, inp=inp, relu=relu):
                with torch.no_grad():
                    conv_nhwc(inp, conv, gemm=gemm, relu=relu)

            def fwd_bwd(gemm, conv=conv, inp=grad_in, relu=relu):
                conv.zero_grad(set_to_none=True)
                conv_nhwc(inp, conv, gemm=gemm, relu=relu).sum().backward()

            kernel = f"{conv.in_channels}x{conv.kernel_size[0]}x{conv.kernel_size[1]}"
            for label, fn in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
                times = {True: [], False: []}
                for _ in range(3):  # interleaved, so both see the same load
                    for gemm in (True, False):
                        times[gemm].append(_median_ms(lambda: fn(gemm), max(args.repeats // 3, 1)))
                g, o = statistics.median(times[True]), statistics.median(times[False])
                print(f"{recipe:28s} {name:8s} {str(tuple(inp.shape)):18s} {kernel:>9s} {label:>9s} "
                      f"{g:8.1f} {o:9.1f} {o / g:6.2f}")


if __name__ == "__main__":
    main()
