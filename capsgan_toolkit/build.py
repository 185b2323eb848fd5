"""Turn a resolved recipe into live components: data, models, losses, gate, optimizers."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from capsgan_toolkit.errors import CapsganError
from capsgan_toolkit.interfaces import DatasetInfo, DatasetPlugin, Encoder, Gate
from capsgan_toolkit.recipe import ResolvedRecipe
from capsgan_toolkit.registry import Registry


@dataclass
class Components:
    """Everything a recipe builds."""

    dataset: DatasetPlugin
    info: DatasetInfo
    encoder: Encoder
    generator: nn.Module
    discriminator: nn.Module | None
    classification: nn.Module
    reconstruction: nn.Module | None
    adversarial: nn.Module | None
    gate: Gate

    def modules(self) -> dict[str, nn.Module]:
        out = {"encoder": self.encoder, "generator": self.generator}
        if self.discriminator is not None:
            out["discriminator"] = self.discriminator
        return out


def pick_device(name: str) -> torch.device:
    """Return the device for ``auto``, ``cpu``, ``cuda`` or ``mps``, checking it exists."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise CapsganError('run.device = "cuda", but no CUDA GPU is available here. Use "auto" or "cpu".')
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise CapsganError('run.device = "mps", but Apple MPS is not available here. Use "auto" or "cpu".')
    return torch.device(name)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _create(registry: Registry, resolved: ResolvedRecipe, key: str, family: str, **context: Any):
    spec = {
        "data": resolved.recipe.data,
        "encoder": resolved.recipe.encoder,
        "generator": resolved.recipe.generator,
        "discriminator": resolved.recipe.discriminator,
        "gate": resolved.recipe.gate,
        "losses.classification": resolved.recipe.losses.classification,
        "losses.reconstruction": resolved.recipe.losses.reconstruction,
        "losses.adversarial": resolved.recipe.losses.adversarial,
    }[key]
    if spec is None:
        return None
    comp = registry.get(family, spec.plugin)
    try:
        return comp.cls(resolved.params[key], **context)
    except CapsganError:
        raise
    except Exception as exc:
        raise CapsganError(
            f'{resolved.source}: building {key} (plugin "{spec.plugin}" from {comp.source}) failed: '
            f"{type(exc).__name__}: {exc}. Check the params in [{key}] or report it to the plugin's authors."
        ) from exc


def build_components(resolved: ResolvedRecipe, registry: Registry) -> Components:
    """Build every component of the recipe; model weights are drawn from the seeded RNG."""
    dataset = _create(registry, resolved, "data", "dataset")
    info = dataset.info
    encoder = _create(registry, resolved, "encoder", "encoder", image_shape=info.image_shape, num_classes=info.num_classes)
    generator = _create(
        registry, resolved, "generator", "generator",
        num_classes=info.num_classes, capsule_dim=encoder.capsule_dim, image_shape=info.image_shape,
    )
    discriminator = None
    if resolved.recipe.losses.adversarial is not None:
        if resolved.recipe.discriminator is None:
            raise CapsganError(
                f"{resolved.source}: losses.adversarial is set but there is no [discriminator] table. "
                'Add one (for example plugin = "dcgan") or remove losses.adversarial for an L2-only generator.'
            )
        discriminator = _create(registry, resolved, "discriminator", "discriminator", image_shape=info.image_shape)
    return Components(
        dataset=dataset,
        info=info,
        encoder=encoder,
        generator=generator,
        discriminator=discriminator,
        classification=_create(registry, resolved, "losses.classification", "loss"),
        reconstruction=_create(registry, resolved, "losses.reconstruction", "loss"),
        adversarial=_create(registry, resolved, "losses.adversarial", "loss"),
        gate=_create(registry, resolved, "gate", "gate"),
    )


def count_parameters(module: nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())
