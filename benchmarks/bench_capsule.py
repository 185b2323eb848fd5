"""Benchmark the capsnet encoder's CPU training step against the previous code, and its routing.

Prints, measured side by side in one process:

* **Training step** (forward, margin loss, backward, Adam as the trainer builds it) of the
  paper's MNIST CapsNet (1x28x28, conv1 256 9x9, 32 primary types 9x9 stride 2, 1152
  children, batch 64) and of the report's CIFAR-10 model (3x32x32, 64 primary types, 4096
  children, leaky routing, batch 32): ms per step and images/s of the current
  ``plugins/capsule.py`` and of the version at ``--previous`` (default: the commit before the
  GEMM convolution, loaded from git into a temporary module), the speed-up, and each step's
  FLOP/s as a share of this machine's float32 matmul rate. FLOPs are counted by
  :class:`torch.utils.flop_counter.FlopCounterMode` on one step (the same count for both
  versions: they do the same matrix products). Every time is the best of ``--repeats``; each
  repeat times one step of each version and one 2048^3 matmul, so all three see the same load
  from other processes; the matmul reference is the best seen in the run.
* **Routing** (forward, 3 iterations, K=10, D=16): images/s of :func:`dynamic_routing` and of
  a loop-over-parents reference, as many public implementations route.
* **Adam**: one optimizer step over the MNIST capsnet's parameters, the trainer's (torch's
  fused kernel on a CPU) against torch's default implementation, side by side.

Both versions run under the same settings: the glibc allocator keeps freed memory (the
capsnet encoder sets this itself, :func:`capsgan_plugins.capsule_cpu.keep_freed_memory`), and,
unless ``--no-tuning``, the script re-runs itself with ``OMP_WAIT_POLICY=PASSIVE``: OpenMP
threads that spin while waiting steal the cores from each other when other processes share
the machine (2x slower on a busy 2-core machine); it must be set before torch starts.

Usage::

    python benchmarks/bench_capsule.py                 # about 1-2 minutes on 2 cores
    python benchmarks/bench_capsule.py --quick         # fewer repeats
    python benchmarks/bench_capsule.py --profile       # and where the MNIST step's time goes
    python benchmarks/bench_capsule.py --previous HEAD~3
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

TUNING = {"OMP_WAIT_POLICY": "PASSIVE"}
ROOT = Path(__file__).resolve().parent.parent

if (
    __name__ == "__main__"
    and "--no-tuning" not in sys.argv
    and any(os.environ.get(k) != v for k, v in TUNING.items())
):
    # OpenMP reads this at start-up only: re-run before importing torch.
    os.execve(sys.executable, [sys.executable, os.path.abspath(__file__), *sys.argv[1:]], {**os.environ, **TUNING})

import torch  # noqa: E402

from capsgan_plugins import capsule  # noqa: E402
from capsgan_plugins.capsule import dynamic_routing, squash  # noqa: E402
from capsgan_plugins.capsule_cpu import keep_freed_memory  # noqa: E402
from capsgan_plugins.losses import MarginLoss  # noqa: E402
from capsgan_toolkit.evaluation.flops import count_flops  # noqa: E402
from capsgan_toolkit.step.optim import OptimizerSpec, build_optimizer  # noqa: E402

MATMUL_SIZE = 2048
TARGETS = {"MNIST": 0.70, "CIFAR-10": 0.65}


@dataclass(frozen=True)
class Case:
    name: str
    image_shape: tuple[int, int, int]
    primary_types: int
    batch: int
    leaky: bool


CASES = [Case("MNIST", (1, 28, 28), 32, 64, False), Case("CIFAR-10", (3, 32, 32), 64, 32, True)]


def previous_revision() -> str:
    """The commit before the one that added plugins/capsule_cpu.py (the GEMM convolution)."""
    added = subprocess.run(["git", "-C", str(ROOT), "log", "--diff-filter=A", "--format=%h", "--",
                            "plugins/capsule_cpu.py"], capture_output=True, text=True, check=True).stdout.split()
    if not added:
        raise SystemExit("plugins/capsule_cpu.py is not committed: give --previous REV")
    return added[-1] + "^"


def load_previous(rev: str, folder: Path):
    """Import ``plugins/capsule.py`` as it was at ``rev``, as a module of its own."""
    source = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:plugins/capsule.py"],
                            capture_output=True, text=True, check=True).stdout
    path = folder / "capsule_previous.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("capsule_previous", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # pydantic resolves the params' annotations through it
    spec.loader.exec_module(module)
    return module


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def make_step(module, case: Case, optimizer: str = "trainer"):
    """Return ``(step, flops)``: one training step of ``module``'s encoder and its counted FLOPs.

    ``optimizer``: ``"trainer"``, the Adam that ``capsgan run`` builds (on a CPU torch's fused
    kernel: one pass over each parameter), or ``"unfused"``, torch's default implementation
    (one pass per arithmetic operation; what the trainer used before it fused).
    """
    torch.manual_seed(0)
    params = module.CapsNetParams(primary_types=case.primary_types, leaky_routing=case.leaky)
    enc = module.CapsNetEncoder(params, image_shape=case.image_shape, num_classes=10)
    loss_fn = MarginLoss(MarginLoss.Params())
    if optimizer == "unfused":
        opt = torch.optim.Adam(enc.parameters(), lr=1e-4, betas=(0.5, 0.999))
    else:
        opt, _ = build_optimizer(OptimizerSpec(lr=1e-4, betas=(0.5, 0.999)), enc.parameters(), total_steps=1)
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(case.batch, *case.image_shape, generator=gen) * 2 - 1
    labels = torch.randint(0, 10, (case.batch,), generator=gen)

    def step():
        opt.zero_grad(set_to_none=True)
        loss_fn(enc(images), labels).backward()
        opt.step()

    step()
    return step, count_flops(lambda: loss_fn(enc(images), labels).backward())


def bench_steps(versions: dict, repeats: int, optimizer: str) -> tuple[dict, float]:
    """Time each case of each version, interleaved; return ``{(case, version): (s, flops)}`` and the matmul rate."""
    a, b = torch.randn(MATMUL_SIZE, MATMUL_SIZE), torch.randn(MATMUL_SIZE, MATMUL_SIZE)
    mm = min(_timed(lambda: torch.mm(a, b)) for _ in range(3))
    out = {}
    for case in CASES:
        steps = {name: make_step(module, case, optimizer) for name, module in versions.items()}
        best = {name: float("inf") for name in versions}
        for _ in range(repeats):
            for name, (step, _) in steps.items():
                best[name] = min(best[name], _timed(step))
            mm = min(mm, _timed(lambda: torch.mm(a, b)))
        for name, (_step, flops) in steps.items():
            out[case.name, name] = (best[name], flops)
        del steps
    return out, 2 * MATMUL_SIZE**3 / mm


def bench_adam(repeats: int) -> dict[str, float]:
    """Seconds of one Adam step over the MNIST capsnet's parameters: the trainer's (fused on a CPU) and torch's default.

    Both optimizers update their own copy of the same parameters with the same gradients,
    interleaved; the best of ``repeats`` (at least 5) counts.
    """
    case = CASES[0]
    times = {}
    steps = {}
    for name in ("trainer", "unfused"):
        torch.manual_seed(0)
        enc = capsule.CapsNetEncoder(capsule.CapsNetParams(primary_types=case.primary_types),
                                     image_shape=case.image_shape, num_classes=10)
        for p in enc.parameters():
            p.grad = torch.randn_like(p) * 1e-3
        if name == "trainer":  # the scheduler stays referenced: it wraps the optimizer's step
            opt, sched = build_optimizer(OptimizerSpec(lr=1e-4, betas=(0.5, 0.999)), enc.parameters(), total_steps=1)
        else:
            opt, sched = torch.optim.Adam(enc.parameters(), lr=1e-4, betas=(0.5, 0.999)), None
        opt.step()
        steps[name], times[name] = (opt.step, sched), float("inf")
    for _ in range(max(5, repeats)):
        for name, (step, _) in steps.items():
            times[name] = min(times[name], _timed(step))
    return times


def loop_routing(u_hat: torch.Tensor, iterations: int) -> torch.Tensor:
    """Reference routing with a Python loop over parents (one parent's slice at a time)."""
    batch, children, parents, _ = u_hat.shape
    logits = [u_hat.new_zeros(batch, children) for _ in range(parents)]
    for step in range(iterations):
        c = torch.softmax(torch.stack(logits, dim=2), dim=2)
        outputs = []
        for j in range(parents):
            v_j = squash((c[:, :, j : j + 1] * u_hat[:, :, j, :]).sum(dim=1))
            outputs.append(v_j)
            if step < iterations - 1:
                logits[j] = logits[j] + (u_hat[:, :, j, :] * v_j.unsqueeze(1)).sum(dim=-1)
    return torch.stack(outputs, dim=1)


def bench_routing(children: int, batch: int, repeats: int) -> tuple[float, float, float, float]:
    """Images/s of the batched routing (standard and encoder layouts) and of the loop reference; max |diff|."""
    u_hat = torch.randn(batch, children, 10, 16) * 0.05
    u_enc = u_hat.transpose(0, 1).contiguous().transpose(0, 1)  # (B, N, K, D) view of (N, B, K, D) memory
    with torch.no_grad():
        times = [min(_timed(lambda f=f: f()) for _ in range(repeats)) for f in (
            lambda: dynamic_routing(u_hat, 3), lambda: dynamic_routing(u_enc, 3), lambda: loop_routing(u_hat, 3))]
        diff = float((dynamic_routing(u_hat, 3) - loop_routing(u_hat, 3)).abs().max())
    return (*(batch / t for t in times), diff)


def profile_mnist(optimizer: str, rows: int = 14) -> None:
    from torch.profiler import ProfilerActivity, profile

    step, _ = make_step(capsule, CASES[0], optimizer)
    step()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(2):
            step()
    print("\nWhere the current MNIST step's time goes (torch.profiler, 2 steps, self CPU time):")
    print(prof.key_averages(group_by_input_shape=True).table(
        sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=24, max_shapes_column_width=60))


def _load() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--previous", default=None, help="git revision of the code to compare with "
                        "(default: the commit before plugins/capsule_cpu.py was added)")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per version and case (best counts)")
    parser.add_argument("--quick", action="store_true", help="3 repeats, no routing section")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, all cores)")
    parser.add_argument("--profile", action="store_true", help="also profile the current MNIST step")
    parser.add_argument("--optimizer", choices=["trainer", "unfused"], default="trainer",
                        help="Adam as `capsgan run` builds it (fused on a CPU), or torch's default implementation")
    parser.add_argument("--no-tuning", action="store_true", help="keep the OpenMP default (spinning threads)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = 3 if args.quick else args.repeats
    allocator = keep_freed_memory()  # both versions under the same allocator settings
    rev = args.previous or previous_revision()
    started = time.perf_counter()
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "?") if Path("/proc/cpuinfo").exists() else "?"
    print(f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} thread(s); "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(default)')}; allocator: {allocator}; "
          f"load average (1/5/15 min) {_load()}")
    with tempfile.TemporaryDirectory() as folder:
        versions = {"previous": load_previous(rev, Path(folder)), "current": capsule}
        results, rate = bench_steps(versions, repeats, args.optimizer)
    print(f"\nTraining step (forward + margin loss + backward + {args.optimizer} Adam), best of {repeats}; "
          f"previous = plugins/capsule.py at {rev}")
    print(f"{'case':9} {'batch':>5} {'GFLOP':>6} {'version':>9} {'ms/step':>8} {'img/s':>7} {'GFLOP/s':>8} "
          f"{'% matmul':>9} {'target':>7} {'speed-up':>9}")
    for case in CASES:
        base = results[case.name, "previous"][0]
        for name in versions:
            seconds, flops = results[case.name, name]
            print(f"{case.name:9} {case.batch:5d} {flops / 1e9:6.1f} {name:>9} {1e3 * seconds:8.0f} "
                  f"{case.batch / seconds:7.1f} {flops / seconds / 1e9:8.1f} {100 * flops / seconds / rate:8.1f}% "
                  f"{100 * TARGETS[case.name]:6.0f}% {base / seconds:8.2f}x")
    print(f"float32 matmul {MATMUL_SIZE}^3 (best in the run): {rate / 1e9:.1f} GFLOP/s; load average now {_load()}")
    if not args.quick:
        print("\nRouting (forward, 3 iterations, K=10, D=16), images/s")
        print(f"{'children':>8} {'batch':>5} {'batched':>8} {'enc. layout':>11} {'loop ref':>9} {'speed-up':>9} "
              f"{'max |diff|':>10}")
        for children, batch in ((1152, 128), (4096, 64)):
            standard, encoder, loop, diff = bench_routing(children, batch, repeats)
            print(f"{children:8d} {batch:5d} {standard:8.0f} {encoder:11.0f} {loop:9.0f} {standard / loop:8.1f}x "
                  f"{diff:10.1e}")
        adam = bench_adam(repeats)
        print(f"\nAdam step over the MNIST capsnet's parameters (6.8 M), best of {max(5, repeats)}: the trainer's "
              f"(fused on a CPU) {1e3 * adam['trainer']:.1f} ms, torch's default {1e3 * adam['unfused']:.1f} ms, "
              f"{adam['unfused'] / adam['trainer']:.2f}x")
    if args.profile:
        profile_mnist(args.optimizer)
    print(f"\ntotal {time.perf_counter() - started:.0f} s; load average now {_load()}")


if __name__ == "__main__":
    main()
