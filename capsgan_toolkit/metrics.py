"""Image-quality numbers: pixel metrics, and FID / KID / IS / precision-recall via torch-fidelity.

Every score is computed on uint8 RGB images (grayscale replicated to three channels),
the format torch-fidelity's feature extractors are defined on, so a number here means
the same as one computed from PNG files. Reference features are cached on disk under a
name that holds everything they depend on (data set, split, subset size and seed,
feature network), so a changed protocol can never reuse a stale cache.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from capsgan_toolkit.errors import CapsganError
from capsgan_toolkit.interfaces import FeatureSetup
from capsgan_toolkit.reporting import to_uint8

FIDELITY_FLAGS = {"fid": "fid", "kid": "kid", "is": "isc", "prc": "prc"}
"""Our score name -> the torch-fidelity flag that computes it."""


def cache_root(configured: str = "") -> Path:
    """Return the evaluation cache folder: ``configured``, else $CAPSGAN_CACHE, else ~/.cache/capsgan."""
    if configured:
        return Path(configured).expanduser()
    env = os.environ.get("CAPSGAN_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "capsgan"


def count_tag(n: int) -> str:
    """Write an image count the way metric names carry it: 1000 -> '1k', 500 -> '500'."""
    return f"{n // 1000}k" if n >= 1000 and n % 1000 == 0 else str(n)


def fork_rng(device: torch.device):
    """Context that restores torch's CPU (and this CUDA device's) random state on exit.

    Building feature networks draws random initial weights before loading the real
    ones; evaluation must not move the random state of a training run around it.
    """
    devices = [device.index or 0] if device.type == "cuda" else []
    return torch.random.fork_rng(devices=devices)


def to_fidelity_images(images: torch.Tensor) -> torch.Tensor:
    """Map images in [-1, 1] ``(B, C, H, W)`` to uint8 RGB ``(B, 3, H, W)`` on the CPU."""
    out = to_uint8(images.detach().cpu())
    if out.shape[1] == 1:
        out = out.expand(-1, 3, -1, -1)
    elif out.shape[1] != 3:
        raise CapsganError(f"Scores need 1- or 3-channel images; these have {out.shape[1]} channels.")
    return out.contiguous()


# ------------------------------------------------------------------ pixel metrics


def _unit(images: torch.Tensor) -> torch.Tensor:
    return (images.detach().double().clamp(-1, 1) + 1) / 2


def mse(reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image mean squared error with pixels in [0, 1] (inputs in [-1, 1])."""
    return (_unit(reconstruction) - _unit(target)).pow(2).mean(dim=(1, 2, 3))


def psnr(reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB with pixels in [0, 1]; identical images give 100 dB (MSE floored at 1e-10)."""
    return 10 * torch.log10(1.0 / mse(reconstruction, target).clamp(min=1e-10))


def _gaussian_window(size: int, sigma: float, dtype) -> torch.Tensor:
    x = torch.arange(size, dtype=dtype) - (size - 1) / 2
    w = torch.exp(-(x**2) / (2 * sigma**2))
    return w / w.sum()


def ssim(reconstruction: torch.Tensor, target: torch.Tensor, *, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Per-image SSIM (Wang et al. 2004) with pixels in [0, 1].

    Gaussian window (11 taps, sigma 1.5; shrunk to the image for smaller images),
    local statistics over the valid region only (no padding), K1 = 0.01, K2 = 0.03,
    averaged over pixels and channels. Computed in float64.
    """
    x, y = _unit(reconstruction), _unit(target)
    size = min(window, x.shape[-1], x.shape[-2])
    size -= (size + 1) % 2  # an odd window keeps it centred
    channels = x.shape[1]
    g = _gaussian_window(size, sigma, x.dtype)
    kernel = (g[:, None] * g[None, :]).expand(channels, 1, size, size)

    def blur(t):
        return F.conv2d(t, kernel, groups=channels)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = 0.01**2, 0.03**2
    index = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return index.mean(dim=(1, 2, 3))


# ----------------------------------------------------------------- torch-fidelity


class _Images(Dataset):
    """uint8 images held in memory, as torch-fidelity's input."""

    def __init__(self, images: torch.Tensor):
        self.images = images

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.images[index]


def fidelity_scores(
    generated: torch.Tensor,
    reference: torch.Tensor | None,
    setup: FeatureSetup,
    scores: set[str],
    *,
    reference_cache: str | None,
    cache_dir: Path,
    device: torch.device,
    seed: int,
    batch_size: int = 100,
) -> dict[str, float]:
    """Compute FID / KID / IS / precision-recall with torch-fidelity.

    Args:
        generated: uint8 RGB images ``(N, 3, H, W)`` (torch-fidelity's input 1).
        reference: uint8 RGB real images (input 2), needed by all but ``is``.
        setup: the prepared feature extractor.
        scores: any of ``fid``, ``kid``, ``is``, ``prc``.
        reference_cache: a name that identifies the reference set and the extractor's
            weights uniquely; its features and statistics are cached under it.
        cache_dir: the evaluation cache (torch-fidelity's cache goes in ``fidelity/``).
        device: where features are extracted (CUDA is used when it is a CUDA device).
        seed: torch-fidelity's ``rng_seed`` (KID subsets, IS splits).

    Returns:
        ``fid``, ``kid`` and ``kid_std``, ``is`` and ``is_std``, ``precision``,
        ``recall`` and ``f_score``, for the requested scores.
    """
    import torch_fidelity

    unknown = set(scores) - set(FIDELITY_FLAGS)
    if unknown:
        raise ValueError(f"unknown scores {sorted(unknown)}")
    if not scores:
        return {}
    n_gen = generated.shape[0]
    needs_reference = bool(set(scores) - {"is"})
    if needs_reference and reference is None:
        raise ValueError("FID, KID and precision/recall need reference images")
    n_ref = reference.shape[0] if reference is not None else n_gen
    kwargs: dict[str, Any] = dict(
        input1=_Images(generated),
        cuda=device.type == "cuda",
        batch_size=min(batch_size, n_gen),
        verbose=False,
        cache=True,
        cache_root=str(cache_dir / "fidelity"),
        save_cpu_ram=True,  # no DataLoader worker processes for images already in memory
        rng_seed=seed,
        kid_subset_size=min(1000, n_gen, n_ref),
        isc_splits=min(10, n_gen),
        samples_shuffle=True,
    )
    for score in scores:
        kwargs[FIDELITY_FLAGS[score]] = True
    if needs_reference:
        kwargs["input2"] = _Images(reference)
        if reference_cache is not None:
            kwargs["input2_cache_name"] = reference_cache
    kwargs.update(setup.fidelity_kwargs)
    try:
        with fork_rng(device):
            raw = torch_fidelity.calculate_metrics(**kwargs)
    except OSError as exc:  # a weights download that failed after all (network gone mid-run)
        raise CapsganError(
            f"torch-fidelity could not load the feature extractor ({setup.description}): {exc}. "
            "If this machine is offline, give a local weights file (see docs/metrics.md)."
        ) from None
    out: dict[str, float] = {}
    names = {
        "frechet_inception_distance": "fid",
        "kernel_inception_distance_mean": "kid",
        "kernel_inception_distance_std": "kid_std",
        "inception_score_mean": "is",
        "inception_score_std": "is_std",
        "precision": "precision",
        "recall": "recall",
        "f_score": "f_score",
    }
    for key, value in raw.items():
        if key in names:
            out[names[key]] = float(value) if math.isfinite(float(value)) else float("nan")
    return out


def conditional_accuracy(classifier, images: torch.Tensor, classes: torch.Tensor, batch_size: int = 100) -> float:
    """Return how often ``classifier`` (uint8 RGB -> logits) recognises the class each image was made for."""
    correct = 0
    with torch.no_grad():
        for start in range(0, images.shape[0], batch_size):
            logits = classifier(images[start:start + batch_size])
            correct += (logits.argmax(1).cpu() == classes[start:start + batch_size].cpu()).sum().item()
    return correct / max(images.shape[0], 1)
