"""Built-in training objectives: the report's reconstruction GAN, its plain-DCGAN baseline, a classifier.

Registered names (family ``objective``):

- ``reconstruction_gan``: the source report's algorithm (section 6.2). The encoder's
  classification loss always trains it; after the gate's warm-up the generator
  reconstructs the image from the encoder's latent, the discriminator tells real from
  reconstructed images, and the generator loss (reconstruction + adversarial, weighted by
  ``losses.generator_weight``) joins the classification loss when the gate says so.
  Options, all off by default (docs/capsules.md, "Beyond the report"): a generation path
  the discriminator judges (images from latents drawn per class, VAE-GAN style), a
  class-consistency term judged by the frozen encoder (AC-GAN style), feature matching on
  the discriminator's features, an R1 penalty, the generator weight acting on the encoder
  alone, and the latent prior used for new images.
- ``dcgan``: the report's baseline, a plain DCGAN (Radford et al., 2016): noise -> generator
  vs discriminator, no encoder. Unconditional, or class-conditional (the noise fills only
  the class's row of a capsule-shaped latent, and the discriminator sees the class as
  one-hot planes beside the image, as in Mirza & Osindero's conditional GAN).
- ``classifier``: the encoder alone with its classification loss, for accuracy baselines.
"""

from __future__ import annotations

import contextlib
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from capsgan_plugins.losses import r1_penalty
from capsgan_toolkit import hookimpl
from capsgan_toolkit.catalogue import PriorKind
from capsgan_toolkit.errors import CapsganError, RecipeError
from capsgan_toolkit.evaluation.prior import (
    PRIOR_KINDS,
    LatentPrior,
    TrueSlotPrior,
    batch_prior_latents,
    encode_training_split,
    fit_latent_prior,
)
from capsgan_toolkit.interfaces import Params as ComponentParams
from capsgan_toolkit.interfaces import Phases
from capsgan_toolkit.objective import Objective, StepResult, Update


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


_MODULE_STATE = {"_parameters", "_buffers", "_modules", "_non_persistent_buffers_set", "training", "forward"}


@contextlib.contextmanager
def judging(encoder: nn.Module):
    """Use ``encoder`` as a fixed judge: gradients reach its input, and it is left exactly as it was.

    Its weights get no gradient (:func:`frozen`); its buffers (BatchNorm's running statistics)
    are swapped for copies during the call, so they do not move; attributes its forward sets
    (the capsnet's diagnostics of the training batch) are put back.
    """
    saved = [(m, name, b) for m in encoder.modules() for name, b in m._buffers.items() if b is not None]
    attributes = {k: v for k, v in vars(encoder).items() if k not in _MODULE_STATE}
    for m, name, b in saved:
        m._buffers[name] = b.clone()
    try:
        with frozen(encoder):
            yield
    finally:
        for m, name, b in saved:
            m._buffers[name] = b
        for key in [k for k in vars(encoder) if k not in _MODULE_STATE and k not in attributes]:
            del encoder.__dict__[key]
        encoder.__dict__.update(attributes)


class _ScaleGradient(torch.autograd.Function):
    """Identity forward; the backward multiplies the gradient by ``scale``."""

    @staticmethod
    def forward(ctx, x, scale: float):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


def scale_gradient(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Return ``x`` unchanged; the gradient flowing back through it is multiplied by ``scale``."""
    return _ScaleGradient.apply(x, scale)


def _projection_classes(discriminator) -> int | None:
    return getattr(discriminator, "projection_classes", None) if discriminator is not None else None


def _check_projection(objective: str, discriminator, num_classes: int) -> None:
    classes = _projection_classes(discriminator)
    if classes is not None and classes != num_classes:
        raise RecipeError(
            f"discriminator.projection_classes is {classes}, but the data set has {num_classes} classes: the "
            f"projection discriminator needs one embedding per class the {objective} objective judges. Set "
            f"discriminator.projection_classes = {num_classes}, or remove it for an unconditional discriminator.")


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
        # Every option is unset by default: an unset key is left out of the resolved recipe, so the
        # report's algorithm, the digests of existing runs and their resumes stay as they were.
        prior_adversarial_weight: float | None = Field(
            None, ge=0.0,
            description="Generation path (VAE-GAN, Larsen et al. 2016): the discriminator also judges images "
                        "generated from latents drawn per class from a Gaussian fitted to the batch's own detached "
                        "latents, and the generator's adversarial loss on them gets this weight. Unset: off.",
        )
        class_consistency_weight: float | None = Field(
            None, ge=0.0,
            description="Class consistency (AC-GAN style): the classification loss of the frozen encoder (its "
                        "weights get no gradient) on reconstructions and on images from the batch prior, with "
                        "this weight in the generator loss. Unset: off.",
        )
        feature_matching_weight: float | None = Field(
            None, ge=0.0,
            description="Reconstruction loss on the discriminator's features (Larsen et al. 2016): MSE between "
                        "the conv blocks' outputs for the reconstruction and its real image, averaged over "
                        "blocks, with this weight beside the pixel loss. Unset: off.",
        )
        r1_weight: float | None = Field(
            None, ge=0.0,
            description="R1 penalty (Mescheder et al. 2018): gamma / 2 * E|grad_x D(x)|^2 on real images in "
                        "the discriminator's loss, with gamma this weight. Unset: off.",
        )
        generator_weight_mode: Literal["shared", "encoder"] | None = Field(
            None,
            description='What losses.generator_weight scales. "shared" (unset: the report): the whole generator '
                        "loss in the one loss of the shared encoder+generator optimizer, whose Adam ignores a "
                        'constant scale on the generator\'s gradient; "encoder": only the generator loss\'s '
                        "gradient into the encoder, the generator trains on its unscaled loss.",
        )
        prior: PriorKind | None = Field(
            None,
            description='Latent prior for new images: "gaussian" (unset: one Gaussian per class), "true_slot" '
                        "(only the true class's capsule varies, the others at their class means; also the "
                        'generation path\'s batch prior), or "mixture" (a few Gaussians per class, seeded EM).',
        )
        prior_components: int | None = Field(
            None, ge=2, le=16, description='Gaussians per class of prior = "mixture" (unset: 3).',
        )
        prior_temperature: float | None = Field(
            None, gt=0, le=2,
            description="Spread of new images' latents around their class (or mixture component) mean, as a multiple "
                        "of the fitted spread, at evaluation and sampling (not the generation path's batch prior): "
                        "below 1 trades variety for class fidelity (a truncation). Unset: 1.",
        )

        @model_validator(mode="after")
        def _components_need_a_mixture(self):
            if self.prior_components is not None and self.prior != "mixture":
                raise ValueError(
                    f'prior_components ({self.prior_components}) sets the Gaussians per class of prior = "mixture", '
                    f"but prior is {self.prior or 'unset (gaussian)'}: set prior = \"mixture\" or remove "
                    "prior_components.")
            return self

    parts: ClassVar[dict[str, bool]] = {
        "encoder": True, "generator": True, "discriminator": False,
        "losses.classification": True, "losses.reconstruction": False, "losses.adversarial": False,
    }
    optimizers: ClassVar[dict[str, dict]] = {"encoder_generator": {"lr": 1e-4}, "discriminator": {"lr": 1e-5}}
    has_classifier = has_reconstruction = has_generation = True

    _NEEDS_DISCRIMINATOR = ("prior_adversarial_weight", "feature_matching_weight", "r1_weight")

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
        given = recipe.objective.params if recipe.objective is not None else {}
        if recipe.discriminator is None or losses.adversarial is None:
            for key in cls._NEEDS_DISCRIMINATOR:
                if given.get(key) is not None:
                    errors.append((f"objective.{key}", "needs a discriminator, and this recipe trains none: add "
                                   "[discriminator] and losses.adversarial, or remove objective." + key))
        return errors

    @staticmethod
    def latent_shape(params, info, encoder) -> tuple[int, int]:
        return info.num_classes, encoder.capsule_dim

    def __init__(self, params, *, parts, weights):
        super().__init__(params, parts=parts, weights=weights)
        self.prior: LatentPrior | None = None
        _check_projection("reconstruction_gan", parts.discriminator, parts.info.num_classes)
        if params.feature_matching_weight is not None and not hasattr(parts.discriminator, "forward_with_features"):
            raise RecipeError(
                "objective.feature_matching_weight matches the discriminator's intermediate features, and this "
                f"discriminator ({type(parts.discriminator).__name__}) has no forward_with_features(images, labels) "
                'method that returns them. Use the built-in discriminator (plugin = "dcgan") or remove '
                "objective.feature_matching_weight.")

    def optimizer_parameters(self):
        out = {"encoder_generator": list(self.p.encoder.parameters()) + list(self.p.generator.parameters())}
        out["discriminator"] = list(self.p.discriminator.parameters()) if self.p.discriminator is not None else []
        return out

    # -------------------------------------------------------------- one step

    def _judge(self, images: torch.Tensor, classes: torch.Tensor, *, eager: bool = False) -> torch.Tensor:
        """D's logits; a projection discriminator gets the classes.

        A call with keyword arguments is one ``speed.cuda_graphs`` runs eagerly (its graphs replace
        the instance's ``forward``): the class labels, and R1's input gradient (a double backward).
        """
        d = self.p.discriminator
        if _projection_classes(d) is not None:
            return d(images, labels=classes)
        return d(images=images) if eager and "forward" in vars(d) else d(images)

    def _judge_with_features(self, images: torch.Tensor, classes: torch.Tensor):
        d = self.p.discriminator
        return d.forward_with_features(images, classes if _projection_classes(d) is not None else None)

    def _latent_classes(self, capsules: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The class whose capsule the latent carries: the prediction with ``latent = "predicted_class"``."""
        if getattr(self.p.encoder.params, "latent", "all") == "predicted_class":
            return self.p.encoder.class_scores(capsules.detach()).argmax(1)
        return labels

    def step(self, images: torch.Tensor, labels: torch.Tensor, phases: Phases, update: Update) -> StepResult:
        p, w, o = self.p, self.weights, self.params
        capsules = p.encoder(images)
        terms = {"classification": p.classification(capsules, labels)}
        encoder_acc = (p.encoder.class_scores(capsules).argmax(1) == labels).float().mean()
        total, logged, disc_acc = terms["classification"], {}, None
        if not phases.warmup:
            latent = p.encoder.to_latent(capsules, labels)
            encoder_only = o.generator_weight_mode == "encoder"
            fake = p.generator(scale_gradient(latent, w["generator_weight"]) if encoder_only else latent)
            prior_fake = prior_classes = None
            judged_prior = o.prior_adversarial_weight is not None and p.discriminator is not None
            if judged_prior or (o.class_consistency_weight is not None and phases.generator):
                # New images from the batch's own latents: no gradient reaches the encoder through them.
                prior_classes = self._latent_classes(capsules, labels)
                prior_fake = p.generator(batch_prior_latents(latent, prior_classes, true_slot=o.prior == "true_slot"))
            if p.discriminator is not None:
                disc_acc = self._discriminator_step(images, labels, fake.detach(),
                                                    (prior_fake.detach(), prior_classes) if judged_prior else None,
                                                    phases.discriminator, update, logged)
            if phases.generator:
                gen = torch.zeros((), device=images.device)
                if p.reconstruction is not None:
                    terms["reconstruction"] = p.reconstruction(fake, images)
                    gen = gen + w["reconstruction_weight"] * terms["reconstruction"]
                if p.discriminator is not None:
                    with frozen(p.discriminator):  # D's weights get no gradient from the generator's step
                        gen = self._adversarial_terms(images, labels, fake, prior_fake, prior_classes, gen, terms)
                if o.class_consistency_weight is not None:
                    judged = torch.cat([p.generator(latent.detach()), prior_fake])
                    with judging(p.encoder):  # the encoder judges; it learns nothing from this term
                        scores = p.encoder(judged)
                    terms["class_consistency"] = p.classification(scores, torch.cat([labels, prior_classes]))
                    gen = gen + o.class_consistency_weight * terms["class_consistency"]
                total = total + (gen if encoder_only else w["generator_weight"] * gen)
        update("encoder_generator", total, terms)
        return _result({**logged, **terms}, encoder_acc, disc_acc)

    def _adversarial_terms(self, images, labels, fake, prior_fake, prior_classes, gen, terms) -> torch.Tensor:
        """Add the generator's adversarial terms (and feature matching) to ``gen``; D is frozen here."""
        p, w, o = self.p, self.weights, self.params
        if o.feature_matching_weight is None:
            terms["adversarial"] = p.adversarial.generator_loss(self._judge(fake, labels))
            gen = gen + w["adversarial_weight"] * terms["adversarial"]
        else:
            fake_logits, fake_maps = self._judge_with_features(fake, labels)
            with torch.no_grad():
                _, real_maps = self._judge_with_features(images, labels)
            terms["adversarial"] = p.adversarial.generator_loss(fake_logits)
            gen = gen + w["adversarial_weight"] * terms["adversarial"]
            terms["feature_matching"] = torch.stack([F.mse_loss(f, r) for f, r in zip(fake_maps, real_maps)]).mean()
            gen = gen + o.feature_matching_weight * terms["feature_matching"]
        if o.prior_adversarial_weight is not None:
            terms["prior_adversarial"] = p.adversarial.generator_loss(self._judge(prior_fake, prior_classes))
            gen = gen + o.prior_adversarial_weight * terms["prior_adversarial"]
        return gen

    def _discriminator_step(self, real, labels, fake, prior, train: bool, update: Update, logged: dict) -> torch.Tensor:
        r1 = train and self.params.r1_weight is not None
        with contextlib.nullcontext() if train else torch.no_grad():
            if r1:
                real = real.detach().requires_grad_(True)
            real_logits, fake_logits = self._judge(real, labels, eager=r1), self._judge(fake, labels)
            if prior is not None:  # the generation path: D judges the prior's images as fakes too
                fake_logits = torch.cat([fake_logits, self._judge(*prior)])
            if train:
                loss = self.p.adversarial.discriminator_loss(real_logits, fake_logits)
                d_terms = {"discriminator": loss}
                if r1:
                    d_terms["r1"] = r1_penalty(real_logits, real)
                    loss = loss + 0.5 * self.params.r1_weight * d_terms["r1"]
                update("discriminator", loss, d_terms)
                logged.update(d_terms)
        return _disc_accuracy(real_logits.detach(), fake_logits.detach())

    # -------------------------------------------------------------- a trained model

    def classify(self, images):
        return self.p.encoder.class_scores(self.p.encoder(images))

    def reconstruct(self, images):
        return self.p.generator(self.p.encoder.to_latent(self.p.encoder(images)))

    def classify_and_reconstruct(self, images):
        capsules = self.p.encoder(images)  # one encoder pass for both
        return self.p.encoder.class_scores(capsules), self.p.generator(self.p.encoder.to_latent(capsules))

    def prepare_generation(self, train_split, *, limit, seed, batch_size, device, progress=None, prior=None,
                           prior_components=None, prior_temperature=None):
        """Fit the latent prior (``prior``, else ``objective.prior``, else ``gaussian``) on training images.

        A mixture has ``prior_components`` Gaussians per class, else ``objective.prior_components``, else 3.
        It draws at ``prior_temperature``, else ``objective.prior_temperature``.
        """
        from capsgan_toolkit.evaluation.evaluator import fit_prior

        kind = prior or self.params.prior or "gaussian"
        temperature = prior_temperature or self.params.prior_temperature or 1.0
        if kind not in PRIOR_KINDS:
            raise CapsganError(f"Unknown latent prior {kind!r}; the priors are {', '.join(PRIOR_KINDS)}.")
        if kind == "mixture":
            vectors, classes, mode = encode_training_split(self.p.encoder, train_split, limit=limit, seed=seed,
                                                           batch_size=batch_size, device=device, progress=progress)
            self.prior = fit_latent_prior(kind, vectors, classes, num_classes=self.p.info.num_classes,
                                          capsule_dim=self.p.encoder.capsule_dim, mode=mode,
                                          components=prior_components or self.params.prior_components or 3,
                                          seed=seed + 3, temperature=temperature)
            return
        gaussian = fit_prior(self.p.encoder, train_split, limit=limit, seed=seed, batch_size=batch_size,
                             device=device, num_classes=self.p.info.num_classes, progress=progress)
        self.prior = TrueSlotPrior(gaussian) if kind == "true_slot" else gaussian
        self.prior.temperature = temperature

    @property
    def fitted_classes(self) -> list[int]:
        return self.prior.fitted_classes

    @property
    def generation_description(self) -> str:
        return self.prior.describe()

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

    def __init__(self, params, *, parts, weights):
        super().__init__(params, parts=parts, weights=weights)
        if _projection_classes(parts.discriminator) is not None and not params.conditional:
            raise RecipeError(
                "discriminator.projection_classes makes the discriminator judge each image as an image of a class, "
                "and the unconditional dcgan objective's images have no class. Set objective.conditional = true, "
                "or remove discriminator.projection_classes.")
        _check_projection("dcgan", parts.discriminator, parts.info.num_classes)

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
        if _projection_classes(self.p.discriminator) is not None:
            return self.p.discriminator(images, labels=classes)
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
