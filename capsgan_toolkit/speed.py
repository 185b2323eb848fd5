"""The recipe's ``[speed]`` table: options that make a step faster without changing the algorithm.

``precision = "bf16"`` runs the forward passes under bfloat16 autocast (the routing and the
squash stay float32: :func:`plugins.capsule.dynamic_routing` leaves autocast itself; backward
runs outside autocast); ``channels_last`` stores the models' weights and each training batch
in NHWC order (faster convolutions on tensor-core GPUs); ``compile`` compiles each model with
``torch.compile`` (in place, so checkpoints keep their keys); ``cudnn_benchmark`` lets cuDNN
time its convolution algorithms for the run's shapes; ``pin_memory`` pins training batches
for faster, asynchronous copies to the GPU. Numbers for each: docs/performance.md.
"""

from __future__ import annotations

import contextlib
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field


class SpeedSection(BaseModel):
    model_config = ConfigDict(extra="forbid")

    precision: Literal["float32", "bf16"] = Field(
        "float32", description='Forward passes in "float32", or under bfloat16 autocast ("bf16"; CUDA, or a CPU with bf16).')
    channels_last: bool = Field(False, description="Models and training batches in channels-last (NHWC) memory order.")
    compile: bool = Field(False, description="Compile each model with torch.compile (first steps slower).")
    cudnn_benchmark: bool = Field(False, description="Let cuDNN pick the fastest convolution algorithms (CUDA).")
    pin_memory: bool = Field(False, description="Pin training batches in page-locked memory (CUDA).")


class Speed:
    """Apply a :class:`SpeedSection` to a run's built models on ``device``."""

    def __init__(self, spec: SpeedSection, device: torch.device, built):
        self.spec, self.device = spec, device
        self.pin_memory = spec.pin_memory and device.type == "cuda"
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = spec.cudnn_benchmark
        for module in built.modules().values():
            if spec.channels_last:
                module.to(memory_format=torch.channels_last)
            if spec.compile:
                module.compile()

    def autocast(self):
        """Return the context the forward passes run in (bf16 autocast, or nothing)."""
        if self.spec.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def batch(self, images: torch.Tensor) -> torch.Tensor:
        """Return a training batch in the memory order the models expect."""
        if self.spec.channels_last and images.dim() == 4:
            return images.contiguous(memory_format=torch.channels_last)
        return images
