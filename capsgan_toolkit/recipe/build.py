"""Turn a resolved recipe into live components: the one way anything is built.

Every component is made through :meth:`Registry.create` from the recipe's slot table
(:data:`capsgan_toolkit.interfaces.SLOTS`); after building, :func:`check_contracts` runs one
tiny batch through the parts and names the plugin whose output has the wrong shape, before
any run folder is made.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from capsgan_toolkit.errors import CapsganError, ContractError
from capsgan_toolkit.interfaces import SLOTS, DatasetInfo, DatasetPlugin, Gate
from capsgan_toolkit.objective import Objective, Parts
from capsgan_toolkit.recipe.schema import ResolvedRecipe
from capsgan_toolkit.step import distributed
from capsgan_toolkit.step.augment import Augmenter, wrap_dataset

_FAMILY = dict(SLOTS)


@dataclass
class Built:
    """Everything a recipe builds: data, parts, the objective that trains them, the gate."""

    resolved: ResolvedRecipe
    dataset: DatasetPlugin
    parts: Parts
    objective: Objective
    gate: Gate

    @property
    def info(self) -> DatasetInfo:
        return self.parts.info

    def modules(self) -> dict[str, nn.Module]:
        return self.parts.modules()

    @property
    def augment(self) -> Augmenter:
        """``built.augment(images, step)``: a training batch augmented as ``[augment]`` asks (identity without it)."""
        return Augmenter(self.resolved.recipe.augment, self.resolved.recipe.run.seed, distributed.current().rank)


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


def _origin(plugins, component) -> str:
    dist = getattr(plugins, "sources", {}).get(component.source)
    return f"{component.source}, {dist}" if dist else component.source


def create(plugins, resolved: ResolvedRecipe, key: str, **context: Any):
    """Build the component of recipe table ``key`` (``None`` if the recipe has none): the one way to build one.

    ``plugins`` is the loaded PluginSet (or its Registry); ``context`` goes to the constructor.

    Raises:
        CapsganError: the constructor failed; the message names the table, the plugin and its source.
    """
    spec = resolved.recipe.spec(key)
    if spec is None:
        return None
    family = "metric_features" if key.startswith("eval.features.") else _FAMILY[key]
    registry = getattr(plugins, "registry", plugins)  # a loaded PluginSet, or its Registry alone
    component = registry.get(family, spec.plugin)
    try:
        return registry.create(family, spec.plugin, resolved.params[key], **context)
    except CapsganError:
        raise
    except Exception as exc:
        raise CapsganError(
            f'{resolved.source}: building [{key}] (plugin "{spec.plugin}" from {_origin(plugins, component)}) '
            f"failed: {type(exc).__name__}: {exc}. Check the params in [{key}] of the recipe, or report it to "
            "the plugin's authors."
        ) from exc


def build(resolved: ResolvedRecipe, plugins, *, check: bool = True, dataset: DatasetPlugin | None = None) -> Built:
    """Build every component of the recipe, seeding the global RNGs with ``run.seed`` first.

    Args:
        resolved: the validated recipe.
        plugins: the loaded :class:`~capsgan_toolkit.plugin.manager.PluginSet`.
        check: run :func:`check_contracts` on the parts.
        dataset: use this data set instead of building the recipe's ``[data]`` (``capsgan bench``
            measures with a stand-in of the right shape when the data are not on disk).
    """
    run = resolved.recipe.run
    if run.threads:
        torch.set_num_threads(run.threads)
    seed_everything(run.seed)
    # [augment] crop: the models are built for, and every split serves, the centre crop (augment.CentreCropped)
    dataset = wrap_dataset(dataset if dataset is not None else create(plugins, resolved, "data"),
                           resolved.recipe.augment, resolved.source)
    info = dataset.info
    objective_cls = plugins.registry.get("objective", resolved.recipe.objective.plugin).cls
    objective_params = resolved.params["objective"]
    encoder = create(plugins, resolved, "encoder", image_shape=info.image_shape, num_classes=info.num_classes)
    rows, dim = (objective_cls.latent_shape(objective_params, info, encoder)
                 if hasattr(objective_cls, "latent_shape") else (info.num_classes, getattr(encoder, "capsule_dim", 16)))
    d_shape = (objective_cls.discriminator_shape(objective_params, info)
               if hasattr(objective_cls, "discriminator_shape") else info.image_shape)
    parts = Parts(
        info=info,
        encoder=encoder,
        generator=create(plugins, resolved, "generator", num_classes=rows, capsule_dim=dim,
                         image_shape=info.image_shape),
        discriminator=create(plugins, resolved, "discriminator", image_shape=d_shape),
        classification=create(plugins, resolved, "losses.classification"),
        reconstruction=create(plugins, resolved, "losses.reconstruction"),
        adversarial=create(plugins, resolved, "losses.adversarial"),
    )
    objective = create(plugins, resolved, "objective", parts=parts, weights=resolved.recipe.losses.weights())
    built = Built(resolved, dataset, parts, objective, create(plugins, resolved, "gate"))
    if check:
        check_contracts(built, plugins, latent=(rows, dim), disc_shape=d_shape)
    return built


def _violation(plugins, resolved, key: str, what: str) -> ContractError:
    spec = resolved.recipe.spec(key)
    component = plugins.registry.get(_FAMILY[key], spec.plugin)
    return ContractError(
        f'{resolved.source}: the {_FAMILY[key]} "{spec.plugin}" of [{key}] (from {_origin(plugins, component)}) '
        f"{what}. Nothing was trained and no run folder was made. Fix the plugin (its family's contract is in "
        "docs/writing-plugins.md) or choose another in the recipe."
    )


class BufferSnapshot:
    """A copy of every buffer (BatchNorm running statistics, counters) of ``modules``, to put back in place.

    Restored with ``copy_`` into the same tensors, so CUDA-graph captures that hold them stay valid.
    """

    def __init__(self, modules):
        self._pairs = [(b, b.detach().clone()) for m in modules for b in m.buffers()]

    @torch.no_grad()
    def restore(self) -> None:
        for live, saved in self._pairs:
            live.copy_(saved)


@torch.no_grad()
def check_contracts(built: Built, plugins, *, latent: tuple[int, int], disc_shape, batch: int = 2) -> None:
    """Run ``batch`` random inputs through each part, in eval and in training mode, and check the shapes returned.

    Both modes, because a model may take another path when training (dropout, BatchNorm batch statistics,
    a branch on ``self.training``). The check runs under ``no_grad`` with its own random generator; the
    global RNGs and every model's buffers (BatchNorm running statistics) are put back afterwards, so it
    changes no weight, statistic or RNG state.

    Raises:
        ContractError: naming the plugin, its source, the mode and the shape it returned.
    """
    p = built.parts
    modes = {name: m.training for name, m in p.modules().items()}
    buffers = BufferSnapshot(p.modules().values())  # parameters cannot change under no_grad; buffers can
    try:
        with torch.random.fork_rng(devices=[]):
            for training in (False, True):
                for m in p.modules().values():
                    m.train(training)
                _check_shapes(built, plugins, latent=latent, disc_shape=disc_shape, batch=batch,
                              mode="in training mode" if training else "in eval mode")
    finally:
        for name, m in p.modules().items():
            m.train(modes[name])
        buffers.restore()


def _check_shapes(built: Built, plugins, *, latent: tuple[int, int], disc_shape, batch: int, mode: str) -> None:
    p, resolved, info = built.parts, built.resolved, built.info
    gen = torch.Generator().manual_seed(0)
    if p.encoder is not None:
        images = torch.rand(batch, *info.image_shape, generator=gen) * 2 - 1
        out = _call(plugins, resolved, "encoder", p.encoder, images)
        want: tuple[int | None, ...] = (batch, info.num_classes, getattr(p.encoder, "capsule_dim", None))
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != want:
            raise _violation(plugins, resolved, "encoder", f"returned {_shape(out)} {mode} for {batch} images of "
                             f"shape {tuple(info.image_shape)}; the contract is (B, K, D) = {want} (K classes, D its "
                             "declared capsule_dim)")
    if p.generator is not None:
        z = torch.randn(batch, *latent, generator=gen)
        out = _call(plugins, resolved, "generator", p.generator, z)
        want = (batch, *info.image_shape)
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != want:
            raise _violation(plugins, resolved, "generator", f"returned {_shape(out)} {mode} for a latent of shape "
                             f"{tuple(z.shape)}; the contract is images (B, C, H, W) = {want}")
    if p.discriminator is not None:
        images = torch.rand(batch, *disc_shape, generator=gen) * 2 - 1
        out = _call(plugins, resolved, "discriminator", p.discriminator, images)
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != (batch,):
            raise _violation(plugins, resolved, "discriminator", f"returned {_shape(out)} {mode} for {batch} images; "
                             f"the contract is one logit per image, shape ({batch},)")


def _call(plugins, resolved, key, module, x):
    try:
        return module(x)
    except Exception as exc:
        raise _violation(plugins, resolved, key, f"failed on a batch of shape {tuple(x.shape)}: "
                         f"{type(exc).__name__}: {exc}") from exc


def _shape(out) -> str:
    return f"shape {tuple(out.shape)}" if isinstance(out, torch.Tensor) else f"a {type(out).__name__}"


def count_parameters(module: nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())
