"""``capsgan bench RECIPE``: how fast a recipe's parts and its training step run here.

Builds the recipe's parts as a run would, feeds them synthetic batches of the data set's
image shape on the recipe's device (or ``--device``) and measures, after warm-up:
images/s of the encoder, generator and discriminator forward (``no_grad``, eval mode) and
of the full training step (the objective's ``step`` with all phases on, each ``update``
doing ``zero_grad``, ``backward`` and ``step`` on the Adam optimizers the trainer builds);
FLOPs per image from :class:`torch.utils.flop_counter.FlopCounterMode` (matmuls and
convolutions, 2 per multiply-add; of each forward, and of the step's forward + backward);
the step's FLOP/s as a share of the float32 matmul rate measured in the same run (CPU:
2048^3; GPU: 8192^3 float32 and bfloat16, plus the card's datasheet peak from
:data:`PEAKS`); and the step's peak tensor memory (``torch.cuda.max_memory_allocated``;
on CPU :func:`cpu_tensor_peak`).

images/s use the median iteration; the share uses the best step against the best matmul
(both filter out pauses other processes cause on a shared machine). ``--baseline``
measures a second recipe in the same process and adds ratios (RECIPE / BASELINE).
"""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch
from rich.table import Table
from torch import nn

from capsgan_toolkit import api
from capsgan_toolkit.errors import DataError
from capsgan_toolkit.evaluation.flops import count_flops
from capsgan_toolkit.interfaces import DatasetInfo, Phases
from capsgan_toolkit.recipe.build import build, pick_device
from capsgan_toolkit.step.optim import build_optimizer
from capsgan_toolkit.step.speed import Speed

PEAKS = {  # vendor datasheets, dense (no sparsity), TFLOP/s: fp32 (no tensor cores), tf32, bf16
    "H100 SXM": (67.0, 494.7, 989.4),
    "H100 PCIe": (51.2, 378.0, 756.0),
    "H100 NVL": (60.0, 417.5, 835.5),
    "H200": (67.0, 494.7, 989.4),
    "A100": (19.5, 156.0, 312.0),
    "L4": (30.3, 60.0, 121.0),
}
_LOSSES = ("losses.classification", "losses.reconstruction", "losses.adversarial")


def peak_for(name: str) -> tuple[str, tuple[float, float, float]] | None:
    """Return the :data:`PEAKS` entry for a CUDA device name (``NVIDIA H100 80GB HBM3`` is the SXM card)."""
    tokens = set(re.split(r"[^A-Z0-9]+", name.upper()))
    for key in ("H100 PCIe", "H100 NVL", "H200", "A100", "L4", "H100"):  # plain "H100 80GB HBM3" is the SXM
        if all(part.upper() in tokens for part in key.split()):
            key = "H100 SXM" if key == "H100" else key
            return key, PEAKS[key]
    return None


def time_each(fn, device: torch.device, steps: int, warmup: int) -> list[float]:
    """Run ``fn`` ``warmup`` times, then return the seconds of each of ``steps`` runs."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda device: None)
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return times


def matmul_rate(device: torch.device, dtype: torch.dtype = torch.float32, size: int | None = None,
                repeats: int = 3) -> float:
    """Return the best FLOP/s of a ``size^3`` matmul (2048 on CPU, 8192 on GPU)."""
    size = size or (2048 if device.type == "cpu" else 8192)
    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randn(size, size, generator=gen).to(device, dtype) for _ in range(2))
    return 2 * size**3 / min(time_each(lambda: torch.mm(a, b), device, repeats, 1))


def _cpu_name() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "?")


def cpu_tensor_peak(fn) -> int | None:
    """Peak bytes of tensor memory while ``fn()`` runs on CPU, parameters and optimizer state included.

    The CPU counterpart of ``torch.cuda.max_memory_allocated``, from torch.profiler's memory
    timeline (None where that fails). The process's resident set would not do: the capsnet
    encoder keeps freed memory in the process (:func:`capsgan_plugins.capsule_cpu.keep_freed_memory`).
    """
    from torch.profiler import ProfilerActivity, profile

    saved = os.dup(2)  # the profiler's own log lines would land in the table
    try:
        with warnings.catch_warnings(), tempfile.TemporaryDirectory() as folder, open(os.devnull, "w") as null:
            warnings.simplefilter("ignore")
            os.dup2(null.fileno(), 2)
            with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                         with_stack=True) as prof:
                fn()
            prof.export_memory_timeline(str(Path(folder) / "memory.json"), device="cpu")
            _, sizes = json.loads((Path(folder) / "memory.json").read_text())
        return int(max(sum(s) for s in sizes))
    except Exception:  # an internal torch API: measure nothing rather than fail the benchmark
        return None
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def machine(device: torch.device) -> dict:
    """Describe where the numbers come from: processor or card, threads and the settings that matter."""
    info = {"device": str(device), "torch": torch.__version__, "cpu": _cpu_name(), "cores": os.cpu_count(),
            "threads": torch.get_num_threads(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(default)"),
            "load_average": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
    return info


class _Synthetic:
    """Stands in for a data set whose files are missing: only its ``info`` is needed here."""

    def __init__(self, info: DatasetInfo):
        self.info = info


def _changed_speed_options(spec) -> dict:
    """The recipe's ``[speed]`` options that differ from their defaults."""
    defaults = type(spec)().model_dump()
    return {k: v for k, v in spec.model_dump().items() if v != defaults[k]}


def build_for_bench(recipe: str, sets=(), *, image_shape=None, classes=None, notes: list[str] | None = None):
    """Load and build ``recipe``; if its data set cannot be built, use ``image_shape`` and ``classes``."""
    plugins, resolved = api.load_recipe(recipe, sets)
    try:
        return build(resolved, plugins), resolved
    except DataError as exc:
        if image_shape is None or classes is None:
            raise DataError(f"{exc} (`capsgan bench` needs only the image shape and the number of classes: "
                            "give --image-shape C,H,W and --classes K to measure without the data.)") from None
        reason = str(exc).splitlines()[0]
    info = DatasetInfo(int(classes), tuple(int(x) for x in image_shape))
    built = build(resolved, plugins, dataset=_Synthetic(info))
    if notes is not None:
        notes.append(f"{recipe}: the data set could not be built ({reason}); measured with --image-shape "
                     f"{','.join(map(str, info.image_shape))} and --classes {info.num_classes}.")
    return built, resolved


def bench_recipe(recipe: str, *, batch: int | None = None, steps: int = 10, warmup: int = 2, device=None,
                 image_shape=None, classes=None, sets=(), notes: list[str] | None = None) -> dict:
    """Measure one recipe (see the module's docstring); return the numbers as a dict."""
    built, resolved = build_for_bench(recipe, sets, image_shape=image_shape, classes=classes, notes=notes)
    device = pick_device(device or resolved.recipe.run.device)
    objective, parts, info = built.objective, built.parts, built.info
    for module in [*built.modules().values(), *(parts.get(k) for k in _LOSSES)]:
        if isinstance(module, nn.Module):
            module.to(device)
    speed = Speed(resolved.recipe.speed, device, built)  # the recipe's [speed] options, as the trainer applies them
    batch = int(batch or resolved.recipe.data.batch_size)
    gen = torch.Generator().manual_seed(0)
    images = speed.batch((torch.rand(batch, *info.image_shape, generator=gen) * 2 - 1).to(device))
    labels = torch.randint(0, info.num_classes, (batch,), generator=gen).to(device)
    params = {name: p for name, p in objective.optimizer_parameters().items() if p}
    optimizers = {name: build_optimizer(resolved.optim[name], p, total_steps=steps + warmup + 2)[0]
                  for name, p in params.items()}

    def update(name, loss, terms) -> bool:  # as the trainer's, less its NaN checks and clipping
        if (opt := optimizers.get(name)) is not None:
            opt.zero_grad(set_to_none=True)
            with torch.autocast(device.type, enabled=False):
                loss.backward()
            opt.step()
        return opt is not None

    phases = Phases(generator=True, discriminator=True)

    def step(eager: bool = False):  # eager: outside a [speed] step, so CUDA graphs (which hide their ops) stay off
        with speed.autocast() if eager else speed.step():
            objective.step(images, labels, phases, update)

    inputs, hooks = {}, []  # what the generator and discriminator get in a real step

    def capture(name):  # the hook returns None: the call's inputs stay as they are
        return lambda module, args: inputs.setdefault(name, tuple(a.detach() for a in args)) and None

    for name in ("generator", "discriminator"):
        module = getattr(parts, name)
        if module is not None:
            hooks.append(module.register_forward_pre_hook(capture(name)))
    objective.train()
    step()
    for hook in hooks:
        hook.remove()
    inputs["encoder"] = (images,)

    out = {"recipe": recipe, "name": resolved.recipe.run.name, "device": str(device), "batch": batch,
           "speed": _changed_speed_options(resolved.recipe.speed),
           "steps": steps, "warmup": warmup, "image_shape": list(info.image_shape), "classes": info.num_classes,
           "parts": {}}
    objective.eval()
    with torch.no_grad():
        for name in ("encoder", "generator", "discriminator"):
            module = getattr(parts, name)
            if module is None or name not in inputs:
                continue
            args = inputs[name]
            n = args[0].shape[0]
            def forward(module=module, args=args):
                with speed.autocast():
                    return module(*args)

            times = time_each(forward, device, steps, warmup)
            out["parts"][name] = {"images_per_s": n / statistics.median(times), "best_s": min(times),
                                  "median_s": statistics.median(times), "flops_per_image": count_flops(forward) / n}
    objective.train()
    step_flops = count_flops(lambda: step(eager=bool(speed.graphed)))  # the flop counter sees eager ops only
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = time_each(step, device, steps, warmup)
    if device.type == "cuda":
        peak, kind = torch.cuda.max_memory_allocated(device), "cuda max_memory_allocated"
    else:
        peak, kind = cpu_tensor_peak(step), "tensor memory (torch.profiler memory timeline)"
    out["step"] = {"images_per_s": batch / statistics.median(times), "median_s": statistics.median(times),
                   "best_s": min(times), "flops_per_image": step_flops / batch,
                   "flops_per_s": step_flops / min(times), "peak_memory_bytes": peak, "peak_memory_kind": kind}
    return out


def run_bench(recipe: str, baseline: str | None = None, baseline_sets=(), **kwargs) -> dict:
    """Measure ``recipe`` (and ``baseline``, with ``baseline_sets`` too) with the matmul reference before and after."""
    notes: list[str] = []
    device = kwargs.pop("device", None)
    first = bench_recipe(recipe, device=device, notes=notes, **kwargs)
    dev = torch.device(first["device"])
    info = machine(dev)
    rates = [matmul_rate(dev)]
    results = [first]
    if baseline:
        kwargs["sets"] = (*kwargs.get("sets", ()), *baseline_sets)
        results.append(bench_recipe(baseline, device=device, notes=notes, **kwargs))
    rates.append(matmul_rate(dev))
    reference = {"float32_flops_per_s": max(rates), "float32_matmul_size": 2048 if dev.type == "cpu" else 8192,
                 "float32_flops_per_s_each": rates}
    if dev.type == "cuda":
        reference["bfloat16_flops_per_s"] = matmul_rate(dev, torch.bfloat16)
        known = peak_for(info["gpu"])
        if known:
            name, (fp32, tf32, bf16) = known
            reference["peak"] = {"card": name, "fp32_tflops": fp32, "tf32_tflops": tf32, "bf16_tflops": bf16,
                                 "source": "vendor datasheet, dense"}
    for step in (res["step"] for res in results):
        step["share_of_matmul"] = step["flops_per_s"] / reference["float32_flops_per_s"]
        for kind in ("fp32", "bf16") if "peak" in reference else ():
            step[f"share_of_{kind}_peak"] = step["flops_per_s"] / (reference["peak"][f"{kind}_tflops"] * 1e12)
    info["load_average_after"] = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    report = {"machine": info, "matmul": reference, "results": results, "notes": notes}
    if baseline:
        report["ratios"] = ratios(first, results[1])
    return report


def ratios(a: dict, b: dict) -> dict:
    """Return ``a / b`` for each speed and FLOP count the two results share."""
    out = {}
    for name in ("encoder", "generator", "discriminator"):
        if name in a["parts"] and name in b["parts"]:
            out[f"{name}_images_per_s"] = a["parts"][name]["images_per_s"] / b["parts"][name]["images_per_s"]
            if b["parts"][name]["flops_per_image"]:
                out[f"{name}_flops_per_image"] = a["parts"][name]["flops_per_image"] / b["parts"][name]["flops_per_image"]
    for key in ("images_per_s", "flops_per_image", "share_of_matmul", "peak_memory_bytes"):
        if b["step"].get(key) and a["step"].get(key) is not None:
            out[f"step_{key}"] = a["step"][key] / b["step"][key]
    return out


def _fmt_flops(x: float | None) -> str:
    if x is None:
        return "-"
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if x >= scale:
            return f"{x / scale:.3g} {unit}"
    return f"{x:.3g}"


def render(report: dict) -> Table:
    """Return the side-by-side table of a report."""
    results = report["results"]
    table = Table(title="capsgan bench", title_justify="left")
    table.add_column("measure")
    for res in results:
        table.add_column(f"{res['name']}\n({Path(res['recipe']).name})", justify="right")
    if len(results) == 2:
        table.add_column("ratio", justify="right")

    def row(label, keys, fmt, ratio_key=None):
        cells = []
        for value in results:
            for key in keys:
                value = value.get(key) if isinstance(value, dict) else None
            cells.append("-" if value is None else fmt(value))
        if len(results) == 2:
            r = report["ratios"].get(ratio_key) if ratio_key else None
            cells.append("-" if r is None else f"{r:.2f}x")
        table.add_row(label, *cells)

    table.add_row("device, batch", *(f"{r['device']}, {r['batch']}" for r in results), *[""][:len(results) - 1])
    for name, short in (("encoder", "E"), ("generator", "G"), ("discriminator", "D")):
        row(f"{short} forward img/s", ("parts", name, "images_per_s"), "{:,.0f}".format, f"{name}_images_per_s")
        row(f"{short} forward FLOP/img", ("parts", name, "flops_per_image"), _fmt_flops, f"{name}_flops_per_image")
    row("step img/s", ("step", "images_per_s"), "{:,.1f}".format, "step_images_per_s")
    row("step FLOP/img", ("step", "flops_per_image"), _fmt_flops, "step_flops_per_image")
    row("step FLOP/s (best)", ("step", "flops_per_s"), _fmt_flops)
    row("% of matmul rate", ("step", "share_of_matmul"), lambda v: f"{100 * v:.3g}%", "step_share_of_matmul")
    if "peak" in report["matmul"]:
        row("% of bf16 peak", ("step", "share_of_bf16_peak"), lambda v: f"{100 * v:.2f}%")
    row("step peak MiB", ("step", "peak_memory_bytes"), lambda v: f"{v / 2**20:,.0f}", "step_peak_memory_bytes")
    return table


def footer(report: dict) -> list[str]:
    m, ref = report["machine"], report["matmul"]
    where = m.get("gpu") or f"{m['cpu']}, {m['cores']} cores, {m['threads']} torch threads"
    lines = [f"machine: {where}; torch {m['torch']}; OMP_WAIT_POLICY={m['omp_wait_policy']}; "
             f"load average {m['load_average']} before, {m['load_average_after']} after",
             f"matmul reference: float32 {ref['float32_matmul_size']}^3, best "
             f"{_fmt_flops(ref['float32_flops_per_s'])}FLOP/s (measured before and after the recipes)"]
    if "bfloat16_flops_per_s" in ref:
        lines.append(f"bfloat16 matmul measured: {_fmt_flops(ref['bfloat16_flops_per_s'])}FLOP/s")
    if "peak" in ref:
        p = ref["peak"]
        lines.append(f"{p['card']} datasheet (dense): fp32 {p['fp32_tflops']}, tf32 {p['tf32_tflops']}, "
                     f"bf16 {p['bf16_tflops']} TFLOP/s")
    lines.append("E/G/D: encoder, generator, discriminator (forward: no_grad, eval mode); step: forward + "
                 "backward + Adam, all phases on; img/s: median iteration; % of matmul rate: best step FLOP/s "
                 "over best matmul; FLOPs: torch's flop counter (matmuls, convolutions).")
    return lines + [f"note: {n}" for n in report["notes"]]
