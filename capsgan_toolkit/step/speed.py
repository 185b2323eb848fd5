"""The recipe's ``[speed]`` table: options that make a step faster without changing the algorithm.

``precision = "bf16"`` runs the forward passes under bfloat16 autocast (the routing and the squash
stay float32: :func:`plugins.capsule.dynamic_routing` leaves autocast itself; backward runs outside
autocast); ``precision = "tf32"`` keeps float32 tensors but lets CUDA matmuls use TF32 tensor cores
(``torch.backends.cuda.matmul.allow_tf32``; cuDNN convolutions already do by PyTorch's default,
under either precision; on other devices "tf32" is float32); ``channels_last`` stores the models'
weights and each training batch in NHWC order (faster convolutions on tensor-core GPUs); ``compile``
compiles each model with ``torch.compile`` (in place, so checkpoints keep their keys);
``cudnn_benchmark`` lets cuDNN time its convolution algorithms for the run's shapes; ``pin_memory``
pins training batches for faster, asynchronous copies to the GPU; ``data_on_device`` (on by default)
keeps an in-memory training set on the GPU and gathers each batch there; ``cuda_graphs`` replays
each model's training forward and backward as CUDA graphs (:mod:`capsgan_toolkit.step.cuda_graphs`).
Numbers for each: docs/performance.md.
"""

from __future__ import annotations

import contextlib
import traceback
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from capsgan_toolkit.errors import CapsganError

_COMPILER_FILES = ("torch/_dynamo/", "torch/_inductor/", "torchinductor_")


class SpeedSection(BaseModel):
    model_config = ConfigDict(extra="forbid")

    precision: Literal["float32", "tf32", "bf16"] = Field(
        "float32", description='Forward passes in "float32"; "tf32": float32 tensors, CUDA matmuls on TF32 tensor '
                               'cores (elsewhere float32); or under bfloat16 autocast ("bf16"; CUDA, or a CPU with '
                               'bf16).')
    channels_last: bool = Field(False, description="Models and training batches in channels-last (NHWC) memory order.")
    compile: bool = Field(False, description="Compile each model with torch.compile (first steps slower).")
    cudnn_benchmark: bool = Field(False, description="Let cuDNN pick the fastest convolution algorithms (CUDA).")
    pin_memory: bool = Field(False, description="Pin training batches in page-locked memory (CUDA).")
    cuda_graphs: bool | Literal["auto"] = Field(
        False, description="On CUDA, replay each model's training forward and backward as CUDA graphs (fewer "
                           'kernel launches from Python; not with compile); "auto": a model that cannot be '
                           "captured runs eagerly, with a note, instead of stopping the run.")
    data_on_device: bool = Field(
        True, description="On CUDA, keep an in-memory training set (built-in data sets, MNIST, CIFAR-10; up to "
                          "2 GiB) on the device and gather each batch there (with data.num_workers = 0).")


class Speed:
    """Apply a :class:`SpeedSection` to a run's built models on ``device``."""

    def __init__(self, spec: SpeedSection, device: torch.device, built):
        self.spec, self.device = spec, device
        self.pin_memory = spec.pin_memory and device.type == "cuda"
        self.data_device = device if spec.data_on_device and device.type == "cuda" else None
        if spec.cuda_graphs and spec.compile and graphs_available(device):
            raise CapsganError("speed.cuda_graphs and speed.compile cannot both be true: torch.compile "
                               "captures its own graphs. Set one of them to false in the recipe's [speed] table.")
        if device.type == "cuda":  # set either way: a process that trains several runs gets each run's own
            torch.backends.cudnn.benchmark = spec.cudnn_benchmark
            torch.backends.cuda.matmul.allow_tf32 = spec.precision == "tf32"
        for module in built.modules().values():
            if spec.channels_last:
                module.to(memory_format=torch.channels_last)
            if spec.compile:
                module.compile()
        self.graphed = []
        if spec.cuda_graphs and graphs_available(device):
            from capsgan_toolkit.step.cuda_graphs import graph_models

            self.graphed = graph_models(built.modules(), fallback=spec.cuda_graphs == "auto")

    @contextlib.contextmanager
    def step(self):
        """The context a training step runs in: :meth:`autocast`; with ``cuda_graphs`` the models'
        graphed calls count from the step's start (and run eagerly outside it); with ``compile`` a
        clear error when ``torch.compile`` fails (on CUDA with torch 2.11 it does, in the capsnet's
        convolution backward) instead of the compiler's traceback."""
        for graphed in self.graphed:
            graphed.new_step()
        try:
            with self.autocast():
                yield
        except Exception as exc:
            if not (self.spec.compile and from_compiler(exc)):
                raise
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise CapsganError(
                f"speed.compile = true: torch.compile failed while compiling or running the models "
                f"({type(exc).__name__}: {first[:300]}). Checkpoints already written are intact. Set "
                "speed.compile = false in the recipe's [speed] table (or --set speed.compile=false) and run "
                "again; `capsgan run --resume RUN --set speed.compile=false` continues an interrupted run.") from exc
        finally:
            for graphed in self.graphed:
                graphed.end_step()

    def autocast(self):
        """Return the context the forward passes run in (bf16 autocast, or nothing)."""
        if self.spec.precision == "bf16":  # CUDA graphs replay without autocast's cache of cast weights
            return torch.autocast(self.device.type, dtype=torch.bfloat16, cache_enabled=not self.graphed)
        return contextlib.nullcontext()

    def batch(self, images: torch.Tensor) -> torch.Tensor:
        """Return a training batch in the memory order the models expect."""
        if self.spec.channels_last and images.dim() == 4:
            return images.contiguous(memory_format=torch.channels_last)
        return images


def graphs_available(device: torch.device) -> bool:
    """Whether ``speed.cuda_graphs`` applies on ``device`` (CUDA; elsewhere the option is ignored)."""
    return device.type == "cuda"


def from_compiler(exc: BaseException) -> bool:
    """Whether ``exc`` was raised inside torch.compile's machinery (dynamo, inductor or the code it generated)."""
    frames = traceback.extract_tb(exc.__traceback__)
    return type(exc).__module__.startswith(("torch._dynamo", "torch._inductor")) or any(
        marker in frame.filename.replace("\\", "/") for frame in frames for marker in _COMPILER_FILES)
