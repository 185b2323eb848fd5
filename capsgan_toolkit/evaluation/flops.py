"""FLOP counting, in one place: torch's flop counter around a call, and a part's FLOPs per image."""

from __future__ import annotations

import torch
from torch import nn


def count_flops(fn) -> int:
    """Return the FLOPs :class:`torch.utils.flop_counter.FlopCounterMode` sees while ``fn()`` runs."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


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
    batch = int(example_input.shape[0]) if example_input.dim() else 1
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            total = count_flops(lambda: module(example_input))
    finally:
        module.train(was_training)
    return int(round(total / max(batch, 1)))


def parts_flops_per_image(built) -> dict[str, int]:
    """Forward FLOPs per image of each part of a built recipe (the generator from a K x D latent)."""
    info, gen, out = built.info, torch.Generator().manual_seed(0), {}
    device = next(iter(built.modules().values())).parameters().__next__().device
    for name, module in built.modules().items():
        if name == "generator":
            shape = (module.num_classes, module.capsule_dim)
        else:
            shape = getattr(module, "image_shape", info.image_shape)
        try:
            out[name] = flops_per_image(module, torch.randn(2, *shape, generator=gen).to(device))
        except Exception:  # a plugin that cannot be counted costs nothing here
            continue
    return out
