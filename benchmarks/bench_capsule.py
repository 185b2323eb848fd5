"""Benchmark the capsnet encoder and its dynamic routing on this machine's CPU.

Prints, measured side by side in one run:

* images/s of :func:`dynamic_routing` (forward, 3 iterations) and of a loop-based
  reference that routes one parent at a time, as many public implementations
  do, and the speed-up (target: at least 20x at MNIST size). "batched" feeds
  a contiguous ``(B, N, K, D)`` tensor, so it includes the one relayout copy
  the routing makes; "enc. layout" feeds the view the encoder hands over;
* images/s of one capsnet training step (forward, margin-loss backward, Adam
  step) at MNIST size (1x28x28, 32 primary types) and CIFAR-10 size (3x32x32,
  64 primary types), with the step's FLOP/s counted analytically as a share of
  this machine's float32 matmul FLOP/s, measured in the same run (target: 50%).

Every time is the best of several repeats, which filters out the pauses that
other processes on a shared machine cause; the load average is printed too.
The matmul reference is the best rate seen in the run (before, between the
training steps, after), so the share is, if anything, understated.

Unless ``--no-tuning`` is given, the script re-runs itself with two settings
of the environment (``TUNING`` below), worth setting for CPU training too:

* glibc returns every large freed buffer to the system, so each step pays
  page faults to get fresh memory for its big temporaries (tens of MB here);
  the ``MALLOC_*`` settings keep freed memory for reuse (as jemalloc or
  tcmalloc would);
* OpenMP threads that spin while waiting steal the cores from each other
  when other processes share the machine, which costs 2x or more on a busy
  2-core machine; ``OMP_WAIT_POLICY=PASSIVE`` makes them sleep instead. On a
  dedicated machine spinning is a little faster.

Usage::

    python benchmarks/bench_capsule.py            # about 1 minute
    python benchmarks/bench_capsule.py --quick    # about 20 seconds
    python benchmarks/bench_capsule.py --threads 1
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass

TUNING = {
    "MALLOC_MMAP_THRESHOLD_": str(4 << 30),
    "MALLOC_TRIM_THRESHOLD_": str(64 << 30),
    "MALLOC_TOP_PAD_": str(1 << 30),
    "OMP_WAIT_POLICY": "PASSIVE",
}

if (
    __name__ == "__main__"
    and "--no-tuning" not in sys.argv
    and any(os.environ.get(k) != v for k, v in TUNING.items())
):
    # glibc and OpenMP read these at start-up only: re-run before importing torch.
    os.execve(sys.executable, [sys.executable, os.path.abspath(__file__), *sys.argv[1:]], {**os.environ, **TUNING})

import torch  # noqa: E402

from capsgan_plugins.capsule import CapsNetEncoder, CapsNetParams, dynamic_routing, squash  # noqa: E402

ROUTING_TARGET = 20.0
FLOPS_TARGET = 0.50
MATMUL_SIZE = 2048


@dataclass(frozen=True)
class Case:
    name: str
    image_shape: tuple[int, int, int]
    primary_types: int
    batch: int


def _best_time(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def matmul_flops(size: int, repeats: int) -> float:
    """Return the float32 FLOP/s of a ``size x size`` matmul."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    return 2 * size**3 / _best_time(lambda: torch.mm(a, b), repeats)


def loop_routing(u_hat: torch.Tensor, iterations: int) -> torch.Tensor:
    """Reference routing with a Python loop over parents (one parent's slice at a time)."""
    batch, children, parents, _ = u_hat.shape
    logits = [u_hat.new_zeros(batch, children) for _ in range(parents)]
    for step in range(iterations):
        c = torch.softmax(torch.stack(logits, dim=2), dim=2)
        outputs = []
        for j in range(parents):
            s_j = (c[:, :, j : j + 1] * u_hat[:, :, j, :]).sum(dim=1)
            v_j = squash(s_j)
            outputs.append(v_j)
            if step < iterations - 1:
                logits[j] = logits[j] + (u_hat[:, :, j, :] * v_j.unsqueeze(1)).sum(dim=-1)
    return torch.stack(outputs, dim=1)


def _margin_loss():
    """The project's margin loss when its plugin imports, else the paper's formula inline."""
    try:
        from capsgan_plugins.losses import MarginLoss

        return MarginLoss(MarginLoss.Params())
    except Exception:  # the losses plugin is optional for this benchmark

        def margin(capsules, labels):
            lengths = capsules.pow(2).sum(-1).add(1e-12).sqrt()
            present = torch.nn.functional.one_hot(labels, lengths.shape[1]).to(lengths.dtype)
            per_class = present * torch.relu(0.9 - lengths) ** 2 + 0.5 * (1 - present) * torch.relu(lengths - 0.1) ** 2
            return per_class.sum(1).mean()

        return margin


def step_flops(enc: CapsNetEncoder, batch: int) -> dict[str, float]:
    """FLOPs of one training step, by part (multiply-add = 2 FLOPs).

    Forward plus backward counts 3x the forward, except conv1 (2x: the images
    need no gradient) and the routing (the backward only goes through the last
    iteration's weighted sum; the other iterations use detached predictions).
    """
    p = enc.params
    c, h, w = enc.image_shape
    h1, w1 = h + 2 * p.conv1_padding - p.conv1_kernel + 1, w + 2 * p.conv1_padding - p.conv1_kernel + 1
    h2, w2 = enc.grid
    kd = enc.num_classes * p.class_dim
    conv1 = 2 * h1 * w1 * p.conv1_channels * c * p.conv1_kernel**2
    primary = 2 * h2 * w2 * p.primary_types * p.primary_dim * p.conv1_channels * p.primary_kernel**2
    u_hat = 2 * enc.num_children * p.primary_dim * kd
    one_sum = 2 * enc.num_children * kd
    routing_fwd = one_sum * (2 * p.routing_iterations - 1)
    return {
        "conv1": batch * 2 * conv1,
        "primary": batch * 3 * primary,
        "u_hat": batch * 3 * u_hat,
        "routing": batch * (routing_fwd + 2 * one_sum),
    }


def bench_routing(case: Case, repeats: int) -> tuple[float, float, float, float]:
    """Return images/s of the batched routing (standard and encoder layouts), of the loop reference, and the max difference."""
    n = case.primary_types * (6 * 6 if case.image_shape[1] == 28 else 8 * 8)
    u_hat = torch.randn(case.batch, n, 10, 16) * 0.05
    # The encoder hands over a (B, N, K, D) view of (B, K, N, D) memory.
    u_enc = u_hat.transpose(1, 2).contiguous().transpose(1, 2)
    with torch.no_grad():
        standard = _best_time(lambda: dynamic_routing(u_hat, 3), repeats)
        encoder = _best_time(lambda: dynamic_routing(u_enc, 3), repeats)
        loop = _best_time(lambda: loop_routing(u_hat, 3), repeats)
        diff = float((dynamic_routing(u_hat, 3) - loop_routing(u_hat, 3)).abs().max())
    return case.batch / standard, case.batch / encoder, case.batch / loop, diff


def bench_step(case: Case, repeats: int) -> tuple[float, float, dict[str, float], float]:
    """Return images/s and FLOP/s of a full training step, its FLOPs by part, and matmul FLOP/s.

    Each repeat times one step and then one reference matmul, so that both see
    the same load from other processes.
    """
    torch.manual_seed(0)
    enc = CapsNetEncoder(CapsNetParams(primary_types=case.primary_types), image_shape=case.image_shape, num_classes=10)
    loss_fn = _margin_loss()
    try:  # one fused kernel per step instead of a dozen passes over the parameters
        opt = torch.optim.Adam(enc.parameters(), lr=1e-4, fused=True)
    except (RuntimeError, TypeError):
        opt = torch.optim.Adam(enc.parameters(), lr=1e-4)
    images = torch.rand(case.batch, *case.image_shape) * 2 - 1
    labels = torch.randint(0, 10, (case.batch,))

    def step():
        opt.zero_grad(set_to_none=True)
        loss_fn(enc(images), labels).backward()
        opt.step()

    a, b = torch.randn(MATMUL_SIZE, MATMUL_SIZE), torch.randn(MATMUL_SIZE, MATMUL_SIZE)
    step()
    seconds, mm_seconds = float("inf"), float("inf")
    for _ in range(repeats):
        seconds = min(seconds, _best_time(step, 1, warmup=0))
        mm_seconds = min(mm_seconds, _best_time(lambda: torch.mm(a, b), 1, warmup=0))
    parts = step_flops(enc, case.batch)
    return case.batch / seconds, sum(parts.values()) / seconds, parts, 2 * MATMUL_SIZE**3 / mm_seconds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores)")
    parser.add_argument("--quick", action="store_true", help="fewer repeats, smaller batches (~20 s)")
    parser.add_argument("--no-tuning", action="store_true", help="keep the malloc and OpenMP defaults")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    repeats = 2 if args.quick else 5
    scale = 1 if args.quick else 2
    cases = [
        Case("MNIST 1x28x28, 32 types", (1, 28, 28), 32, 16 * scale),
        Case("CIFAR 3x32x32, 64 types", (3, 32, 32), 64, 8 * scale),
    ]
    started = time.perf_counter()
    tuned = ", ".join(f"{k}={os.environ[k]}" for k in TUNING if k in os.environ) or "none"
    print(
        f"torch {torch.__version__}, {args.threads} thread(s) of {os.cpu_count()} cores, "
        f"load average {os.getloadavg()[0]:.1f}\nenvironment tuning: {tuned}"
    )
    peak_before = matmul_flops(MATMUL_SIZE, repeats)
    print(f"float32 matmul {MATMUL_SIZE}^3: {peak_before / 1e9:.1f} GFLOP/s")

    print("\nRouting (forward, 3 iterations, K=10, D=16), images/s")
    print(
        f"{'case':26} {'batch':>5} {'batched':>8} {'(enc. layout)':>13} {'loop ref':>9} "
        f"{'speed-up':>9} {'(enc.)':>7} {'target':>7} {'max |diff|':>10}"
    )
    for case in cases:
        routing_case = Case(case.name, case.image_shape, case.primary_types, 2 * scale * case.batch)
        standard, encoder, loop, diff = bench_routing(routing_case, repeats)
        print(
            f"{case.name:26} {routing_case.batch:5d} {standard:8.0f} {encoder:13.0f} {loop:9.0f} "
            f"{standard / loop:8.1f}x {encoder / loop:6.1f}x {ROUTING_TARGET:6.0f}x {diff:10.1e}"
        )

    print("\nTraining step (forward + margin loss backward + Adam), default capsnet widths")
    rows = [(case, *bench_step(case, repeats)) for case in cases]
    peak_after = matmul_flops(MATMUL_SIZE, repeats)
    # The best matmul rate seen anywhere in this run: the most demanding reference.
    peak = max([peak_before, peak_after] + [row[4] for row in rows])
    print(f"{'case':26} {'batch':>5} {'img/s':>7} {'GFLOP/step':>10} {'GFLOP/s':>8} {'% matmul':>9} {'target':>7}")
    for case, images_per_s, flops_per_s, parts, _ in rows:
        print(
            f"{case.name:26} {case.batch:5d} {images_per_s:7.1f} {sum(parts.values()) / 1e9:10.1f} "
            f"{flops_per_s / 1e9:8.1f} {100 * flops_per_s / peak:8.0f}% {100 * FLOPS_TARGET:6.0f}%"
        )
    for case, _, _, parts, _ in rows:
        total = sum(parts.values())
        shares = ", ".join(f"{k} {100 * v / total:.1f}%" for k, v in parts.items())
        print(f"  FLOPs of {case.name}: {shares}")
    interleaved = ", ".join(f"{row[4] / 1e9:.1f}" for row in rows)
    print(
        f"\nmatmul reference: {peak / 1e9:.1f} GFLOP/s, the best of: before {peak_before / 1e9:.1f}, "
        f"between steps {interleaved}, after {peak_after / 1e9:.1f}; "
        f"load average now {os.getloadavg()[0]:.1f}; total {time.perf_counter() - started:.0f} s"
    )


if __name__ == "__main__":
    main()
