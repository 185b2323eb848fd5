"""Built-in training objectives: the report's reconstruction GAN, its plain-DCGAN baseline, a classifier.

Registered names (family ``objective``):

- ``reconstruction_gan``: the source report's algorithm (section 6.2). The encoder's
  classification loss always trains it; after the gate's warm-up the generator
  reconstructs the image from the encoder's latent, the discriminator tells real from
  reconstructed images, and the generator loss (reconstruction + adversarial, weighted by
  ``losses.generator_weight``) joins the classification loss when the gate says so.
- ``dcgan``: the report's baseline, a plain DCGAN (Radford et al., 2016): noise -> generator
  vs discriminator, no encoder. Unconditional, or class-conditional (the noise fills only
  the class's row of a capsule-shaped latent, and the discriminator sees the class as
  one-hot planes beside the image, as in Mirza & Osindero's conditional GAN).
- ``classifier``: the encoder alone with its classification loss, for accuracy baselines.
"""

from __future__ import annotations

import contextlib
from typing import ClassVar

import torch
from pydantic import Field
from torch import nn

from capsgan_toolkit import hookimpl
from capsgan_toolkit.interfaces import Params as ComponentParams
from capsgan_toolkit.interfaces import Phases
from capsgan_toolkit.objective import Objective, StepResult, Update
from capsgan_toolkit.evaluation.prior import ClassGaussianPrior


@contextlib.contextmanager
def frozen(module: nn.Module | None):
    """Let gradients flow through ``module`` to its input without computing its weights' gradients."""
    if module is None:
        yield
        return
    flags = [p.requires_grad for p in module.parameters()]
    for p in module.parameters():
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(module.parameters(), flags):
            p.requires_grad_(flag)


def _disc_accuracy(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """The discriminator's batch accuracy, left on the device (:func:`_result` reads it)."""
    return 0.5 * ((real_logits > 0).float().mean() + (fake_logits < 0).float().mean())


def _result(values: dict[str, torch.Tensor], encoder_acc: torch.Tensor | None = None,
            disc_acc: torch.Tensor | None = None) -> StepResult:
    """A step's :class:`StepResult`, every number read from the device at once.

    Each ``.item()`` waits for the GPU to finish its queue, and the queue then runs dry while
    Python issues the next kernels; one read per step instead of one per number keeps it fed.
    """
    accs = {"encoder_acc": encoder_acc, "disc_acc": disc_acc}
    accs = {k: t for k, t in accs.items() if t is not None}
    tensors = [v.detach().float().reshape(()) for v in values.values()] + [t.reshape(()) for t in accs.values()]
    numbers = torch.stack(tensors).tolist() if tensors else []
    return StepResult(values=dict(zip(values, numbers)), **dict(zip(accs, numbers[len(values):])))


def _batched(fn, tensor: torch.Tensor, device: torch.device, batch_size: int = 128) -> torch.Tensor:
    return torch.cat([fn(tensor[i:i + batch_size].to(device)).float().cpu()
                      for i in range(0, tensor.shape[0], batch_size)])


def _device(objective: Objective) -> torch.device:
    return next(next(iter(objective.modules().values())).parameters()).device


# ------------------------------------------------------------------ reconstruction GAN


class ReconstructionGAN(Objective):
    """The report's algorithm: capsule/CNN encoder -> generator reconstructs -> discriminator judges."""

    class Params(ComponentParams):
        pass

    parts: ClassVar[dict[str, bool]] = {
        "encoder": True, "generator": True, "discriminator": False,
        "losses.classification": True, "losses.reconstruction": False, "losses.adversarial": False,
    }
    optimizers: ClassVar[dict[str, dict]] = {"encoder_generator": {"lr": 1e-4}, "discriminator": {"lr": 1e-5}}
    has_classifier = has_reconstruction = has_generation = True

    @classmethod
    def check_recipe(cls, recipe) -> list[tuple[str, str]]:
        losses, errors = recipe.losses, []
        if losses.reconstruction is None and losses.adversarial is None:
            errors.append(("losses", "give at least one of losses.reconstruction and losses.adversarial"))
        if losses.adversarial is not None and recipe.discriminator is None:
            errors.append(("discriminator", 'losses.adversarial is set but there is no [discriminator] table. Add one '
                           '(for example plugin = "dcgan") or remove losses.adversarial for an L2-only generator'))
        if losses.adversarial is None and recipe.discriminator is not None:
            errors.append(("discriminator", "there is a [discriminator] but no losses.adversarial to train it with; "
                           "add losses.adversarial or remove [discriminator]"))
        return errors

    @staticmethod
    def latent_shape(params, info, encoder) -> tuple[int, int]:
        return info.num_classes, encoder.capsule_dim

    def __init__(self, params, *, parts, weights):
        super().__init__(params, parts=parts, weights=weights)
        self.prior: ClassGaussianPrior | None = None

    def optimizer_parameters(self):
        out = {"encoder_generator": list(self.p.encoder.parameters()) + list(self.p.generator.parameters())}
        out["discriminator"] = list(self.p.discriminator.parameters()) if self.p.discriminator is not None else []
        return out

    def step(self, images: torch.Tensor, labels: torch.Tensor, phases: Phases, update: Update) -> StepResult:
        p, w = self.p, self.weights
        capsules = p.encoder(images)
        terms = {"classification": p.classification(capsules, labels)}
        encoder_acc = (p.encoder.class_scores(capsules).argmax(1) == labels).float().mean()
        total, logged, disc_acc = terms["classification"], {}, None
        if not phases.warmup:
            fake = p.generator(p.encoder.to_latent(capsules, labels))
            if p.discriminator is not None:
                disc_acc = self._discriminator_step(images, fake.detach(), phases.discriminator, update, logged)
            if phases.generator:
                gen = torch.zeros((), device=images.device)
                if p.reconstruction is not None:
                    terms["reconstruction"] = p.reconstruction(fake, images)
                    gen = gen + w["reconstruction_weight"] * terms["reconstruction"]
                if p.discriminator is not None:
                    with frozen(p.discriminator):  # D's weights get no gradient from the generator's step
                        terms["adversarial"] = p.adversarial.generator_loss(p.discriminator(fake))
                    gen = gen + w["adversarial_weight"] * terms["adversarial"]
                total = total + w["generator_weight"] * gen
        update("encoder_generator", total, terms)
        return _result({**logged, **terms}, encoder_acc, disc_acc)

    def _discriminator_step(self, real, fake, train: bool, update: Update, logged: dict) -> torch.Tensor:
        d = self.p.discriminator
        with contextlib.nullcontext() if train else torch.no_grad():
            real_logits, fake_logits = d(real), d(fake)
            if train:
                loss = self.p.adversarial.discriminator_loss(real_logits, fake_logits)
                update("discriminator", loss, {"discriminator": loss})
                logged["discriminator"] = loss
        return _disc_accuracy(real_logits.detach(), fake_logits.detach())

    # -------------------------------------------------------------- a trained model

    def classify(self, images):
        return self.p.encoder.class_scores(self.p.encoder(images))

    def reconstruct(self, images):
        return self.p.generator(self.p.encoder.to_latent(self.p.encoder(images)))

    def prepare_generation(self, train_split, *, limit, seed, batch_size, device, progress=None):
        from capsgan_toolkit.evaluation.evaluator import fit_prior

        self.prior = fit_prior(self.p.encoder, train_split, limit=limit, seed=seed, batch_size=batch_size,
                               device=device, num_classes=self.p.info.num_classes, progress=progress)

    @property
    def fitted_classes(self) -> list[int]:
        return self.prior.fitted_classes

    @property
    def generation_description(self) -> str:
        return (f"class_gaussian latent prior, {self.prior.mode} mode, fitted on "
                f"{int(self.prior.counts.sum())} training images")

    def sample_latents(self, classes, generator):
        if self.prior is None:
            raise RuntimeError("call prepare_generation first")
        return self.prior.sample(classes, generator)

    def generate(self, classes, generator):
        return _batched(self.p.generator, self.sample_latents(classes, generator), _device(self))


# ------------------------------------------------------------------ plain DCGAN


class DCGANObjective(Objective):
    """The report's baseline: a plain DCGAN, noise -> generator vs discriminator, no encoder."""

    class Params(ComponentParams):
        latent_rows: int = Field(10, ge=1, description="Rows K of the (K, D) noise latent (unconditional).")
        latent_dim: int = Field(10, ge=1, description="Columns D of the (K, D) noise latent; K x D = DCGAN's z (100).")
        conditional: bool = Field(
            False, description="Class-conditional: noise fills only the class's row of a (classes, D) latent, "
                               "and the discriminator sees the class as one-hot planes beside the image.",
        )

    parts: ClassVar[dict[str, bool]] = {"generator": True, "discriminator": True, "losses.adversarial": True}
    optimizers: ClassVar[dict[str, dict]] = {"generator": {"lr": 2e-4, "betas": (0.5, 0.999)},
                                             "discriminator": {"lr": 2e-4, "betas": (0.5, 0.999)}}
    has_generation = True

    @staticmethod
    def latent_shape(params, info, encoder) -> tuple[int, int]:
        return (info.num_classes if params.conditional else params.latent_rows), params.latent_dim

    @staticmethod
    def discriminator_shape(params, info) -> tuple[int, int, int]:
        c, h, w = info.image_shape
        return (c + info.num_classes, h, w) if params.conditional else (c, h, w)

    @property
    def conditional(self) -> bool:
        return self.params.conditional

    def optimizer_parameters(self):
        return {"generator": list(self.p.generator.parameters()),
                "discriminator": list(self.p.discriminator.parameters())}

    def sample_latents(self, classes, generator=None):
        k, d = self.latent_shape(self.params, self.p.info, None)
        device = classes.device
        z = torch.randn(classes.shape[0], k, d, generator=generator, device=None if generator else device)
        z = z.to(device)
        if self.params.conditional:
            z = z * nn.functional.one_hot(classes, k).to(z.dtype).unsqueeze(-1)
        return z

    def _judge(self, images, classes):
        if self.params.conditional:
            planes = nn.functional.one_hot(classes, self.p.info.num_classes).to(images.dtype)
            planes = planes[:, :, None, None].expand(-1, -1, *images.shape[2:])
            images = torch.cat([images, planes], dim=1)
        return self.p.discriminator(images)

    def step(self, images, labels, phases, update) -> StepResult:
        p, logged = self.p, {}
        fake = p.generator(self.sample_latents(labels))  # fake classes = the batch's classes
        with contextlib.nullcontext() if phases.discriminator else torch.no_grad():
            real_logits, fake_logits = self._judge(images, labels), self._judge(fake.detach(), labels)
            if phases.discriminator:
                loss = p.adversarial.discriminator_loss(real_logits, fake_logits)
                update("discriminator", loss, {"discriminator": loss})
                logged["discriminator"] = loss
        disc_acc = _disc_accuracy(real_logits.detach(), fake_logits.detach())
        if phases.generator and not phases.warmup:
            with frozen(p.discriminator):
                loss = p.adversarial.generator_loss(self._judge(fake, labels))
            update("generator", loss, {"adversarial": loss})
            logged["adversarial"] = loss
        return _result(logged, disc_acc=disc_acc)

    def generate(self, classes, generator):
        return _batched(self.p.generator, self.sample_latents(classes, generator), _device(self))

    @property
    def generation_description(self) -> str:
        k, d = self.latent_shape(self.params, self.p.info, None)
        kind = "class-conditional, noise in the class's row" if self.params.conditional else "unconditional"
        return f"standard normal noise latent ({k} x {d}, {kind})"


# ------------------------------------------------------------------ encoder only


class ClassifierObjective(Objective):
    """The encoder alone, trained with its classification loss (an accuracy baseline)."""

    class Params(ComponentParams):
        pass

    parts: ClassVar[dict[str, bool]] = {"encoder": True, "losses.classification": True}
    optimizers: ClassVar[dict[str, dict]] = {"encoder": {"lr": 1e-3, "betas": (0.9, 0.999)}}
    has_classifier = True

    def optimizer_parameters(self):
        return {"encoder": list(self.p.encoder.parameters())}

    def step(self, images, labels, phases, update) -> StepResult:
        capsules = self.p.encoder(images)
        loss = self.p.classification(capsules, labels)
        update("encoder", loss, {"classification": loss})
        acc = (self.p.encoder.class_scores(capsules).argmax(1) == labels).float().mean()
        return _result({"classification": loss}, encoder_acc=acc)

    def classify(self, images):
        return self.p.encoder.class_scores(self.p.encoder(images))


@hookimpl
def capsgan_register(registry):
    """Register the built-in objectives."""
    registry.register("objective", "reconstruction_gan", ReconstructionGAN)
    registry.register("objective", "dcgan", DCGANObjective)
    registry.register("objective", "classifier", ClassifierObjective)
