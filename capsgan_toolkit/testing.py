"""Contract checks for components: call them from a plugin's own pytest suite.

Each family has one check that builds the component with tiny inputs and asserts what
the engine relies on: shapes, value ranges, finite values, gradients that reach every
trainable parameter, the latent masking modes, determinism under a seed, a params model
that round-trips and rejects unknown keys, and clear errors for image shapes the
component cannot work with. The toolkit's own tests run the same checks on every
built-in component, so the contract lives in one place::

    from capsgan_toolkit.testing import check_encoder

    from my_package import MyEncoder

    def test_my_encoder_meets_the_contract():
        check_encoder(MyEncoder, {"hidden": 8})

A failed check raises :class:`ContractViolation` (an ``AssertionError``, so pytest shows
it as a test failure) whose message names the check, the component and what was wrong::

    check_encoder: encoder my_package.MyEncoder, image shape (1, 28, 28), check "gradients":
    no gradient reaches parameter "head.weight" ...

Public API:

- :func:`check_params`: the params model alone (used by every check below).
- :func:`check_encoder`, :func:`check_generator`, :func:`check_discriminator`.
- :func:`check_classification_loss`, :func:`check_reconstruction_loss`,
  :func:`check_adversarial_loss`.
- :func:`check_gate`, :func:`check_dataset`.
- :func:`check_objective`: builds a tiny recipe around the objective (built-in parts, the
  glyphs data set), checks the parts' contracts the way the engine does
  (:func:`capsgan_toolkit.build.check_contracts`) and trains two steps.
- :func:`check_component`: any of the above by family name (:data:`CHECKS`).

Every check runs on the CPU and takes at most a few seconds with small params; pass
params that keep the component small (few channels).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import tempfile
import tomllib
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from pydantic import BaseModel, ValidationError

from capsgan_toolkit.errors import CapsganError
from capsgan_toolkit.interfaces import (
    AdversarialLoss, ClassificationLoss, DatasetInfo, DatasetParams, DatasetPlugin, Discriminator, Encoder,
    EncoderParams, Gate, Generator, Params, Phases, ReconstructionLoss, TrainState,
)

__all__ = [
    "BAD_IMAGE_SHAPES",
    "CHECKS",
    "ContractViolation",
    "IMAGE_SHAPES",
    "check_adversarial_loss",
    "check_classification_loss",
    "check_component",
    "check_dataset",
    "check_discriminator",
    "check_encoder",
    "check_gate",
    "check_generator",
    "check_objective",
    "check_params",
    "check_reconstruction_loss",
]

IMAGE_SHAPES: tuple[tuple[int, int, int], ...] = ((1, 28, 28), (3, 32, 32))
"""Image shapes ``(C, H, W)`` the image checks use by default: MNIST-like grey and CIFAR-like RGB."""

BAD_IMAGE_SHAPES: tuple[tuple[int, ...], ...] = ((28, 28), (1, 0, 28), (0, 28, 28))
"""Image shapes no component can work with; building one with them must raise a CapsganError."""

BATCH = 3
"""Images per checked batch: odd, and unlike the usual class counts and capsule sizes, so a
transposed dimension cannot go unnoticed."""

_UNKNOWN_KEY = "no_such_param_capsgan_kit"


class ContractViolation(AssertionError):
    """A component breaks its family's contract.

    Attributes:
        check: the check that failed, e.g. ``"gradients"``.
        component: the component, e.g. ``"encoder my_package.MyEncoder"``.
    """

    def __init__(self, message: str, *, check: str, component: str):
        super().__init__(message)
        self.check = check
        self.component = component


# ------------------------------------------------------------------------------ helpers


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


class _Checker:
    """Names failures: ``check_encoder: encoder pkg.Cls, image shape (1, 28, 28), check "gradients": ...``."""

    def __init__(self, function: str, family: str, cls: type):
        self.function = function
        self.component = f"{family} {_qualname(cls)}"
        self.where = ""

    def fail(self, check: str, detail: str) -> ContractViolation:
        where = f", {self.where}" if self.where else ""
        return ContractViolation(f'{self.function}: {self.component}{where}, check "{check}": {detail}',
                                 check=check, component=self.component)

    def expect(self, condition: bool, check: str, detail: str) -> None:
        if not condition:
            raise self.fail(check, detail)

    @contextlib.contextmanager
    def running(self, check: str, what: str) -> Iterator[None]:
        """Turn an exception raised while doing ``what`` into a violation of ``check``."""
        try:
            yield
        except ContractViolation:
            raise
        except Exception as exc:
            raise self.fail(check, f"{what} raised {type(exc).__name__}: {exc}") from exc


def _seed(seed: int) -> None:
    from capsgan_toolkit.build import seed_everything

    seed_everything(seed)


def _params_model(cls: type) -> type[BaseModel]:
    model = getattr(cls, "Params", None)
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        raise AssertionError(f"{_qualname(cls)} has no pydantic Params model (got {model!r}); declare a nested "
                             "class Params subclassing capsgan_toolkit.interfaces.Params (or its family's base).")
    return model


def _validated(chk: _Checker, model: type[BaseModel], params: Mapping[str, Any] | BaseModel | None) -> BaseModel:
    if isinstance(params, model):
        return params
    if isinstance(params, BaseModel):
        raise chk.fail("params", f"params is a {type(params).__name__}, not the component's own {model.__name__}")
    try:
        return model.model_validate(dict(params or {}))
    except ValidationError as exc:
        raise chk.fail("params", f"the params given to the check do not validate: {exc}") from None


def _shape(value: Any) -> str:
    return f"shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else f"a {type(value).__name__}"


def _check_tensor(chk: _Checker, check: str, what: str, value: Any, shape: tuple[int, ...],
                  value_range: tuple[float, float] | None = None) -> torch.Tensor:
    chk.expect(isinstance(value, torch.Tensor), check, f"{what} is {_shape(value)}, not a tensor")
    chk.expect(tuple(value.shape) == tuple(shape), check, f"{what} has {_shape(value)}; the contract is {tuple(shape)}")
    chk.expect(value.is_floating_point(), check, f"{what} has dtype {value.dtype}; the contract is a float tensor")
    chk.expect(bool(torch.isfinite(value).all()), "finite", f"{what} holds NaN or Inf values")
    if value_range is not None:
        lo, hi = float(value.detach().min()), float(value.detach().max())
        chk.expect(value_range[0] <= lo and hi <= value_range[1], "range",
                   f"{what} lies in [{lo:.4g}, {hi:.4g}]; the contract is [{value_range[0]:g}, {value_range[1]:g}]")
    return value


def _random_weights(out: torch.Tensor, seed: int = 1) -> torch.Tensor:
    """Fixed random weights for a scalar of ``out``: unlike ``out.sum()``, not blind to normalised outputs."""
    return torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)


def _check_gradients(chk: _Checker, module: torch.nn.Module, what: str) -> None:
    trainable = [(name, p) for name, p in module.named_parameters() if p.requires_grad]
    chk.expect(bool(trainable), "gradients", f"{what} has no trainable parameters (nothing for an optimizer to train)")
    for name, p in trainable:
        chk.expect(p.grad is not None, "gradients",
                   f'no gradient reaches parameter "{name}" from {what}\'s output: is it used in forward, or '
                   "detached (.detach(), .item(), torch.no_grad) on the way?")
        chk.expect(bool(torch.isfinite(p.grad).all()), "gradients", f'the gradient of parameter "{name}" holds NaN or Inf')
        chk.expect(bool(p.grad.abs().sum() > 0), "gradients",
                   f'the gradient of parameter "{name}" is exactly zero: its value cannot change the output')


def _check_input_gradient(chk: _Checker, x: torch.Tensor, what: str) -> None:
    chk.expect(x.grad is not None and bool(torch.isfinite(x.grad).all()) and bool(x.grad.abs().sum() > 0),
               "gradients", f"no finite, non-zero gradient flows back to {what}; the parts before it train through it")


def _expect_raises_capsgan_error(chk: _Checker, build: Callable[[tuple], Any], bad_shapes) -> None:
    for shape in bad_shapes:
        try:
            build(tuple(shape))
        except CapsganError:
            continue
        except Exception as exc:
            raise chk.fail("error messages",
                           f"building it for the image shape {tuple(shape)} raised {type(exc).__name__}: {exc}; "
                           "the contract is a CapsganError (usually capsgan_toolkit.errors.RecipeError) of one clear "
                           "sentence: call capsgan_toolkit.layers.check_image_shape(kind, image_shape) first in "
                           "__init__") from exc
        raise chk.fail("error messages",
                       f"building it for the image shape {tuple(shape)} succeeded; the contract is a CapsganError "
                       "saying the shape is unusable (capsgan_toolkit.layers.check_image_shape raises one)")


def _state_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------- params


def check_params(component: type, params: Mapping[str, Any] | BaseModel | None = None, *,
                 base: type[BaseModel] = Params, descriptions: bool = True) -> BaseModel:
    """Check a component's params model; return the validated params.

    Checks that ``component.Params`` subclasses ``base`` (``Params`` rejects unknown keys), that
    ``params`` (default: every field's default) validate, that they survive the round trips a
    run makes (``model_dump`` -> ``model_validate``; JSON by alias with ``None`` left out, as a
    run folder's recipe.toml stores them; TOML), that an unknown key is rejected, and, with
    ``descriptions``, that every field has a description (``capsgan plugins`` shows it).

    Args:
        component: the component class (its ``Params`` is checked), or a params model.
        params: a dict or a ``Params`` instance; ``None``: the defaults.
        base: the base the params model must subclass (``EncoderParams`` for encoders,
            ``DatasetParams`` for data sets).
        descriptions: require a description on every field.

    Raises:
        ContractViolation: naming the component and what is wrong.
    """
    is_model = isinstance(component, type) and issubclass(component, BaseModel)
    chk = _Checker("check_params", "params model" if is_model else "component", component)
    model = component if is_model else _params_model(component)
    chk.expect(issubclass(model, base), "params",
               f"its Params model {model.__name__} does not subclass {base.__module__}.{base.__name__}")
    p = _validated(chk, model, params)
    round_trips = {"model_dump -> model_validate": lambda: model.model_validate(p.model_dump())}

    def via_json():
        dumped = p.model_dump(mode="json", by_alias=True, exclude_none=True)
        return model.model_validate(json.loads(json.dumps(dumped)))

    def via_toml():
        from capsgan_toolkit.recipe import dumps_toml

        dumped = p.model_dump(mode="json", by_alias=True, exclude_none=True)
        return model.model_validate(tomllib.loads(dumps_toml({"table": dumped}))["table"])

    round_trips["JSON by alias, None left out (recipe.toml of a run)"] = via_json
    round_trips["TOML"] = via_toml
    for name, trip in round_trips.items():
        with chk.running("params round trip", f"the {name} round trip"):
            again = trip()
        chk.expect(again == p, "params round trip",
                   f"the {name} round trip gives {again!r}, not the original {p!r} (a resumed or evaluated run "
                   "would build a different component)")
    try:
        model.model_validate({**p.model_dump(by_alias=True), _UNKNOWN_KEY: 1})
    except ValidationError:
        pass
    else:
        raise chk.fail("params", f'an unknown key ("{_UNKNOWN_KEY}") is accepted; a typo in a recipe must be an '
                       'error: subclass capsgan_toolkit.interfaces.Params (model_config extra="forbid")')
    if descriptions:
        for name, field in model.model_fields.items():
            chk.expect(bool(field.description), "params",
                       f'param "{field.alias or name}" has no description: add Field(..., description="...") '
                       "(capsgan plugins shows it)")
    return p


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
        outputs, states = [], []
        for _ in range(2):
            _seed(seed)
            again = build(shape).train()
            _seed(seed + 1)
            with torch.no_grad():
                outputs.append(again(latent.detach()))
            states.append(again.state_dict())
        chk.expect(_state_equal(*states) and torch.equal(*outputs), "determinism",
                   "two builds under the same seed differ in weights or output: use torch's random numbers only")
    chk.where = ""
    _expect_raises_capsgan_error(chk, build, bad_image_shapes)


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
        outputs, states = [], []
        for _ in range(2):
            _seed(seed)
            again = build(shape).train()
            _seed(seed + 1)
            with torch.no_grad():
                outputs.append(again(images.detach()))
            states.append(again.state_dict())
        chk.expect(_state_equal(*states) and torch.equal(*outputs), "determinism",
                   "two builds under the same seed differ in weights or output: use torch's random numbers only")
    chk.where = ""
    _expect_raises_capsgan_error(chk, build, bad_image_shapes)


# ------------------------------------------------------------------------------- losses


def _scalar(chk: _Checker, value: Any, what: str) -> torch.Tensor:
    chk.expect(isinstance(value, torch.Tensor) and value.dim() == 0, "shape",
               f"{what} is {_shape(value)}; the contract is a scalar tensor (shape ())")
    chk.expect(bool(torch.isfinite(value)), "finite", f"{what} is {float(value.detach())}")
    return value


def _build_loss(chk: _Checker, cls: type, base: type, params) -> torch.nn.Module:
    chk.expect(isinstance(cls, type) and issubclass(cls, base), "base class",
               f"it does not subclass capsgan_toolkit.interfaces.{base.__name__}")
    p = check_params(cls, params)
    with chk.running("build", "building it"):
        return cls(p)


def check_classification_loss(loss_cls: type[ClassificationLoss], params: Mapping[str, Any] | BaseModel | None = None,
                              *, num_classes: int = 10, capsule_dim: int = 6) -> None:
    """Check a classification loss: ``loss(capsules (B, K, D), labels (B,))`` is a finite scalar.

    Also: gradients reach the capsules, finite even at zero-length capsules; it is
    deterministic; it is lower when the true class's capsule is the longest than when
    another class's is; the params round-trip.

    Raises:
        ContractViolation: naming the check and the component.
    """
    chk = _Checker("check_classification_loss", "classification_loss", loss_cls)
    loss = _build_loss(chk, loss_cls, ClassificationLoss, params)
    k, d = num_classes, capsule_dim
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(BATCH) % k
    for name, caps in (("random capsules", torch.randn(BATCH, k, d, generator=gen) * 0.3),
                       ("zero-length capsules", torch.zeros(BATCH, k, d))):
        caps = caps.requires_grad_(True)
        with chk.running("forward", f"the loss of {name}"):
            value = _scalar(chk, loss(caps, labels), f"the loss of {name}")
        with chk.running("gradients", "backward from the loss"):
            value.backward()
        chk.expect(caps.grad is not None and bool(torch.isfinite(caps.grad).all()), "gradients",
                   f"the gradient reaching {name} is missing or not finite")
        again = loss(caps.detach(), labels)
        chk.expect(torch.equal(value.detach(), again.detach()), "determinism", "the same input gives another value")
    direction = torch.full((BATCH, k, d), 0.05 / math.sqrt(d))
    right, wrong = direction.clone(), direction.clone()
    rows = torch.arange(BATCH)
    right[rows, labels] = 0.95 / math.sqrt(d)
    wrong[rows, (labels + 1) % k] = 0.95 / math.sqrt(d)
    good, bad = float(loss(right, labels)), float(loss(wrong, labels))
    chk.expect(good < bad, "direction",
               f"the loss is {good:.4g} when the true class's capsule is the longest and {bad:.4g} when another "
               "class's is; training would not learn to classify")


def check_reconstruction_loss(loss_cls: type[ReconstructionLoss],
                              params: Mapping[str, Any] | BaseModel | None = None, *,
                              image_shape: Sequence[int] = (3, 8, 8), perfect_is_zero: bool = True) -> None:
    """Check a reconstruction loss: ``loss(reconstruction, target)`` over images is a finite scalar.

    Also: a perfect reconstruction costs less than an imperfect one, and (with
    ``perfect_is_zero``; pass ``False`` for a loss with an epsilon such as Charbonnier's) zero;
    gradients reach the reconstruction; deterministic; tensors of different shapes raise an
    error instead of broadcasting into a silently wrong loss; the params round-trip.

    Raises:
        ContractViolation: naming the check and the component.
    """
    chk = _Checker("check_reconstruction_loss", "reconstruction_loss", loss_cls)
    loss = _build_loss(chk, loss_cls, ReconstructionLoss, params)
    gen = torch.Generator().manual_seed(0)
    target = torch.rand(BATCH, *image_shape, generator=gen) * 2 - 1
    recon = (torch.rand(BATCH, *image_shape, generator=gen) * 2 - 1).requires_grad_(True)
    with chk.running("forward", "the loss of a reconstruction"):
        value = _scalar(chk, loss(recon, target), "the loss of a reconstruction")
    chk.expect(float(value.detach()) > 0, "direction",
               f"an imperfect reconstruction costs {float(value.detach())}, not more than zero")
    with chk.running("gradients", "backward from the loss"):
        value.backward()
    chk.expect(recon.grad is not None and bool(torch.isfinite(recon.grad).all()) and bool(recon.grad.abs().sum() > 0),
               "gradients", "no finite, non-zero gradient reaches the reconstruction")
    chk.expect(torch.equal(value.detach(), loss(recon.detach(), target).detach()), "determinism",
               "the same input gives another value")
    perfect = float(loss(target, target.clone()))
    chk.expect(perfect < float(value.detach()), "direction",
               f"a perfect reconstruction costs {perfect}, not less than an imperfect one ({float(value.detach())})")
    if perfect_is_zero:
        chk.expect(abs(perfect) <= 1e-12, "direction", f"a perfect reconstruction costs {perfect}, not zero")
    c = image_shape[0]
    other = torch.rand(BATCH, c + 1, *image_shape[1:], generator=gen) * 2 - 1
    try:
        loss(recon.detach()[:, :1], other)
    except Exception:
        pass
    else:
        raise chk.fail("error messages", f"a reconstruction of shape {(BATCH, 1, *image_shape[1:])} and a target of "
                       f"shape {tuple(other.shape)} give a loss (broadcast); the contract is an error naming both "
                       "shapes (a generator that makes images of the wrong size must not train silently)")


def check_adversarial_loss(loss_cls: type[AdversarialLoss], params: Mapping[str, Any] | BaseModel | None = None) -> None:
    """Check an adversarial loss: ``generator_loss(fake_logits)`` and ``discriminator_loss(real, fake)``.

    Both are finite scalars with finite gradients to their logits, also for extreme logits
    (``±1e4``); the discriminator's loss is lower when it scores real images high and fakes
    low than the other way round; the generator's loss is lower when the fakes fool the
    discriminator; both are deterministic; the params round-trip.

    Raises:
        ContractViolation: naming the check and the component.
    """
    chk = _Checker("check_adversarial_loss", "adversarial_loss", loss_cls)
    loss = _build_loss(chk, loss_cls, AdversarialLoss, params)
    gen = torch.Generator().manual_seed(0)
    for name, scale in (("logits", 1.0), ("extreme logits", 1e4)):
        real = (torch.randn(BATCH, generator=gen) * scale).requires_grad_(True)
        fake = (torch.randn(BATCH, generator=gen) * scale).requires_grad_(True)
        with chk.running("forward", f"the losses of {name}"):
            d_loss = _scalar(chk, loss.discriminator_loss(real, fake), f"discriminator_loss of {name}")
            g_loss = _scalar(chk, loss.generator_loss(fake), f"generator_loss of {name}")
        with chk.running("gradients", "backward from the losses"):
            (d_loss + g_loss).backward()
        chk.expect(all(t.grad is not None and bool(torch.isfinite(t.grad).all()) for t in (real, fake)), "gradients",
                   f"the gradients reaching the {name} are missing or not finite")
        chk.expect(torch.equal(d_loss.detach(), loss.discriminator_loss(real.detach(), fake.detach()).detach()),
                   "determinism", "the same logits give another discriminator loss")
    high, low = torch.full((BATCH,), 3.0), torch.full((BATCH,), -3.0)
    right, wrong = float(loss.discriminator_loss(high, low)), float(loss.discriminator_loss(low, high))
    chk.expect(right < wrong, "direction", f"discriminator_loss is {right:.4g} when real images score high and fakes "
               f"low, and {wrong:.4g} the other way round; the discriminator would learn the wrong thing")
    fooled, caught = float(loss.generator_loss(high)), float(loss.generator_loss(low))
    chk.expect(fooled < caught, "direction", f"generator_loss is {fooled:.4g} when the fakes score as real and "
               f"{caught:.4g} when they score as fake; the generator would learn the wrong thing")


# -------------------------------------------------------------------------------- gates


def _gate_states(count: int = 24) -> list[TrainState]:
    gen = torch.Generator().manual_seed(0)
    fixed = [TrainState(epoch=0, step=0, encoder_acc=0.0, disc_acc=None),
             TrainState(epoch=30, step=10, encoder_acc=0.95, disc_acc=0.3),
             TrainState(epoch=30, step=11, encoder_acc=0.95, disc_acc=0.7),
             TrainState(epoch=31, step=12, encoder_acc=0.9, disc_acc=0.99)]
    walk = [TrainState(epoch=i // 6, step=i, encoder_acc=float(torch.rand(1, generator=gen)),
                       disc_acc=None if i < 2 else float(torch.rand(1, generator=gen))) for i in range(count)]
    return walk + fixed


def check_gate(gate_cls: type[Gate], params: Mapping[str, Any] | BaseModel | None = None) -> None:
    """Check a gate against the contract of :class:`~capsgan_toolkit.interfaces.Gate`.

    ``decide`` returns :class:`~capsgan_toolkit.interfaces.Phases` for a walk of training
    states; it never trains a discriminator the recipe does not have; its ``state_dict``
    survives a checkpoint (``torch.save`` / ``torch.load(weights_only=True)``) and a fresh gate
    given it with ``load_state_dict`` decides exactly as the original from then on (exact
    resume); two gates with the same params decide alike; the params round-trip.

    Raises:
        ContractViolation: naming the check and the component.
    """
    chk = _Checker("check_gate", "gate", gate_cls)
    chk.expect(isinstance(gate_cls, type) and issubclass(gate_cls, Gate), "base class",
               "it does not subclass capsgan_toolkit.interfaces.Gate")
    p = check_params(gate_cls, params)

    def build():
        with chk.running("build", "building it"):
            return gate_cls(p)

    states = _gate_states()
    gate = build()
    decisions = []
    for state in states:
        with chk.running("decide", f"decide({state})"):
            phases = gate.decide(state)
        chk.expect(isinstance(phases, Phases), "decide", f"decide({state}) returned {phases!r}, not a Phases")
        decisions.append(phases)
    other = build()
    chk.expect([other.decide(s) for s in states] == decisions, "determinism",
               "two gates with the same params decide differently on the same training states")
    for cut in (1, 3, len(states) // 2, len(states) - 2):
        original = build()
        for s in states[:cut]:
            original.decide(s)
        with chk.running("state round trip", "state_dict()"):
            state = original.state_dict()
        buffer = io.BytesIO()
        try:
            torch.save(state, buffer)
            buffer.seek(0)
            state = torch.load(buffer, weights_only=True)
        except Exception as exc:
            raise chk.fail("state round trip", f"its state_dict() {state!r} cannot be stored in a checkpoint "
                           f"({type(exc).__name__}: {exc}); use tensors and plain Python values") from exc
        fresh = build()
        with chk.running("state round trip", "load_state_dict(state_dict())"):
            fresh.load_state_dict(state)
        after = [fresh.decide(s) for s in states[cut:]]
        chk.expect(after == [original.decide(s) for s in states[cut:]], "state round trip",
                   f"after {cut} decisions, a fresh gate given the state_dict() decides differently from the "
                   "original: return every piece of state (latches, counters) from state_dict")
    no_d = build()
    for s in states:
        plain = TrainState(epoch=s.epoch, step=s.step, encoder_acc=s.encoder_acc, disc_acc=None,
                           has_discriminator=False)
        phases = no_d.decide(plain)
        chk.expect(isinstance(phases, Phases) and not phases.discriminator, "decide",
                   f"decide({plain}) trains a discriminator the recipe does not have (has_discriminator=False)")


# ----------------------------------------------------------------------------- datasets


def check_dataset(dataset_cls: type[DatasetPlugin], params: Mapping[str, Any] | BaseModel | None = None, *,
                  splits: Sequence[str] = ("train", "test"), items: int = 8) -> None:
    """Check a data set against the contract of :class:`~capsgan_toolkit.interfaces.DatasetPlugin`.

    ``info`` is a :class:`~capsgan_toolkit.interfaces.DatasetInfo` (``num_classes >= 1``, an
    image shape of three positive sizes, no class names or one per class); each split is a
    non-empty ``Dataset`` whose first ``items`` items are ``(float image of info.image_shape in
    [-1, 1], int label in [0, K))`` and batch with a ``DataLoader``; a second instance with the
    same params serves the same items; the params round-trip (base ``DatasetParams``).

    Pass params that keep the data small (few images), and that find its files.

    Raises:
        ContractViolation: naming the check and the component.
    """
    chk = _Checker("check_dataset", "dataset", dataset_cls)
    chk.expect(isinstance(dataset_cls, type) and issubclass(dataset_cls, DatasetPlugin), "base class",
               "it does not subclass capsgan_toolkit.interfaces.DatasetPlugin")
    p = check_params(dataset_cls, params, base=DatasetParams)
    with chk.running("build", "building it"):
        data = dataset_cls(p)
    with chk.running("info", "reading info"):
        info = data.info
    chk.expect(isinstance(info, DatasetInfo), "info", f"info is {info!r}, not a DatasetInfo")
    k, shape = info.num_classes, tuple(info.image_shape)
    chk.expect(isinstance(k, int) and k >= 1, "info", f"info.num_classes is {k!r}")
    chk.expect(len(shape) == 3 and all(isinstance(s, int) and s >= 1 for s in shape), "info",
               f"info.image_shape is {shape!r}; the contract is (C, H, W) of positive ints")
    chk.expect(len(info.class_names) in (0, k), "info",
               f"info.class_names has {len(info.class_names)} names for {k} classes")
    with chk.running("determinism", "building a second instance"):
        twin = dataset_cls(p)
    for name in splits:
        chk.where = f'split "{name}"'
        with chk.running("split", f'split("{name}")'):
            split = data.split(name)
        with chk.running("split", "len(split)"):
            n = len(split)
        chk.expect(n >= 1, "split", "the split is empty")
        for i in range(min(items, n)):
            with chk.running("items", f"reading item {i}"):
                item = split[i]
            chk.expect(isinstance(item, (tuple, list)) and len(item) == 2, "items",
                       f"item {i} is {type(item).__name__}; the contract is a pair (image, label)")
            image, label = item
            _check_tensor(chk, "items", f"the image of item {i}", image, shape, (-1.0, 1.0))
            label = int(label.item()) if isinstance(label, torch.Tensor) and label.numel() == 1 else label
            chk.expect(isinstance(label, int) and not isinstance(label, bool) and 0 <= label < k, "items",
                       f"the label of item {i} is {label!r}; the contract is an int in [0, {k})")
        with chk.running("items", "batching the split with a DataLoader"):
            images, labels = next(iter(torch.utils.data.DataLoader(split, batch_size=min(4, n))))
        chk.expect(tuple(images.shape) == (min(4, n), *shape) and labels.shape == (min(4, n),), "items",
                   f"a DataLoader batch has images of {_shape(images)} and labels of {_shape(labels)}")
        first = twin.split(name)[0]
        chk.expect(torch.equal(first[0], split[0][0]) and int(first[1]) == int(split[0][1]), "determinism",
                   "two instances with the same params serve different items: derive all randomness from params")


# --------------------------------------------------------------------------- objectives

_KIT_PARTS: dict[str, dict[str, Any]] = {
    "encoder": {"plugin": "cnn", "channels": 4, "capsule_dim": 4, "latent": "true_class"},
    "generator": {"plugin": "dcgan", "base_channels": 4},
    "discriminator": {"plugin": "dcgan", "base_channels": 4},
    "losses.classification": {"plugin": "margin"},
    "losses.reconstruction": {"plugin": "mse"},
    "losses.adversarial": {"plugin": "minimax"},
}
"""Built-in parts :func:`check_objective` puts around an objective, per recipe key (tiny widths)."""


def _kit_recipe(objective: dict[str, Any], parts: Mapping[str, Mapping[str, Any] | None], steps: int) -> dict:
    recipe: dict[str, Any] = {
        "run": {"name": "capsgan-kit", "seed": 0, "epochs": 1, "device": "cpu", "steps_per_epoch": steps,
                "log_every": 1, "eval_batches": 1, "val_fraction": 0.0},
        "data": {"plugin": "glyphs", "image_size": 28, "channels": 1, "num_train": 40, "num_test": 20,
                 "batch_size": 8, "noise": 0.0},
        "objective": objective,
        "gate": {"plugin": "always"},
        "checkpoint": {"every_epochs": 0, "keep_last": 1},
        "output": {"sample_images": 4},
        "eval": {"metrics": ["acc"], "prior_images": 40},
    }
    for key, table in parts.items():
        if table is None:
            continue
        node = recipe
        *outer, last = key.split(".")
        for part in outer:
            node = node.setdefault(part, {})
        node[last] = dict(table)
    if "losses" in recipe:
        recipe["losses"].setdefault("generator_weight", 1.0)
    return recipe


def check_objective(objective_cls: type, params: Mapping[str, Any] | None = None, *,
                    parts: Mapping[str, Mapping[str, Any] | None] | None = None,
                    sets: Sequence[str] = (), steps: int = 2) -> None:
    """Check an objective by training it: a tiny recipe, the engine's contract checks, ``steps`` steps.

    The recipe uses the glyphs data set (28x28 grey, 10 classes) and, for each recipe key the
    objective declares in ``parts``, a tiny built-in (:data:`_KIT_PARTS`: ``cnn`` encoder,
    ``dcgan`` generator and discriminator, ``margin``/``mse``/``minimax`` losses). It checks that
    the recipe validates; :func:`capsgan_toolkit.build.build` with its contract checks
    (:func:`~capsgan_toolkit.build.check_contracts`) passes; ``optimizer_parameters()`` names
    exactly the declared ``optimizers``; training ``steps`` steps in a temporary run folder
    writes finite losses, changes the weights of every optimizer's parameters and a final
    checkpoint; a second run with the same seed logs the same losses; and what the objective
    says it can do works: ``classify`` gives finite ``(B, K)`` scores, ``reconstruct`` and
    ``generate`` images of the data set's shape in ``[-1, 1]``, ``generate`` the same images
    for the same ``torch.Generator`` seed.

    Args:
        objective_cls: the objective class. It need not be registered: an unregistered class
            is registered for the check under the name ``kit_objective``.
        params: its params (its ``[objective]`` table); ``None``: the defaults.
        parts: recipe tables to use instead of the built-ins, by recipe key
            (``{"encoder": {"plugin": "capsnet", ...}}``); ``None`` as a value leaves a key out.
        sets: ``--set`` style overrides applied to the tiny recipe last.
        steps: training steps.

    Raises:
        ContractViolation: naming the check and the component.
    """
    from capsgan_toolkit.build import build
    from capsgan_toolkit.objective import PART_KEYS, Objective
    from capsgan_toolkit.plugin_manager import load_plugins
    from capsgan_toolkit.recipe import apply_overrides, resolve

    chk = _Checker("check_objective", "objective", objective_cls)
    chk.expect(isinstance(objective_cls, type) and issubclass(objective_cls, Objective), "base class",
               "it does not subclass capsgan_toolkit.objective.Objective")
    p = check_params(objective_cls, params)
    declared = dict(objective_cls.parts)
    unknown = sorted(set(declared) - set(PART_KEYS))
    chk.expect(not unknown, "declaration", f"parts names {unknown}; the recipe keys are {', '.join(PART_KEYS)}")
    chk.expect(bool(objective_cls.optimizers), "declaration", "optimizers is empty: name at least one optimizer")
    plugins = load_plugins()
    registry = plugins.registry
    name = next((registry.recipe_name(c) for c in registry.components("objective") if c.cls is objective_cls), None)
    if name is None:
        registry.current_source = "capsgan_toolkit.testing"
        try:
            with chk.running("register", "registering it"):
                registry.register("objective", "kit_objective", objective_cls)
        finally:
            registry.current_source = "<unknown>"
        name = "kit_objective"
    tables = {key: _KIT_PARTS[key] for key in declared}
    tables.update(parts or {})
    objective_table = {"plugin": name, **p.model_dump(mode="json", by_alias=True, exclude_none=True)}

    def fit(run_dir: Path):
        from capsgan_toolkit.trainer import Trainer

        data = _kit_recipe(objective_table, tables, steps)
        apply_overrides(data, list(sets))
        try:
            resolved = resolve(data, registry, source="the check_objective recipe")
        except CapsganError as exc:
            raise chk.fail("recipe", f"the tiny recipe around it does not validate (pass parts= or sets= to "
                           f"adapt it): {exc}") from None
        with chk.running("contracts", "building the recipe (with the engine's contract checks)"):
            built = build(resolved, plugins)
        objective = built.objective
        with chk.running("optimizers", "optimizer_parameters()"):
            groups = objective.optimizer_parameters()
        chk.expect(set(groups) == set(objective_cls.optimizers), "optimizers",
                   f"optimizer_parameters() names {sorted(groups)}; optimizers declares "
                   f"{sorted(objective_cls.optimizers)}")
        owned = {id(t) for m in objective.modules().values() for t in m.parameters()}
        for group, tensors in groups.items():
            chk.expect(all(id(t) in owned for t in tensors), "optimizers",
                       f'optimizer "{group}" steps parameters of no model in modules()')
        before = {group: [t.detach().clone() for t in tensors] for group, tensors in groups.items()}
        (run_dir / "checkpoints").mkdir(parents=True)
        with chk.running("training", f"training {steps} steps"):
            trainer = Trainer(resolved, plugins, run_dir, built=built)
            trainer.monitor.plot = lambda *args, **kwargs: None  # the loss-curve picture: slow, and not the objective's
            summary = trainer.fit()
        chk.expect(summary.get("steps") == steps, "training", f"the run made {summary.get('steps')} steps, not {steps}")
        chk.expect((run_dir / "checkpoints" / "final.pt").is_file(), "training", "no final checkpoint was written")
        for group, tensors in groups.items():
            if tensors:
                changed = any(not torch.equal(a, t.detach()) for a, t in zip(before[group], tensors))
                chk.expect(changed, "training", f'{steps} steps changed no parameter of optimizer "{group}": does '
                           "step() call update(...) with a loss that depends on them?")
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        train = [r for r in rows if r.get("kind") == "train"]
        chk.expect(len(train) == steps, "training", f"metrics.jsonl has {len(train)} training rows for {steps} steps")
        losses = [{k: v for k, v in r.items() if k.startswith("loss_")} for r in train]
        chk.expect(all(losses), "training", "step() reports no loss (StepResult.values is empty)")
        for row in losses:
            for key, value in row.items():
                chk.expect(isinstance(value, (int, float)) and math.isfinite(value), "finite", f"{key} is {value!r}")
        return built, losses

    with tempfile.TemporaryDirectory(prefix="capsgan-kit-") as tmp:
        built, losses = fit(Path(tmp) / "a")
        _, again = fit(Path(tmp) / "b")
    chk.expect(losses == again, "determinism", f"two runs with the same seed log different losses: {losses} and "
               f"{again}; draw random numbers from torch only and never from a fresh, unseeded generator")
    _check_trained_objective(chk, built)


def _check_trained_objective(chk: _Checker, built) -> None:
    objective, info = built.objective, built.info
    shape, k = tuple(info.image_shape), info.num_classes
    split = built.dataset.split("test")
    images = torch.stack([split[i][0] for i in range(BATCH)])
    objective.eval()
    with torch.no_grad():
        if objective.has_classifier:
            with chk.running("classify", "classify(images)"):
                scores = objective.classify(images)
            _check_tensor(chk, "classify", "classify(images)", scores, (BATCH, k))
        if objective.has_reconstruction:
            with chk.running("reconstruct", "reconstruct(images)"):
                recon = objective.reconstruct(images)
            _check_tensor(chk, "reconstruct", "reconstruct(images)", recon, (BATCH, *shape), (-1.0, 1.0))
        if objective.has_generation:
            with chk.running("generate", "prepare_generation(...)"):
                objective.prepare_generation(built.dataset.split("train"), limit=40, seed=0, batch_size=20,
                                             device=torch.device("cpu"))
            classes = torch.arange(BATCH) % k
            outs = []
            for _ in range(2):
                with chk.running("generate", "generate(classes, generator)"):
                    outs.append(objective.generate(classes, torch.Generator().manual_seed(5)))
            _check_tensor(chk, "generate", "generate(classes, generator)", outs[0], (BATCH, *shape), (-1.0, 1.0))
            chk.expect(torch.equal(outs[0], outs[1]), "determinism",
                       "generate gives different images for the same torch.Generator seed: draw the noise from it")


# ---------------------------------------------------------------------------- by family

CHECKS: dict[str, Callable[..., Any]] = {
    "objective": check_objective,
    "encoder": check_encoder,
    "generator": check_generator,
    "discriminator": check_discriminator,
    "classification_loss": check_classification_loss,
    "reconstruction_loss": check_reconstruction_loss,
    "adversarial_loss": check_adversarial_loss,
    "gate": check_gate,
    "dataset": check_dataset,
}
"""The check of each family (``metric_features`` has none yet)."""


def check_component(family: str, cls: type, params: Mapping[str, Any] | BaseModel | None = None, **options: Any):
    """Run the check of ``family`` (a key of :data:`CHECKS`) on ``cls`` with ``params`` and ``options``."""
    if family not in CHECKS:
        raise ValueError(f'capsgan_toolkit.testing has no check for family "{family}"; '
                         f"it checks: {', '.join(CHECKS)}.")
    return CHECKS[family](cls, params, **options)
