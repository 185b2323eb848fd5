"""Contract checks of the model families: encoders, generators, discriminators.

Import them from :mod:`capsgan_toolkit.testing`; this module is their implementation.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from pydantic import BaseModel, ValidationError

from capsgan_toolkit.interfaces import Discriminator, Encoder, EncoderParams, Generator
from capsgan_toolkit.testing.base import (
    BAD_IMAGE_SHAPES,
    BATCH,
    IMAGE_SHAPES,
    _check_gradients,
    _check_input_gradient,
    _check_tensor,
    _Checker,
    _expect_raises_capsgan_error,
    _random_weights,
    _seed,
    _state_equal,
    check_params,
)

# ----------------------------------------------------------------------------- encoders


def check_encoder(encoder_cls: type[Encoder], params: Mapping[str, Any] | BaseModel | None = None, *,
                  image_shapes: Sequence[Sequence[int]] = IMAGE_SHAPES, num_classes: int = 10,
                  bad_image_shapes: Sequence[Sequence[int]] = BAD_IMAGE_SHAPES, seed: int = 0) -> None:
    """Check an encoder against the contract of :class:`~capsgan_toolkit.interfaces.Encoder`.

    For every image shape: it builds; ``capsule_dim`` is a positive int; images ``(B, C, H, W)``
    in ``[-1, 1]`` give finite capsules ``(B, K, D)`` with ``D = capsule_dim`` and finite,
    non-negative ``class_scores``; ``diagnostics`` is a dict of finite numbers; gradients reach
    every trainable parameter; the same seed builds the same weights and gives the same output
    (dropout included). Then: ``to_latent`` keeps all capsules (``latent = "all"``), only the
    true class's (``"true_class"``, the predicted one's without labels) or the predicted
    class's (``"predicted_class"``); the params round-trip (:func:`check_params`, base
    ``EncoderParams``); each of ``bad_image_shapes`` raises a CapsganError.

    Args:
        encoder_cls: the encoder class.
        params: its params (dict or instance); ``None``: the defaults.
        image_shapes: ``(C, H, W)`` shapes it must work with.
        num_classes: ``K``.
        bad_image_shapes: shapes it must refuse with a CapsganError (``()``: skip).
        seed: the seed of weights and inputs.

    Raises:
        ContractViolation: naming the check and the component.
    """
    chk = _Checker("check_encoder", "encoder", encoder_cls)
    chk.expect(isinstance(encoder_cls, type) and issubclass(encoder_cls, Encoder), "base class",
               "it does not subclass capsgan_toolkit.interfaces.Encoder")
    p = check_params(encoder_cls, params, base=EncoderParams)
    k = num_classes

    def build(shape, value=p):
        return encoder_cls(value, image_shape=shape, num_classes=k)

    for shape in image_shapes:
        shape = tuple(shape)
        chk.where = f"image shape {shape}"
        _seed(seed)
        with chk.running("build", f"building it with its params for {k} classes"):
            enc = build(shape)
        dim = getattr(enc, "capsule_dim", None)
        chk.expect(isinstance(dim, int) and not isinstance(dim, bool) and dim >= 1, "capsule_dim",
                   f"capsule_dim is {dim!r}; set self.capsule_dim (D, a positive int) in __init__ after "
                   "super().__init__(...)")
        chk.expect(tuple(enc.image_shape) == shape and enc.num_classes == k, "base class",
                   "image_shape or num_classes differ from what the engine passed: call "
                   "super().__init__(params, image_shape=image_shape, num_classes=num_classes)")
        images = torch.rand(BATCH, *shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1
        enc.train()
        _seed(seed + 1)
        with chk.running("forward", f"forward on images of shape {tuple(images.shape)}"):
            caps = enc(images)
        _check_tensor(chk, "shape", "the output", caps, (BATCH, k, dim))
        scores = enc.class_scores(caps)
        _check_tensor(chk, "shape", "class_scores(output)", scores, (BATCH, k))
        chk.expect(bool((scores >= 0).all()), "range", "class_scores(output) has negative scores")
        diag = getattr(enc, "diagnostics", None)
        chk.expect(isinstance(diag, dict), "diagnostics", f"diagnostics is {diag!r}, not a dict")
        for key, value in diag.items():
            chk.expect(isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value),
                       "diagnostics", f"diagnostics[{key!r}] is {value!r}; the contract is a finite Python number "
                       "(use float(...) or .item())")
        labels = torch.arange(BATCH) % k
        latent = enc.to_latent(caps, labels)
        _check_tensor(chk, "masking", "to_latent(output, labels)", latent, (BATCH, k, dim))
        loss = (caps * _random_weights(caps)).sum() + (latent * _random_weights(latent, 2)).sum()
        with chk.running("gradients", "backward from the output"):
            loss.backward()
        _check_gradients(chk, enc, "the encoder")

        outputs, states = [], []
        for _ in range(2):  # the same seed twice: the same weights, the same output (dropout included)
            _seed(seed)
            with chk.running("determinism", "building it again"):
                again = build(shape)
            again.train()
            _seed(seed + 1)
            with torch.no_grad():
                outputs.append(again(images))
            states.append(again.state_dict())
        chk.expect(_state_equal(*states), "determinism",
                   "two builds under the same seed have different weights: draw random numbers from torch, "
                   "numpy or random only (the engine seeds all three)")
        chk.expect(torch.equal(*outputs), "determinism",
                   "the same weights, input and seed give different outputs: use torch's random numbers only")
    chk.where = ""
    if image_shapes:
        _check_masking(chk, encoder_cls, p, tuple(image_shapes[0]), k)
    _expect_raises_capsgan_error(chk, lambda shape: build(shape), bad_image_shapes)


def _check_masking(chk: _Checker, encoder_cls, p: BaseModel, shape, k: int) -> None:
    field = type(p).model_fields.get("latent")
    if field is None:
        return
    gen = torch.Generator().manual_seed(3)
    dim = 4
    caps = torch.randn(BATCH, k, dim, generator=gen)
    labels = (torch.arange(BATCH) * 3 + 1) % k
    predicted = Encoder.class_scores(caps).argmax(1)
    if bool((predicted == labels).any()):  # make true and predicted class differ everywhere
        labels = (predicted + 1) % k

    def kept(index):
        mask = torch.nn.functional.one_hot(index, k).to(caps.dtype).unsqueeze(-1)
        return caps * mask

    for mode, want_labels, want_none in (("all", caps, caps), ("true_class", kept(labels), kept(predicted)),
                                         ("predicted_class", kept(predicted), kept(predicted))):
        try:
            q = type(p).model_validate({**p.model_dump(by_alias=True), "latent": mode})
        except ValidationError:
            continue  # the encoder does not offer this mode
        _seed(0)
        with chk.running("masking", f'building it with latent = "{mode}"'):
            enc = encoder_cls(q, image_shape=shape, num_classes=k)
        for given, want, how in ((labels, want_labels, "with labels"), (None, want_none, "without labels")):
            with chk.running("masking", f'to_latent (latent = "{mode}", {how})'):
                got = enc.to_latent(caps, given)
            chk.expect(isinstance(got, torch.Tensor) and got.shape == caps.shape and torch.allclose(got, want),
                       "masking", f'to_latent with latent = "{mode}" ({how}) does not keep '
                       + {"all": "every capsule", "true_class": "only the true class's capsule (the predicted "
                          "class's without labels)", "predicted_class": "only the predicted class's capsule"}[mode]
                       + ", zeroing the others")


# --------------------------------------------------------------------------- generators


def check_generator(generator_cls: type[Generator], params: Mapping[str, Any] | BaseModel | None = None, *,
                    image_shapes: Sequence[Sequence[int]] = IMAGE_SHAPES, num_classes: int = 10,
                    capsule_dim: int = 6, bad_image_shapes: Sequence[Sequence[int]] = BAD_IMAGE_SHAPES,
                    seed: int = 0) -> None:
    """Check a generator against the contract of :class:`~capsgan_toolkit.interfaces.Generator`.

    For every image shape: a latent ``(B, K, D)`` (also one masked to one class's row, as
    ``to_latent`` hands it over) gives finite images ``(B, C, H, W)`` in ``[-1, 1]``;
    gradients reach every trainable parameter and the latent (the encoder trains through the
    generator); the same seed gives the same weights and output. Then the params round-trip
    and each of ``bad_image_shapes`` raises a CapsganError.

    Raises:
        ContractViolation: naming the check and the component.
    """
    chk = _Checker("check_generator", "generator", generator_cls)
    chk.expect(isinstance(generator_cls, type) and issubclass(generator_cls, Generator), "base class",
               "it does not subclass capsgan_toolkit.interfaces.Generator")
    p = check_params(generator_cls, params)
    k, d = num_classes, capsule_dim

    def build(shape):
        return generator_cls(p, num_classes=k, capsule_dim=d, image_shape=shape)

    for shape in image_shapes:
        shape = tuple(shape)
        chk.where = f"image shape {shape}"
        _seed(seed)
        with chk.running("build", f"building it for a ({k}, {d}) latent"):
            gen = build(shape)
        chk.expect((gen.num_classes, gen.capsule_dim, tuple(gen.image_shape)) == (k, d, shape), "base class",
                   "num_classes, capsule_dim or image_shape differ from what the engine passed: call "
                   "super().__init__(params, num_classes=..., capsule_dim=..., image_shape=...)")
        gen.train()
        latent = torch.randn(BATCH, k, d, generator=torch.Generator().manual_seed(seed))
        latent[0, 1:] = 0  # one latent as to_latent masks it: only class 0's row
        latent.requires_grad_(True)
        _seed(seed + 1)
        with chk.running("forward", f"forward on a latent of shape {tuple(latent.shape)}"):
            images = gen(latent)
        _check_tensor(chk, "shape", "the output", images, (BATCH, *shape), (-1.0, 1.0))
        with chk.running("gradients", "backward from the output"):
            (images * _random_weights(images)).sum().backward()
        _check_gradients(chk, gen, "the generator")
        _check_input_gradient(chk, latent, "the latent")
        _check_rebuilds_identically(chk, build, shape, latent.detach(), seed)
    chk.where = ""
    _expect_raises_capsgan_error(chk, build, bad_image_shapes)


def _check_rebuilds_identically(chk, build, shape, inputs: torch.Tensor, seed: int) -> None:
    """Build twice under the same seed: the same weights, and the same output on ``inputs``."""
    outputs, states = [], []
    for _ in range(2):
        _seed(seed)
        again = build(shape).train()
        _seed(seed + 1)
        with torch.no_grad():
            outputs.append(again(inputs))
        states.append(again.state_dict())
    chk.expect(_state_equal(*states) and torch.equal(*outputs), "determinism",
               "two builds under the same seed differ in weights or output: use torch's random numbers only")


# ------------------------------------------------------------------------ discriminators


def check_discriminator(discriminator_cls: type[Discriminator], params: Mapping[str, Any] | BaseModel | None = None,
                        *, image_shapes: Sequence[Sequence[int]] = IMAGE_SHAPES,
                        bad_image_shapes: Sequence[Sequence[int]] = BAD_IMAGE_SHAPES, seed: int = 0) -> None:
    """Check a discriminator against the contract of :class:`~capsgan_toolkit.interfaces.Discriminator`.

    For every image shape: images ``(B, C, H, W)`` in ``[-1, 1]`` give finite logits ``(B,)``;
    gradients reach every trainable parameter and the images (the generator trains through
    the discriminator); the same seed gives the same weights and output. Then the params
    round-trip and each of ``bad_image_shapes`` raises a CapsganError.

    Raises:
        ContractViolation: naming the check and the component.
    """
    chk = _Checker("check_discriminator", "discriminator", discriminator_cls)
    chk.expect(isinstance(discriminator_cls, type) and issubclass(discriminator_cls, Discriminator), "base class",
               "it does not subclass capsgan_toolkit.interfaces.Discriminator")
    p = check_params(discriminator_cls, params)

    def build(shape):
        return discriminator_cls(p, image_shape=shape)

    for shape in image_shapes:
        shape = tuple(shape)
        chk.where = f"image shape {shape}"
        _seed(seed)
        with chk.running("build", "building it"):
            disc = build(shape)
        chk.expect(tuple(disc.image_shape) == shape, "base class",
                   "image_shape differs from what the engine passed: call super().__init__(params, image_shape=...)")
        disc.train()
        images = (torch.rand(BATCH, *shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1).requires_grad_(True)
        _seed(seed + 1)
        with chk.running("forward", f"forward on images of shape {tuple(images.shape)}"):
            logits = disc(images)
        _check_tensor(chk, "shape", "the output (one logit per image)", logits, (BATCH,))
        with chk.running("gradients", "backward from the output"):
            (logits * _random_weights(logits)).sum().backward()
        _check_gradients(chk, disc, "the discriminator")
        _check_input_gradient(chk, images, "the images")
        _check_rebuilds_identically(chk, build, shape, images.detach(), seed)
    chk.where = ""
    _expect_raises_capsgan_error(chk, build, bad_image_shapes)
