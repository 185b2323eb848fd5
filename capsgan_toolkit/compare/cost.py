"""Cost of a model part: FLOPs per image, counted by torch's flop counter."""

from __future__ import annotations

import torch
from torch import nn


def flops_per_image(module: nn.Module, example_input: torch.Tensor) -> int:
    """Count the floating-point operations of one forward pass, per image.

    Uses :class:`torch.utils.flop_counter.FlopCounterMode`, which counts matrix
    multiplications and convolutions (2 FLOPs per multiply-add) and nothing elementwise,
    so squash, softmax and activations are not included: the number compares the heavy
    work of parts, it is not a profile.

    Args:
        module: the part (an encoder, generator or discriminator).
        example_input: a batch shaped as the part's input; the count is divided by its
            first dimension.

    Returns:
        FLOPs per image, rounded to an integer.
    """
    from torch.utils.flop_counter import FlopCounterMode

    batch = int(example_input.shape[0]) if example_input.dim() else 1
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            module(example_input)
    finally:
        module.train(was_training)
    return int(round(counter.get_total_flops() / max(batch, 1)))
