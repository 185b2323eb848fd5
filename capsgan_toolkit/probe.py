"""The spatial-structure probe: what a trained encoder keeps when test images are turned, moved or scrambled.

The source report's motivation is that capsules keep spatial structure that CNNs lose. The
probe measures it on a trained run: encoder accuracy, the mean length of the true class's
capsule, and the reconstruction error, on the same test images as they are, rotated
(15/30/45 degrees), shifted (2/4 pixels) and with their quadrants swapped (the parts of the
image in the wrong places: the "face with mouth and eye swapped" of the report's introduction).
Rotations and shifts resample with the image's own border, so no black corners appear.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn.functional as F

from capsgan_toolkit.data import class_balanced_indices, split_labels


def _affine(images: torch.Tensor, degrees: float = 0.0, dx: float = 0.0, dy: float = 0.0) -> torch.Tensor:
    """Rotate by ``degrees`` and shift by (dx, dy) pixels, filling with the border pixels."""
    b, _, h, w = images.shape
    a = math.radians(degrees)
    theta = torch.tensor([[math.cos(a), -math.sin(a), -2 * dx / w], [math.sin(a), math.cos(a), -2 * dy / h]],
                         dtype=images.dtype).expand(b, 2, 3)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _swap_quadrants(images: torch.Tensor) -> torch.Tensor:
    """Exchange the top-left with the bottom-right and the top-right with the bottom-left quarter."""
    h, w = images.shape[-2] // 2, images.shape[-1] // 2
    out = images.clone()
    out[..., :h, :w], out[..., h:2 * h, w:2 * w] = images[..., h:2 * h, w:2 * w], images[..., :h, :w]
    out[..., :h, w:2 * w], out[..., h:2 * h, :w] = images[..., h:2 * h, :w], images[..., :h, w:2 * w]
    return out


PERTURBATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "none": lambda x: x,
    "rotate 15": lambda x: _affine(x, 15), "rotate 30": lambda x: _affine(x, 30), "rotate 45": lambda x: _affine(x, 45),
    "shift 2 px": lambda x: _affine(x, dx=2, dy=2), "shift 4 px": lambda x: _affine(x, dx=4, dy=4),
    "quadrants swapped": _swap_quadrants,
}
"""Name -> what is done to the test images (batched, in [-1, 1])."""


@torch.no_grad()
def probe(run, *, n: int = 1000, batch_size: int = 100) -> list[dict[str, Any]]:
    """Measure a loaded run (:func:`capsgan_toolkit.api.load_trained`) on perturbed test images.

    Returns one row per perturbation: ``acc`` (where the objective classifies),
    ``true_class_length`` (the true class's capsule length, where there is an encoder) and
    ``rec_mse01`` (reconstruction MSE in [0, 1] pixels, where the objective reconstructs).
    """
    from capsgan_toolkit.metrics import recon_mse01

    obj, encoder, device = run.objective, run.built.parts.encoder, run.device
    test = run.built.dataset.split("test")
    labels_all = split_labels(test)
    picked = class_balanced_indices(labels_all, min(n, len(test)))
    images = torch.stack([test[i][0] for i in picked])
    labels = torch.tensor([labels_all[i] for i in picked])
    obj.eval()
    rows = []
    for name, perturb in PERTURBATIONS.items():
        sums = {"acc": 0.0, "true_class_length": 0.0, "rec_mse01": 0.0}
        for start in range(0, len(images), batch_size):
            x = perturb(images[start:start + batch_size]).to(device)
            y = labels[start:start + batch_size].to(device)
            if obj.has_classifier:
                sums["acc"] += (obj.classify(x).argmax(1) == y).sum().item()
            if encoder is not None:
                lengths = encoder.class_scores(encoder(x))
                sums["true_class_length"] += lengths.gather(1, y[:, None]).sum().item()
            if obj.has_reconstruction:
                sums["rec_mse01"] += recon_mse01(obj.reconstruct(x), x).sum().item()
        row: dict[str, Any] = {"probe": name, "images": len(images)}
        for key, wanted in (("acc", obj.has_classifier), ("true_class_length", encoder is not None),
                            ("rec_mse01", obj.has_reconstruction)):
            row[key] = sums[key] / len(images) if wanted else None
        rows.append(row)
    return rows


def examples(run, count: int = 8) -> torch.Tensor:
    """Return a grid-ready batch: for each perturbation, ``count`` perturbed test images (one per class)."""
    test = run.built.dataset.split("test")
    labels = split_labels(test)
    images = torch.stack([test[i][0] for i in class_balanced_indices(labels, count)])
    return torch.cat([perturb(images) for perturb in PERTURBATIONS.values()])
