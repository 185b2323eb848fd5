"""Image-quality numbers: pixel metrics, and FID / KID / IS / precision-recall via torch-fidelity.

Every score is computed on uint8 RGB images (grayscale replicated to three channels),
the format torch-fidelity's feature extractors are defined on, so a number here means
the same as one computed from PNG files. Reference features are cached on disk under a
name that holds everything they depend on (data set, split, subset size and seed,
feature network), so a changed protocol can never reuse a stale cache.

Metric names, units and directions are in :mod:`capsgan_toolkit.catalogue`; long waits
show through :mod:`capsgan_toolkit.progress`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from capsgan_toolkit.catalogue import KID_SUBSETS, is_splits, kid_subset_size
from capsgan_toolkit.errors import CapsganError
from capsgan_toolkit.interfaces import FeatureSetup
from capsgan_toolkit.progress import Progress
from capsgan_toolkit.rundir.reporting import to_uint8

FIDELITY_RESULTS = (
    "frechet_inception_distance", "kernel_inception_distance_mean", "kernel_inception_distance_std",
    "inception_score_mean", "inception_score_std", "precision", "recall", "f_score",
)
"""torch-fidelity's names of the values :func:`fidelity_scores` returns."""


def cache_root(configured: str = "") -> Path:
    """Return the evaluation cache folder: ``configured``, else $CAPSGAN_CACHE, else ~/.cache/capsgan."""
    if configured:
        return Path(configured).expanduser()
    env = os.environ.get("CAPSGAN_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "capsgan"


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


def recon_mse01(reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image reconstruction MSE with pixels in [0, 1] (inputs in [-1, 1]), float64: the one MSE definition.

    ``capsgan eval``'s ``rec_mse…`` and the training row's ``test_rec_mse01`` are this
    value averaged over images (``.sum()`` it to accumulate over batches). In [-1, 1]
    units it would be four times larger.
    """
    return (_unit(reconstruction) - _unit(target)).pow(2).mean(dim=(1, 2, 3))


PSNR_CEILING_DB = 100.0
"""PSNR of identical images (an MSE of 1e-10)."""


def psnr(reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB with pixels in [0, 1], by torchmetrics' ``peak_signal_noise_ratio`` (data range 1).

    Identical images (torchmetrics: infinite) give 100 dB, the value of an MSE of 1e-10.
    """
    from torchmetrics.functional.image import peak_signal_noise_ratio

    value = peak_signal_noise_ratio(_unit(reconstruction), _unit(target), data_range=1.0, reduction="none",
                                    dim=(1, 2, 3))
    return value.double().clamp(max=PSNR_CEILING_DB)


def ssim_window(height: int, width: int, *, window: int = 11, sigma: float = 1.5) -> tuple[int, float]:
    """The Gaussian window SSIM uses on ``height x width`` images: (taps, sigma).

    11 taps at sigma 1.5; an image smaller than that gets the largest odd window that fits, its sigma
    shrunk in proportion (torchmetrics derives the taps from sigma: ``2 * int(3.5 * sigma + 0.5) + 1``).
    """
    size = min(window, height, width)
    size -= (size + 1) % 2  # an odd window keeps it centred
    return size, (sigma if size == window else sigma * size / window)


def ssim(reconstruction: torch.Tensor, target: torch.Tensor, *, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Per-image SSIM (Wang et al. 2004) with pixels in [0, 1], by torchmetrics.

    torchmetrics' ``structural_similarity_index_measure`` (Gaussian window, 11 taps, sigma 1.5; see
    :func:`ssim_window` for smaller images; K1 = 0.01, K2 = 0.03), its SSIM map averaged over the valid
    region only (the positions whose window lies inside the image: torchmetrics' own average also counts
    the windows over its reflect padding), then over channels. In float32: within 1e-6 of float64 on random
    images, up to 9e-4 on flat backgrounds (docs/metrics.md); torchmetrics in float64 takes about fourteen
    times as long on a CPU.
    """
    from torchmetrics.functional.image import structural_similarity_index_measure

    x, y = _unit(reconstruction).float(), _unit(target).float()
    size, s = ssim_window(x.shape[-2], x.shape[-1], window=window, sigma=sigma)
    _, full = structural_similarity_index_measure(x, y, gaussian_kernel=True, sigma=s, kernel_size=size,
                                                  data_range=1.0, k1=0.01, k2=0.03, reduction="none",
                                                  return_full_image=True)
    pad = (size - 1) // 2
    valid = full[..., pad:full.shape[-2] - pad, pad:full.shape[-1] - pad]
    return valid.double().mean(dim=(1, 2, 3))


# ----------------------------------------------------------------- torch-fidelity


class _Images(Dataset):
    """uint8 images held in memory, as torch-fidelity's input; ``seen`` is called per image read."""

    def __init__(self, images: torch.Tensor, seen: Callable[[int], None] | None = None):
        self.images = images
        self.seen = seen

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> torch.Tensor:
        if self.seen is not None:
            self.seen(1)
        return self.images[index]


def fidelity_scores(
    generated: torch.Tensor,
    reference: torch.Tensor | None,
    setup: FeatureSetup,
    flags: set[str],
    *,
    reference_cache: str | None,
    cache_dir: Path,
    device: torch.device,
    seed: int,
    batch_size: int = 100,
    kid_subset: int | None = None,
    progress: Progress | None = None,
    description: str = "features",
) -> dict[str, float]:
    """Compute FID / KID / IS / precision-recall with torch-fidelity.

    Args:
        generated: uint8 RGB images ``(N, 3, H, W)`` (torch-fidelity's input 1).
        reference: uint8 RGB real images (input 2), needed by all but ``isc``.
        setup: the prepared feature extractor.
        flags: torch-fidelity's metric flags: any of ``fid``, ``kid``, ``isc``, ``prc``
            (:data:`capsgan_toolkit.catalogue.FIDELITY_FLAGS` maps request names to them).
        reference_cache: a name that identifies the reference set and the extractor's
            weights uniquely; its features and statistics are cached under it.
        cache_dir: the evaluation cache (torch-fidelity's cache goes in ``fidelity/``).
        device: where features are extracted (CUDA is used when it is a CUDA device).
        seed: torch-fidelity's ``rng_seed`` (KID subsets, IS splits).
        kid_subset: KID's subset size (default :func:`~capsgan_toolkit.catalogue.kid_subset_size`).
        progress: shows a bar while images go through the feature network.
        description: the bar's text.

    Returns:
        torch-fidelity's values by its own names (:data:`FIDELITY_RESULTS`), for the
        requested flags; a non-finite value becomes NaN.
    """
    import torch_fidelity

    unknown = set(flags) - {"fid", "kid", "isc", "prc"}
    if unknown:
        raise ValueError(f"unknown torch-fidelity flags {sorted(unknown)}")
    if not flags:
        return {}
    n_gen = generated.shape[0]
    needs_reference = bool(set(flags) - {"isc"})
    if needs_reference and reference is None:
        raise ValueError("FID, KID and precision/recall need reference images")
    n_ref = reference.shape[0] if reference is not None else n_gen
    progress = progress or Progress()
    with progress.task(description, n_gen + (n_ref if needs_reference else 0)) as advance:
        kwargs: dict[str, Any] = dict(
            input1=_Images(generated, advance),
            cuda=device.type == "cuda",
            batch_size=min(batch_size, n_gen),
            verbose=False,
            cache=True,
            cache_root=str(cache_dir / "fidelity"),
            save_cpu_ram=True,  # no DataLoader worker processes for images already in memory
            rng_seed=seed,
            kid_subsets=KID_SUBSETS,
            kid_subset_size=kid_subset or kid_subset_size(n_gen, n_ref),
            isc_splits=is_splits(n_gen),
            samples_shuffle=True,
        )
        for flag in flags:
            kwargs[flag] = True
        if needs_reference:
            kwargs["input2"] = _Images(reference, advance)  # a cached reference is not read again
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
    return {key: float(value) if math.isfinite(float(value)) else float("nan")
            for key, value in raw.items() if key in FIDELITY_RESULTS}


def conditional_accuracy(classifier, images: torch.Tensor, classes: torch.Tensor, batch_size: int = 100) -> float:
    """Return how often ``classifier`` (uint8 RGB -> logits) says ``classes``: the class each image was made for
    (``gen_condacc``) or the true class of the image it reconstructs (``rec_acc``)."""
    correct = 0
    with torch.no_grad():
        for start in range(0, images.shape[0], batch_size):
            logits = classifier(images[start:start + batch_size])
            correct += (logits.argmax(1).cpu() == classes[start:start + batch_size].cpu()).sum().item()
    return correct / max(images.shape[0], 1)
